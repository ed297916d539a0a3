"""Reading and loading for ``emdiff diff ...`` and ``emdiff transfer``: the options every
model-reading command shares, checked before anything is loaded, and the loading, the fit checks
(width, layer, site) and the report that follow, each failing with one ``error:`` line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from emdiff.cli_common import (
    check_adapter,
    check_choice,
    check_device,
    check_dtype,
    check_exists,
    check_file,
    check_model,
    fail,
)


# ---- reading and loading for the feature diffs ------------------------------------------------
@dataclass
class ReadOptions:
    """The options every model-reading command shares: what to load and where to read."""

    model: str
    adapter: str | None
    dictionary: Path
    layer: int | None
    site: str | None
    positions: str
    batch_size: int
    dtype: str
    device: str

    def check(self) -> None:
        """Refuse bad options before anything is loaded."""
        from emdiff.models.hooks import SITES

        check_model("--model", self.model)
        check_adapter("--adapter", self.adapter)
        check_exists("--dictionary", self.dictionary)
        check_dtype(self.dtype)
        check_device(self.device)
        if self.site is not None:
            check_choice("--site", self.site, SITES)
        self.parsed_positions()

    def parsed_positions(self):
        from emdiff.data.positions import Positions
        from emdiff.errors import InputError

        try:
            return Positions.parse(self.positions)
        except InputError as e:
            fail(f"--positions {self.positions}: {e}")


def _where(opts: ReadOptions, d) -> tuple[int, str]:
    """Layer and site: the dictionary's own, unless options name them; another point is refused
    (``resid_pre`` of layer L + 1 is ``resid_post`` of layer L, the same tensor)."""
    from emdiff.dictionaries.base import same_tensor

    m, name = d.meta, opts.dictionary
    if m.site is None and m.hook is not None:
        fail(
            f"--dictionary {name}: reads {m.hook}, which emdiff cannot read (it reads resid_pre, "
            "attn_out, resid_mid, mlp_out and resid_post)"
        )
    layer = m.layer if opts.layer is None else opts.layer
    site = opts.site or m.site
    own = f"layer {m.layer} {m.site}" + (f" ({m.hook})" if m.hook else "")
    if not same_tensor(m.layer, m.site, layer, site):
        if opts.site is not None and m.site is not None and opts.site != m.site:
            fail(f"--site {opts.site}: {name} was trained at {m.site} ({own}); drop --site")
        if opts.layer is not None and m.layer is not None and opts.layer != m.layer:
            fail(
                f"--layer {opts.layer}: {name} was trained on layer {m.layer} ({own}); drop --layer"
            )
    if layer is None:
        fail(f"--dictionary {name}: does not record its layer; pass --layer")
    if site is None:
        fail(f"--dictionary {name}: does not record its hook site; pass --site")
    return layer, site


def load_context(opts: ReadOptions, out: Path | None = None):
    """Load the dictionary, resolve layer and site from it, load the model, check that they fit,
    and return the run context the analyses read (the command adds datasets and tables)."""
    from emdiff.analyses import RunContext
    from emdiff.dictionaries import load_dictionary
    from emdiff.models import check_layer, load_model
    from emdiff.models.read import ReadSpec
    from emdiff.stats.collect import StatsConfig

    d = load_dictionary(opts.dictionary)
    layer, site = _where(opts, d)
    name = opts.model
    lm = load_model(name, opts.adapter, dtype=opts.dtype, device=opts.device)
    if d.d_in != lm.d_model:
        fail(
            f"--dictionary {opts.dictionary}: width d_in={d.d_in}, but {name} has d_model="
            f"{lm.d_model}; use a dictionary trained on this model"
        )
    layer = check_layer(lm.model, layer)
    read = ReadSpec(
        layers=(layer,),
        site=site,
        positions=opts.parsed_positions(),
        dictionary=str(opts.dictionary),
    )
    stats_cfg = StatsConfig(batch_size=opts.batch_size, progress=True)
    return RunContext(read, lm.model, lm.tokenizer, {layer: d}, out=out, stats_cfg=stats_cfg)


def read_chats(option: str, path: Path):
    """Read a chat JSONL before the model loads, so a bad line fails in seconds."""
    from emdiff.data.chat import load_chat_jsonl

    return load_chat_jsonl(check_file(option, path))


def encode_chats(tokenizer, conversations):
    """Tokenize conversations with their answer masks."""
    from emdiff.data.masks import encode_chat

    return [encode_chat(tokenizer, c.as_dicts()) for c in conversations]


def read_judged(option: str, path: Path, **kwargs):
    """A judged-answer table (.csv, .parquet or .jsonl), read before the model loads."""
    from emdiff.analyses import load_judged

    check_file(option, path)
    if path.suffix not in (".csv", ".parquet", ".jsonl", ".json"):
        fail(f"{option} {path}: use a .csv, .parquet or .jsonl file")
    try:
        return load_judged(path, **kwargs)
    except UnicodeDecodeError:
        raise
    except ValueError as e:
        fail(e if str(path) in str(e) else f"{option} {path}: {e}")


def read_ranking(option: str, path: Path):
    """A ranking table that an earlier diff wrote (``tables/*.parquet``)."""
    import pandas as pd

    check_file(option, path)
    try:
        return pd.read_parquet(path)
    except ValueError as e:  # pyarrow's ArrowInvalid: not a parquet file
        fail(f"{option} {path}: not a parquet table ({e})")


def report_ranking(res, out: Path, top: int, as_json: bool) -> None:
    """Save a diff's tables and volcano plot under ``out`` and print the top of the ranking."""
    from emdiff.stats.compare import ranked

    saved = res.save(out)
    path, plot = saved[0], saved[-1]
    typer.echo(f"read: {_describe(res.meta['read'])}")
    cols = [
        "layer",
        "feature",
        "effect",
        "effect_ci_low",
        "effect_ci_high",
        "diff",
        "q",
        "fire_rate_a",
        "fire_rate_b",
    ]
    for direction in ("increase", "decrease"):
        typer.echo(
            f"\ntop {top} by {direction} ({res.meta['label_a']} vs {res.meta['label_b']}, "
            f"{res.meta['test']}):"
        )
        typer.echo(
            ranked(res.table, direction)[cols]
            .head(top)
            .to_string(index=False, float_format=lambda x: f"{x:.4g}")
        )
    n_sig = int((res.table["q"] < 0.05).sum())
    typer.echo(f"\n{n_sig} of {len(res.table)} features with q < 0.05 (BH)")
    typer.echo(f"table: {path}\nfigure: {plot}")
    if as_json:
        typer.echo(
            json.dumps({**res.summary(), "table": str(path), "plot": str(plot)}, default=str)
        )


def _describe(read: dict) -> str:
    from emdiff.models.read import ReadSpec

    return ReadSpec.model_validate(read).describe()
