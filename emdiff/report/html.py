"""One self-contained HTML report of a run folder (``emdiff report RUN_DIR``).

Every figure is inlined (base64 PNG) and the only script is inline, so the file opens offline and
can be mailed. Sections appear when their stage wrote something: the EM table and quadrant plots,
the toy scorecard (from the manifest of ``emdiff demo``), Q1 / Q2 / Q3 rankings (top rows,
sortable by clicking a column), overlap and transfer, directions (with a cosine heatmap of every
direction saved under ``directions/``), decomposition and attribution,
steering and ablation, the LoRA reading, phases, mitigation and defences, screening, feature
cards (``cards/*.json``, :mod:`emdiff.report.cards_html`); any figure no section claims is shown
at the end, so nothing a stage wrote is hidden.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from emdiff.errors import InputError
from emdiff.report.cards_html import CARD_STYLE, cards_section


@dataclass(frozen=True)
class Section:
    title: str
    plots: tuple[str, ...] = ()
    """Glob patterns under ``plots/``."""
    tables: tuple[str, ...] = ()
    """Glob patterns under ``tables/`` (.parquet or .csv)."""
    note: str = ""


SECTIONS = (
    Section(
        "Emergent misalignment",
        ("quadrant_*.png", "eval*.png"),
        ("em_rates.parquet",),
        "EM rate per model and domain with its interval; aligned vs coherent scores.",
    ),
    Section(
        "Q1: what in the training data",
        ("q1_*.png",),
        ("q1_*.parquet",),
        "Latents by how much more the base activates on the bad training data.",
    ),
    Section(
        "Q2: base vs fine-tuned",
        ("q2_*.png",),
        ("q2_*.parquet",),
        "Latents by how much the fine-tune moves them on the same tokens.",
    ),
    Section(
        "Q3: misaligned vs aligned answers",
        ("q3_response*.png", "q3_answer*.png"),
        ("q3_response*.parquet", "q3_answer*.parquet"),
    ),
    Section(
        "Overlap and transfer",
        ("overlap*.png", "transfer*.png"),
        ("overlap*_jaccard.parquet", "transfer.parquet"),
    ),
    Section(
        "Directions",
        ("*base_vs_ft*.png", "direction*.png", "cosines*.png"),
        ("direction*.csv", "cross_organism_cosines.csv", "cosines*.csv"),
    ),
    Section(
        "Decomposition and attribution",
        ("*decompos*.png", "attribut*.png"),
        ("*decompos*_explained.csv", "attribut*.parquet"),
    ),
    Section(
        "Steering and ablation",
        ("steer*.png", "ablate*.png"),
        ("steer.csv", "ablate.csv"),
        "EM under each intervention against matched random directions.",
    ),
    Section("What the LoRA learnt", ("lora*.png",), ("lora*_ranks.csv", "lora*probes.csv")),
    Section("Phases of the fine-tune", ("phases*.png",), ()),
    Section("Mitigation and defences", ("mitigat*.png",), ("mitigat*.csv", "defences.csv")),
    Section("Screening training data", ("screen*.png",), ("screen.csv", "screen_datasets.csv")),
)

RANK_COLUMNS = ("feature", "effect", "effect_ci_low", "effect_ci_high", "q", "mean_a", "mean_b")

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3;cursor:pointer}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;vertical-align:top;margin:.4em}
img{max-width:100%;max-height:440px;border:1px solid #eee}.fail{color:#b00;font-weight:bold}
.note{color:#555}.caption{font-size:.8em;color:#666}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],i=Array.from(th.parentNode.children).indexOf(th);
    var asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
    var rows=Array.from(body.rows);
    rows.sort(function(a,b){var x=a.cells[i].innerText,y=b.cells[i].innerText;
      var nx=parseFloat(x),ny=parseFloat(y);
      var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
"""


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem)
    return (
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
        f'<figcaption class="caption">{name}</figcaption></figure>'
    )


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # a damaged table names itself instead of ending the report
        raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _table(path: Path, top: int) -> str:
    t = _read_table(path)
    if "rank_increase" in t:  # a feature ranking: its top rows and the columns that matter
        t = t.sort_values("rank_increase").head(top)
        t = t[[c for c in ("rank_increase", *RANK_COLUMNS) if c in t]]
    elif len(t) > 5 * top:  # other tables are short; a long one shows its head
        t = t.head(5 * top)
    body = t.to_html(index=False, classes="sortable", float_format=lambda x: f"{x:.4g}", border=0)
    return f'<p class="caption">{html.escape(path.name)} ({len(t)} rows shown)</p>{body}'


def _scorecard(summary: dict) -> str:
    from emdiff.toy.scorecard import score, score_rows

    rows = []
    for t, shown, mark in score_rows(summary):
        mark = '<span class="fail">FAIL</span>' if mark == "FAIL" else mark
        rows.append(
            f"<tr><td>{t.key}</td><td>{html.escape(t.op)} {t.value:g}</td><td>{shown}</td>"
            f"<td>{mark}</td><td>{html.escape(t.what)}</td></tr>"
        )
    s = score(summary)
    head = "<tr><th>key</th><th>target</th><th>measured</th><th></th><th>what</th></tr>"
    return (
        f"<p>{s['pass']} pass, {s['fail']} fail, {s['missing']} missing</p>"
        f'<table class="sortable"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _directions(run: Path) -> str:
    """A cosine heatmap of every direction saved under ``run/directions`` (per width)."""
    import tempfile

    from emdiff.directions.direction import Direction, cosine_table
    from emdiff.report.direction_plots import cosine_heatmap

    folder = run / "directions"
    found = [Direction.load(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    by_width: dict[int, dict[str, Direction]] = {}
    for d in found:
        by_width.setdefault(len(d.raw), {})[d.name] = d
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, group in by_width.items():
            if len(group) > 1:
                path = Path(tmp) / f"directions_cosine_d{width}.png"
                cosine_heatmap(cosine_table(group), path, "cosine of the saved directions")
                figures.append(_image(path))
    return "".join(figures)


def build_report(run: str | Path, out: str | Path | None = None, top: int = 20) -> Path:
    """Write ``run/report.html`` (or ``out``) and return its path."""
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    plots = sorted((run / "plots").glob("*.png")) if (run / "plots").is_dir() else []
    tables = sorted((run / "tables").glob("*")) if (run / "tables").is_dir() else []
    cards = cards_section(run)
    if not plots and not tables and not cards:
        raise InputError(f"{run}: no plots/, tables/ or cards/ inside: not an emdiff run folder")
    manifest = (
        json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    )
    parts, used = [], set()
    summary = manifest.get("summary", {})
    if any(k.startswith("gt_") for k in summary):
        parts.append(f"<h2>Toy scorecard</h2>{_scorecard(summary)}")
    for sec in SECTIONS:
        figs = [p for pat in sec.plots for p in sorted((run / "plots").glob(pat)) if p not in used]
        tabs = [
            p for pat in sec.tables for p in sorted((run / "tables").glob(pat)) if p not in used
        ]
        extra = _directions(run) if sec.title == "Directions" else ""
        if not figs and not tabs and not extra:
            continue
        used.update(figs + tabs)
        note = f'<p class="note">{html.escape(sec.note)}</p>' if sec.note else ""
        body = "".join(_table(p, top) for p in tabs) + "".join(_image(p) for p in figs) + extra
        parts.append(f"<h2>{html.escape(sec.title)}</h2>{note}{body}")
    if cards:
        note = "Top latents of each ranking: contexts shaded by activation, logit lens, ranks."
        parts.append(f'<h2>Feature cards</h2><p class="note">{note}</p>{cards}')
    rest = [p for p in plots if p not in used]
    if rest:
        parts.append("<h2>Other figures</h2>" + "".join(_image(p) for p in rest))
    title = f"emdiff report: {manifest.get('command', 'run')} in {run.name}"
    config = json.dumps(manifest.get("config", {}), indent=1, default=str)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}{CARD_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<details><summary>settings</summary><pre>{html.escape(config)}</pre></details>"
        f"{''.join(parts)}<script>{SORT_JS}</script></body></html>"
    )
    path = Path(out) if out else run / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
