"""The 8-task CLIP suites on a tiny random CLIP and tiny fake datasets laid out as a hub mirror.

Every Hub id of ``clip-vit-b32-ta8`` (θ_pre, the eight FusionBench experts, the eight datasets) is
a directory under ``$MERGEARENA_HUB_MIRROR``, so the suite runs its real loading code offline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from tiny_hub import perturbed, save_image_dataset, save_tiny_clip, save_tiny_clip_vision, tiny_clip_tokenizer

from bench.executors.local import run_local
from bench.plan import build_plan
from bench.registry import suites
from bench.store import Store
from bench.suite import MissingAssetError
from bench.weights import CheckpointError, save_state
from tasks.clip_ta8 import DATASETS, TASKS, ClipViTB32TA8, class_prompts, open_clip_body, task_prompts

MODEL = "clip-vit-base-patch32"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.CLIPModel, dict]:
    """(mirror root, θ_pre CLIPModel, {task: expert vision state}); odd experts are saved in the flat layout."""
    root = tmp_path_factory.mktemp("hub")
    clip = save_tiny_clip(root / "openai" / MODEL)
    vision = {k: v.clone() for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    experts = {}
    for i, task in enumerate(TASKS):
        experts[task] = perturbed(vision, seed=i + 1)
        save_tiny_clip_vision(root / "tanganke" / f"{MODEL}_{task}", experts[task], flat=i % 2 == 1)
        save_image_dataset(root / DATASETS[task].path, class_prompts(task)[0], seed=i,
                           mode="L" if task == "mnist" else "RGB")
    return root, clip, experts


@pytest.fixture()
def suite(mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClipViTB32TA8:
    monkeypatch.setenv("MERGEARENA_HUB_MIRROR", str(mirror[0]))
    monkeypatch.setenv("MERGEARENA_OFFLINE", "1")
    return ClipViTB32TA8(cache_dir=tmp_path / "cache")


def test_suites_are_registered_with_eight_tasks_in_protocol_order() -> None:
    for name in ("clip-vit-b32-ta8", "clip-vit-l14-ta8"):
        assert suites.get(name).name == name
    assert TASKS == ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    sizes = {t: len(class_prompts(t)[0]) for t in TASKS}
    assert sizes == {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
                     "mnist": 10, "dtd": 47}
    assert all("{c}" in tpl for t in TASKS for tpl in task_prompts()[t]["templates"])


def test_body_is_the_vision_tower_and_experts_of_both_layouts_load_onto_its_keys(suite, mirror) -> None:
    _, clip, experts = mirror
    body = suite.pretrained()
    assert set(body) == {k for k in clip.state_dict() if k.startswith("vision_model.")}
    assert not any(k.startswith(("text_model.", "visual_projection", "text_projection")) for k in body)
    for task in ("sun397", "stanford-cars"):  # transformers-4 layout, then flat transformers-5 layout
        loaded = suite.expert(task).body
        assert set(loaded) == set(body)
        assert all(torch.equal(loaded[k], experts[task][k]) for k in body)


def test_zero_shot_head_is_the_renormalised_mean_of_normalised_template_embeddings(suite, mirror) -> None:
    _, clip, _ = mirror
    tokenizer = tiny_clip_tokenizer()
    classnames, templates = class_prompts("dtd")  # 8 templates per class
    expected = []
    with torch.no_grad():
        for c in classnames[:5]:  # one class per batch, as FusionBench's HFCLIPClassifier does
            tokens = tokenizer([t.replace("{c}", c) for t in templates], padding=True, return_tensors="pt")
            e = clip.text_projection(clip.text_model(**tokens).pooler_output)
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(0)
            expected.append(e / e.norm())
    head = suite.expert("dtd").head
    torch.testing.assert_close(head["class_embeddings"][:5], torch.stack(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head["logit_scale"], clip.logit_scale.detach().exp().reshape(1))
    torch.testing.assert_close(head["visual_projection"], clip.visual_projection.weight.detach())


def test_task_model_logits_equal_transformers_clip_logits_for_a_single_template_task(suite, mirror) -> None:
    """MNIST has one template, so its head is exactly CLIPModel's text embeddings of the 10 prompts."""
    _, clip, _ = mirror
    batch = next(suite.batches("mnist", "test", batch_size=4))
    classnames, (template,) = class_prompts("mnist")
    tokens = tiny_clip_tokenizer()([template.replace("{c}", c) for c in classnames], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=batch.inputs["pixel_values"]).logits_per_image
        got = suite.task_model(suite.pretrained(), suite.head("mnist"), "mnist")(**batch.inputs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert batch.inputs["pixel_values"].shape == (4, 3, 16, 16)  # grayscale converted to RGB, 16x16 crop


def test_harness_protects_merges_and_evaluates_all_eight_tasks(suite) -> None:
    plan = build_plan(suite, defense="params,mergelock", attack="none", merge="ta", victims=["eurosat"],
                      partners="rest")
    store = Store(suite.cache_dir / "results.sqlite")
    summary = run_local(suite, store, plan.cells, run_id="clip-test", log=lambda _: None)
    records = store.cells(suite="clip-vit-b32-ta8")
    assert summary.failed == 0 and {r.status for r in records} == {"ok"}, [r.reason for r in records]
    merged = {r.defense: r for r in records if r.kind == "merge"}
    assert set(merged) == {"none", "counterfactual", "params", "mergelock"}
    for name in ("none", "params", "mergelock"):
        assert {m.task for m in merged[name].metrics if m.role == "merged"} == set(TASKS)
    assert {m.task for m in merged["counterfactual"].metrics} == {"eurosat"}  # θ_pre in the victim's slot
    baseline = next(r for r in records if r.kind == "baseline")
    for name in ("params", "mergelock"):  # function-preserving on the vision tower...
        assert merged[name].provenance["flags"]["function_preservation"]["ok"]
        assert merged[name].value("utility") == baseline.value("expert")
        # ...yet the release is a different body, so the merge is a different model
        assert merged[name].provenance["hashes"]["artifact"] != merged["none"].provenance["hashes"]["filling"]
    assert 0.0 <= baseline.value("pretrained") <= 1.0 and 0.0 <= baseline.value("expert") <= 1.0


def test_finetune_raises_naming_the_checkpoints_but_refinetunes_the_vision_tower_when_given_steps(suite) -> None:
    with pytest.raises(MissingAssetError, match=f"tanganke/{MODEL}_gtsrb"):
        suite.finetune("gtsrb", suite.pretrained())
    expert = suite.expert("gtsrb")
    tuned = suite.finetune("gtsrb", expert.body, expert.head, steps=2)
    assert set(tuned.body) == set(expert.body)
    assert any(not torch.equal(tuned.body[k], expert.body[k]) for k in expert.body)
    assert all(torch.equal(tuned.head[k], expert.head[k]) for k in expert.head)  # the zero-shot head stays fixed


def test_missing_checkpoint_offline_names_the_hub_id_and_the_mirror(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MERGEARENA_HUB_MIRROR", str(tmp_path / "empty"))
    monkeypatch.setenv("MERGEARENA_OFFLINE", "1")
    suite = ClipViTB32TA8(cache_dir=tmp_path)
    with pytest.raises(MissingAssetError, match=r"openai/clip-vit-base-patch32.*MERGEARENA_HUB_MIRROR"):
        suite.arch_map()


def test_missing_dataset_offline_names_the_dataset_id(suite, tmp_path) -> None:
    suite.datasets["dtd"] = type(suite.datasets["dtd"])("nobody/no-such-dataset")
    with pytest.raises(MissingAssetError, match="nobody/no-such-dataset"):
        next(suite.batches("dtd", "test"))


def test_local_directories_replace_hub_ids(mirror, tmp_path, monkeypatch) -> None:
    root, _, experts = mirror
    monkeypatch.delenv("MERGEARENA_HUB_MIRROR", raising=False)
    monkeypatch.setenv("MERGEARENA_OFFLINE", "1")
    suite = ClipViTB32TA8(cache_dir=tmp_path, pretrained=str(root / "openai" / MODEL),
                          experts=str(root / "tanganke" / (MODEL + "_{task}")),
                          datasets={t: str(root / DATASETS[t].path) for t in TASKS})
    assert torch.equal(suite.expert("svhn").body["vision_model.post_layernorm.weight"],
                       experts["svhn"]["vision_model.post_layernorm.weight"])
    assert len(list(suite.batches("svhn", "train", batch_size=4))) == 2


def test_dataset_whose_classes_differ_from_the_class_list_is_rejected(suite, tmp_path) -> None:
    save_image_dataset(tmp_path / "eurosat-5", [f"c{i}" for i in range(5)])
    suite.datasets["eurosat"] = type(suite.datasets["eurosat"])(str(tmp_path / "eurosat-5"))
    with pytest.raises(CheckpointError, match="5 classes but the task's class list has 10"):
        suite.dataset("eurosat", "test")


def test_open_clip_body_is_read_from_a_task_vectors_state_dict_without_open_clip(tmp_path) -> None:
    from bench.families.tiny import tiny

    _, tower = tiny("open-clip-vit")
    path = tmp_path / "finetuned.safetensors"
    save_state({"model.visual." + k: v for k, v in tower.items()}, path)  # task_vectors' ImageEncoder keys
    from bench.weights import load_state

    body = open_clip_body(load_state(path))
    assert set(body) == set(tower) and all(torch.equal(body[k], tower[k]) for k in tower)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed here")
def test_open_clip_lineage_without_open_clip_says_how_to_install_it(tmp_path) -> None:
    suite = ClipViTB32TA8(cache_dir=tmp_path, lineage="open_clip")
    with pytest.raises(MissingAssetError, match=r"mergearena\[clip\]"):
        suite.pretrained()
    assert suite.reference_table().name == "clip-vit-b32-ta8.open_clip.json"


def test_unknown_lineage_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown CLIP checkpoint lineage 'laion'"):
        ClipViTB32TA8(cache_dir=tmp_path, lineage="laion")
