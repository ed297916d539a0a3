"""The one analysis interface: a pydantic config whose ``run(ctx)`` maps a run context to a result.

A :class:`RunContext` holds what every analysis reads: the model (a PEFT model can switch its
adapter), its tokenizer, the :class:`~emdiff.models.read.ReadSpec` and a dictionary per layer it
names, named inputs (token rows, tables, other model variants, earlier results) and the run
folder, under which statistics are cached shard by shard (``stats/<variant>/<dataset>``). An
:class:`Analysis` is a config with ``run(ctx) -> Result``; a :class:`Result` writes its own tables
and figures (``save(out)``) and a flat ``summary()``. The CLI, the demo and the toy know only
this, so a new analysis is one new file that subclasses :class:`Analysis` and registers itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from emdiff.data.positions import Positions
from emdiff.dictionaries.base import SparseDictionary
from emdiff.errors import InputError
from emdiff.models.load import adapter_state, model_identity
from emdiff.models.read import ReadSpec, Row, require_tokens, selection
from emdiff.stats.collect import StatsConfig, check_dictionaries
from emdiff.stats.distributed import collect_stats_sharded
from emdiff.stats.features import FeatureStats, ResidualStats
from emdiff.stats.run import run_stats

Variant = torch.nn.Module | tuple[torch.nn.Module, bool | None]
"""A model as it is, or ``(model, adapter_on)``: a PEFT model with its adapter on or off."""


class Result(Protocol):
    """What an analysis returns: its name, what was computed (``meta``), files and a summary."""

    name: str
    meta: dict

    def save(self, out: str | Path) -> list[Path]:
        """Write tables (``tables/<name>*``) and figures (``plots/<name>*``) under ``out``."""
        ...

    def summary(self) -> dict:
        """Flat JSON-able figures (for ``--json`` and the demo's summary)."""
        ...


@dataclass
class RunContext:
    """Everything an analysis may read; each analysis takes what it needs and names what is
    missing. ``read`` says where the model is read (None for analyses of finished tables)."""

    read: ReadSpec | None = None
    model: torch.nn.Module | None = None
    tokenizer: Any = None
    dictionaries: Mapping[int, SparseDictionary] = field(default_factory=dict)
    datasets: Mapping[str, Sequence[Row]] = field(default_factory=dict)
    """Token rows by name (``encode_chat`` output)."""
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    """Tables by name: judged answers, rankings written by an earlier run."""
    variants: Mapping[str, Variant] = field(default_factory=dict)
    """Other model variants by name (the fine-tuned model, a chat model)."""
    results: dict[str, Result] = field(default_factory=dict)
    """Earlier results by name; :meth:`Analysis.run` callers add theirs here."""
    out: Path | None = None
    """Run folder: statistics are cached under ``out/stats``; None keeps everything in memory."""
    stats_cfg: StatsConfig = field(default_factory=StatsConfig)
    stats_keyed: bool = False
    """Cache statistics in a folder per content hash of their inputs (the pipeline does), so
    changed settings compute anew instead of being refused."""

    def __post_init__(self) -> None:
        if self.model is not None and self.read is not None and self.dictionaries:
            check_dictionaries(self.model, self.dictionaries, self.read)
        self.out = None if self.out is None else Path(self.out)

    def need(self, kind: str, mapping: Mapping, name: str):
        """``mapping[name]``, or an InputError naming what is missing and what there is."""
        if name not in mapping:
            raise InputError(
                f"no {kind} named {name!r} in the run context (it has {sorted(mapping) or 'none'})"
            )
        return mapping[name]

    def require_model(self, what: str) -> torch.nn.Module:
        """The model, once the context has a model, a read spec and its dictionaries."""
        have = {"model": self.model, "read spec": self.read, "dictionaries": self.dictionaries}
        missing = [
            name for name, v in have.items() if v is None or (name == "dictionaries" and not v)
        ]
        if missing:
            raise InputError(
                f"{what} reads a model through a dictionary: the run context has no {', '.join(missing)}"
            )
        return self.model

    def feature_stats(
        self, rows: Sequence[Row], dataset: str, variant: Variant | None = None, name: str = "model"
    ) -> dict[int, FeatureStats]:
        """Feature statistics of ``rows`` read by ``variant`` (default: the model as it is); with
        ``out`` they are sharded, resumable and kept under ``out/stats/<name>/<dataset>``, and
        reusing that folder with another model, adapter, read spec or setting is refused."""
        return self.read_stats(rows, dataset, variant, name)[0]

    def read_stats(
        self, rows: Sequence[Row], dataset: str, variant: Variant | None = None, name: str = "model"
    ) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
        """:meth:`feature_stats` and the raw residual statistics of the same tokens (empty when
        ``stats_cfg.residual`` is off)."""
        model = self.require_model("feature_stats")
        adapter = None
        if variant is not None:
            model, adapter = variant if isinstance(variant, tuple) else (variant, None)
        if not rows:
            raise InputError(f"dataset {dataset!r} has no rows: nothing to compute")
        masks = selection(rows, self.read.positions, model)
        require_tokens(masks, self.read.positions, f"dataset {dataset!r}")
        cfg = self.stats_cfg
        with nullcontext() if adapter is None else adapter_state(model, adapter):
            if self.out is None:  # split across the ranks under torchrun
                return collect_stats_sharded(model, rows, self.dictionaries, self.read, cfg)
            ident = {"model": model_identity(model), "adapter": adapter}
            root = self.out / "stats" / name / dataset
            return run_stats(
                model, rows, self.dictionaries, self.read, root, cfg, ident, self.stats_keyed
            )


class Analysis(BaseModel):
    """Base of every analysis config: ``kind`` names it in the registry, ``name`` its files."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str]
    name: str | None = None
    """File stem of the result (default: ``kind``)."""
    positions: str | None = None
    """Token positions for this analysis (``Positions.parse`` form, e.g. ``answer_predicting``)
    instead of the read spec's; the site and layers stay the context's."""

    layer: int | None = Field(None, ge=0)
    """Read only this layer of the read spec (which must name it); analyses that read one
    layer need it when the read spec names several."""

    @field_validator("positions")
    @classmethod
    def _parses(cls, v: str | None) -> str | None:
        return None if v is None else str(Positions.parse(v))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            ANALYSES[cls.kind] = cls

    @property
    def stem(self) -> str:
        return self.name or self.kind

    def run(self, ctx: RunContext) -> Result:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def at_positions(self, ctx: RunContext) -> RunContext:
        """``ctx`` read at this analysis' ``positions`` and ``layer``, when it names them."""
        if ctx.read is None:
            return ctx
        read = ctx.read
        if self.positions is not None:
            read = read.model_copy(update={"positions": Positions.parse(self.positions)})
        if self.layer is not None:
            if self.layer not in read.layers:
                raise InputError(
                    f"{self.kind} {self.stem!r}: layer {self.layer} is not read; the read spec "
                    f"names layers {list(read.layers)}"
                )
            read = read.at(self.layer)
        return ctx if read is ctx.read else replace(ctx, read=read)

    def one_layer(self, ctx: RunContext) -> int:
        """The one layer this analysis reads; several without ``layer`` set is an error."""
        if len(ctx.read.layers) != 1:
            raise InputError(
                f"{self.kind} {self.stem!r} reads one layer; the read spec names "
                f"{list(ctx.read.layers)}: set layer"
            )
        return ctx.read.layers[0]

    def record(self, ctx: RunContext, **figures: Any) -> dict:
        """The meta every result carries: kind, this config and the read spec."""
        return {
            "kind": self.kind,
            "config": self.model_dump(mode="json"),
            "read": None if ctx.read is None else ctx.read.model_dump(mode="json"),
            **figures,
        }


ANALYSES: dict[str, type[Analysis]] = {}
"""Every analysis config by ``kind``; filled as each analysis module is imported."""


def save_meta(meta: dict, path: Path) -> Path:
    """``meta`` as indented JSON at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, default=str))
    return path
