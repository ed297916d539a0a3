"""Streaming, mergeable statistics of dictionary features and residual streams."""

from emdiff.stats.collect import StatsConfig, collect_stats
from emdiff.stats.features import FeatureStats, ResidualStats

__all__ = ["FeatureStats", "ResidualStats", "StatsConfig", "collect_stats"]
