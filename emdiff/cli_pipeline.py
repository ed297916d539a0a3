"""``emdiff run PIPELINE.yaml``: every stage of one config into one run folder, then its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_common import check_file, fail, value_errors


def _overrides(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs (VALUE read as YAML: numbers, lists, booleans)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            fail(f"--set {item}: write KEY=VALUE, e.g. --set model.base=path/to/model")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML (see examples/).")],
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/pipeline"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Reuse the finished stages of an existing run folder whose inputs and settings "
            "are unchanged; recompute the rest.",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key, KEY=VALUE (dotted, e.g. model.base=PATH)."),
    ] = None,
    report: Annotated[bool, typer.Option(help="Write OUT/report.html at the end.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run a pipeline: organism, sampling and judging, dictionaries, analyses; one run folder.

    \bReads: PIPELINE.yaml with sections model, organism, data, eval, read,
    dictionaries, analyses (or toy). Writes under --out: stages/*.json (what
    finished, keyed by a content hash of its inputs), eval/, adapters/,
    stats/, tables/, plots/, manifest.json and report.html.

    \bExample:
      emdiff run examples/gemma2_9b_it_gemma_scope.yaml --out runs/gemma
      emdiff run examples/gemma2_9b_it_gemma_scope.yaml --out runs/gemma --resume
    """
    import json

    from emdiff.pipeline import load_pipeline, run_pipeline

    check_file("PIPELINE", pipeline)
    with value_errors():
        cfg = load_pipeline(pipeline, _overrides(set_ or []))
        manifest = run_pipeline(cfg, out, resume=resume, report=report, echo=typer.echo)
    if json_out:
        typer.echo(json.dumps(manifest["summary"], default=str))
