"""The analyses, each one config behind one interface (:class:`Analysis` ``.run(ctx)``): Q1
dataset diff, Q2 model diff, Q3 response diff, ranking overlap, transfer, the misalignment
direction, its decomposition, latent attribution, steering / ablation sweeps, LoRA reading and
phases, data screening, benign re-alignment and feature cards."""

from emdiff.analyses.base import ANALYSES, Analysis, Result, RunContext, Variant
from emdiff.analyses.cards import CardsResult, FeatureCards
from emdiff.analyses.cards_io import Explanation, attach_explanations
from emdiff.analyses.common import DiffResult, encode_qa
from emdiff.analyses.dataset_diff import DatasetDiff
from emdiff.analyses.directions import Attribute, Decompose, DirectionResult, MeanDirection
from emdiff.analyses.lora import LoraPhases, LoraRead, LoraResult
from emdiff.analyses.model_diff import ModelDiff
from emdiff.analyses.overlap import Overlap, RankingOverlap, overlap
from emdiff.analyses.response_diff import ResponseDiff, ResponseSplit, load_judged, split_responses
from emdiff.analyses.steer import Steer
from emdiff.analyses.training import Mitigate, Screen, TableResult
from emdiff.analyses.transfer import Transfer, TransferResult

__all__ = [
    "ANALYSES",
    "Analysis",
    "Attribute",
    "CardsResult",
    "DatasetDiff",
    "Decompose",
    "DiffResult",
    "DirectionResult",
    "Explanation",
    "FeatureCards",
    "LoraPhases",
    "LoraRead",
    "LoraResult",
    "MeanDirection",
    "Mitigate",
    "ModelDiff",
    "Overlap",
    "RankingOverlap",
    "ResponseDiff",
    "ResponseSplit",
    "Result",
    "RunContext",
    "Screen",
    "Steer",
    "TableResult",
    "Transfer",
    "TransferResult",
    "Variant",
    "attach_explanations",
    "encode_qa",
    "load_judged",
    "overlap",
    "split_responses",
]
