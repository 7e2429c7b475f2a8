"""`bench.protect.protect_checkpoint` on tiny BERT Hugging Face directories written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from bench.no_data import DataRequiredError
from bench.plugins import Defense
from bench.protect import protect_checkpoint
from bench.registry import defenses, suites
from bench.weights import CheckpointError, load_state, save_state, state_hash
from tasks.jsonl_text import read_jsonl

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "fine", "bad", "awful", "poor", "movie", "plot"]


def tiny_config(**overrides) -> transformers.BertConfig:
    sizes = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return transformers.BertConfig(**{**sizes, **overrides})


def perturbed(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for fine-tuning: move every floating parameter a little, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def save_tokenizer(path: Path) -> None:
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(str(path))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """θ_pre as a bare BertModel directory; experts as a BertModel and a BertForSequenceClassification directory."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    base = transformers.BertModel(tiny_config())
    base.save_pretrained(str(root / "base"))
    expert = transformers.BertModel(tiny_config())
    expert.load_state_dict(base.state_dict())
    perturbed(expert, 1)
    expert.save_pretrained(str(root / "expert"))
    save_tokenizer(root / "expert")
    classifier = transformers.BertForSequenceClassification(tiny_config())
    classifier.bert.load_state_dict(base.state_dict())
    perturbed(classifier, 2)
    classifier.save_pretrained(str(root / "classifier"))
    save_tokenizer(root / "classifier")
    return {"base": root / "base", "expert": root / "expert", "classifier": root / "classifier"}


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 11, 3, 0], [2, 9, 12, 10, 3]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@torch.no_grad()
def hidden(model_dir: Path) -> torch.Tensor:
    return transformers.BertModel.from_pretrained(str(model_dir)).eval()(**inputs()).last_hidden_state


@torch.no_grad()
def logits(model_dir: Path) -> torch.Tensor:
    return transformers.BertForSequenceClassification.from_pretrained(str(model_dir)).eval()(**inputs()).logits


def test_none_defense_writes_a_transformers_loadable_copy_with_a_note(dirs, tmp_path):
    out = tmp_path / "released"
    note = protect_checkpoint("none", dirs["expert"], dirs["base"], out, {})
    assert torch.equal(hidden(out), hidden(dirs["expert"]))
    assert note["input_hash"] == note["output_hash"] == state_hash(load_state(out / "model.safetensors"))
    assert note["changed_tensors"] == [] and note["family"] == "bert" and note["key_prefix"] == ""
    written = json.loads((out / "protection.json").read_text())
    assert written["spec"] == {"name": "none", "version": "1", "params": {}}
    assert written["input_hash"] == note["input_hash"] and written["date"]
    assert {"config.json", "tokenizer_config.json"} <= {f.name for f in out.iterdir()}


def test_params_keeps_the_prefix_and_the_classifier_and_preserves_logits(dirs, tmp_path):
    out = tmp_path / "released"
    note = protect_checkpoint("params", dirs["classifier"], dirs["base"], out, {"high": "4"}, seed=3)
    original, released = load_state(dirs["classifier"] / "model.safetensors"), load_state(out / "model.safetensors")
    assert set(released) == set(original)  # same keys, "bert." prefix kept
    assert note["key_prefix"] == "bert."
    assert torch.equal(released["classifier.weight"], original["classifier.weight"])
    assert torch.equal(released["bert.pooler.dense.weight"], original["bert.pooler.dense.weight"])
    assert len(note["changed_tensors"]) > 0 and note["relative_l2_change"] > 0.1
    assert torch.allclose(logits(out), logits(dirs["classifier"]), atol=1e-4, rtol=1e-4)
    assert note["spec"]["params"]["high"] == 4.0 and note["output_hash"] != note["input_hash"]


def test_a_data_defense_without_data_names_the_data_option(dirs, tmp_path):
    with pytest.raises(DataRequiredError, match="--data FILE.jsonl"):
        protect_checkpoint("mergeguard-stage2", dirs["expert"], dirs["base"], tmp_path / "out", {})


def write_jsonl(path: Path) -> Path:
    rows = [
        {"text": f"{a} {b}", "label": "pos" if a in ("good", "great", "fine") else "neg"}
        for a in ("good", "great", "fine", "bad", "awful", "poor")
        for b in ("movie", "plot")
    ] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mergeguard_stage2_with_jsonl_data_negates_toward_the_base(dirs, tmp_path):
    data = write_jsonl(tmp_path / "reviews.jsonl")
    out = tmp_path / "released"
    note = protect_checkpoint(
        "mergeguard-stage2", dirs["expert"], dirs["base"], out, {"heldout_samples": "16"}, data=data
    )
    released, expert, base = (load_state(d / "model.safetensors") for d in (out, dirs["expert"], dirs["base"]))
    moved = 0
    for k in note["changed_tensors"]:
        diff = released[k] != expert[k]
        assert torch.equal(released[k][diff], base[k][diff])  # β = 1: the negated entries are θ_pre's
        moved += int(diff.sum())
    assert moved == note["defense_notes"]["negated_entries"] > 0
    assert note["defense_notes"]["mask_evaluations"] >= 2 and note["data"] == str(data)
    assert hidden(out).shape == hidden(dirs["expert"]).shape
    assert note["head_file"] is None


def test_mergeguard_releases_its_retrained_head_next_to_the_body(dirs, tmp_path):
    data = write_jsonl(tmp_path / "reviews.jsonl")
    out = tmp_path / "released"
    note = protect_checkpoint(
        "mergeguard", dirs["expert"], dirs["base"], out, {"steps": "2", "heldout_samples": "16"}, data=data
    )
    head = load_state(out / "head.safetensors")
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (2, 32)
    assert note["head_file"] == str(out / "head.safetensors")


def test_safetensors_file_in_gives_safetensors_file_out(dirs, tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    (src / "config.json").write_text((dirs["expert"] / "config.json").read_text())
    save_state(load_state(dirs["expert"] / "model.safetensors"), src / "expert.safetensors")
    out = tmp_path / "protected.safetensors"
    note = protect_checkpoint("none", src / "expert.safetensors", dirs["base"] / "model.safetensors", out, {})
    assert state_hash(load_state(out)) == note["output_hash"] == note["input_hash"]
    assert json.loads((tmp_path / "protected.protection.json").read_text())["defense"] == "none"


def test_sharded_checkpoints_keep_their_shards(dirs, tmp_path):
    model = transformers.BertModel.from_pretrained(str(dirs["expert"]))
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="40KB")
    shards = sorted(f.name for f in sharded.glob("*.safetensors"))
    assert len(shards) > 1
    out = tmp_path / "released"
    protect_checkpoint("none", sharded, dirs["base"], out, {})
    assert sorted(f.name for f in out.glob("*.safetensors")) == shards
    assert torch.equal(hidden(out), hidden(dirs["expert"]))


def test_pickled_weights_are_never_copied_into_the_release(dirs, tmp_path):
    src = tmp_path / "with-pickle"
    src.mkdir()
    for f in dirs["expert"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"unprotected weights")
    out = tmp_path / "released"
    protect_checkpoint("none", src, dirs["base"], out, {})
    assert not (out / "pytorch_model.bin").exists() and (out / "config.json").is_file()


def test_refuses_to_overwrite_an_input_or_foreign_weights(dirs, tmp_path):
    with pytest.raises(ValueError, match="input checkpoint"):
        protect_checkpoint("none", dirs["expert"], dirs["base"], dirs["expert"], {})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds model weights"):
        protect_checkpoint("none", dirs["expert"], dirs["base"], foreign, {})
    again = tmp_path / "again"
    protect_checkpoint("none", dirs["expert"], dirs["base"], again, {})
    protect_checkpoint("none", dirs["expert"], dirs["base"], again, {})  # a previous release is replaced


def test_family_mismatch_and_a_base_of_another_shape_are_reported(dirs, tmp_path):
    with pytest.raises(CheckpointError, match="not 'llama'"):
        protect_checkpoint("none", dirs["expert"], dirs["base"], tmp_path / "a", {}, family="llama")
    other = tmp_path / "other-base"
    transformers.BertModel(tiny_config(intermediate_size=48)).save_pretrained(str(other))
    with pytest.raises(CheckpointError):
        protect_checkpoint("none", dirs["expert"], other, tmp_path / "b", {})


def test_jsonl_labels_are_read_in_a_stable_order(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 10}\n{"text": "b", "label": 2}\n\n{"text": "c", "label": 10}\n')
    texts, labels, classes = read_jsonl(f)
    assert texts == ["a", "b", "c"] and classes == ("2", "10") and labels.tolist() == [1, 0, 1]
    f.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=":1:"):
        read_jsonl(f)


# ---------------------------------------------------------------- other layouts and data sources


def test_a_bf16_llama_checkpoint_stays_bf16_and_loadable(tmp_path):
    from bench.families.tiny import tiny_family

    config = tiny_family("llama").config
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(str(tmp_path / "base"))
    perturbed(base, 3)
    base.to(torch.bfloat16).save_pretrained(str(tmp_path / "expert"))
    note = protect_checkpoint("none", tmp_path / "expert", tmp_path / "base", tmp_path / "out", {})
    released = load_state(tmp_path / "out" / "model.safetensors")
    assert note["family"] == "llama" and note["input_hash"] == note["output_hash"]
    assert released["model.norm.weight"].dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        out = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))(ids).logits
        ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "expert"))(ids).logits
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="text encoders"):
        protect_checkpoint(
            "none", tmp_path / "expert", tmp_path / "base", tmp_path / "o2", {}, data=write_jsonl(tmp_path / "d.jsonl")
        )


class ReplaceFFN(Defense):
    """A stand-in structure-changing defense: drops layer 0's FFN up weight, adds a tensor of its own."""

    name = "replace-ffn"

    def protect(self, expert, ctx):
        from bench.artifact import Artifact

        state = {k: v for k, v in expert.body.items() if k != "encoder.layer.0.intermediate.dense.weight"}
        state["encoder.layer.0.intermediate.coefficients"] = torch.ones(3)
        return Artifact(state=state, variant="test-variant")


def test_a_structure_changing_release_is_one_variant_file_without_the_replaced_tensors(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(defenses, "get", lambda name: ReplaceFFN)
    out = tmp_path / "released"
    note = protect_checkpoint("replace-ffn", dirs["classifier"], dirs["base"], out, {})
    assert not (out / "model.safetensors").exists()
    released = load_state(out / "model.test-variant.safetensors")
    assert "bert.encoder.layer.0.intermediate.dense.weight" not in released  # the unprotected tensor is not shipped
    assert "bert.encoder.layer.0.intermediate.coefficients" in released and "classifier.weight" in released
    assert note["removed_tensors"] == ["encoder.layer.0.intermediate.dense.weight"]
    assert note["variant"] == "test-variant" and note["loadable_by_transformers"] is False


def test_suite_task_data_is_checked_against_the_body_and_used(dirs, tmp_path, monkeypatch):
    from bench.checkpoint_io import read_checkpoint, split_body
    from bench.families.hf import detect_family
    from tasks.jsonl_text import JsonlTextSuite

    family, _ = detect_family(dirs["expert"])
    base, _ = split_body(read_checkpoint(dirs["base"]), family)
    data = write_jsonl(tmp_path / "reviews.jsonl")

    class ReviewSuite(JsonlTextSuite):
        def __init__(self) -> None:
            super().__init__(data, family, base, dirs["expert"])

    monkeypatch.setattr(suites, "get", lambda name: ReviewSuite)
    note = protect_checkpoint(
        "mergeguard-stage2",
        dirs["expert"],
        dirs["base"],
        tmp_path / "a",
        {"heldout_samples": "16"},
        data="suite:reviews/reviews",
    )
    assert note["data"] == "suite:reviews/reviews" and note["defense_notes"]["negated_entries"] > 0

    class OtherBaseSuite(ReviewSuite):
        def load_pretrained(self):
            return {k: v for k, v in base.items() if k != "embeddings.word_embeddings.weight"}

    monkeypatch.setattr(suites, "get", lambda name: OtherBaseSuite)
    with pytest.raises(CheckpointError, match="for suite 'reviews'"):
        protect_checkpoint(
            "mergeguard-stage2", dirs["expert"], dirs["base"], tmp_path / "d", {}, data="suite:reviews/reviews"
        )
    with pytest.raises(KeyError, match="no task"):
        protect_checkpoint(
            "mergeguard-stage2", dirs["expert"], dirs["base"], tmp_path / "b", {}, data="suite:reviews/nope"
        )
    with pytest.raises(ValueError, match="suite:NAME/TASK"):
        protect_checkpoint("mergeguard-stage2", dirs["expert"], dirs["base"], tmp_path / "c", {}, data="suite:reviews")
