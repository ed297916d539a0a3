"""Streaming, mergeable statistics of dictionary features and residual streams."""

from emdiff.lazy import lazy_exports

_WHERE = {
    "FeatureStats": "features",
    "ResidualStats": "features",
    "StatsConfig": "collect",
    "collect_stats": "collect",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
