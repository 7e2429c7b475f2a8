"""Where the real-scale suites find checkpoints and datasets: a local directory, a hub mirror, or the Hub.

Every model or dataset of a real-scale suite is named by its Hugging Face Hub id
(``openai/clip-vit-base-patch32``, ``tanganke/sun397``). An id is resolved, in order, to

1. the id itself when it is a local directory (any id can be replaced by a path);
2. ``$MERGEARENA_HUB_MIRROR/<id>`` when that directory exists: a mirror laid out like the Hub, as
   ``huggingface-cli download <id> --local-dir $MERGEARENA_HUB_MIRROR/<id>`` (models) or
   ``datasets.load_dataset(<id>).save_to_disk($MERGEARENA_HUB_MIRROR/<id>)`` (datasets) leave it;
3. the Hub (through the local Hugging Face cache), unless ``MERGEARENA_OFFLINE=1`` or
   ``HF_HUB_OFFLINE=1`` is set.

When none works, `MissingAssetError` names the id, what it was needed for and the two ways to
provide it. Weights are only ever read from safetensors files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.suite import MissingAssetError

MIRROR_ENV = "MERGEARENA_HUB_MIRROR"
OFFLINE_ENV = "MERGEARENA_OFFLINE"
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
"""What is fetched of a model repository: configs, tokenizer files and safetensors weights (no pickles)."""


def offline() -> bool:
    """Whether the Hub must not be contacted (``MERGEARENA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def local_dir(spec: str) -> Path | None:
    """``spec`` as a local directory, or its copy in the hub mirror, or None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and (Path(mirror).expanduser() / spec).is_dir():
        return Path(mirror).expanduser() / spec
    return None


def _provide_hint(spec: str, kind: str) -> str:
    fetch = (f"huggingface-cli download {spec} --local-dir ${MIRROR_ENV}/{spec}" if kind == "model"
             else f"datasets.load_dataset('{spec}').save_to_disk('${MIRROR_ENV}/{spec}')")
    return f"provide it as a local directory ({fetch}, with {MIRROR_ENV} set) or allow Hub downloads"


def resolve_model_dir(spec: str, what: str, patterns: Sequence[str] = MODEL_FILES) -> Path:
    """The local directory holding model ``spec`` (a path or a Hub id), downloading it when allowed."""
    found = local_dir(spec)
    if found is not None:
        return found
    reason = f"{OFFLINE_ENV} or HF_HUB_OFFLINE is set"
    if not offline():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=spec, allow_patterns=list(patterns)))
        except Exception as exc:  # offline, unknown repository, gated model: all end in the same advice
            reason = f"the Hub could not provide it ({type(exc).__name__})"
    raise MissingAssetError(
        f"{what}: {spec!r} is not a local directory, not in the hub mirror, and {reason}; {_provide_hint(spec, 'model')}"
    )


def load_dataset_split(spec: str, config: str | None, split: str, what: str) -> Any:
    """One split of dataset ``spec`` (a ``save_to_disk`` directory, a dataset repository directory, or a Hub id)."""
    try:
        import datasets
    except ImportError as exc:
        raise MissingAssetError(f"{what} needs the `datasets` package: pip install datasets") from exc
    found = local_dir(spec)
    if found is not None:
        return _local_split(datasets, found, config, split, what)
    if offline():
        raise MissingAssetError(
            f"{what}: dataset {spec!r} is not a local directory or in the hub mirror, and {OFFLINE_ENV} or "
            f"HF_HUB_OFFLINE is set; {_provide_hint(spec, 'dataset')}"
        )
    try:
        return datasets.load_dataset(spec, config, split=split)
    except Exception as exc:
        raise MissingAssetError(
            f"{what}: dataset {spec!r} (split {split!r}) could not be loaded from the Hub ({type(exc).__name__}); "
            f"{_provide_hint(spec, 'dataset')}"
        ) from exc


def _local_split(datasets: Any, path: Path, config: str | None, split: str, what: str) -> Any:
    # `save_to_disk` directories hold dataset_dict.json (several splits) or state.json (one split);
    # anything else is read as a dataset repository (parquet / image folders), as load_dataset would.
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise MissingAssetError(f"{what}: {path} has splits {sorted(loaded)}, not {split!r}")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(path), config, split=split)
    except Exception as exc:
        raise MissingAssetError(f"{what}: cannot read split {split!r} of the dataset in {path}: {exc}") from exc
