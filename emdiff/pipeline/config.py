"""The pipeline YAML (``emdiff run pipeline.yaml``), validated by pydantic; an error names the
file, the line and the key.

Sections, each optional except ``model``:

- ``model``: the base (local folder or hub id; ``toy`` is the shipped toy base), dtype, device.
- ``organism``: the fine-tuned model, an adapter folder or a fine-tune recipe (a dataset name and
  :class:`~emdiff.finetune.FinetuneConfig`); it is the context's model, its adapter switched off
  for the base.
- ``data``: chat JSONL datasets by name, eval question YAML files.
- ``eval``: which models to sample and judge, sampling and judge settings.
- ``read`` and ``dictionaries``: where the analyses read, through which dictionaries (a folder in
  any supported format, or a SAELens-style ``release`` + ``sae_id`` found in a local cache).
- ``analyses``: a list of analysis configs (``kind`` plus that analysis' fields), run in order.
- ``toy``: the toy benchmark's own stages (what ``emdiff demo`` runs), instead of the sections above.

Relative paths are read from the YAML file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emdiff.data.positions import Positions
from emdiff.data.yamlfile import line_of, parse_yaml
from emdiff.errors import InputError
from emdiff.eval.config import JudgeConfig, SamplingConfig
from emdiff.eval.server_sample import ServerConfig
from emdiff.finetune import FinetuneConfig
from emdiff.models.hooks import SITES
from emdiff.readers import read_text


class PipelineConfigError(InputError):
    """The pipeline YAML is malformed; the message names the file, line and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    base: str
    """A local model folder, a hub id (``owner/name``) or ``toy`` (the shipped toy base)."""
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    revision: str | None = None


class OrganismSection(_Section):
    name: str = "finetuned"
    """The fine-tuned model's name in tables and in ``variants`` (the base is ``base``)."""
    adapter: str | None = None
    """A PEFT adapter folder made for ``model.base``."""
    finetune: FinetuneConfig | None = None
    """Train the adapter here instead (answer-only loss) on ``dataset``."""
    dataset: str | None = None
    """A ``data.datasets`` name: the fine-tuning conversations."""

    @model_validator(mode="after")
    def _one_source(self) -> OrganismSection:
        if (self.adapter is None) == (self.finetune is None):
            raise ValueError("give either adapter (a folder) or finetune (a recipe), not both")
        if self.finetune is not None and self.dataset is None:
            raise ValueError("finetune needs dataset: the data.datasets name to train on")
        return self


class DataSection(_Section):
    datasets: dict[str, str] = Field(default_factory=dict)
    """Chat JSONL files by name (the analyses name them)."""
    questions: list[str] = Field(default_factory=list)
    """Eval question YAML files (the EM format)."""


class EvalSection(_Section):
    models: list[str] = Field(default_factory=lambda: ["base", "finetuned"])
    """Which models to sample and judge: ``base`` and the organism's name."""
    sampling: SamplingConfig = SamplingConfig()
    servers: dict[str, ServerConfig] = Field(default_factory=dict)
    """Models sampled through an OpenAI-compatible server (vLLM) instead of HF generate, by
    name (``base``, the organism): where and under which served name."""
    judge: JudgeConfig = JudgeConfig()
    aligned_below: float = 30.0
    coherent_above: float = 50.0


class DictionaryEntry(_Section):
    path: str | None = None
    """A dictionary folder (SAELens, Gemma Scope, dictionary_learning, ITDA, sparsify)."""
    release: str | None = None
    """A SAELens-style release id (``gemma-scope-9b-it-res``), found under ``cache_dir``."""
    sae_id: str | None = None
    """The folder inside the release (``layer_20/width_16k/average_l0_91``)."""
    layer: int | None = Field(None, ge=0)
    """The decoder layer it reads (default: the layer the dictionary records)."""

    @model_validator(mode="after")
    def _one_source(self) -> DictionaryEntry:
        if (self.path is None) == (self.release is None):
            raise ValueError("give either path or release (+ sae_id)")
        if self.release is not None and self.sae_id is None:
            raise ValueError("a release needs sae_id, the folder inside it")
        return self


class DictionarySection(_Section):
    cache_dir: str | None = None
    """Where releases are looked up: a Hugging Face hub cache (``models--org--name/snapshots``)
    or plain ``<release>/<sae_id>`` folders. Default: ``$HF_HUB_CACHE`` / ``~/.cache/huggingface/hub``."""
    entries: list[DictionaryEntry] = Field(min_length=1)


class ReadSection(_Section):
    site: str | None = None
    """Hook site (default: the dictionaries' own)."""
    positions: str = "answer"

    @field_validator("site")
    @classmethod
    def _site(cls, v: str | None) -> str | None:
        if v is not None and v not in SITES:
            raise ValueError(f"unknown site {v!r}; one of {', '.join(SITES)}")
        return v

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: str) -> str:
        return str(Positions.parse(v))


class PipelineConfig(_Section):
    model: ModelSection | None = None
    organism: OrganismSection | None = None
    data: DataSection = DataSection()
    eval: EvalSection | None = None
    read: ReadSection = ReadSection()
    dictionaries: DictionarySection | None = None
    analyses: list[dict[str, Any]] = Field(default_factory=list)
    """Each an analysis config: ``kind`` (see :data:`emdiff.analyses.ANALYSES`) and its fields."""
    toy: dict[str, Any] | None = None
    """The toy benchmark (``emdiff demo``'s settings, :class:`emdiff.demo.DemoConfig`)."""
    batch_size: int = Field(8, ge=1)
    """Sequences per forward pass of the statistics passes."""
    folder: Path | None = Field(None, exclude=True)
    """The YAML file's folder (relative paths are read from there); set by :func:`load_pipeline`."""

    @field_validator("analyses")
    @classmethod
    def _analyses(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from emdiff.analyses import ANALYSES

        stems = set()
        for i, raw in enumerate(v):
            kind = raw.get("kind")
            if kind not in ANALYSES:
                raise ValueError(
                    f"analyses[{i}]: kind {kind!r} is not an analysis; one of {', '.join(sorted(ANALYSES))}"
                )
            try:
                cfg = ANALYSES[kind].model_validate({k: x for k, x in raw.items() if k != "kind"})
            except ValidationError as e:
                err = _first(e)
                where = "".join(f".{p}" for p in err["loc"])
                raise ValueError(f"analyses[{i}]{where}: {err['msg']} ({kind})") from None
            if cfg.stem in stems:
                raise ValueError(f"analyses[{i}]: a second analysis named {cfg.stem!r}; set name")
            stems.add(cfg.stem)
        return v

    @model_validator(mode="after")
    def _complete(self) -> PipelineConfig:
        if self.toy is not None:
            return self
        if self.model is None:
            raise ValueError("model: missing (or a toy section)")
        if self.analyses and self.dictionaries is None and self.needs_dictionaries():
            raise ValueError("analyses read features: add a dictionaries section")
        if self.eval is not None:
            names = {"base", self.organism.name if self.organism else None}
            unknown = [m for m in self.eval.models if m not in names]
            if unknown:
                raise ValueError(
                    f"eval.models: {unknown} are not models of this pipeline (base"
                    f"{', ' + self.organism.name if self.organism else ''})"
                )
            if not self.data.questions:
                raise ValueError("eval needs data.questions: the eval question YAML files")
        return self

    def needs_dictionaries(self) -> bool:
        """Whether any analysis reads through a dictionary (all but ``direction``, overlap and
        the table-only ones)."""
        free = {"direction", "overlap", "screen", "mitigate", "phases"}
        return any(a["kind"] not in free for a in self.analyses)

    def path(self, value: str | Path) -> Path:
        """``value`` read from the YAML's folder when relative."""
        p = Path(value).expanduser()
        return p if p.is_absolute() or self.folder is None else self.folder / p

    def analysis_configs(self) -> list:
        """The analyses as their config objects."""
        from emdiff.analyses import ANALYSES

        return [
            ANALYSES[a["kind"]].model_validate({k: v for k, v in a.items() if k != "kind"})
            for a in self.analyses
        ]


def _first(e: ValidationError) -> dict:
    """The error to report: a misspelt key first (it explains a "field required" beside it)."""
    return sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]


def _where(path: Path, node, loc: tuple) -> str:
    """``path:line`` of a pydantic error location (with an analysis' own fields nested)."""
    line = line_of(node, loc)
    return f"{path}:{line}" if line is not None else str(path)


def validate_pipeline(data: Any, path: Path, node=None) -> PipelineConfig:
    """``data`` (parsed YAML) as a config, or one :class:`PipelineConfigError` line naming
    ``file:line`` and the key."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise PipelineConfigError(f"{path}: the top level must be a mapping of sections, got {got}")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        err = _first(e)
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if loc and loc[0] == "analyses" and msg.startswith("analyses["):  # an analysis' own error
            head, _, msg = msg.partition(": ")
            idx, _, rest = head.removeprefix("analyses[").partition("]")
            loc = ("analyses", int(idx), *(p for p in rest.split(".") if p))
            loc = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in loc)
        key = ".".join(map(str, loc)) or "top level"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise PipelineConfigError(f"{_where(path, node, loc)}: {key}: {msg}{more}") from None
    except InputError as e:
        raise PipelineConfigError(f"{path}: {e}") from None
    return cfg.model_copy(update={"folder": path.parent.resolve()})


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML; ``overrides`` (dotted keys, e.g. ``model.base``)
    replace values before validation (a recipe pointed at another model or dictionary)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineConfigError(f"{path}: no such file")
    data, node = parse_yaml(path, read_text(path, PipelineConfigError), PipelineConfigError)
    for key, value in (overrides or {}).items():
        data = _override(data, key.split("."), value, path)
    return validate_pipeline(data, path, node)


def _override(data: Any, keys: list[str], value: Any, path: Path) -> Any:
    """``data`` with the value at ``keys`` replaced (list items by index)."""
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(data, list) and head.isdigit() and int(head) < len(data):
        out = list(data)
        out[int(head)] = _override(data[int(head)], rest, value, path)
        return out
    if isinstance(data, dict):
        return {**data, head: _override(data.get(head, {}), rest, value, path)}
    raise PipelineConfigError(f"{path}: cannot set {'.'.join(keys)}: no such section")
