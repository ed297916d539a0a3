"""``emdiff report RUN_DIR``: one self-contained HTML file of a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_common import check_exists, check_out_file, value_errors


def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder (any emdiff command's --out).")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file to write (default RUN/report.html).")
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Rows of each ranking shown.")] = 20,
) -> None:
    """One self-contained HTML report of a run folder (figures inlined, opens offline).

    \bReads: RUN/tables, RUN/plots, RUN/cards and RUN/manifest.json as any
    emdiff command writes them. Writes: RUN/report.html (or --out) with a
    section per stage that ran: EM, the toy scorecard, Q1/Q2/Q3 rankings
    (sortable), overlap, directions, decomposition, steering, LoRA, phases,
    mitigation, screening, feature cards.

    \bExample:
      emdiff demo --out runs/demo && emdiff report runs/demo
    """
    from emdiff.report.html import build_report

    check_exists("RUN", run)
    check_out_file(out, "--out")
    with value_errors():
        path = build_report(run, out, top=top)
    typer.echo(f"written: {path} ({path.stat().st_size / 1e6:.1f} MB)")
