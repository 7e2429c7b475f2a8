"""``sd15-styles`` and the ``unet`` family on a tiny random SD pipeline saved in diffusers layout.

θ_pre (UNet, VAE, CLIP text encoder, tokenizer, DDIM scheduler), two style experts (a pipeline
directory with ``unet/`` and a bare UNet directory), a tiny CLIP scorer and a caption dataset are
written to tmp dirs and loaded through the suite's real loading code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_hub import (
    perturbed,
    save_caption_dataset,
    save_tiny_clip,
    save_tiny_sd,
    save_unet_expert,
    tiny_unet,
)

from bench.executors.local import run_local
from bench.families.base import ATTENTION, GATED_MLP, get_qkv
from bench.families.unet import SplitGEGLU, UNetFamily
from bench.plan import build_plan
from bench.registry import families, suites
from bench.store import Store
from bench.suite import MissingAssetError


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd")
    unet = save_tiny_sd(root / "sd15")
    save_tiny_clip(root / "scorer")
    save_unet_expert(root / "style-a", perturbed(unet.state_dict(), 1, 0.02))
    save_unet_expert(root / "style-b", perturbed(unet.state_dict(), 2, 0.02), bare=True)
    save_caption_dataset(root / "captions")
    return root


@pytest.fixture()
def suite(sd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tasks.sd15_styles import SD15Styles, StyleTask

    monkeypatch.setenv("MERGEARENA_OFFLINE", "1")
    tasks = {"style-a": StyleTask(str(sd_root / "style-a"), "style a", data=str(sd_root / "captions")),
             "style-b": StyleTask(str(sd_root / "style-b"), "style b")}
    return SD15Styles(cache_dir=tmp_path / "cache", base=str(sd_root / "sd15"), scorer=str(sd_root / "scorer"),
                      tasks=tasks, steps=2, resolution=16, subjects=("a cat", "a house"))


def probe(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 700]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}


# ---------------------------------------------------------------- the unet family


def test_unet_family_splits_geglu_without_changing_the_unet_function() -> None:
    unet = tiny_unet(seed=3)
    family = UNetFamily(unet.config)
    body = family.to_body(unet.state_dict())
    assert not any(".ff.net.0.proj." in k for k in body) and any(".ff.net.0.gate.weight" in k for k in body)
    module = family.build(body)
    assert isinstance(module.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0], SplitGEGLU)
    x = probe()
    with torch.no_grad():
        want = unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
        got = module(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    back = family.to_diffusers(body)
    assert set(back) == set(unet.state_dict()) and all(torch.equal(back[k], unet.state_dict()[k]) for k in back)


def test_unet_map_exposes_self_attention_and_geglu_as_gated_mlp_per_transformer_block() -> None:
    unet = tiny_unet()
    family = families.get("unet")(unet.config)
    amap = family.arch_map()
    assert len(amap.layers) == 4  # down 1 + mid 1 + up 2 transformer blocks
    assert {ATTENTION, GATED_MLP} <= amap.features
    body = family.to_body(unet.state_dict())
    for layer in amap.layers:
        att, mlp = layer.attention, layer.mlp
        assert ".attn1." in att.q and ".attn2." not in (att.k + att.v)  # cross-attention is not exposed
        q, k, v, _ = get_qkv(body, att)
        assert q.shape == k.shape == v.shape == (att.num_heads * att.head_dim,) * 2  # K/V read hidden states
        assert body[mlp.up].shape == body[mlp.gate].shape and body[mlp.down].shape[1] == body[mlp.up].shape[0]
        assert mlp.activation == "gelu" and amap.layer_of(layer.prefix + "attn2.to_k.weight") == layer.index
    # the GEGLU rows: up = first half of the fused projection, gate = second half (diffusers' chunk order)
    fused = unet.state_dict()[amap.layers[0].prefix + "ff.net.0.proj.weight"]
    assert torch.equal(body[amap.layers[0].mlp.up], fused[: fused.shape[0] // 2])
    assert torch.equal(body[amap.layers[0].mlp.gate], fused[fused.shape[0] // 2:])


def test_params_defense_on_the_unet_map_keeps_the_unet_output() -> None:
    from bench.plugins import DefenseContext
    from bench.suite import Expert
    from defenses.params import PaRaMS

    unet = tiny_unet()
    family = UNetFamily(unet.config)
    base = family.to_body(unet.state_dict())
    expert = perturbed(base, seed=5, scale=0.02)
    ctx = DefenseContext(suite=None, task="style", base=base, arch=family.arch_map(), family=family, seed=0)
    art = PaRaMS().protect(Expert(expert, {}), ctx)
    changed = [k for k in expert if not torch.equal(expert[k], art.state[k])]
    assert any(".ff.net.0.up." in k for k in changed) and any(".attn1.to_q." in k for k in changed)
    assert not any(".attn2." in k for k in changed)
    x = probe(1)
    with torch.no_grad():
        want = family.build(expert)(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
        got = family.build(art)(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the suite


def test_suite_is_registered() -> None:
    assert suites.get("sd15-styles").name == "sd15-styles"


def test_evaluate_generates_seeded_images_scores_them_and_saves_a_grid(suite) -> None:
    expert = suite.expert("style-a")
    first = suite.evaluate(expert.body, expert.head, "style-a")
    assert set(first) == {"clip_score", "style_score"}
    assert all(0.0 <= v <= 100.0 for v in first.values())
    assert suite.evaluate(expert.body, expert.head, "style-a") == first  # fixed prompts and seeds
    assert suite.evaluate(suite.pretrained(), {}, "style-a") != first  # a different UNet draws differently
    from PIL import Image

    grid = Image.open(suite.grid_path(expert.body, "style-a"))
    assert grid.size == (2 * 16, 16)  # one 16-pixel image per prompt, side by side


def test_clip_score_is_torchmetrics_definition_on_the_scorer(suite) -> None:
    from tasks.sd15_styles import clip_score

    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    assert clip_score(a, b).tolist() == [100.0, 0.0]  # 100·cos, negative similarity clipped to 0
    images = suite.generate(suite.pretrained(), "style-b")
    scores = suite.clip_scores(images, suite.prompts("style-b"))
    assert scores.shape == (2,) and float(scores.min()) >= 0.0


def test_both_expert_layouts_load_as_unet_bodies(suite, sd_root) -> None:
    from tasks.sd15_styles import unet_weights

    for task in ("style-a", "style-b"):
        body = suite.expert(task).body
        assert set(body) == set(suite.pretrained())
        raw = unet_weights(sd_root / task)
        fused = suite.family().to_diffusers(body)
        assert all(torch.equal(fused[k], raw[k]) for k in raw)


def test_harness_run_with_a_function_preserving_defense_keeps_the_unet_output(suite) -> None:
    plan = build_plan(suite, defense="params", attack="none", merge="ta", victims=["style-a"], partners="rest")
    store = Store(suite.cache_dir / "results.sqlite")
    summary = run_local(suite, store, plan.cells, run_id="sd-test", log=lambda _: None)
    records = store.cells(suite="sd15-styles")
    assert summary.failed == 0 and {r.status for r in records} == {"ok"}, [r.reason for r in records]
    protected = next(r for r in records if r.kind == "merge" and r.defense == "params")
    check = protected.provenance["flags"]["function_preservation"]
    assert check["ok"] and check["max_abs_diff"] < 1e-4
    assert {m.task for m in protected.metrics if m.role == "merged"} == {"style-a", "style-b"}
    baseline = next(r for r in records if r.kind == "baseline")
    # same denoiser function, same seeds: the protected release draws the expert's images
    assert protected.value("utility", metric="clip_score") == pytest.approx(
        baseline.value("expert", metric="clip_score"), abs=1e-3)


def test_probe_batches_target_the_noise_of_a_zero_latent(suite) -> None:
    batch = next(suite.batches("style-a", "test", batch_size=2))
    scheduler = suite._components["train_scheduler"]
    t = batch.inputs["timestep"]
    alpha_bar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(batch.inputs["sample"], (1 - alpha_bar).sqrt() * batch.labels)
    assert batch.inputs["encoder_hidden_states"].shape == (2, 77, 32)


def test_finetune_raises_naming_the_checkpoint_and_trains_the_unet_on_caption_data(suite, sd_root) -> None:
    with pytest.raises(MissingAssetError, match="style-a"):
        suite.finetune("style-a", suite.pretrained())
    expert = suite.expert("style-a")
    tuned = suite.finetune("style-a", expert.body, {}, steps=1)
    assert any(not torch.equal(tuned.body[k], expert.body[k]) for k in expert.body)
    with pytest.raises(MissingAssetError, match="style style-b has no training data"):
        next(suite.batches("style-b", "train"))


def test_missing_base_offline_names_the_hub_id(tmp_path, monkeypatch) -> None:
    from tasks.sd15_styles import SD15Styles

    monkeypatch.setenv("MERGEARENA_OFFLINE", "1")
    monkeypatch.delenv("MERGEARENA_HUB_MIRROR", raising=False)
    with pytest.raises(MissingAssetError, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
        SD15Styles(cache_dir=tmp_path).arch_map()


def test_tasks_from_the_environment_and_bad_task_specs(tmp_path, monkeypatch) -> None:
    from tasks.sd15_styles import SD15Styles

    monkeypatch.setenv("MERGEARENA_SD15_TASKS", '{"naruto": {"model": "me/sd15-naruto", "style": "naruto style"}}')
    suite = SD15Styles(cache_dir=tmp_path)
    assert suite.tasks == ("naruto",) and suite.prompts("naruto")[0].endswith(", naruto style")
    with pytest.raises(ValueError, match="needs 'model' and 'style'"):
        SD15Styles(cache_dir=tmp_path, tasks={"x": {"model": "m"}})
