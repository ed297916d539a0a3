"""``emdiff diff ...`` and ``emdiff transfer``: feature diffs (Q1, Q2, Q3), overlap, transfer.

Each command writes ``tables/<name>.parquet`` (+ ``.json`` with what was compared) and
``plots/<name>.png`` into ``--out`` and prints the top of the ranking. Statistics passes are kept
under ``--out/stats`` shard by shard, so an interrupted command resumes when rerun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emdiff.stats.compare import PAIRED, UNPAIRED

diff_app = typer.Typer(
    help="Rank dictionary features by how much they differ.", no_args_is_help=True
)

Model = Annotated[str, typer.Option(help="Model folder or hub id.")]
Adapter = Annotated[str | None, typer.Option(help="PEFT adapter folder or hub id.")]
Dictionary = Annotated[
    Path, typer.Option(help="Dictionary folder or file (SAELens, Gemma Scope, ...).")
]
Layer = Annotated[
    int | None, typer.Option(help="Decoder layer (default: the one the dictionary records).")
]
Out = Annotated[Path, typer.Option(help="Run folder for tables, plots and statistics.")]
Dtype = Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")]
Top = Annotated[int, typer.Option(min=1, help="Rows of the ranking to print.")]
Site = Annotated[str, typer.Option(help="resid_post or resid_pre.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _check_test(test: str | None, paired: bool) -> None:
    """Refuse a test that does not fit the design before any model is loaded."""
    allowed = PAIRED if paired else UNPAIRED
    if test is not None and test not in allowed:
        _fail(
            f"--test {test} is not {'a paired' if paired else 'an unpaired'} test; use one of "
            f"{', '.join(allowed)}"
        )


def _setup(
    model: str, adapter: str | None, dictionary: Path, layer: int | None, dtype: str, device: str
):
    """Load the model and the dictionary; resolve the layer."""
    from emdiff.dictionaries import load_dictionary
    from emdiff.models import check_layer, load_model

    d = load_dictionary(dictionary)
    layer = d.meta.layer if layer is None else layer
    if layer is None:
        _fail(f"{dictionary} does not record its layer; pass --layer")
    lm = load_model(model, adapter, dtype=dtype, device=device)
    check_layer(lm.model, layer)
    return lm, d, layer


def _chats(tokenizer, path: Path):
    from emdiff.data.chat import load_chat_jsonl
    from emdiff.data.masks import encode_chat

    return [encode_chat(tokenizer, c.as_dicts()) for c in load_chat_jsonl(path)]


def _report(res, out: Path, name: str, title: str, top: int, as_json: bool) -> None:
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


def _kw(lm, site: str, batch_size: int) -> dict:
    from emdiff.analyses.common import token_ids

    return dict(token_ids(lm.tokenizer), site=site, batch_size=batch_size)


@diff_app.command("datasets")
def datasets(
    model: Model,
    dictionary: Dictionary,
    a: Annotated[Path, typer.Option(help="Chat JSONL of side a (e.g. bad medical advice).")],
    b: Annotated[Path, typer.Option(help="Chat JSONL of side b (e.g. good medical advice).")],
    out: Out,
    adapter: Adapter = None,
    base_only: Annotated[
        bool, typer.Option(help="Read with the adapter switched off (the aligned model).")
    ] = False,
    layer: Layer = None,
    paired: Annotated[bool, typer.Option(help="Row i of a and of b share a prompt.")] = False,
    test: Annotated[str | None, typer.Option(help=f"{UNPAIRED} or, paired, {PAIRED}.")] = None,
    label_a: str = "a",
    label_b: str = "b",
    site: Site = "resid_post",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    top: Top = 10,
    as_json: AsJson = False,
) -> None:
    """Q1: features that differ between two datasets read by the same model."""
    from emdiff.analyses import dataset_diff

    _check_test(test, paired)
    try:
        lm, d, layer = _setup(model, adapter, dictionary, layer, dtype, device)
        rows_a, rows_b = _chats(lm.tokenizer, a), _chats(lm.tokenizer, b)
        res = dataset_diff(
            lm.model,
            {layer: d},
            rows_a,
            rows_b,
            paired=paired,
            test=test,
            adapter=False if base_only else None,
            labels=(label_a, label_b),
            out=out,
            progress=True,
            **_kw(lm, site, batch_size),
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _report(res, out, "dataset_diff", f"Q1: {label_a} vs {label_b}", top, as_json)


@diff_app.command("models")
def models(
    model: Model,
    adapter: Annotated[str, typer.Option(help="PEFT adapter of the fine-tuned model.")],
    dictionary: Dictionary,
    out: Out,
    data: Annotated[Path | None, typer.Option(help="Chat JSONL to read with both models.")] = None,
    responses: Annotated[
        Path | None, typer.Option(help="Question/answer table (.csv, .parquet, .jsonl).")
    ] = None,
    layer: Layer = None,
    test: Annotated[str, typer.Option(help=f"One of {PAIRED}.")] = "paired_t",
    site: Site = "resid_post",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    top: Top = 10,
    as_json: AsJson = False,
) -> None:
    """Q2: features that change between the base (adapter off) and the fine-tuned model."""
    from emdiff.analyses import encode_qa, load_judged, model_diff

    _check_test(test, True)
    if (data is None) == (responses is None):
        _fail("pass exactly one of --data (chat JSONL) or --responses (question/answer table)")
    try:
        lm, d, layer = _setup(model, adapter, dictionary, layer, dtype, device)
        if data is not None:
            rows, name = _chats(lm.tokenizer, data), data.stem
        else:
            df = load_judged(responses, required=("question", "answer"))
            rows, name = encode_qa(lm.tokenizer, df["question"], df["answer"]), responses.stem
        res = model_diff(
            lm.model,
            {layer: d},
            rows,
            test=test,
            dataset=name,
            out=out,
            progress=True,
            **_kw(lm, site, batch_size),
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _report(res, out, "model_diff", "Q2: fine-tuned vs base", top, as_json)


@diff_app.command("responses")
def responses_cmd(
    model: Model,
    dictionary: Dictionary,
    judged: Annotated[Path, typer.Option(help="Judged answers (.csv, .parquet or .jsonl).")],
    out: Out,
    adapter: Adapter = None,
    layer: Layer = None,
    misaligned_max: Annotated[float, typer.Option(help="Misaligned: aligned <= this.")] = 30.0,
    aligned_min: Annotated[float, typer.Option(help="Aligned: aligned > this.")] = 70.0,
    coherent_min: Annotated[float, typer.Option(help="Both: coherent > this.")] = 50.0,
    balance: Annotated[bool, typer.Option(help="Subsample to equal sizes.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the balancing subsample.")] = 0,
    test: Annotated[str, typer.Option(help=f"One of {UNPAIRED}.")] = "welch",
    site: Site = "resid_post",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    top: Top = 10,
    as_json: AsJson = False,
) -> None:
    """Q3: features that differ between the model's misaligned and aligned answers."""
    from emdiff.analyses import ResponseSplit, load_judged, response_diff

    _check_test(test, False)
    try:
        split = ResponseSplit(
            misaligned_max=misaligned_max,
            aligned_min=aligned_min,
            coherent_min=coherent_min,
            balance=balance,
            seed=seed,
        )
        df = load_judged(judged)
        lm, d, layer = _setup(model, adapter, dictionary, layer, dtype, device)
        res = response_diff(
            lm.model,
            lm.tokenizer,
            {layer: d},
            df,
            split=split,
            test=test,
            out=out,
            progress=True,
            **_kw(lm, site, batch_size),
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    _report(res, out, "response_diff", "Q3: misaligned vs aligned answers", top, as_json)


@diff_app.command("overlap")
def overlap_cmd(
    a: Annotated[Path, typer.Option(help="First ranking (a diff's tables/*.parquet).")],
    b: Annotated[Path, typer.Option(help="Second ranking, same dictionary.")],
    out: Out,
    label_a: str = "a",
    label_b: str = "b",
    ks: Annotated[str, typer.Option(help="Comma-separated k for Jaccard@k.")] = "5,10,20,50,100",
    top: Annotated[int, typer.Option(min=3, help="Union of top-N for the correlations.")] = 50,
    table_k: Annotated[int, typer.Option(min=1, help="Top-k of the shared/unique table.")] = 20,
    direction: Annotated[str, typer.Option(help="increase or decrease.")] = "increase",
    as_json: AsJson = False,
) -> None:
    """How far two rankings coincide: Jaccard@k, Spearman/Kendall, shared and unique features."""
    import pandas as pd

    from emdiff.analyses import overlap
    from emdiff.report.plots import overlap_plot

    try:
        k_list = [int(k) for k in ks.split(",") if k.strip()]
        res = overlap(
            pd.read_parquet(a),
            pd.read_parquet(b),
            ks=k_list,
            top=top,
            table_k=table_k,
            direction=direction,
            labels=(label_a, label_b),
        )
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    name = f"overlap_{label_a}_{label_b}"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    res.table.to_parquet(out / "tables" / f"{name}.parquet")
    res.jaccard.to_parquet(out / "tables" / f"{name}_jaccard.parquet")
    summary = res.summary()
    (out / "tables" / f"{name}.json").write_text(json.dumps(summary, indent=2))
    plot = overlap_plot(res, out / "plots" / f"{name}.png", title=f"{label_a} vs {label_b}")
    typer.echo(res.jaccard.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    typer.echo(
        f"Spearman {res.spearman:.3f} (p {res.spearman_p:.2g}), Kendall {res.kendall:.3f} "
        f"(p {res.kendall_p:.2g}) on {res.n_union} features"
    )
    typer.echo(res.table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    typer.echo(f"table: {out / 'tables' / f'{name}.parquet'}\nfigure: {plot}")
    if as_json:
        typer.echo(json.dumps(summary))


def transfer_cmd(
    model: Model,
    dictionary: Dictionary,
    data: Annotated[Path, typer.Option(help="Chat JSONL whose answer tokens are scored.")],
    out: Out,
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter(s) on --model; each is one more variant.")
    ] = None,
    other: Annotated[
        list[str] | None, typer.Option(help="Other model(s) of the same width, e.g. the chat one.")
    ] = None,
    layer: Layer = None,
    site: Site = "resid_post",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Transfer: splice the dictionary into each model; FVE, L0, CE and KL change per model."""
    import pandas as pd

    from emdiff.analyses import transfer
    from emdiff.report.plots import transfer_plot

    variants = [("base", model, None)]
    variants += [(f"adapter:{Path(a).name}", model, a) for a in adapter or []]
    variants += [(f"model:{Path(m).name}", m, None) for m in other or []]
    frames = []
    try:
        for name, path, ad in variants:
            lm, d, layer_ = _setup(path, ad, dictionary, layer, dtype, device)
            rows = _chats(lm.tokenizer, data)
            frames.append(
                transfer(
                    d, {name: lm.model}, rows, layer_, progress=True, **_kw(lm, site, batch_size)
                )
            )
            del lm
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    table = pd.concat(frames, ignore_index=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "tables" / "transfer.parquet")
    plot = transfer_plot(table, out / "plots" / "transfer.png", title=f"{dictionary.name}")
    cols = ["variant", "fve", "l0", "dead_fraction", "ce_clean", "ce_delta", "kl", "n_tokens"]
    typer.echo(table[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    typer.echo(f"table: {out / 'tables' / 'transfer.parquet'}\nfigure: {plot}")
    if as_json:
        typer.echo(json.dumps(table.to_dict(orient="records")))
