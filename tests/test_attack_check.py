"""`bench attack` without ``--out``: how far an attack moves a checkpoint (tiny BERT directories in tmp_path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_protect import dirs  # noqa: F401  (dirs is a fixture)

from bench.attack_check import body_change, check_attack
from bench.protect import protect_checkpoint
from bench.weights import load_state


def _body(model_dir: Path) -> dict[str, torch.Tensor]:
    """A BertModel directory's body: its tensors without the pooler (a head, not part of the BERT family's body)."""
    return {k: v for k, v in load_state(model_dir / "model.safetensors").items() if not k.startswith("pooler.")}


@pytest.fixture(scope="module")
def near(dirs, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Fine-tune-sized experts of θ_pre (BertModel, and a classifier with a head): 0.002 noise on init scale 0.02.

    (The ``dirs`` experts move every weight by 0.05, more than θ_pre's own scale: there weight matching
    rightly finds a better alignment than the identity.)"""
    root = tmp_path_factory.mktemp("near")
    for i, (name, cls) in enumerate((("expert", transformers.BertModel), ("partner", transformers.BertModel),
                                     ("classifier", transformers.BertForSequenceClassification))):
        model = cls(transformers.BertConfig.from_pretrained(str(dirs["base"])))
        body = model.bert if hasattr(model, "bert") else model
        body.load_state_dict(transformers.BertModel.from_pretrained(str(dirs["base"])).state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.002 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(root / name))
    return {"base": dirs["base"], **{n: root / n for n in ("expert", "partner", "classifier")}}


def _norm(state: dict[str, torch.Tensor]) -> float:
    return sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()) ** 0.5


def test_body_change_is_measured_against_the_task_vector_and_the_weights():
    base = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor([3])}
    inp = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}
    out = {"w": torch.tensor([1.5, 2.0]), "n": torch.tensor([7])}  # integer tensors are not compared
    change = body_change(out, inp, base)
    assert (change.tensors, change.changed, change.largest) == (1, 1, "w")
    assert change.relative_to_task_vector == 0.5 and abs(change.relative_to_weights - 0.5 / 5**0.5) < 1e-12
    assert body_change(inp, inp, base).relative_to_task_vector == 0 and body_change(inp, inp, base).largest == ""


def test_an_undo_attack_leaves_an_unprotected_checkpoint_and_its_merge_unchanged(near):
    for attack in ("realign", "revert-to-base", "taylor-invert"):
        result = check_attack(attack, near["expert"], near["base"])
        assert result["body"].changed == 0 and result["body"].relative_to_task_vector == 0, attack
    merged = check_attack("realign", near["expert"], near["base"], partners=[near["partner"]], merge="ta")
    assert merged["merge"].change == 0 and merged["merge"].tensors > 0
    # scale-division estimates scales ≈ 1 from τ and divides them out: a small move (measured 0.024)
    moved = check_attack("scale-division", near["expert"], near["base"])["body"].relative_to_task_vector
    assert 0 < moved < 0.1


def test_the_check_reports_how_far_an_attack_moves_a_release(near, tmp_path):
    protect_checkpoint("params", near["expert"], near["base"], tmp_path / "released", {"scale": "false"}, seed=3)
    result = check_attack("realign", tmp_path / "released", near["base"])["body"]
    # realign turns the permuted release back into the expert, so it moves it by exactly ‖expert − release‖
    base, expert, released = _body(near["base"]), _body(near["expert"]), _body(tmp_path / "released")
    moved = _norm({k: expert[k] - released[k] for k in base})
    assert abs(result.relative_to_task_vector - moved / _norm({k: released[k] - base[k] for k in base})) < 1e-6
    assert abs(result.relative_to_weights - moved / _norm(released)) < 1e-6 and result.changed > 0
    # and its merge: TA(expert, partner) against TA(release, partner), λ = 0.5
    partner = _body(near["partner"])
    merged = check_attack("realign", tmp_path / "released", near["base"], partners=[near["partner"]], merge="ta",
                          merge_params={"lambda_": "0.5"})["merge"]
    plain_tau = _norm({k: 0.5 * (released[k] - base[k]) + 0.5 * (partner[k] - base[k]) for k in base})
    assert abs(merged.relative_to_task_vector - 0.5 * moved / plain_tau) < 1e-5  # float32 merges: measured ~1e-7


def test_bench_attack_without_out_prints_the_relative_change(near, tmp_path):
    cmd = [sys.executable, "-m", "bench.cli", "attack", "--attack", "realign", "--artifact", str(near["expert"]),
           "--base", str(near["base"]), "--partner", str(near["partner"]), "--merge", "ta", "--merge-param", "lambda_=0.5"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "||out - in|| / ||in - base|| = 0.000e+00" in out.stdout and "the ta merge" in out.stdout
    assert "tensors changed: 0 of" in out.stdout and not list(tmp_path.iterdir())  # nothing written
    bad = subprocess.run(cmd[:4] + ["nonsense"] + cmd[5:], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_the_check_reads_an_expert_with_a_task_head(near):
    # A classifier checkpoint (bert. prefix, its own head) is compared on its body only.
    result = check_attack("realign", near["classifier"], near["base"])["body"]
    assert result.changed == 0 and result.tensors == sum(v.is_floating_point() for v in _body(near["base"]).values())
