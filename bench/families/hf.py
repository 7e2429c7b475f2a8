"""Hugging Face model directories: which family a ``config.json`` describes, and where its body lives.

``detect_family(path) -> (family, key_prefix)``: the family for the directory's ``model_type`` and
the prefix the checkpoint puts in front of the family's body keys (``"bert."`` for a
``BertForSequenceClassification`` checkpoint, ``""`` otherwise). `select_body` then reads the body
(only the tensors the family's module has: a full CLIP checkpoint's text tower, a BERT pooler or a
classifier head stay out), and `replace_body` writes a merged body back into the full checkpoint.

Detection is driven by the families registry: a family lists the ``model_type`` values it reads
(`Family.hf_model_types`) and builds itself from the config (`Family.from_hf_config`), so a new
family (a third-party one too) is detected without an edit here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bench.families.family import Family
from bench.registry import RegistryError, families
from bench.weights import CheckpointError, StateDict, open_checkpoint


class UnsupportedModelError(CheckpointError):
    """A model directory's ``model_type`` has no family here."""


# ---------------------------------------------------------------- bodies of checkpoints


def body_shapes(family: Family) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``family``'s body, without allocating weights (module built on the meta device)."""
    shapes = getattr(family, "state_shapes", None)
    if callable(shapes):  # families whose module needs an optional package describe their keys themselves
        return dict(shapes())
    with torch.device("meta"):
        module = family.new_module()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def select_body(checkpoint: Mapping[str, torch.Tensor], family: Family, key_prefix: str = "") -> StateDict:
    """The body of ``family`` read from ``checkpoint`` (keys ``key_prefix + body key``), keyed by body key."""
    keys = list(body_shapes(family))
    missing = [key_prefix + k for k in keys if key_prefix + k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} of the {family.name} body's {len(keys)} tensors, e.g. {missing[:3]}"
        )
    return {k: checkpoint[key_prefix + k] for k in keys}


def replace_body(
    checkpoint: Mapping[str, torch.Tensor], body: Mapping[str, torch.Tensor], key_prefix: str = ""
) -> StateDict:
    """``checkpoint`` with its body tensors replaced by ``body``'s (text towers, heads and the rest kept)."""
    unknown = [key_prefix + k for k in body if key_prefix + k not in checkpoint]
    if unknown:
        raise CheckpointError(f"{len(unknown)} body tensor(s) have no place in the checkpoint, e.g. {unknown[:3]}")
    out = {k: checkpoint[k] for k in checkpoint}
    out.update({key_prefix + k: v for k, v in body.items()})
    return out


# ---------------------------------------------------------------- detection


def detect_family(model_dir_or_config: str | os.PathLike | Mapping[str, Any] | Any) -> tuple[Family, str]:
    """The family described by a Hugging Face ``config.json`` and the checkpoint's key prefix of its body.

    Accepts a model directory, a ``config.json`` path, a config dict or a ``PretrainedConfig``. For a
    directory with safetensors weights the key layout is read from the weights' names; otherwise it
    is inferred from the config (``architectures``, ``transformers_version``).
    """
    config, keys, where = _read_config(model_dir_or_config)
    model_type = config.get("model_type")
    readers = model_type_readers()
    if model_type not in readers:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} has no family; supported model types: {', '.join(sorted(readers))}"
        )
    return readers[model_type].from_hf_config(config, keys)


def model_type_readers() -> dict[str, type[Family]]:
    """Hugging Face ``model_type`` -> the registered family that reads it (`Family.hf_model_types`)."""
    readers: dict[str, type[Family]] = {}
    for name in families.names():
        cls = families.get(name)
        for model_type in cls.hf_model_types:
            if model_type in readers:
                raise RegistryError(
                    f"model_type {model_type!r} is claimed by two families ({readers[model_type].name}, {cls.name})"
                )
            readers[model_type] = cls
    return readers


def _read_config(source: Any) -> tuple[dict[str, Any], list[str] | None, str]:
    """(config dict, the checkpoint's key names or None, a name for error messages)."""
    if isinstance(source, Mapping):
        return dict(source), None, "config"
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return source.to_dict(), None, type(source).__name__
    path = Path(source)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json found; pass a Hugging Face model directory or its config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    keys = None
    if path.is_dir() and any(path.glob("*.safetensors")):
        keys = list(open_checkpoint(path))  # reads the headers only
    return config, keys, str(path)
