"""One YAML, one command, one run folder: the pipeline config (:mod:`.config`), what its stages
read (:mod:`.inputs`), its stages before the analyses (:mod:`.stages`) and the runner with its
content-hash stage cache (:mod:`.run`)."""

from emdiff.pipeline.config import PipelineConfig, PipelineConfigError, load_pipeline
from emdiff.pipeline.run import run_pipeline

__all__ = ["PipelineConfig", "PipelineConfigError", "load_pipeline", "run_pipeline"]
