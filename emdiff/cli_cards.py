"""``emdiff cards | export | import-explanations``: feature cards of a run's rankings, their
export in Neuronpedia's upload format, and explanations imported from a Neuronpedia export
(:mod:`emdiff.analyses.cards`, :mod:`emdiff.report.neuronpedia`). Options and files are checked
before a model loads."""

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
    Site,
    check_choice,
    check_exists,
    check_file,
    check_out,
    config,
    fail,
    value_errors,
)
from emdiff.cli_diff_io import ReadOptions, encode_chats, load_context, read_chats, read_judged

Run = Annotated[Path, typer.Argument(help="Run folder (an emdiff diff --out).")]


def _rankings(run: Path, text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        fail(f"--rankings {text!r}: name at least one ranking, e.g. model_diff")
    for n in names:
        path = run / "tables" / f"{n}.parquet"
        if not path.is_file():
            have = sorted(p.stem for p in (run / "tables").glob("*.parquet"))
            fail(f"--rankings {n}: no {path} (the run has {', '.join(have) or 'no tables'})")
    return names


def _positions(run: Path, names: tuple[str, ...], given: str | None) -> str:
    """``--positions``, else those the first ranking was read at (``tables/<name>.json``)."""
    from emdiff.data.positions import Positions

    if given is not None:
        return given
    try:
        read = json.loads((run / "tables" / f"{names[0]}.json").read_text())["read"]
        return str(Positions.model_validate(read["positions"]))
    except (OSError, ValueError, KeyError, TypeError):
        return "answer"


def _line(card: dict) -> str:
    ranks = ", ".join(f"{n} #{s['rank']}" for n, s in card["stats"].items())
    top = " ".join(repr(t) for t, _ in card["logits"]["top"][:3])
    fire = 100 * card["histogram"]["firing_fraction"]
    return f"L{card['layer']} #{card['latent']:<6} {ranks:<28} fires {fire:5.1f}%  -> {top}"


def cards_cmd(
    run: Run,
    rankings: Annotated[
        str, typer.Option(help="Ranking tables of RUN/tables, comma-separated (model_diff,...).")
    ],
    model: Model,
    dictionary: Dictionary,
    data: Annotated[Path | None, typer.Option(help="Chat JSONL to take contexts from.")] = None,
    responses: Annotated[
        Path | None, typer.Option(help="Question/answer table to take contexts from.")
    ] = None,
    adapter: Adapter = None,
    base_only: Annotated[
        bool, typer.Option(help="Read with the adapter switched off (the base model).")
    ] = False,
    top: Annotated[int, typer.Option(min=1, help="Latents per ranking (and direction).")] = 10,
    direction: Annotated[str, typer.Option(help="increase, decrease or both.")] = "increase",
    contexts: Annotated[int, typer.Option(min=1, help="Top contexts per card.")] = 20,
    negatives: Annotated[int, typer.Option(min=0, help="Contexts where it never fires.")] = 10,
    name: Annotated[str, typer.Option(help="Cards file name (RUN/cards/NAME.json).")] = "cards",
    layer: Layer = None,
    site: Site = None,
    positions: Annotated[
        str | None,
        typer.Option(help="Token positions, as emdiff diff takes them (default: the ranking's)."),
    ] = None,
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Feature cards for the top latents of a run's rankings.

    \bReads: RUN/tables/<ranking>.parquet (from emdiff diff), --model (+ --adapter)
    with the --dictionary the rankings were made with, and the text to show:
    a chat JSONL (--data) or a question/answer table (--responses).
    Writes: RUN/cards/NAME.json, per latent its top contexts with every
    token's activation, contexts where it never fires, an activation
    histogram, its logit lens and its rank in each ranking; explanations in
    RUN/cards/explanations.json are merged. emdiff report RUN shows them.

    \bExample:
      emdiff cards runs/q2 --rankings model_diff \\
        --model Qwen/Qwen2.5-7B-Instruct --adapter ./bad-medical-lora \\
        --dictionary ./sae-layer12 --responses runs/eval/judged.csv
    """
    from emdiff.analyses import FeatureCards, encode_qa

    check_exists("RUN", run)
    names = _rankings(run, rankings)
    check_choice("--direction", direction, ("increase", "decrease", "both"))
    if (data is None) == (responses is None):
        fail("pass exactly one of --data (chat JSONL) or --responses (question/answer table)")
    positions = _positions(run, names, positions)
    opts = ReadOptions(
        model, adapter, dictionary, layer, site, positions, batch_size, dtype, device
    )
    opts.check()
    analysis = config(
        FeatureCards,
        {"rankings": "--rankings", "contexts": "--contexts"},
        name=name,
        rankings=names,
        dataset=(data or responses).stem,
        top=top,
        direction=direction,
        contexts=contexts,
        negatives=negatives,
        adapter=False if base_only else None,
    )
    if data is not None:
        conversations = read_chats("--data", data)
    else:
        df = read_judged("--responses", responses, required=("question", "answer"))
    check_out(run / "cards", "RUN")
    with value_errors():
        ctx = load_context(opts, run)
        if data is not None:
            rows = encode_chats(ctx.tokenizer, conversations)
        else:
            rows = encode_qa(ctx.tokenizer, df["question"], df["answer"])
        ctx.datasets = {analysis.dataset: rows}
        res = analysis.run(ctx)
    path = res.save(run)[0]
    for card in res.cards:
        typer.echo(_line(card))
    typer.echo(f"written: {path} ({len(res.cards)} cards)")
    if as_json:
        typer.echo(json.dumps({**res.summary(), "cards": str(path)}, default=str))


def export_cmd(
    kind: Annotated[str, typer.Argument(metavar="FORMAT", help="neuronpedia")],
    run: Run,
    out: Annotated[Path, typer.Option(help="Folder to write the export into.")],
    cards: Annotated[
        str | None, typer.Option(help="Cards file of RUN/cards (default: the only one).")
    ] = None,
    model_id: Annotated[
        str | None, typer.Option(help="Neuronpedia model id (default: from the model's name).")
    ] = None,
    sae_set: Annotated[
        str | None, typer.Option(help="Neuronpedia SAE set (default: emdiff-<site>).")
    ] = None,
    per_batch: Annotated[int, typer.Option(min=1, help="Features per batch file.")] = 128,
) -> None:
    """Export feature cards in Neuronpedia's upload format (as SAEDashboard writes it).

    \bReads: RUN/cards/<cards>.json (from emdiff cards).
    Writes under --out, per layer, a folder
    <model_id>_<sae_set>_<hook>_<d_sae>/ with run_settings.json and
    batch-N.json files: features with their top activations (tokens,
    values), logit lens (pos_str/pos_values, neg_str/neg_values), activation
    histogram and firing fraction.

    \bExample:
      emdiff export neuronpedia runs/q2 --out runs/q2/neuronpedia
    """
    from emdiff.analyses.cards_io import cards_files
    from emdiff.report.neuronpedia import export_neuronpedia

    check_choice("FORMAT", kind, ("neuronpedia",))
    check_exists("RUN", run)
    files = cards_files(run)
    have = ", ".join(p.stem for p in files)
    if cards is not None:
        files = [p for p in files if p.stem == cards]
        if not files:
            fail(f"--cards {cards}: no {run / 'cards' / cards}.json (cards: {have or 'none'})")
    elif not files:
        fail(f"RUN {run}: no cards/*.json; make them with emdiff cards")
    elif len(files) > 1:
        fail(f"RUN {run}: several cards files ({have}); pick one with --cards")
    check_out(out)
    with value_errors():
        written = export_neuronpedia(files[0], out, model_id, sae_set, per_batch)
    batches = [p for p in written if p.name.startswith("batch-")]
    folders = sorted({str(p.parent) for p in written})
    typer.echo(f"written: {len(batches)} batch file(s) in {', '.join(folders)}")


def import_explanations_cmd(
    run: Run,
    file: Annotated[
        Path, typer.Argument(help="Neuronpedia explanation export (.json, .jsonl, .jsonl.gz).")
    ],
    source: Annotated[
        str | None,
        typer.Option(help="Neuronpedia source id to keep, e.g. 20-gemmascope-res-16k."),
    ] = None,
) -> None:
    """Import explanations of the run's carded latents from a Neuronpedia export.

    \bReads: RUN/cards/*.json and FILE: Neuronpedia explanation records
    (modelId, layer such as 20-gemmascope-res-16k, index, description), as
    a JSON list, JSON Lines or .jsonl.gz; an emdiff explanations file also
    works. Rows are matched to cards by (layer number, index).
    Writes: RUN/cards/explanations.json (merged) and the explanations into
    every cards file.

    \bExample:
      emdiff import-explanations runs/q2 gemma-2-2b_20-gemmascope-res-16k.json
    """
    from emdiff.report.neuronpedia import import_explanations

    check_exists("RUN", run)
    check_file("FILE", file)
    with value_errors():
        done = import_explanations(run, file, source)
    skipped = done.read - done.matched
    typer.echo(
        f"{done.matched} of {done.read} explanations match a card ({skipped} of other latents "
        "skipped)"
    )
    for name, n in done.attached.items():
        typer.echo(f"{name}: {n} cards with an explanation")
    typer.echo(f"written: {done.path}")
