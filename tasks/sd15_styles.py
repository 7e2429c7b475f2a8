"""The ``sd15-styles`` suite: Stable Diffusion 1.5 style fine-tunes, merged in the UNet, scored by CLIP score.

θ_pre is ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (diffusers layout). A task is a style, and
its expert is a full fine-tune of SD 1.5 released as a diffusers pipeline (or a bare ``unet``
directory). **The UNet is the body** (`bench.families.unet`: the map exposes each transformer
block's self-attention and its GEGLU feed-forward as a gated MLP); the text encoder, tokenizer,
VAE and scheduler are θ_pre's, shared by every task and never merged, so a style that lives partly
in an expert's fine-tuned text encoder is scored through θ_pre's (the UNet carries the style).

Default styles (each configurable, ``tasks=`` or ``$MERGEARENA_SD15_TASKS`` as JSON
``{"name": {"model": id, "style": phrase, "data": dataset id}}``), all full SD 1.5 fine-tunes per
their model cards (check a checkpoint's lineage before publishing its numbers):

- ``mo-di``: ``nitrosocke/mo-di-diffusion``, "modern disney style";
- ``openjourney``: ``prompthero/openjourney``, "mdjrny-v4 style";
- ``analog``: ``wavymulder/Analog-Diffusion``, "analog style".

``lambdalabs/sd-naruto-diffusers`` (Naruto) is not a default: it was trained from Justin Pinkney's
Pokémon model, an SD 1.4 descendant (eolecvk.com, "Stable Diffusion Finetuning"), so its task
vector against SD 1.5 is not a fine-tuning delta. A Naruto or WikiArt expert fine-tuned from SD 1.5
(e.g. with diffusers' ``train_text_to_image.py`` on ``lambdalabs/naruto-blip-captions``) plugs in
through ``tasks=``.

**Metric.** For every task, fixed prompts ``"<subject>, <style>"`` over `SUBJECTS`, prompt i
generated with seed i (a CPU ``torch.Generator`` per prompt, so batching does not change an image),
``steps`` denoising steps of θ_pre's scheduler at classifier-free guidance ``guidance``, at
``resolution`` pixels, no safety checker. ``clip_score`` (the primary metric) is the mean over
prompts of ``100 · max(cos(E_img, E_text), 0)`` with the prompt as text, the definition of
torchmetrics' ``CLIPScore``, computed here with transformers' ``CLIPModel`` (``scorer``, default
``openai/clip-vit-large-patch14``, torchmetrics' default). ``style_score`` is the same against the
style phrase alone. The images of each evaluation are saved as one PNG grid under
``<cache>/sd15-grids/<task>/<weights hash>.png`` for the site.

**Batches** (for defenses and attacks that run or train the UNet; inputs are the UNet's
``sample``, ``timestep``, ``encoder_hidden_states``, labels its training target): ``train`` draws
image-caption pairs from the task's ``data`` dataset (VAE latents, seeded noise and timesteps, the
scheduler's ε or v target: the SD fine-tuning objective); ``test`` holds no images, so its batches
are probes of the fixed prompts at a zero latent, ``sample = sqrt(1 - ᾱ_t) ε`` with ``t`` spread
over the schedule and target ε (exact for x0 = 0). Task models return the predicted noise and
`loss` is the mean squared error. AdaMerging's entropy objective has no meaning on noise
predictions, so ``adamerging-*`` merges are not meaningful on this suite.

Experts are given: ``finetune`` with the expert recipe (``steps=None``) raises, naming the
checkpoints; with ``steps`` it trains the UNet (AdamW, lr 1e-5, the diffusers example's rate for
style fine-tunes) on the ``train`` batches. Generation uses CUDA when present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.artifact import Artifact
from bench.families.unet import UNetFamily
from bench.registry import suites
from bench.suite import Batch, Expert, MissingAssetError, Regularizer, Split, Suite
from bench.weights import CheckpointError, LazyStateDict, StateDict, check_compatible, state_hash
from tasks.hub import load_dataset_split, local_dir, resolve_model_dir
from tasks.training import detached_state, endless, train

BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SCORER = "openai/clip-vit-large-patch14"
TASKS_ENV = "MERGEARENA_SD15_TASKS"
PIPELINE_FILES = ("*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors")
SUBJECTS = (
    "a portrait of an old fisherman",
    "a castle on a hill at sunset",
    "a cat sitting on a windowsill",
    "a busy city street in the rain",
)
"""Subjects of the fixed evaluation prompts (prompt = subject + ", " + style)."""


@dataclass(frozen=True)
class StyleTask:
    """One style: the expert checkpoint, its trigger phrase, and optional image-caption training data."""

    model: str
    """Hub id or directory of a diffusers SD 1.5 pipeline (or of its ``unet`` alone)."""
    style: str
    """The style phrase appended to every prompt; also the text of ``style_score``."""
    data: str | None = None
    """Dataset id or directory of image-caption pairs (``image``, ``text`` columns) for ``train`` batches."""
    image_column: str = "image"
    caption_column: str = "text"


DEFAULT_TASKS: dict[str, StyleTask] = {
    "mo-di": StyleTask("nitrosocke/mo-di-diffusion", "modern disney style"),
    "openjourney": StyleTask("prompthero/openjourney", "mdjrny-v4 style"),
    "analog": StyleTask("wavymulder/Analog-Diffusion", "analog style"),
}


def unet_weights(pipeline_or_unet_dir: Path) -> LazyStateDict:
    """The full-precision safetensors weights of a diffusers UNet (``<dir>/unet`` or ``<dir>`` itself).

    Variant files (``*.fp16.safetensors``) are skipped when a full-precision file exists: reading
    both would mix two copies of every tensor.
    """
    unet_dir = pipeline_or_unet_dir / "unet" if (pipeline_or_unet_dir / "unet").is_dir() else pipeline_or_unet_dir
    files = sorted(unet_dir.glob("*.safetensors"))
    full = [f for f in files if len(f.name.split(".")) == 2]
    if not files:
        pickles = [f.name for f in unet_dir.glob("*.bin")]
        hint = f" (only pickles: {pickles}; convert them to safetensors, pickles are never loaded)" if pickles else ""
        raise CheckpointError(f"{unet_dir} has no UNet safetensors weights{hint}")
    return LazyStateDict(full or files)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair, ``100 · max(cos(image, text), 0)`` (torchmetrics' CLIPScore before averaging)."""
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


def image_grid(images: Sequence[Any]) -> Any:
    """One row of equally sized PIL images."""
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (i * w, 0))
    return grid


def _style(name: str, task: StyleTask | Mapping[str, Any]) -> StyleTask:
    if isinstance(task, StyleTask):
        return task
    try:
        return StyleTask(**task)
    except TypeError as exc:
        raise ValueError(f"style task {name!r} needs 'model' and 'style' (and optionally 'data'): {exc}") from exc


class Denoiser(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states).sample``; ``.body`` is the UNet."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.body(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


@suites.register()
class SD15Styles(Suite):
    """Stable Diffusion 1.5 style fine-tunes (UNet merged; text encoder and VAE shared); CLIP score."""

    name = "sd15-styles"
    description = "Stable Diffusion 1.5 style experts (UNet merged), scored by CLIP score of fixed prompts; needs a GPU"
    primary_metric = "clip_score"
    LR = 1e-5
    TRAIN_BATCH_SIZE = 4

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, base: str = BASE,
                 tasks: Mapping[str, StyleTask | Mapping[str, Any]] | None = None, scorer: str = SCORER,
                 steps: int = 25, guidance: float = 7.5, resolution: int = 512,
                 subjects: Sequence[str] = SUBJECTS) -> None:
        super().__init__(cache_dir)
        if tasks is None and os.environ.get(TASKS_ENV):
            try:
                tasks = json.loads(os.environ[TASKS_ENV])
            except json.JSONDecodeError as exc:
                raise ValueError(f"${TASKS_ENV} is not valid JSON: {exc}") from exc
        self.styles = {name: _style(name, t) for name, t in (tasks or DEFAULT_TASKS).items()}
        if not self.styles:
            raise ValueError("sd15-styles needs at least one style task")
        if steps < 1 or resolution % 8 or not subjects:
            raise ValueError("sd15-styles needs steps >= 1, a resolution divisible by 8 and at least one subject")
        self.base, self.scorer_spec = base, scorer
        self.steps, self.guidance, self.resolution, self.subjects = steps, guidance, resolution, tuple(subjects)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.styles)

    def recipe(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "experts": {t: s.model for t, s in self.styles.items()},
            "styles": {t: s.style for t, s in self.styles.items()},
            "data": {t: s.data for t, s in self.styles.items()},
            "scorer": self.scorer_spec,
            "generation": {"steps": self.steps, "guidance": self.guidance, "resolution": self.resolution,
                           "subjects": list(self.subjects), "seeds": "prompt index"},
            "finetune": {"optimizer": "AdamW", "lr": self.LR, "batch_size": self.TRAIN_BATCH_SIZE},
        }

    def prompts(self, task: str) -> list[str]:
        self.check_task(task)
        return [f"{subject}, {self.styles[task].style}" for subject in self.subjects]

    # ------------------------------------------------------------ θ_pre's shared components

    @cached_property
    def base_dir(self) -> Path:
        return resolve_model_dir(self.base, "Stable Diffusion 1.5 θ_pre (diffusers layout)", PIPELINE_FILES)

    @cached_property
    def _family(self) -> UNetFamily:
        return UNetFamily.from_pretrained(self.base_dir / "unet")

    def family(self) -> UNetFamily:
        return self._family

    def load_pretrained(self) -> StateDict:
        state = unet_weights(self.base_dir)
        return self.family().to_body({k: state[k] for k in state})

    @cached_property
    def _components(self) -> dict[str, Any]:
        """θ_pre's tokenizer, text encoder, VAE and scheduler (loaded from safetensors only)."""
        import diffusers
        import transformers

        d = self.base_dir
        scheduler_config = diffusers.DDIMScheduler.load_config(str(d / "scheduler"))
        scheduler_cls = getattr(diffusers, scheduler_config.get("_class_name", "PNDMScheduler"))
        return {
            "tokenizer": transformers.AutoTokenizer.from_pretrained(d / "tokenizer"),
            "text_encoder": transformers.CLIPTextModel.from_pretrained(d / "text_encoder", use_safetensors=True).eval(),
            "vae": diffusers.AutoencoderKL.from_pretrained(d / "vae", use_safetensors=True).eval(),
            "scheduler": scheduler_cls.from_config(scheduler_config),
            "train_scheduler": diffusers.DDPMScheduler.from_config(scheduler_config),
        }

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """θ_pre's text-encoder states of ``prompts``, padded to the tokenizer's length as the pipeline does."""
        tokenizer, encoder = self._components["tokenizer"], self._components["text_encoder"]
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        return encoder(tokens.input_ids.to(encoder.device))[0].cpu()

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self._components["vae"].config.block_out_channels) - 1)

    # ------------------------------------------------------------ experts (given, not trained)

    def expert_cached(self, task: str) -> bool:
        return task in self._experts or local_dir(self.styles[task].model) is not None

    def expert(self, task: str) -> Expert:
        """``task``'s released UNet as a body; SD experts have no task head (an empty one)."""
        self.check_task(task)
        if task not in self._experts:
            spec = self.styles[task].model
            state = unet_weights(resolve_model_dir(spec, f"expert of style {task}", PIPELINE_FILES))
            body = self.family().to_body({k: state[k] for k in state})
            check_compatible(self.pretrained(), body, what=f"UNet of expert {spec!r} ({task})")
            self._experts[task] = Expert(body=body, head={})
        return self._experts[task]

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        """Train the UNet ``steps`` steps on ``task``'s image-caption data; without ``steps`` this raises."""
        self.check_task(task)
        if steps is None:
            raise MissingAssetError(
                f"{self.name} does not train its experts; it uses the released checkpoint {self.styles[task].model!r} "
                f"for style {task} (θ_pre {self.base!r})"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.task_model(body, {}, task).train()
            stream = endless(lambda epoch: self.batches(task, "train", batch_size=self.TRAIN_BATCH_SIZE, shuffle=True,
                                                        seed=seed * 1000 + epoch))
            train(model, self.make_optimizer(model.body.parameters()), stream, steps, regularizer,
                  desc=f"{self.name}/{task}", loss_fn=self.loss)
        trained = detached_state(model.body)
        return Expert(body={k: trained[k].to(v.dtype) for k, v in body.items()}, head={})

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.LR)

    def output_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.mse_loss(outputs.float(), batch.labels.float())

    # ------------------------------------------------------------ batches

    def batches(self, task: str, split: Split, *, batch_size: int = 4, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        self.check_task(task)
        if split == "test":
            yield from self._probe_batches(task, batch_size, limit, shuffle, seed)
        else:
            yield from self._train_batches(task, batch_size, limit, shuffle, seed)

    def _probe_batches(self, task: str, batch_size: int, limit: int | None, shuffle: bool, seed: int) -> Iterator[Batch]:
        from tasks.training import batch_indices

        prompts = self.prompts(task)
        scheduler = self._components["train_scheduler"]
        T = scheduler.config.num_train_timesteps
        size = self.resolution // self.vae_scale_factor
        channels = self.family().config.get("in_channels", 4)
        g = torch.Generator().manual_seed(seed)
        for idx in batch_indices(len(prompts), batch_size, limit, shuffle, seed):
            n = len(idx)
            timesteps = torch.tensor([(T - 1) - int(i) * (T // len(prompts)) for i in idx], dtype=torch.long)
            noise = torch.randn(n, channels, size, size, generator=g)
            sample = scheduler.add_noise(torch.zeros_like(noise), noise, timesteps)  # x0 = 0: target is ε exactly
            states = self.encode_prompts([prompts[int(i)] for i in idx])
            yield Batch(inputs={"sample": sample, "timestep": timesteps, "encoder_hidden_states": states}, labels=noise)

    def _train_batches(self, task: str, batch_size: int, limit: int | None, shuffle: bool, seed: int) -> Iterator[Batch]:
        from tasks.training import batch_indices

        style = self.styles[task]
        if style.data is None:
            raise MissingAssetError(
                f"style {task} has no training data; training batches need image-caption pairs: give the task a "
                f"'data' dataset (tasks={{'{task}': {{'model': ..., 'style': ..., 'data': ...}}}} or ${TASKS_ENV})"
            )
        ds = load_dataset_split(style.data, None, "train", f"training data of style {task}")
        c = self._components
        scheduler, vae = c["train_scheduler"], c["vae"]
        g = torch.Generator().manual_seed(seed)
        for idx in batch_indices(len(ds), batch_size, limit, shuffle, seed):
            rows = ds[[int(i) for i in idx]]
            pixels = torch.stack([self._pixels(im) for im in rows[style.image_column]])
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            states = self.encode_prompts(list(rows[style.caption_column]))
            yield Batch(inputs={"sample": noisy, "timestep": timesteps, "encoder_hidden_states": states}, labels=target)

    def _pixels(self, image: Any) -> torch.Tensor:
        """Resize (shorter side), centre-crop to the resolution, scale to [-1, 1]: diffusers' training transform."""
        from PIL import Image

        image = image.convert("RGB")
        r = self.resolution
        scale = r / min(image.size)
        image = image.resize((max(r, round(image.width * scale)), max(r, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
        left, top = (image.width - r) // 2, (image.height - r) // 2
        array = np.asarray(image.crop((left, top, left + r, top + r)), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    # ------------------------------------------------------------ models and evaluation

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> Denoiser:
        self.check_task(task)
        return Denoiser(self.family().build(body)).eval()

    def pipeline(self, body: StateDict | Artifact) -> Any:
        """A ``StableDiffusionPipeline`` of θ_pre's components around the UNet ``body`` (no safety checker)."""
        import diffusers

        c = self._components
        pipe = diffusers.StableDiffusionPipeline(
            vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=self.family().build(body),
            scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    @torch.no_grad()
    def generate(self, body: StateDict | Artifact, task: str) -> list[Any]:
        """The fixed prompts of ``task`` rendered by ``body``, prompt i with seed i."""
        pipe = self.pipeline(body)
        prompts = self.prompts(task)
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        try:
            return pipe(prompts, height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                        guidance_scale=self.guidance, generator=generators, output_type="pil").images
        finally:
            pipe.to("cpu")

    @cached_property
    def _scorer(self) -> tuple[Any, Any, Any]:
        """(CLIPModel, tokenizer, image processor) of the CLIP-score model, weights from safetensors."""
        import transformers

        from bench.weights import open_checkpoint

        d = resolve_model_dir(self.scorer_spec, "CLIP model of the CLIP score")
        model = transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(d)).eval()
        state = open_checkpoint(d)
        missing = [k for k in model.state_dict() if k not in state and not k.endswith("position_ids")]
        if missing:
            raise CheckpointError(f"{d} lacks CLIP tensors {missing[:3]}")
        model.load_state_dict({k: state[k] for k in model.state_dict() if k in state}, strict=False)
        try:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        return model, transformers.AutoTokenizer.from_pretrained(d), Processor.from_pretrained(d)

    @torch.no_grad()
    def clip_scores(self, images: Sequence[Any], texts: Sequence[str]) -> torch.Tensor:
        """``100 · max(cos, 0)`` of each image with its text under the scorer CLIP."""
        model, tokenizer, processor = self._scorer
        model.to(self.device)
        try:
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            tokens = tokenizer(list(texts), padding=True, truncation=True,
                               max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
            image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            text_embeds = model.text_projection(model.text_model(input_ids=tokens.input_ids.to(self.device),
                                                                 attention_mask=tokens.attention_mask.to(self.device)).pooler_output)
            return clip_score(image_embeds, text_embeds).cpu()
        finally:
            model.to("cpu")

    def grid_path(self, body: StateDict | Artifact, task: str) -> Path:
        """Where the image grid of ``body`` on ``task`` is saved (for the site)."""
        digest = body.content_hash().replace(":", "-") if isinstance(body, Artifact) else state_hash(body)
        return self.cache_dir / "sd15-grids" / task / f"{digest[:24]}.png"

    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        images = self.generate(body, task)
        prompts = self.prompts(task)
        path = self.grid_path(body, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        image_grid(images).save(tmp)
        os.replace(tmp, path)  # a finished grid appears at once
        return {"clip_score": float(self.clip_scores(images, prompts).mean()),
                "style_score": float(self.clip_scores(images, [self.styles[task].style] * len(images)).mean())}
