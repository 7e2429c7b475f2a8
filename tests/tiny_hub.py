"""Tiny random-init stand-ins for Hub checkpoints and datasets, written to a directory laid out like
the Hub (``<root>/<hub id>``), so the real-scale suites load them through their real loading code.

- `tiny_clip_tokenizer`: a byte-level CLIP tokenizer with no merges (one token per byte);
- `save_tiny_clip`: a full ``CLIPModel`` directory (weights, config, tokenizer, image processor), 16x16 images;
- `save_tiny_clip_vision`: a ``CLIPVisionModel`` expert in transformers 4's layout (``vision_model.*``,
  as the FusionBench checkpoints) or transformers 5's flat one;
- `save_image_dataset`: a ``DatasetDict`` of random images with a ``ClassLabel`` column, via ``save_to_disk``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=160, bos_token_id=0, eos_token_id=1, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8, hidden_act="quick_gelu", initializer_factor=2.0)
IMAGE = 16


def tiny_clip_tokenizer() -> transformers.CLIPTokenizer:
    """Byte-level BPE without merges: ids 0/1 are start/end of text, then 256 bytes and 256 word-final bytes."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip_config(projection_dim: int = 16) -> transformers.CLIPConfig:
    return transformers.CLIPConfig(text_config=dict(TEXT), vision_config=dict(VISION), projection_dim=projection_dim)


def tiny_image_processor() -> object:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


def save_tiny_clip(path: Path, seed: int = 0) -> transformers.CLIPModel:
    """A tiny full ``CLIPModel`` saved as a Hub-like directory; returns the model."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_clip_config()).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    tiny_image_processor().save_pretrained(path)
    return model


def save_tiny_clip_vision(path: Path, vision_state: dict[str, torch.Tensor], *, flat: bool = False) -> None:
    """A ``CLIPVisionModel`` expert directory from a ``vision_model.*`` state (transformers 4 layout unless ``flat``)."""
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.CLIPVisionConfig(**VISION).to_dict()
    config.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"],
                  transformers_version="5.0.0" if flat else "4.40.0")
    (path / "config.json").write_text(json.dumps(config))
    state = {(k[len("vision_model."):] if flat else k): v.contiguous() for k, v in vision_state.items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def save_image_dataset(path: Path, classnames: list[str], *, n_train: int = 6, n_test: int = 6, seed: int = 0,
                       size: int = 20, mode: str = "RGB") -> None:
    """A ``DatasetDict(train, test)`` of random images and labels cycling over the classes."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classnames)})
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode) for _ in range(n)]
        labels = [int(i % len(classnames)) for i in rng.permutation(n)]
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))


# ---------------------------------------------------------------- Stable Diffusion

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT["hidden_size"], attention_head_dim=4, norm_num_groups=8)
VAE = dict(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
           sample_size=16)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET).eval()


def save_tiny_sd(path: Path, seed: int = 0):
    """A tiny SD pipeline directory (unet, vae, text_encoder, tokenizer, DDIM scheduler); returns the UNet.

    The VAE halves the resolution once, so 16-pixel images have 8x8 latents.
    """
    from diffusers import AutoencoderKL, DDIMScheduler

    path.mkdir(parents=True, exist_ok=True)
    unet = tiny_unet(seed)
    unet.save_pretrained(path / "unet")
    torch.manual_seed(seed + 1)
    AutoencoderKL(**VAE).save_pretrained(path / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).save_pretrained(path / "text_encoder")
    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(path / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet


def save_unet_expert(path: Path, unet_state: dict[str, torch.Tensor], *, bare: bool = False) -> None:
    """An expert pipeline directory holding only ``unet/`` (or, ``bare``, the UNet directory itself)."""
    target = path if bare else path / "unet"
    unet = tiny_unet()
    unet.load_state_dict(unet_state)
    unet.save_pretrained(target)


def save_caption_dataset(path: Path, n: int = 4, seed: int = 0, size: int = 24) -> None:
    """A one-split image-caption dataset (``image``, ``text``), as lambdalabs/naruto-blip-captions."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)) for _ in range(n)]
    texts = [f"a drawing of thing {i}" for i in range(n)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "text": texts}).cast_column(
        "image", datasets.Image())}).save_to_disk(str(path))
