"""Reading and loading for ``emdiff diff ...`` and ``emdiff transfer``: the options every
model-reading command shares, checked before anything is loaded, and the loading, the fit checks
(width, layer, site) and the report that follow, each failing with one ``error:`` line."""

from __future__ import annotations

import json
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
def check_model_options(
    model: str, adapter: str | None, dictionary: Path, dtype: str, device: str, site: str
):
    """The options every model-reading command shares, checked before anything is loaded."""
    from emdiff.models.hooks import SITES

    check_model("--model", model)
    check_adapter("--adapter", adapter)
    check_exists("--dictionary", dictionary)
    check_dtype(dtype)
    check_device(device)
    check_choice("--site", site, SITES)


def load_for_diff(
    model: str,
    adapter: str | None,
    dictionary: Path,
    layer: int | None,
    dtype: str,
    device: str,
    site: str | None = None,
):
    """Load the dictionary, resolve the layer, then load the model; check that they fit (width,
    layer and site the dictionary records) with messages naming the options."""
    from emdiff.dictionaries import load_dictionary
    from emdiff.models import check_layer, load_model

    d = load_dictionary(dictionary)
    m = d.meta
    if site is not None and m.hook is not None and site not in m.hook and m.hook not in site:
        from emdiff.models.hooks import SITES

        fix = f"pass --site {m.hook}" if m.hook in SITES else "use a residual-stream dictionary"
        fail(f"--site {site}: {dictionary} was trained on {m.hook}; {fix}")
    given, layer = layer, m.layer if layer is None else layer
    if layer is None:
        fail(f"--dictionary {dictionary}: does not record its layer; pass --layer")
    lm = load_model(model, adapter, dtype=dtype, device=device)
    if d.d_in != lm.d_model:
        fail(
            f"--dictionary {dictionary}: width d_in={d.d_in}, but {model} has d_model="
            f"{lm.d_model}; use a dictionary trained on this model"
        )
    layer = check_layer(lm.model, layer)
    if m.layer is not None and layer != m.layer:
        fail(
            f"--layer {given}: {dictionary} was trained on layer {m.layer} ({m.hook}); "
            f"drop --layer or pass --layer {m.layer}"
        )
    return lm, d, layer


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


def collect_kwargs(lm, site: str, batch_size: int) -> dict:
    """The statistics-collection keywords every diff passes: token ids, site, batch size."""
    from emdiff.analyses.common import token_ids

    return dict(token_ids(lm.tokenizer), site=site, batch_size=batch_size)


def read_ranking(option: str, path: Path):
    """A ranking table that an earlier diff wrote (``tables/*.parquet``)."""
    import pandas as pd

    check_file(option, path)
    try:
        return pd.read_parquet(path)
    except ValueError as e:  # pyarrow's ArrowInvalid: not a parquet file
        fail(f"{option} {path}: not a parquet table ({e})")


def report_ranking(res, out: Path, name: str, title: str, top: int, as_json: bool) -> None:
    """Save a diff's table and volcano plot under ``out`` and print the top of the ranking."""
    from emdiff.report.plots import volcano_plot
    from emdiff.stats.compare import ranked

    path = res.save(out, name)
    plot = volcano_plot(res.table, out / "plots" / f"{name}.png", title=title)
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
            json.dumps({**res.meta, "table": str(path), "n_significant": n_sig}, default=str)
        )
