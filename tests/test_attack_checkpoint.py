"""`bench attack` on released tiny BERT checkpoints written in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_protect import dirs, hidden, logits  # noqa: F401  (dirs is a fixture)

from bench.attack_checkpoint import attack_checkpoint
from bench.protect import protect_checkpoint
from bench.weights import load_state


def _body(model_dir: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = load_state(model_dir / "model.safetensors")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _rel(a: dict, b: dict, base: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in base if a[k].is_floating_point())
    den = sum(float((b[k] - base[k]).pow(2).sum()) for k in base if b[k].is_floating_point())
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def near_expert(dirs, tmp_path_factory) -> Path:
    """An expert whose task vector is small next to θ_pre (as fine-tuning leaves it): 10% of the init scale."""
    out = tmp_path_factory.mktemp("near") / "expert"
    model = transformers.BertModel.from_pretrained(str(dirs["base"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return out


def test_realign_and_scale_division_recover_a_params_release(dirs, near_expert, tmp_path) -> None:
    protect_checkpoint("params", near_expert, dirs["base"], tmp_path / "released", seed=3)
    note = attack_checkpoint(["realign", "scale-division"], tmp_path / "released", dirs["base"], tmp_path / "recovered")
    assert note["attack"]["name"] == "realign+scale-division" and note["cost"]["seconds"]["prepare"] >= 0
    base, expert = _body(dirs["base"]), _body(near_expert)
    released, recovered = _body(tmp_path / "released"), _body(tmp_path / "recovered")
    assert _rel(released, expert, base) > 10  # the release sits many task vectors away from the expert...
    assert _rel(recovered, expert, base) < 0.3  # ...the attack brings it back to the expert up to scale-estimate noise
    torch.testing.assert_close(hidden(tmp_path / "recovered"), hidden(near_expert), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "recovered" / "config.json").is_file() and (tmp_path / "recovered" / "attack.json").is_file()


def test_attack_then_merge_writes_the_merged_checkpoint(dirs, tmp_path) -> None:
    protect_checkpoint("params", dirs["expert"], dirs["base"], tmp_path / "released", seed=3)
    attack_checkpoint(["realign"], tmp_path / "released", dirs["base"], tmp_path / "aligned")
    attack_checkpoint(["realign"], tmp_path / "released", dirs["base"], tmp_path / "merged", partners=[dirs["expert"]],
                      merge="ta", merge_params={"lambda_": "0.5"})
    base, aligned, partner = _body(dirs["base"]), _body(tmp_path / "aligned"), _body(dirs["expert"])
    merged = _body(tmp_path / "merged")
    for k in ("encoder.layer.0.intermediate.dense.weight", "embeddings.word_embeddings.weight"):
        torch.testing.assert_close(merged[k], base[k] + 0.5 * (aligned[k] - base[k]) + 0.5 * (partner[k] - base[k]))
    transformers.BertModel.from_pretrained(str(tmp_path / "merged"))  # loads as a standard checkpoint


def test_classifier_checkpoint_keeps_its_head_and_prefix(dirs, tmp_path) -> None:
    protect_checkpoint("mergelock", dirs["classifier"], dirs["base"], tmp_path / "released", seed=1)
    attack_checkpoint("anchor-align", tmp_path / "released", dirs["base"], tmp_path / "recovered")
    torch.testing.assert_close(logits(tmp_path / "recovered"), logits(dirs["classifier"]), atol=1e-4, rtol=1e-4)


def test_structure_changed_release_needs_a_restoring_attack(dirs, near_expert, tmp_path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in
                              enumerate(["good movie", "bad plot", "great movie", "awful plot", "fine movie", "poor plot"] * 6)))
    protect_checkpoint("taylormlp", near_expert, dirs["base"], tmp_path / "released", data=data, seed=0)
    with pytest.raises(Exception, match="cannot restore the standard structure"):
        attack_checkpoint("realign", tmp_path / "released", dirs["base"], tmp_path / "x")
    attack_checkpoint("taylor-invert", tmp_path / "released", dirs["base"], tmp_path / "recovered")
    base, expert, recovered = _body(dirs["base"]), _body(near_expert), _body(tmp_path / "recovered")
    assert set(recovered) == set(base)
    assert _rel(recovered, expert, base) < 1e-3


def test_finish_attacks_without_a_merge_are_refused_in_one_line(dirs, tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.cli", "attack", "--attack", "unmask", "--artifact", str(dirs["expert"]),
                          "--base", str(dirs["base"]), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "acts after the merge" in out.stderr and "Traceback" not in out.stderr
