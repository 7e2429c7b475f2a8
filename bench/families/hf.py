"""Hugging Face model directories: which family a ``config.json`` describes, and where its body lives.

``detect_family(path) -> (family, key_prefix)``: the family for the directory's ``model_type`` and
the prefix the checkpoint puts in front of the family's body keys (``"bert."`` for a
``BertForSequenceClassification`` checkpoint, ``""`` otherwise). `select_body` then reads the body
(only the tensors the family's module has: a full CLIP checkpoint's text tower, a BERT pooler or a
classifier head stay out), and `replace_body` writes a merged body back into the full checkpoint.

Also here: `Prefixed`, which nests a module under a dotted key prefix (``vision_model.``,
``model.visual.``) so that a family's body keys can match the checkpoints it is used with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.families.family import Family
from bench.weights import CheckpointError, StateDict, open_checkpoint

SUPPORTED_MODEL_TYPES = ("bert", "clip", "clip_vision_model", "llama")


class UnsupportedModelError(CheckpointError):
    """A model directory's ``model_type`` has no family here."""


# ---------------------------------------------------------------- key prefixes


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is empty or a dotted path ending in a dot (``"vision_model."``)."""
    if prefix and (not prefix.endswith(".") or any(not part.isidentifier() for part in prefix[:-1].split("."))):
        raise ValueError(
            f"key prefix {prefix!r} must be empty or dotted identifiers ending in '.', e.g. 'vision_model.'"
        )
    return prefix


class _Hop(nn.Module):
    """An intermediate container on a `Prefixed` path (holds one child, computes nothing)."""


class Prefixed(nn.Module):
    """Holds ``inner`` under the dotted path ``prefix`` so every state-dict key starts with it.

    ``Prefixed(CLIPVisionModel(cfg), "vision_model.").state_dict()`` has the keys of a full
    ``CLIPModel``'s vision tower; ``forward`` is ``inner``'s forward, `inner` returns the model, and
    other attributes (``config``, ``encoder``) are read from it.
    """

    def __init__(self, inner: nn.Module, prefix: str) -> None:
        super().__init__()
        if not check_prefix(prefix):
            raise ValueError("Prefixed needs a non-empty key prefix such as 'vision_model.'")
        self._path = tuple(prefix[:-1].split("."))
        holder: nn.Module = self
        for part in self._path[:-1]:
            hop = _Hop()
            holder.add_module(part, hop)
            holder = hop
        holder.add_module(self._path[-1], inner)

    @property
    def inner(self) -> nn.Module:
        module: nn.Module = self
        for part in self._path:
            module = getattr(module, part)
        return module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Attributes of the held model (``config``, ``encoder``) read through, as on the model itself.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in self.__dict__.get("_path", ()):  # the path itself is never delegated
                raise
            return getattr(self.inner, name)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a `Prefixed` wrapper (or ``module`` itself)."""
    return module.inner if isinstance(module, Prefixed) else module


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


def load_body(path: str | os.PathLike) -> tuple[Family, StateDict, str]:
    """(family, body, key_prefix) of a Hugging Face model directory."""
    family, key_prefix = detect_family(path)
    return family, select_body(open_checkpoint(path), family, key_prefix), key_prefix


# ---------------------------------------------------------------- detection


def detect_family(model_dir_or_config: str | os.PathLike | Mapping[str, Any] | Any) -> tuple[Family, str]:
    """The family described by a Hugging Face ``config.json`` and the checkpoint's key prefix of its body.

    Accepts a model directory, a ``config.json`` path, a config dict or a ``PretrainedConfig``. For a
    directory with safetensors weights the key layout is read from the weights' names; otherwise it
    is inferred from the config (``architectures``, ``transformers_version``).
    """
    config, keys, where = _read_config(model_dir_or_config)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} has no family; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return _DETECTORS[model_type](config, keys)


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


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _bert(config: dict[str, Any], keys: list[str] | None) -> tuple[Family, str]:
    import transformers

    from bench.families.bert import BertFamily

    # BertFor* task models nest the encoder under "bert."; a bare BertModel (sentence-transformers) does not.
    if keys is not None:
        key_prefix = "bert." if _has_prefix(keys, "bert.") else ""
    else:
        architectures = config.get("architectures") or ["BertModel"]
        key_prefix = "" if architectures[0] == "BertModel" else "bert."
    return BertFamily(transformers.BertConfig.from_dict(config)), key_prefix


def _clip_vision(config: dict[str, Any], keys: list[str] | None) -> tuple[Family, str]:
    import transformers

    from bench.families.clip import ClipVisionFamily

    # transformers 4 saved CLIPVisionModel under "vision_model."; transformers 5 saves it flat.
    if keys is not None:
        prefix = "vision_model." if _has_prefix(keys, "vision_model.") else ""
    else:
        major = str(config.get("transformers_version", "4")).split(".", 1)[0]
        prefix = "" if major.isdigit() and int(major) >= 5 else "vision_model."
    return ClipVisionFamily(transformers.CLIPVisionConfig.from_dict(config), prefix=prefix), ""


def _clip(config: dict[str, Any], keys: list[str] | None) -> tuple[Family, str]:
    import transformers

    from bench.families.clip import ClipVisionFamily

    # Only the vision tower of a full CLIPModel is merged; its keys sit under "vision_model.".
    vision = transformers.CLIPConfig.from_dict(config).vision_config
    return ClipVisionFamily(vision, prefix="vision_model."), ""


def _llama(config: dict[str, Any], keys: list[str] | None) -> tuple[Family, str]:
    import transformers

    from bench.families.llama import LlamaFamily

    return LlamaFamily(transformers.LlamaConfig.from_dict(config)), ""


_DETECTORS = {"bert": _bert, "clip_vision_model": _clip_vision, "clip": _clip, "llama": _llama}
