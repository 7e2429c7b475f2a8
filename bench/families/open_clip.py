"""open_clip ViT image towers (``open_clip.transformer.VisionTransformer``, OpenAI CLIP layout).

This is the layout of the mlfoundations/task_vectors checkpoints that PaRaMS (ISCT-W/PaRaMS) and the
original 8-task CLIP protocol use. Body keys are ``prefix + <VisionTransformer key>``: ``""`` for the
tower alone, ``"visual."`` inside an open_clip ``CLIP`` model, ``"model.visual."`` inside
task_vectors' ``ImageEncoder``. Per layer ``transformer.resblocks.{i}``:

- ``attn.in_proj_weight`` [3d, d] and ``attn.in_proj_bias`` [3d]: Q, K, V stacked on dim 0, as
  ``nn.MultiheadAttention`` stores them (the map's ``fused_qkv``; `get_qkv`/`set_qkv` split it);
- ``attn.out_proj.{weight,bias}``;
- ``mlp.c_fc`` -> activation -> ``mlp.c_proj``: QuickGELU for OpenAI weights, GELU for LAION ones;
- pre-LN ``ln_1`` / ``ln_2``.

The tower also holds ``conv1.weight`` (patch embedding, no bias), ``class_embedding``,
``positional_embedding`` and ``ln_pre`` (the embedding stage), ``ln_post`` and ``proj`` [d, out]
(the projection into the joint image-text space, listed as the map's ``head``; it is applied as
``x @ proj``, so it is no ``nn.Linear``). LayerScale (``ls_1``/``ls_2``) and attentional pooling
are not part of this layout; `OpenClipVisionFamily.from_state_dict` rejects checkpoints that have them.

Building the module needs ``open_clip_torch`` (the optional ``[clip]`` extra), which needs
torchvision; without it `new_module` raises `MissingAssetError`, while the map, `state_shapes` and
every weight-level operation work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from bench.families.base import ATTENTION, FUSED_QKV, MLP, ArchitectureMap, AttentionMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.families.prefixed import Prefixed, check_prefix, unwrap
from bench.registry import families
from bench.suite import MissingAssetError

INSTALL = "pip install mergearena[clip]"
DEFAULT_HEAD_WIDTH = 64
"""open_clip's ``CLIPVisionCfg.head_width``: heads = width // 64 for every OpenAI and LAION ViT."""

_PROBE = "transformer.resblocks.0.attn.in_proj_weight"
_KNOWN_LAYER_KEYS = frozenset(
    f"{m}.{t}" for m in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj") for t in ("weight", "bias")
) | {"attn.in_proj_weight", "attn.in_proj_bias"}

Activation = Literal["quick_gelu", "gelu"]


@families.register()
class OpenClipVisionFamily(Family):
    """An open_clip ``VisionTransformer`` of the given sizes, its keys under ``prefix``."""

    name = "open-clip-vit"

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        patch_size: int = 32,
        image_size: int = 224,
        output_dim: int = 512,
        activation: Activation = "quick_gelu",
        prefix: str = "",
    ) -> None:
        if activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"open_clip ViTs use 'quick_gelu' (OpenAI weights) or 'gelu', not {activation!r}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.width, self.layers, self.heads = width, layers, heads
        self.mlp_width = int(width * mlp_ratio)  # open_clip's ResidualAttentionBlock rounds the same way
        self.mlp_ratio = mlp_ratio
        self.patch_size, self.image_size, self.output_dim = patch_size, image_size, output_dim
        self.activation = activation
        self.prefix = check_prefix(prefix)
        self._map: ArchitectureMap | None = None

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        *,
        heads: int | None = None,
        activation: Activation = "quick_gelu",
        prefix: str | None = None,
    ) -> OpenClipVisionFamily:
        """The family whose body ``state`` is (sizes read from the tensor shapes).

        A state dict does not record the head count or the activation: ``heads`` defaults to
        width // 64 (open_clip's ``head_width``), ``activation`` to QuickGELU (OpenAI weights; pass
        'gelu' for LAION weights). ``prefix`` is found from the key of the first block's in_proj.
        """
        if prefix is None:
            prefix = _find_prefix(state)
        p = check_prefix(prefix)
        for key in (p + "conv1.weight", p + "positional_embedding", p + "proj", p + _PROBE):
            if key not in state:
                raise ValueError(f"not an open_clip VisionTransformer state dict: {key!r} is missing")
        _reject_unknown_layer_keys(state, p)
        conv = _shape(state, p + "conv1.weight")
        width, patch = conv[0], conv[-1]
        grid = math.isqrt(_shape(state, p + "positional_embedding")[0] - 1)
        layers = 1 + max(int(k[len(p) :].split(".")[2]) for k in state if k.startswith(p + "transformer.resblocks."))
        mlp_width = _shape(state, p + "transformer.resblocks.0.mlp.c_fc.weight")[0]
        return cls(
            width,
            layers,
            heads or width // DEFAULT_HEAD_WIDTH,
            mlp_ratio=mlp_width / width,
            patch_size=patch,
            image_size=grid * patch,
            output_dim=_shape(state, p + "proj")[1],
            activation=activation,
            prefix=p,
        )

    # ------------------------------------------------------------ shapes and module

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape of the body, in ``VisionTransformer.state_dict()`` order (no module needed)."""
        p, d, h = self.prefix, self.width, self.mlp_width
        grid = self.image_size // self.patch_size
        shapes = {
            p + "class_embedding": (d,),
            p + "positional_embedding": (grid * grid + 1, d),
            p + "proj": (d, self.output_dim),
            p + "conv1.weight": (d, 3, self.patch_size, self.patch_size),
            p + "ln_pre.weight": (d,),
            p + "ln_pre.bias": (d,),
        }
        for i in range(self.layers):
            b = f"{p}transformer.resblocks.{i}."
            shapes.update(
                {
                    b + "ln_1.weight": (d,),
                    b + "ln_1.bias": (d,),
                    b + "attn.in_proj_weight": (3 * d, d),
                    b + "attn.in_proj_bias": (3 * d,),
                    b + "attn.out_proj.weight": (d, d),
                    b + "attn.out_proj.bias": (d,),
                    b + "ln_2.weight": (d,),
                    b + "ln_2.bias": (d,),
                    b + "mlp.c_fc.weight": (h, d),
                    b + "mlp.c_fc.bias": (h,),
                    b + "mlp.c_proj.weight": (d, h),
                    b + "mlp.c_proj.bias": (d,),
                }
            )
        shapes.update({p + "ln_post.weight": (d,), p + "ln_post.bias": (d,)})
        return shapes

    def new_module(self) -> nn.Module:
        """open_clip's ``VisionTransformer`` (under ``prefix`` when set); needs the ``[clip]`` extra."""
        try:
            from open_clip.transformer import QuickGELU, VisionTransformer
        except ImportError as exc:
            raise MissingAssetError(
                f"the open-clip-vit family needs open_clip to build modules; install it with `{INSTALL}`"
            ) from exc
        model = VisionTransformer(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            layers=self.layers,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            output_dim=self.output_dim,
            act_layer=QuickGELU if self.activation == "quick_gelu" else nn.GELU,
        )
        return Prefixed(model, self.prefix) if self.prefix else model

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        """``resblock.mlp = mlp``: ResidualAttentionBlock adds its output (through ``ls_2``) after ``ln_2``."""
        self._block(module, layer).mlp = mlp

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        if which != "up":
            raise ValueError(f"open_clip's feed-forward has no {which!r} projection; only 'up' (mlp.c_fc)")
        projection = getattr(self._block(module, layer).mlp, "c_fc", None)
        if not isinstance(projection, nn.Module):
            raise ValueError(f"layer {layer}'s feed-forward was replaced by install_mlp; it has no up projection")
        return projection

    def _block(self, module: nn.Module, layer: int) -> nn.Module:
        if not 0 <= layer < self.layers:
            raise IndexError(f"layer {layer} out of range: this open_clip ViT has {self.layers} layers")
        return unwrap(module).transformer.resblocks[layer]

    # ------------------------------------------------------------ map

    def arch_map(self) -> ArchitectureMap:
        if self._map is None:
            p = self.prefix
            self._map = ArchitectureMap(
                family=self.name,
                layers=tuple(self._layer_map(i) for i in range(self.layers)),
                embeddings=(
                    p + "conv1.weight",
                    p + "class_embedding",
                    p + "positional_embedding",
                    p + "ln_pre.weight",
                    p + "ln_pre.bias",
                ),
                final_norms=(p + "ln_post.weight", p + "ln_post.bias"),
                features=frozenset({ATTENTION, FUSED_QKV, MLP}),
                head=(p + "proj",),
            )
        return self._map

    def _layer_map(self, i: int) -> LayerMap:
        p = f"{self.prefix}transformer.resblocks.{i}."
        attention = AttentionMap(
            num_heads=self.heads,
            head_dim=self.width // self.heads,
            num_kv_heads=self.heads,
            fused_qkv=p + "attn.in_proj_weight",
            fused_qkv_bias=p + "attn.in_proj_bias",
            o=p + "attn.out_proj.weight",
            o_bias=p + "attn.out_proj.bias",
        )
        mlp = MLPMap(
            up=p + "mlp.c_fc.weight",
            up_bias=p + "mlp.c_fc.bias",
            down=p + "mlp.c_proj.weight",
            down_bias=p + "mlp.c_proj.bias",
            activation=self.activation,
        )
        norms = tuple(p + f"{n}.{t}" for n in ("ln_1", "ln_2") for t in ("weight", "bias"))
        return LayerMap(index=i, attention=attention, mlp=mlp, norms=norms, prefix=p)


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    shape = getattr(state, "shape", None)  # LazyStateDict reads a shape without loading the tensor
    return tuple(shape(key)) if callable(shape) else tuple(state[key].shape)


def _find_prefix(state: Mapping[str, torch.Tensor]) -> str:
    found = sorted(
        {k[: -len(_PROBE)] for k in state if k.endswith(_PROBE) and (k[: -len(_PROBE)] + "conv1.weight") in state}
    )
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(repr(f) for f in found)})"
        raise ValueError(f"expected one open_clip VisionTransformer in the state dict, found {what}; pass prefix=")
    return found[0]


def _reject_unknown_layer_keys(state: Mapping[str, torch.Tensor], p: str) -> None:
    block = p + "transformer.resblocks.0."
    unknown = sorted(k[len(block) :] for k in state if k.startswith(block) and k[len(block) :] not in _KNOWN_LAYER_KEYS)
    if unknown:
        raise ValueError(
            f"open_clip block tensors {unknown[:3]} are outside the OpenAI ViT layout this family maps "
            "(LayerScale / scaled attention are not supported)"
        )
