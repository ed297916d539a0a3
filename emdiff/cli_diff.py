"""``emdiff diff ...`` and ``emdiff transfer``: feature diffs (Q1, Q2, Q3), overlap, transfer.

Each diff command writes ``tables/<name>.parquet`` (+ ``.json`` with what was compared) and
``plots/<name>.png`` into ``--out`` and prints the top of the ranking. Statistics passes are kept
under ``--out/stats`` shard by shard, so an interrupted command resumes when rerun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_common import (
    Adapter,
    AsJson,
    BatchSize,
    Device,
    Dictionary,
    Dtype,
    Layer,
    Model,
    Out,
    Positions,
    Site,
    Top,
    check_adapter,
    check_choice,
    check_labels,
    check_model,
    check_out,
    config,
    fail,
    parse_ks,
    value_errors,
)
from emdiff.cli_diff_io import (
    ReadOptions,
    encode_chats,
    load_context,
    read_chats,
    read_judged,
    read_ranking,
    report_ranking,
)
from emdiff.stats.methods import PAIRED, UNPAIRED

diff_app = typer.Typer(
    help="""Rank dictionary features by how much they differ (Q1, Q2, Q3) and compare rankings.

\bReads: a model (+ PEFT adapter), a sparse dictionary and chat JSONL or
judged-answer files; overlap reads two rankings. Writes under --out:
tables/<name>.parquet (+ .json), plots/<name>.png and stats/ (resumable).

\bExample:
  emdiff diff responses --model Qwen/Qwen2.5-7B-Instruct \\
    --adapter ./bad-medical-lora --dictionary ./sae-layer12 \\
    --judged runs/eval/judged.csv --out runs/q3
""",
    no_args_is_help=True,
)


def _check_test(test: str | None, paired: bool) -> None:
    """Refuse a test that does not fit the design before any model is loaded."""
    allowed = PAIRED if paired else UNPAIRED
    if test is not None and test not in allowed:
        fail(
            f"--test {test} is not {'a paired' if paired else 'an unpaired'} test; use one of "
            f"{', '.join(allowed)}"
        )


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
    site: Site = None,
    positions: Positions = "answer",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    top: Top = 10,
    as_json: AsJson = False,
) -> None:
    """Q1: features that differ between two datasets read by the same model.

    \bReads: --model (+ --adapter), the --dictionary, and the chat JSONL
    files --a and --b (their answer tokens are compared).
    Writes under --out: tables/dataset_diff.parquet (+ .json, what was
    compared), plots/dataset_diff.png, and stats/ (per-shard statistics;
    rerun the same command to resume).

    \bExample:
      emdiff diff datasets --model Qwen/Qwen2.5-7B-Instruct \\
        --dictionary ./sae-layer12 --a bad_medical.jsonl \\
        --b good_medical.jsonl --paired --out runs/q1
    """
    from emdiff.analyses import DatasetDiff

    _check_test(test, paired)
    opts = ReadOptions(
        model, adapter, dictionary, layer, site, positions, batch_size, dtype, device
    )
    opts.check()
    check_labels(label_a, label_b)
    analysis = config(
        DatasetDiff,
        a=label_a,
        b=label_b,
        paired=paired,
        test=test,
        adapter=False if base_only else None,
    )
    conv_a, conv_b = read_chats("--a", a), read_chats("--b", b)
    check_out(out)
    with value_errors():
        ctx = load_context(opts, out)
        ctx.datasets = {
            label_a: encode_chats(ctx.tokenizer, conv_a),
            label_b: encode_chats(ctx.tokenizer, conv_b),
        }
        res = analysis.run(ctx)
    report_ranking(res, out, top, as_json)


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
    site: Site = None,
    positions: Positions = "answer",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    top: Top = 10,
    as_json: AsJson = False,
) -> None:
    """Q2: features that change between the base (adapter off) and the fine-tuned model.

    \bReads: --model and its --adapter, the --dictionary, and the same text
    for both: a chat JSONL (--data) or a question/answer table (--responses).
    Writes under --out: tables/model_diff.parquet (+ .json),
    plots/model_diff.png, and stats/ (rerun the same command to resume).

    \bExample:
      emdiff diff models --model Qwen/Qwen2.5-7B-Instruct \\
        --adapter ./bad-medical-lora --dictionary ./sae-layer12 \\
        --responses runs/eval/judged.csv --out runs/q2
    """
    from emdiff.analyses import ModelDiff, encode_qa

    _check_test(test, True)
    if (data is None) == (responses is None):
        fail("pass exactly one of --data (chat JSONL) or --responses (question/answer table)")
    opts = ReadOptions(
        model, adapter, dictionary, layer, site, positions, batch_size, dtype, device
    )
    opts.check()
    if data is not None:
        conversations, name = read_chats("--data", data), data.stem
    else:
        df, name = (
            read_judged("--responses", responses, required=("question", "answer")),
            responses.stem,
        )
    check_out(out)
    with value_errors():
        ctx = load_context(opts, out)
        if data is not None:
            rows = encode_chats(ctx.tokenizer, conversations)
        else:
            rows = encode_qa(ctx.tokenizer, df["question"], df["answer"])
        ctx.datasets = {name: rows}
        res = ModelDiff(dataset=name, test=test).run(ctx)
    report_ranking(res, out, top, as_json)


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
    site: Site = None,
    positions: Annotated[
        str | None,
        typer.Option(
            help="Token positions (as for the other diffs); default answer, or last with "
            "--follow-up."
        ),
    ] = None,
    follow_up: Annotated[
        list[str] | None,
        typer.Option(
            help="A user turn to append after every answer (repeatable); the model is then "
            "read where it is about to answer it (positions last)."
        ),
    ] = None,
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    top: Top = 10,
    as_json: AsJson = False,
) -> None:
    """Q3: features that differ between the model's misaligned and aligned answers.

    \bReads: --model (+ --adapter, usually the one that answered), the
    --dictionary, and --judged, the judged answers (emdiff eval run's
    judged.csv, or .parquet / .jsonl with question, answer, aligned, coherent).
    Writes under --out: tables/response_diff.parquet (+ .json),
    plots/response_diff.png, and stats/ (rerun the same command to resume).

    \bExample:
      emdiff diff responses --model Qwen/Qwen2.5-7B-Instruct \\
        --adapter ./bad-medical-lora --dictionary ./sae-layer12 \\
        --judged runs/eval/judged.csv --out runs/q3
    """
    from emdiff.analyses import ResponseDiff, ResponseSplit

    _check_test(test, False)
    follow = tuple(follow_up or ())
    if any(not f.strip() for f in follow):
        fail("--follow-up: an empty turn; give the text of a user message")
    positions = positions or ("last" if follow else "answer")
    opts = ReadOptions(
        model, adapter, dictionary, layer, site, positions, batch_size, dtype, device
    )
    opts.check()
    df = read_judged("--judged", judged)
    split = config(
        ResponseSplit,
        misaligned_max=misaligned_max,
        aligned_min=aligned_min,
        coherent_min=coherent_min,
        balance=balance,
        seed=seed,
    )
    check_out(out)
    with value_errors():
        ctx = load_context(opts, out)
        ctx.tables = {"judged": df}
        res = ResponseDiff(split=split, test=test, follow_up=follow).run(ctx)
    report_ranking(res, out, top, as_json)


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
    """How far two rankings coincide: Jaccard@k, Spearman/Kendall, shared and unique features.

    \bReads: --a and --b, two rankings written by emdiff diff (tables/*.parquet)
    with the same dictionary; no model.
    Writes under --out: tables/overlap_A_B.parquet (shared/unique table),
    tables/overlap_A_B_jaccard.parquet, tables/overlap_A_B.json (summary) and
    plots/overlap_A_B.png, where A and B are --label-a and --label-b.

    \bExample:
      emdiff diff overlap --a runs/q1/tables/dataset_diff.parquet \\
        --b runs/q2/tables/model_diff.parquet --label-a q1 --label-b q2 \\
        --out runs/overlap
    """
    from emdiff.analyses import RankingOverlap, RunContext

    check_choice("--direction", direction, ("increase", "decrease"))
    k_list = parse_ks("--ks", ks)
    check_labels(label_a, label_b)
    analysis = config(
        RankingOverlap,
        a=label_a,
        b=label_b,
        ks=tuple(k_list),
        top=top,
        table_k=table_k,
        direction=direction,
    )
    tables = {label_a: read_ranking("--a", a), label_b: read_ranking("--b", b)}
    check_out(out)
    with value_errors():
        res = analysis.run(RunContext(tables=tables))
    table_path, _, _, plot = res.save(out)
    summary = res.summary()
    typer.echo(res.jaccard.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    typer.echo(
        f"Spearman {res.spearman:.3f} (p {res.spearman_p:.2g}), Kendall {res.kendall:.3f} "
        f"(p {res.kendall_p:.2g}) on {res.n_union} features"
    )
    typer.echo(res.table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    typer.echo(f"table: {table_path}\nfigure: {plot}")
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
    site: Site = None,
    positions: Positions = "answer",
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Transfer: splice the dictionary into each model; FVE, L0, CE and KL change per model.

    \bReads: --model, each --adapter on it and each --other model (one variant
    each), the --dictionary, and the chat JSONL --data (its answer tokens).
    Writes under --out: tables/transfer.parquet (one row per variant) and
    plots/transfer.png. Nothing is cached: a rerun starts over.

    \bExample:
      emdiff transfer --model google/gemma-2-2b --other google/gemma-2-2b-it \\
        --dictionary ./gemma-scope-l12 --data chats.jsonl --out runs/transfer
    """
    from dataclasses import replace

    import pandas as pd

    from emdiff.analyses import Transfer, TransferResult

    opts = ReadOptions(model, None, dictionary, layer, site, positions, batch_size, dtype, device)
    opts.check()
    for a in adapter or []:
        check_adapter("--adapter", a)
    for m in other or []:
        check_model("--other", m)
    conversations = read_chats("--data", data)
    check_out(out)
    variants = [("base", opts)]
    variants += [(f"adapter:{Path(a).name}", replace(opts, adapter=a)) for a in adapter or []]
    variants += [(f"model:{Path(m).name}", replace(opts, model=m)) for m in other or []]
    frames = []
    with value_errors():
        for name, variant_opts in variants:  # one model in memory at a time
            ctx = load_context(variant_opts)
            ctx.datasets = {"data": encode_chats(ctx.tokenizer, conversations)}
            ctx.variants = {name: ctx.model}
            res = Transfer(dataset="data").run(ctx)
            frames.append(res.table)
            del ctx
    res = TransferResult("transfer", pd.concat(frames, ignore_index=True), res.meta)
    res.meta.update(variants=[n for n, _ in variants], title=str(dictionary.name))
    table_path, _, plot = res.save(out)
    table = res.table
    cols = ["variant", "fve", "l0", "dead_fraction", "ce_clean", "ce_delta", "kl", "n_tokens"]
    typer.echo(table[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    typer.echo(f"table: {table_path}\nfigure: {plot}")
    if as_json:
        typer.echo(json.dumps(table.to_dict(orient="records")))
