"""Checkpoint-level protection for model owners: ``bench protect --defense D --model DIR --base DIR --out DIR``.

`protect_checkpoint` reads a fine-tuned checkpoint, which is a Hugging Face model directory (sharded
or not) or a ``.safetensors`` state dict, together with the θ_pre it was fine-tuned from. It applies
a defense to the checkpoint's body and writes the release in the same format. The body tensors are
replaced, keep their key prefix and dtype, and stay in their original shard files. Every other
tensor (a classifier, a text tower, a pooler) is copied unchanged. Config and tokenizer files are
copied. Pickled weights are never copied, because they would ship the unprotected model next to
the protected one. A release whose structure changed (a variant, such as a Taylor FFN) is one file,
``model.<variant>.safetensors``, so that transformers never mistakes it for the standard model. A
``protection.json`` note records the defense spec, the hashes of input and
output, the date and what changed.

Data. A defense that runs the model on task data (MergeGuard, the Taylor releases) takes it from
``data``, in one of two forms:

* a JSONL file with one ``{"text": ..., "label": ...}`` per line, for text encoders (BERT). The
  texts are tokenised with the model directory's tokenizer and classified from the mean-pooled
  last hidden state, as the ``text-minilm`` suite does. Every line is training data;
* ``suite:NAME/TASK``: a registered suite's task, whose model must have the checkpoint's body.

The checkpoint carries no head for that data, so a linear head is first fitted on the frozen body
(a linear probe, `fit_probe_head`). That head and the body make the expert the defense protects.
A head the defense retrains (MergeGuard stage 1) is written next to the body as
``head.safetensors``. Data-free defenses get a context whose suite refuses data access. A defense
that needs data but was given none therefore fails with a `DataRequiredError`, which names the
``--data`` forms.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import __version__
from bench.artifact import Artifact
from bench.checkpoint_io import WEIGHT_SUFFIXES, check_out_parent, copy_side_files
from bench.families.family import Family
from bench.plugins import Defense, DefenseContext
from bench.registry import defenses, suites
from bench.store import strict_json
from bench.suite import Batch, Expert, Regularizer, Split, Suite
from bench.weights import (
    CheckpointError,
    StateDict,
    assert_finite,
    check_compatible,
    is_mergeable,
    load_state,
    open_checkpoint,
    read_metadata,
    save_state,
    state_hash,
)

DATA_FORMS = '--data FILE.jsonl (one {"text": ..., "label": ...} per line) or --data suite:NAME/TASK'
_CHECKPOINT_TASK = "checkpoint"


class DataRequiredError(ValueError):
    """A defense needs task data that the caller did not provide."""


# ---------------------------------------------------------------- reading checkpoints


@dataclass
class Checkpoint:
    """A checkpoint read into memory: every tensor, the file each came from, and each file's metadata."""

    path: Path
    tensors: StateDict
    files: dict[str, str]
    """Tensor name -> name of the safetensors file that holds it."""
    metadata: dict[str, dict[str, str]]
    """File name -> that file's safetensors metadata."""

    @property
    def is_dir(self) -> bool:
        return self.path.is_dir()


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Every tensor of a Hugging Face directory or a ``.safetensors`` file, with its shard of origin."""
    path = Path(path)
    open_checkpoint(path)  # one clear error for a missing path, pickled-only weights or a corrupt file
    shards = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    tensors: StateDict = {}
    files: dict[str, str] = {}
    metadata: dict[str, dict[str, str]] = {}
    for shard in shards:
        part = load_state(shard)
        tensors.update(part)
        files.update(dict.fromkeys(part, shard.name))
        metadata[shard.name] = read_metadata(shard)
    return Checkpoint(path, tensors, files, metadata)


def resolve_family(checkpoint: Checkpoint, family: str | Family | None) -> Family:
    """The checkpoint's family: given as an object, or detected from its ``config.json`` (checked against a given name)."""
    if isinstance(family, Family):
        return family
    from bench.families.hf import detect_family

    config = _config_path(checkpoint.path)
    if config is None:
        raise CheckpointError(
            f"{checkpoint.path}: no config.json to read the architecture from; pass a Hugging Face model directory "
            "or put the model's config.json beside the .safetensors file"
        )
    detected, _ = detect_family(config)
    if family is not None and family != detected.name:
        raise CheckpointError(f"{config} describes a {detected.name!r} model, not {family!r}; drop --family or fix it")
    return detected


def _config_path(path: Path) -> Path | None:
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    return config if config.is_file() else None


def body_prefix(keys: Mapping[str, Any], family: Family) -> str:
    """The key prefix under which ``family``'s body sits in a checkpoint (``""``, ``"bert."``, ...)."""
    from bench.families.hf import body_shapes

    body = sorted(body_shapes(family), key=len, reverse=True)
    probe = body[0]
    candidates = sorted({k[: len(k) - len(probe)] for k in keys if k.endswith(probe)}, key=len)
    for prefix in candidates:
        if all(prefix + k in keys for k in body):
            return prefix
    raise CheckpointError(
        f"checkpoint does not hold a {family.name} body of this configuration (no tensor named like {probe!r})"
    )


def split_body(checkpoint: Checkpoint, family: Family) -> tuple[StateDict, str]:
    """(body keyed by body key, in float32 where floating, key prefix)."""
    from bench.families.hf import select_body

    prefix = body_prefix(checkpoint.tensors, family)
    body = select_body(checkpoint.tensors, family, prefix)
    return {k: v.float() if is_mergeable(v) else v for k, v in body.items()}, prefix


# ---------------------------------------------------------------- data


class NoDataSuite(Suite):
    """The context suite of a data-free protection: θ_pre and the family, and no task data."""

    name = "checkpoint"

    def __init__(self, family: Family, base: StateDict, defense: str) -> None:
        super().__init__()
        self._family, self._base, self._defense = family, base, defense

    @property
    def tasks(self) -> tuple[str, ...]:
        return (_CHECKPOINT_TASK,)

    def family(self) -> Family:
        return self._family

    def load_pretrained(self) -> StateDict:
        return self._base

    def recipe(self) -> dict[str, Any]:
        return {}

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise DataRequiredError(f"defense {self._defense!r} runs the model on task data; pass {DATA_FORMS}")

    batches = task_model = finetune = evaluate = _refuse  # type: ignore[assignment]


class JsonlTextSuite(Suite):
    """One text-classification task read from a JSONL file, tokenised with the model directory's tokenizer.

    The task model is ``head(mean_pool(body(input_ids, attention_mask)))``, as in ``text-minilm``;
    fine-tuning uses that suite's recipe (AdamW 5e-5, weight decay 0.01, batch 32, 64 tokens).
    """

    name = "jsonl"
    LR, WEIGHT_DECAY, BATCH_SIZE, MAX_LENGTH, STEPS = 5e-5, 0.01, 32, 64, None

    TEXT_ENCODERS = ("bert",)
    """Families whose module returns ``last_hidden_state`` for token ids (what mean pooling needs)."""

    def __init__(self, file: Path, family: Family, base: StateDict, tokenizer_dir: Path) -> None:
        super().__init__()
        if family.name not in self.TEXT_ENCODERS:
            raise ValueError(
                f"JSONL text classification runs on text encoders ({', '.join(self.TEXT_ENCODERS)}), not {family.name!r}; "
                "use --data suite:NAME/TASK with a suite of this architecture"
            )
        self.file, self._family, self._base = file, family, base
        self.texts, self.labels, self.classes = read_jsonl(file)
        self.task = file.stem
        try:
            import transformers

            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except Exception as exc:
            raise CheckpointError(
                f"{tokenizer_dir}: cannot load a tokenizer for the JSONL texts ({exc}); "
                "use a model directory with tokenizer files"
            ) from exc

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.task,)

    def family(self) -> Family:
        return self._family

    def load_pretrained(self) -> StateDict:
        return self._base

    def recipe(self) -> dict[str, Any]:
        return {"data": str(self.file), "classes": list(self.classes), "lr": self.LR, "batch_size": self.BATCH_SIZE}

    def hidden_size(self) -> int:
        return int(self._family.config.hidden_size)

    def batches(
        self,
        task: str,
        split: Split,
        *,
        batch_size: int = 32,
        limit: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        from tasks.training import batch_indices

        self.check_task(task)
        for idx in batch_indices(len(self.texts), batch_size, limit, shuffle, seed):
            enc = self.tokenizer(
                [self.texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.MAX_LENGTH,
                return_tensors="pt",
            )
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            yield Batch(inputs=inputs, labels=self.labels[torch.as_tensor(idx)])

    def task_model(self, body: StateDict | Artifact, head: StateDict | None, task: str) -> nn.Module:
        from tasks.text_minilm import TextClassifier
        from tasks.training import linear_head

        self.check_task(task)
        return TextClassifier(self._family.build(body), linear_head(head, self.hidden_size(), len(self.classes))).eval()

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The recipe's optimiser (AdamW with the class's LR and WEIGHT_DECAY), shared with attacks that fine-tune."""
        return torch.optim.AdamW(params, lr=self.LR, weight_decay=self.WEIGHT_DECAY)

    def finetune(
        self,
        task: str,
        body: StateDict,
        head: StateDict | None = None,
        *,
        seed: int = 0,
        regularizer: Regularizer | None = None,
        steps: int | None = None,
    ) -> Expert:
        from tasks.training import detached_state, endless, steps_per_epoch, train

        steps = steps if steps is not None else steps_per_epoch(len(self.texts), self.BATCH_SIZE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.task_model(body, head, task)
            optimizer = self.make_optimizer(model.parameters())
            stream = endless(
                lambda epoch: self.batches(
                    task, "train", batch_size=self.BATCH_SIZE, shuffle=True, seed=seed * 1000 + epoch
                )
            )
            train(model, optimizer, stream, steps, regularizer, desc=f"jsonl/{task}")
        return Expert(body=detached_state(model.body), head=detached_state(model.head))

    def evaluate(
        self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False
    ) -> dict[str, float]:
        from tasks.training import accuracy

        return {"accuracy": accuracy(self.task_model(body, head, task), self.batches(task, "train", batch_size=64))}


def read_jsonl(file: Path) -> tuple[list[str], torch.Tensor, tuple[str, ...]]:
    """(texts, class indices, class names) of a ``{"text", "label"}`` JSONL file; classes in sorted order."""
    texts, raw = [], []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            raw.append(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f'{file}:{n}: each line must be a JSON object with "text" and "label" ({exc})') from exc
    classes = tuple(
        sorted(
            {str(v) for v in raw},
            key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c),
        )
    )
    if len(classes) < 2:
        raise ValueError(f"{file}: needs at least two distinct labels; found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return texts, torch.tensor([index[str(v)] for v in raw]), classes


def data_suite(
    data: str | os.PathLike | None, defense: str, family: Family, base: StateDict, body: StateDict, model_path: Path
) -> tuple[Suite, str, str]:
    """(suite, task, description) of the data source a protection uses."""
    if data is None:
        return NoDataSuite(family, base, defense), _CHECKPOINT_TASK, "none"
    text = str(data)
    if text.startswith("suite:"):
        name, _, task = text[len("suite:") :].partition("/")
        if not name or not task:
            raise ValueError(f"--data {text!r}: expected suite:NAME/TASK, e.g. suite:text-minilm/rt-sentiment")
        suite = suites.get(name)()
        suite.check_task(task)
        check_compatible(suite.pretrained(), body, what=f"the checkpoint's body (for suite {name!r})")
        return suite, task, text
    file = Path(text)
    if not file.is_file():
        raise FileNotFoundError(f"--data {text!r} is neither a JSONL file nor suite:NAME/TASK")
    tokenizer_dir = model_path if model_path.is_dir() else model_path.parent
    suite = JsonlTextSuite(file, family, base, tokenizer_dir)
    return suite, suite.task, str(file)


def fit_probe_head(
    suite: Suite, task: str, body: StateDict, *, seed: int = 0, steps: int = 200, samples: int = 512, lr: float = 1e-2
) -> StateDict:
    """A linear head for ``body`` on ``task``, trained with the body frozen (features computed once).

    A task model without a linear ``.head`` (a language model, whose output head is in the body)
    gets the empty head.
    """
    model = suite.task_model(body, None, task)  # type: ignore[arg-type]  # None: a fresh head
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        return {}
    features, labels = [], []
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in suite.batches(task, "train", batch_size=64, limit=samples, shuffle=True, seed=seed):
            model(**batch.inputs)
            features.append(captured.pop())
            labels.append(batch.labels)
    hook.remove()
    x, y = torch.cat(features), torch.cat(labels)
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(x.shape[1], head.out_features)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in probe.state_dict().items()}


# ---------------------------------------------------------------- writing


def _prepare_out(out: Path, sources: list[Path]) -> None:
    check_out_parent(out)
    resolved = out.resolve()
    for src in sources:
        if resolved == src.resolve():
            raise ValueError(f"--out {out} is an input checkpoint; write the protected model somewhere else")
    if out.is_dir():
        weights = [f for f in out.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")]
        if weights and not (out / "protection.json").is_file():
            raise ValueError(f"--out {out} already holds model weights ({weights[0].name}); choose an empty directory")
        for f in weights:  # a previous protection's files, replaced now
            f.unlink()


def write_release(checkpoint: Checkpoint, tensors: StateDict, out: Path, variant: str | None) -> list[Path]:
    """Write ``tensors`` in the checkpoint's layout: same shard files (directory) or one file."""

    def meta(name: str) -> dict[str, str]:
        m = {**checkpoint.metadata.get(name, {}), "format": "pt"}
        if variant:
            m["mergearena.variant"] = variant
        return m

    if variant:
        # The standard module cannot run this release: one file, never named like a transformers checkpoint.
        target = out if out.suffix == ".safetensors" else out / f"model.{variant}.safetensors"
        save_state(_unshare(tensors), target, meta(next(iter(checkpoint.metadata), "")))
        return [target]
    if out.suffix == ".safetensors":
        save_state(_unshare(tensors), out, meta(next(iter(checkpoint.metadata), "")))
        return [out]
    shards: dict[str, StateDict] = {}
    for k, v in tensors.items():
        shards.setdefault(
            checkpoint.files.get(k, "model.safetensors") if checkpoint.is_dir else "model.safetensors", {}
        )[k] = v
    written = []
    for name, shard in shards.items():
        save_state(_unshare(shard), out / name, meta(name))
        written.append(out / name)
    return written


def _unshare(tensors: StateDict) -> StateDict:
    """Clone tensors that share storage with an earlier one (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out


# ---------------------------------------------------------------- the protection


def protect_checkpoint(
    defense_name: str,
    model_path: str | os.PathLike,
    base_path: str | os.PathLike,
    out_path: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    family: str | Family | None = None,
    data: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Protect the checkpoint at ``model_path`` (fine-tuned from ``base_path``) and write it to ``out_path``.

    Returns the note also written as ``protection.json`` (beside a ``.safetensors`` output, as
    ``<name>.protection.json``).
    """
    defense: Defense = defenses.get(defense_name).from_overrides(params or {})
    model_path, base_path, out = Path(model_path), Path(base_path), Path(out_path)
    _prepare_out(out, [model_path, base_path])

    checkpoint = read_checkpoint(model_path)
    assert_finite(checkpoint.tensors, f"model {model_path}")
    fam = resolve_family(checkpoint, family)
    body, prefix = split_body(checkpoint, fam)
    base_checkpoint = read_checkpoint(base_path)
    assert_finite(base_checkpoint.tensors, f"base {base_path}")
    base, _ = split_body(base_checkpoint, fam)
    check_compatible(base, body, what=f"{model_path} (its body)")

    suite, task, data_note = data_suite(data, defense_name, fam, base, body, model_path)
    head = fit_probe_head(suite, task, body, seed=seed) if data is not None else {}
    ctx = DefenseContext(suite=suite, task=task, base=base, arch=fam.arch_map(), family=fam, seed=seed)
    artifact = defense.protect(Expert(body=body, head=head), ctx)
    assert_finite(artifact.state, f"the {defense_name} artifact")
    assert_finite(artifact.head or {}, f"the {defense_name} artifact's head")

    released = _released_tensors(checkpoint, body, artifact, prefix)
    if out.suffix != ".safetensors":
        out.mkdir(parents=True, exist_ok=True)
    files = write_release(checkpoint, released, out, artifact.variant)
    side = copy_side_files(model_path, out) if model_path.is_dir() and out.suffix != ".safetensors" else []
    head_file = None
    if artifact.head is not None:
        head_file = out.with_suffix(".head.safetensors") if out.suffix == ".safetensors" else out / "head.safetensors"
        save_state(artifact.head, head_file, {"mergearena.defense": defense_name, "mergearena.data": data_note})

    note = _note(
        defense,
        checkpoint,
        base_checkpoint,
        body,
        artifact,
        released,
        prefix,
        fam,
        data_note,
        seed,
        files,
        side,
        head_file,
    )
    note_path = out.with_suffix(".protection.json") if out.suffix == ".safetensors" else out / "protection.json"
    tmp = note_path.with_name(note_path.name + ".tmp")
    tmp.write_text(strict_json(note, indent=1, sort_keys=True))
    os.replace(tmp, note_path)
    return note


def _released_tensors(checkpoint: Checkpoint, body: StateDict, artifact: Artifact, prefix: str) -> StateDict:
    """The checkpoint with its body replaced by the artifact's (original key prefix and dtypes).

    Body tensors the artifact lacks are dropped, never copied from the input: a variant replaces
    them with its own, and shipping the originals would ship the unprotected weights.
    """
    missing = sorted(set(body) - set(artifact.state))
    if missing and not artifact.variant:
        raise CheckpointError(f"the defense's artifact lacks {len(missing)} body tensor(s), e.g. {missing[:3]}")
    out = {k: v for k, v in checkpoint.tensors.items() if not (k.startswith(prefix) and k[len(prefix) :] in body)}
    for k, v in artifact.state.items():
        original = checkpoint.tensors.get(prefix + k)
        out[prefix + k] = v.to(original.dtype) if original is not None else v
    return out


def _note(
    defense: Defense,
    checkpoint: Checkpoint,
    base: Checkpoint,
    body: StateDict,
    artifact: Artifact,
    released: StateDict,
    prefix: str,
    family: Family,
    data_note: str,
    seed: int,
    files: list[Path],
    side: list[str],
    head_file: Path | None,
) -> dict[str, Any]:
    kept = [k for k in body if k in artifact.state and artifact.state[k].shape == body[k].shape]
    changed = [k for k in kept if not torch.equal(artifact.state[k].to(body[k].dtype), body[k])]
    removed = sorted(set(body) - set(artifact.state))
    added = sorted(set(artifact.state) - set(body))
    num = sum(
        float((artifact.state[k].double() - body[k].double()).pow(2).sum()) for k in changed if is_mergeable(body[k])
    )
    den = sum(float(body[k].double().pow(2).sum()) for k in kept if is_mergeable(body[k]))
    relative = (num / den) ** 0.5 if den else 0.0
    what = f"{defense.name} changed {len(changed)} of {len(body)} body tensors (relative L2 change {relative:.4g}); "
    if artifact.variant:
        what += (
            f"replaced {len(removed)} by {len(added)} tensors of variant {artifact.variant!r}, "
            "which runs only through MergeArena's variant module"
        )
    else:
        what += "structure unchanged, loads like the input"
    if head_file is not None:
        what += f"; the defense retrained the task head, released as {head_file.name}"
    return {
        "defense": defense.name,
        "spec": defense.spec(),
        "what": what,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mergearena_version": __version__,
        "seed": seed,
        "family": family.name,
        "key_prefix": prefix,
        "data": data_note,
        "input": str(checkpoint.path),
        "input_hash": state_hash(checkpoint.tensors),
        "base": str(base.path),
        "base_hash": state_hash(base.tensors),
        "output": [str(f) for f in files],
        "output_hash": state_hash(released),
        "head_file": str(head_file) if head_file else None,
        "copied_files": side,
        "changed_tensors": changed,
        "removed_tensors": removed,
        "added_tensors": added,
        "relative_l2_change": relative,
        "variant": artifact.variant,
        "loadable_by_transformers": artifact.variant is None and "config.json" in side,
        "defense_notes": artifact.notes,
    }
