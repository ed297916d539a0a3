"""Streaming, mergeable statistics of dictionary features and residual streams."""

from emdiff.stats.collect import collect_stats, selection_mask
from emdiff.stats.features import FeatureStats, ResidualStats

__all__ = ["FeatureStats", "ResidualStats", "collect_stats", "selection_mask"]
