"""MergeArena: proactive defenses against unauthorized model merging, and the attacks that break them."""

__version__ = "0.1.0"
