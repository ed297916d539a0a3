"""The analyses: Q1 dataset diff, Q2 model diff, Q3 response diff, overlap and transfer."""

from emdiff.analyses.common import DiffResult, encode_qa, feature_stats
from emdiff.analyses.dataset_diff import dataset_diff
from emdiff.analyses.model_diff import model_diff
from emdiff.analyses.overlap import Overlap, overlap
from emdiff.analyses.response_diff import ResponseSplit, load_judged, response_diff, split_responses
from emdiff.analyses.transfer import transfer

__all__ = [
    "DiffResult",
    "Overlap",
    "ResponseSplit",
    "dataset_diff",
    "encode_qa",
    "feature_stats",
    "load_judged",
    "model_diff",
    "overlap",
    "response_diff",
    "split_responses",
    "transfer",
]
