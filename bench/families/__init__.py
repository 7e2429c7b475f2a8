"""Architecture adapters and their architecture maps."""

from bench.families.base import ArchitectureMap, AttentionMap, LayerMap, MLPMap, get_qkv, set_qkv
from bench.families.family import Family

__all__ = ["ArchitectureMap", "AttentionMap", "Family", "LayerMap", "MLPMap", "get_qkv", "set_qkv"]
