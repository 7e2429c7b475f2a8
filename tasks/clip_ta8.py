"""The 8-task CLIP suites ``clip-vit-b32-ta8`` and ``clip-vit-l14-ta8`` (the task-arithmetic protocol).

Tasks, in the protocol's order: ``sun397``, ``stanford-cars``, ``resisc45``, ``eurosat``, ``svhn``,
``gtsrb``, ``mnist``, ``dtd``. Each task is classified zero-shot: a task's head is the text
embedding of every class name under the task's prompt templates (each template embedding
L2-normalised, averaged over templates, renormalised; logits = exp(logit_scale) · cos(image, class)),
computed once from θ_pre's text tower and never merged. Class names and templates ship as
``tasks/reference/clip_ta8_tasks.json`` (FusionBench's lists, task_vectors' templates; sources inside).
**Only the vision tower is the body**: it is what was fine-tuned, protected and merged.

Two checkpoint lineages, pinned per suite instance (``lineage=`` or ``$MERGEARENA_CLIP_LINEAGE``):

* ``hf`` (default): θ_pre ``openai/clip-vit-{base-patch32,large-patch14}`` and FusionBench's experts
  ``tanganke/clip-vit-*_<task>`` (``CLIPVisionModel``, Adam lr 1e-5, 4000 steps, batch 32), run by
  transformers. The body is the ``vision_model.*`` tensors (`ClipVisionFamily`); the visual
  projection, the text tower and the logit scale come from θ_pre and belong to the head.
  Images are preprocessed by θ_pre's ``CLIPImageProcessor`` (the PIL backend: no torchvision).
* ``open_clip``: the mlfoundations/task_vectors open_clip checkpoints, whose numbers the AdaMerging
  paper reports. Needs the ``[clip]`` extra (open_clip_torch, which needs a torchvision matching
  torch; without it every model operation raises `MissingAssetError`). The body is open_clip's
  ``visual`` tower, ``proj`` included, as task_vectors' ``ImageEncoder`` fine-tunes it. task_vectors
  releases pickled modules (``finetuned.pt``), which this harness never unpickles: convert each
  once, in an environment you trust, to ``<dir>/<Task>/finetuned.safetensors`` holding
  ``image_encoder.state_dict()`` (``save_file({k: v.contiguous() for k, v in torch.load(p,
  weights_only=False).state_dict().items()}, ...)``) and pass ``<dir>`` as ``experts`` or set
  ``$MERGEARENA_TASK_VECTORS_DIR``. Data still come from the ``datasets`` ids below, so splits may
  differ from task_vectors' torchvision splits (e.g. SUN397 partition 1): override them to match.

Datasets (test split evaluated in full unless ``eval_limit``; ``train`` for attacks and defenses
that train): ``tanganke/{sun397,stanford_cars,resisc45,eurosat,gtsrb,dtd}``, ``svhn`` (config
``cropped_digits``) and ``mnist``, the ids of FusionBench's dataset configs. Every model and dataset
id resolves through `tasks.hub` (local path, ``$MERGEARENA_HUB_MIRROR/<id>``, or the Hub), so the
suite runs offline from a mirror; a missing one raises `MissingAssetError` naming it.

Experts are given, not trained: ``finetune`` with the expert recipe (``steps=None``) raises, naming
the checkpoints. A defense that re-fine-tunes an expert (MergeGuard) passes ``steps``; that runs
FusionBench's recipe on the vision tower (Adam lr 1e-5, batch 32, head fixed), which is also the
optimiser attacks get from `make_optimizer`. Evaluation and head computation use CUDA when present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.artifact import Artifact
from bench.families.family import Family
from bench.registry import suites
from bench.suite import Batch, Expert, MissingAssetError, Regularizer, Split, Suite
from bench.weights import CheckpointError, StateDict, check_compatible, hash_json, load_state, save_state
from tasks.hub import load_dataset_split, local_dir, resolve_model_dir
from tasks.training import batch_indices, detached_state, endless, package_version, progress, train

REFERENCE_DIR = Path(__file__).parent / "reference"
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
LINEAGES = ("hf", "open_clip")
LINEAGE_ENV = "MERGEARENA_CLIP_LINEAGE"
EVAL_LIMIT_ENV = "MERGEARENA_CLIP_EVAL_LIMIT"
TASK_VECTORS_ENV = "MERGEARENA_TASK_VECTORS_DIR"
CLIP_EXTRA = "pip install mergearena[clip]"
TASK_VECTORS_NAMES = {"sun397": "SUN397", "stanford-cars": "Cars", "resisc45": "RESISC45", "eurosat": "EuroSAT",
                      "svhn": "SVHN", "gtsrb": "GTSRB", "mnist": "MNIST", "dtd": "DTD"}
"""task_vectors' dataset names, the directory names of its checkpoints."""


@dataclass(frozen=True)
class DatasetSource:
    """Where one task's images come from (a ``datasets`` id or local directory) and which columns hold what."""

    path: str
    config: str | None = None
    image_column: str = "image"
    label_column: str = "label"

    def spec(self) -> dict[str, Any]:
        return {"path": self.path, "config": self.config, "image": self.image_column, "label": self.label_column}


DATASETS: dict[str, DatasetSource] = {
    "sun397": DatasetSource("tanganke/sun397"),
    "stanford-cars": DatasetSource("tanganke/stanford_cars"),
    "resisc45": DatasetSource("tanganke/resisc45"),
    "eurosat": DatasetSource("tanganke/eurosat"),
    "svhn": DatasetSource("svhn", "cropped_digits"),
    "gtsrb": DatasetSource("tanganke/gtsrb"),
    "mnist": DatasetSource("mnist"),
    "dtd": DatasetSource("tanganke/dtd"),
}
"""FusionBench's dataset configs (``config/dataset/image_classification/test/*.yaml``)."""


@cache
def task_prompts() -> dict[str, dict[str, list[str]]]:
    """``{task: {"classnames": [...], "templates": [...]}}`` from the shipped package data."""
    return json.loads((REFERENCE_DIR / "clip_ta8_tasks.json").read_text())["tasks"]


def class_prompts(task: str) -> tuple[list[str], list[str]]:
    """(class names, templates with ``{c}``) of ``task``."""
    entry = task_prompts()[task]
    return list(entry["classnames"]), list(entry["templates"])


# ---------------------------------------------------------------- zero-shot head and task model


@torch.no_grad()
def zero_shot_embeddings(encode: Any, classnames: list[str], templates: list[str], chunk: int = 512) -> torch.Tensor:
    """[classes, dim]: per class, the renormalised mean of its L2-normalised template embeddings.

    ``encode(list[str]) -> [n, dim]`` embeds texts. Texts of several classes share a batch: CLIP's
    text tower is causal and pools at the end-of-text token, so padding does not change an
    embedding (FusionBench embeds one class per batch; the results agree to float rounding).
    """
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    parts = [encode(texts[i:i + chunk]).float() for i in range(0, len(texts), chunk)]
    emb = torch.cat(parts).reshape(len(classnames), len(templates), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb = emb.mean(dim=1)
    return emb / emb.norm(dim=-1, keepdim=True)


class ZeroShotClassifier(nn.Module):
    """``exp(logit_scale) · normalise(proj(body(pixels))) @ class_embeddings.T``; only ``.body`` is trainable state.

    The head (class embeddings, logit scale and, for the HF lineage, θ_pre's visual projection)
    is held in buffers, so fine-tuning the task model trains the vision tower alone, as the
    protocol does.
    """

    def __init__(self, body: nn.Module, head: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("class_embeddings", head["class_embeddings"].float())
        self.register_buffer("logit_scale", head["logit_scale"].float().reshape(()))
        projection = head.get("visual_projection")
        self.register_buffer("visual_projection", None if projection is None else projection.float())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.body(pixel_values)
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        if self.visual_projection is not None:
            features = features @ self.visual_projection.T
        features = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale * features @ self.class_embeddings.T


def check_head(head: Mapping[str, torch.Tensor], num_classes: int) -> None:
    if "class_embeddings" not in head or "logit_scale" not in head:
        raise CheckpointError(f"a zero-shot CLIP head has 'class_embeddings' and 'logit_scale'; got {sorted(head)}")
    if head["class_embeddings"].shape[0] != num_classes:
        raise CheckpointError(f"the head has {head['class_embeddings'].shape[0]} classes, the task {num_classes}")


# ---------------------------------------------------------------- lineages


class HFLineage:
    """θ_pre as a transformers ``CLIPModel`` directory, experts as ``CLIPVisionModel`` (or ``CLIPModel``) directories."""

    name = "hf"

    def __init__(self, pretrained: str, experts: Mapping[str, str]) -> None:
        self.pretrained_spec = pretrained
        self.expert_specs = dict(experts)

    @cached_property
    def pretrained_dir(self) -> Path:
        return resolve_model_dir(self.pretrained_spec, "CLIP θ_pre (text tower, image processor and vision tower)")

    @cached_property
    def family(self) -> Family:
        from bench.families.clip import ClipVisionFamily
        from bench.families.hf import detect_family

        family, _ = detect_family(self.pretrained_dir)
        if not isinstance(family, ClipVisionFamily) or family.prefix != "vision_model.":
            raise CheckpointError(f"{self.pretrained_dir} is not a full CLIPModel checkpoint (model_type 'clip')")
        return family

    def pretrained_body(self) -> StateDict:
        from bench.families.hf import select_body
        from bench.weights import open_checkpoint

        return select_body(open_checkpoint(self.pretrained_dir), self.family)

    def expert_available(self, task: str) -> bool:
        return local_dir(self.expert_specs[task]) is not None

    def expert_body(self, task: str) -> StateDict:
        """The expert's vision tower under the suite's keys (``vision_model.*``), whatever layout it was saved in."""
        from bench.families.clip import ClipVisionFamily
        from bench.families.hf import detect_family, select_body
        from bench.weights import open_checkpoint

        path = resolve_model_dir(self.expert_specs[task], f"expert of task {task}")
        family, key_prefix = detect_family(path)
        if not isinstance(family, ClipVisionFamily):
            raise CheckpointError(f"{path} is not a CLIP vision checkpoint (model_type 'clip' or 'clip_vision_model')")
        body = select_body(open_checkpoint(path), family, key_prefix)
        # transformers 5 saves a CLIPVisionModel without the "vision_model." level: re-key to θ_pre's layout.
        return {self.family.prefix + k[len(family.prefix):]: v for k, v in body.items()}

    @cached_property
    def _clip(self) -> Any:
        """θ_pre's ``CLIPModel`` with only the head parts loaded: text tower, projections, logit scale."""
        import transformers

        from bench.weights import open_checkpoint

        config = transformers.CLIPConfig.from_pretrained(self.pretrained_dir)
        model = transformers.CLIPModel(config).eval()
        checkpoint = open_checkpoint(self.pretrained_dir)
        wanted = [k for k in model.state_dict() if not k.startswith("vision_model.")]
        missing = [k for k in wanted if k not in checkpoint]
        if missing:
            raise CheckpointError(f"{self.pretrained_dir} lacks the text tower tensors {missing[:3]}")
        model.load_state_dict({k: checkpoint[k] for k in wanted}, strict=False)
        return model

    def head(self, task: str, device: torch.device) -> StateDict:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(self.pretrained_dir)
        clip = self._clip.to(device)
        max_length = clip.config.text_config.max_position_embeddings

        def encode(texts: list[str]) -> torch.Tensor:
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            pooled = clip.text_model(input_ids=tokens["input_ids"].to(device),
                                     attention_mask=tokens["attention_mask"].to(device)).pooler_output
            return clip.text_projection(pooled)

        classnames, templates = class_prompts(task)
        try:
            embeddings = zero_shot_embeddings(encode, classnames, templates).cpu()
        finally:
            clip.to("cpu")
        return {"class_embeddings": embeddings, "logit_scale": clip.logit_scale.detach().exp().reshape(1).cpu(),
                "visual_projection": clip.visual_projection.weight.detach().clone().cpu()}

    @cached_property
    def image_processor(self) -> Any:
        try:  # transformers 5: the PIL backend of CLIPImageProcessor, which needs no torchvision
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
        except ImportError:  # transformers 4
            from transformers import CLIPImageProcessor as Processor
        return Processor.from_pretrained(self.pretrained_dir)

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def fingerprint(self) -> dict[str, Any]:
        return _dir_fingerprint(self.pretrained_dir)


class OpenClipLineage:
    """θ_pre from open_clip (``ViT-B-32`` / ``ViT-L-14``, OpenAI weights), experts as task_vectors state dicts."""

    name = "open_clip"

    def __init__(self, model_name: str, pretrained: str, experts: Mapping[str, str]) -> None:
        self.model_name = model_name
        self.pretrained_spec = pretrained
        self.expert_specs = dict(experts)

    @cached_property
    def _model(self) -> tuple[Any, Any, Any]:
        """(open_clip CLIP model, validation transform, tokenizer)."""
        try:
            import open_clip
        except ImportError as exc:  # includes a missing or broken torchvision
            raise MissingAssetError(
                f"the open_clip lineage needs open_clip_torch and a torchvision matching your torch build: "
                f"`{CLIP_EXTRA}`; the default lineage 'hf' needs neither ({exc})"
            ) from exc
        spec = self.pretrained_spec
        if Path(spec).suffix in (".pt", ".bin", ".pth"):
            raise CheckpointError(f"{spec} is a pickle; pass an open_clip pretrained tag or a .safetensors file")
        model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=spec)
        return model.eval(), preprocess, open_clip.get_tokenizer(self.model_name)

    @cached_property
    def family(self) -> Family:
        from bench.families.open_clip import OpenClipVisionFamily

        visual = self._model[0].visual
        activation = "quick_gelu" if type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
        state = visual.state_dict()
        return OpenClipVisionFamily.from_state_dict(state, heads=visual.transformer.resblocks[0].attn.num_heads,
                                                    activation=activation, prefix="")

    def pretrained_body(self) -> StateDict:
        return {k: v.detach().clone() for k, v in self._model[0].visual.state_dict().items()}

    def expert_file(self, task: str) -> Path:
        spec = Path(self.expert_specs[task]).expanduser()
        return spec / TASK_VECTORS_NAMES[task] / "finetuned.safetensors" if spec.is_dir() else spec

    def expert_available(self, task: str) -> bool:
        return self.expert_file(task).is_file()

    def expert_body(self, task: str) -> StateDict:
        path = self.expert_file(task)
        if not path.is_file():
            raise MissingAssetError(
                f"expert of task {task}: {path} not found; convert task_vectors' {TASK_VECTORS_NAMES[task]}/finetuned.pt "
                f"to safetensors there (see tasks/clip_ta8.py) or set {TASK_VECTORS_ENV}"
            )
        return open_clip_body(load_state(path))

    def head(self, task: str, device: torch.device) -> StateDict:
        model, _, tokenizer = self._model
        model.to(device)

        def encode(texts: list[str]) -> torch.Tensor:
            return model.encode_text(tokenizer(texts).to(device))

        classnames, templates = class_prompts(task)
        try:
            embeddings = zero_shot_embeddings(encode, classnames, templates).cpu()
        finally:
            model.to("cpu")
        return {"class_embeddings": embeddings, "logit_scale": model.logit_scale.detach().exp().reshape(1).cpu()}

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        transform = self._model[1]
        return torch.stack([transform(image.convert("RGB")) for image in images])

    def fingerprint(self) -> dict[str, Any]:
        return {"open_clip": package_version("open_clip_torch"), "model": self.model_name, "pretrained": self.pretrained_spec}


def open_clip_body(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The open_clip visual tower inside ``state`` (an ``ImageEncoder``, ``CLIP`` or tower state dict), keys unprefixed."""
    from bench.families.open_clip import OpenClipVisionFamily

    # Only the key layout is read here; the head count (not recorded in a state dict) does not matter.
    family = OpenClipVisionFamily.from_state_dict(state, heads=1)
    p = family.prefix
    return {k[len(p):]: state[k] for k in family.state_shapes()}


def _dir_fingerprint(path: Path) -> dict[str, Any]:
    """Names, sizes and modification times of a directory's weight and config files (cheap, no hashing of GBs)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


# ---------------------------------------------------------------- the suites


class ClipTA8(Suite):
    """CLIP vision tower on the 8-task protocol; zero-shot heads; experts from a pinned checkpoint lineage."""

    MODEL = ""
    """Hugging Face model name, e.g. ``clip-vit-base-patch32``."""
    OPEN_CLIP_MODEL = ""
    """open_clip architecture name, e.g. ``ViT-B-32``."""
    EVAL_BATCH_SIZE = 128
    TRAIN_BATCH_SIZE = 32
    LR = 1e-5
    """FusionBench's expert recipe: Adam, lr 1e-5, batch 32, 4000 steps, vision tower only."""
    EXPERT_STEPS = 4000

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, lineage: str | None = None,
                 pretrained: str | None = None, experts: str | Mapping[str, str] | None = None,
                 datasets: Mapping[str, str | DatasetSource] | None = None, eval_limit: int | None = None) -> None:
        """``lineage``: 'hf' or 'open_clip' (default ``$MERGEARENA_CLIP_LINEAGE``, else 'hf').
        ``pretrained``: θ_pre's Hub id or directory (open_clip: a pretrained tag or .safetensors file).
        ``experts``: ``{task: id or directory}``, or one string: a pattern with ``{task}`` (hf) or the
        directory of converted task_vectors checkpoints (open_clip). ``datasets``: ``{task: id or
        directory}``. ``eval_limit``: evaluate on the first N test images (default
        ``$MERGEARENA_CLIP_EVAL_LIMIT``, else the whole split, as the published tables do)."""
        super().__init__(cache_dir)
        self.lineage_name = lineage or os.environ.get(LINEAGE_ENV, "hf")
        if self.lineage_name not in LINEAGES:
            raise ValueError(f"unknown CLIP checkpoint lineage {self.lineage_name!r}; choose one of {', '.join(LINEAGES)}")
        self.datasets = {t: _dataset_source(datasets.get(t) if datasets else None, DATASETS[t]) for t in TASKS}
        limit = eval_limit if eval_limit is not None else os.environ.get(EVAL_LIMIT_ENV)
        self.eval_limit = int(limit) if limit not in (None, "") else None
        self.lineage = self._make_lineage(pretrained, experts)
        self._heads: dict[str, StateDict] = {}
        self._data: dict[tuple[str, str], Any] = {}

    def _make_lineage(self, pretrained: str | None, experts: str | Mapping[str, str] | None) -> HFLineage | OpenClipLineage:
        if self.lineage_name == "hf":
            specs = _expert_specs(experts, lambda t: f"tanganke/{self.MODEL}_{t}")
            return HFLineage(pretrained or f"openai/{self.MODEL}", specs)
        root = os.environ.get(TASK_VECTORS_ENV, "task_vectors_checkpoints")
        specs = _expert_specs(experts, lambda t: str(Path(root) / self.OPEN_CLIP_MODEL))
        return OpenClipLineage(self.OPEN_CLIP_MODEL, pretrained or "openai", specs)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def family(self) -> Family:
        return self.lineage.family

    def load_pretrained(self) -> StateDict:
        return self.lineage.pretrained_body()

    def reference_table(self) -> Path:
        """The published table of this suite's lineage, which `bench reproduce` checks the baselines against."""
        return REFERENCE_DIR / f"{self.name}.{self.lineage_name}.json"

    def recipe(self) -> dict[str, Any]:
        return {
            "lineage": self.lineage_name,
            "pretrained": self.lineage.pretrained_spec,
            "experts": dict(self.lineage.expert_specs),
            "datasets": {t: s.spec() for t, s in self.datasets.items()},
            "prompts": hash_json(task_prompts())[:16],
            "head": "zero-shot: renormalised mean of normalised template embeddings of θ_pre's text tower",
            "eval_limit": self.eval_limit,
            "finetune": {"optimizer": "Adam", "lr": self.LR, "batch_size": self.TRAIN_BATCH_SIZE},
        }

    # ------------------------------------------------------------ experts and heads (given, not trained)

    def expert_cached(self, task: str) -> bool:
        return task in self._experts or self.lineage.expert_available(task)

    def expert(self, task: str) -> Expert:
        """The released checkpoint of ``task`` (vision tower) with the task's zero-shot head."""
        self.check_task(task)
        if task not in self._experts:
            body = self.lineage.expert_body(task)
            check_compatible(self.pretrained(), body, what=f"expert {self.lineage.expert_specs[task]!r} of task {task}")
            self._experts[task] = Expert(body=body, head=self.head(task))
        return self._experts[task]

    def head(self, task: str) -> StateDict:
        """``task``'s zero-shot head, computed once from θ_pre's text tower and cached on disk."""
        self.check_task(task)
        if task not in self._heads:
            key = hash_json({"suite": self.name, "lineage": self.lineage_name, "pretrained": self.lineage.fingerprint(),
                             "prompts": task_prompts()[task]})[:16]
            path = self.cache_dir / "clip-heads" / self.name / key / f"{task}.safetensors"
            if path.is_file():
                head = load_state(path)
            else:
                head = self.lineage.head(task, self.device)
                save_state(head, path, {"suite": self.name, "task": task})
            check_head(head, len(class_prompts(task)[0]))
            self._heads[task] = head
        return self._heads[task]

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ------------------------------------------------------------ data

    def dataset(self, task: str, split: Split) -> Any:
        """``task``'s ``split`` as a `datasets.Dataset` (checked against the class list)."""
        self.check_task(task)
        if (task, split) not in self._data:
            source = self.datasets[task]
            ds = load_dataset_split(source.path, source.config, split, f"{split} split of task {task}")
            _check_columns(ds, source, task, len(class_prompts(task)[0]))
            self._data[(task, split)] = ds
        return self._data[(task, split)]

    def batches(self, task: str, split: Split, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        ds = self.dataset(task, split)
        source = self.datasets[task]
        for idx in batch_indices(len(ds), batch_size, limit, shuffle, seed):
            rows = ds[[int(i) for i in idx]]
            pixels = self.lineage.preprocess(list(rows[source.image_column]))
            yield Batch(inputs={"pixel_values": pixels}, labels=torch.as_tensor(rows[source.label_column]))

    # ------------------------------------------------------------ models

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> ZeroShotClassifier:
        self.check_task(task)
        check_head(head, len(class_prompts(task)[0]))
        return ZeroShotClassifier(self.family().build(body), head).eval()

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.LR)

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        """Re-fine-tune ``body`` on ``task`` with FusionBench's recipe for ``steps`` steps (head fixed).

        The suite never builds its own experts: without ``steps`` this raises, naming the checkpoints.
        """
        self.check_task(task)
        if steps is None:
            raise MissingAssetError(
                f"{self.name} does not train its experts; it uses the released checkpoint "
                f"{self.lineage.expert_specs[task]!r} for task {task} (lineage {self.lineage_name}; pretrained "
                f"{self.lineage.pretrained_spec!r})"
            )
        head = head if head is not None else self.head(task)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.task_model(body, head, task).train()
            stream = endless(lambda epoch: self.batches(task, "train", batch_size=self.TRAIN_BATCH_SIZE, shuffle=True,
                                                        seed=seed * 1000 + epoch))
            train(model, self.make_optimizer(model.body.parameters()), stream, steps, regularizer,
                  desc=f"{self.name}/{task}")
        trained = detached_state(model.body)
        return Expert(body={k: trained[k].to(v.dtype) for k, v in body.items()}, head=dict(head))

    @torch.no_grad()
    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        model = self.task_model(body, head, task).to(self.device)
        n = len(self.dataset(task, "test")) if self.eval_limit is None else min(self.eval_limit, len(self.dataset(task, "test")))
        correct = total = 0
        batches = self.batches(task, "test", batch_size=self.EVAL_BATCH_SIZE, limit=self.eval_limit)
        for batch in progress(batches, total=-(-n // self.EVAL_BATCH_SIZE), desc=f"{self.name}/{task} eval"):
            logits = model(batch.inputs["pixel_values"].to(self.device))
            correct += int((logits.argmax(-1).cpu() == batch.labels).sum())
            total += len(batch.labels)
        if total == 0:
            raise ValueError(f"task {task} has no test images")
        return {"accuracy": correct / total}


def _expert_specs(experts: str | Mapping[str, str] | None, default: Any) -> dict[str, str]:
    if isinstance(experts, Mapping):
        unknown = sorted(set(experts) - set(TASKS))
        if unknown:
            raise ValueError(f"experts given for unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
        return {t: str(experts.get(t) or default(t)) for t in TASKS}
    if isinstance(experts, str):  # one directory for all (open_clip layout) or a '{task}' pattern
        return {t: experts.replace("{task}", t) for t in TASKS}
    return {t: default(t) for t in TASKS}


def _dataset_source(given: str | DatasetSource | None, default: DatasetSource) -> DatasetSource:
    if given is None:
        return default
    if isinstance(given, DatasetSource):
        return given
    return DatasetSource(str(given), default.config, default.image_column, default.label_column)


def _check_columns(ds: Any, source: DatasetSource, task: str, num_classes: int) -> None:
    columns = set(ds.column_names)
    missing = [c for c in (source.image_column, source.label_column) if c not in columns]
    if missing:
        raise CheckpointError(f"the {task} dataset {source.path!r} lacks column(s) {missing}; it has {sorted(columns)}")
    names = getattr(ds.features[source.label_column], "names", None)
    # A dataset whose label set differs from the class list would be scored against the wrong heads.
    if names is not None and len(names) != num_classes:
        raise CheckpointError(
            f"the {task} dataset {source.path!r} has {len(names)} classes but the task's class list has {num_classes}"
        )


@suites.register()
class ClipViTB32TA8(ClipTA8):
    """CLIP ViT-B/32 vision tower on SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (zero-shot heads)."""

    name = "clip-vit-b32-ta8"
    description = "CLIP ViT-B/32 (88M vision tower) on the 8-task protocol; FusionBench or task_vectors experts; needs a GPU"
    MODEL = "clip-vit-base-patch32"
    OPEN_CLIP_MODEL = "ViT-B-32"


@suites.register()
class ClipViTL14TA8(ClipTA8):
    """CLIP ViT-L/14 vision tower on SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (zero-shot heads)."""

    name = "clip-vit-l14-ta8"
    description = "CLIP ViT-L/14 (304M vision tower) on the 8-task protocol; FusionBench or task_vectors experts; needs a GPU"
    MODEL = "clip-vit-large-patch14"
    OPEN_CLIP_MODEL = "ViT-L-14"
    EVAL_BATCH_SIZE = 64
