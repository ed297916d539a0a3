"""The report's "Feature cards" section: each card of ``RUN/cards/*.json`` as inline HTML.

Per card: its ranks and effects in every ranking, its explanation (the best one of
``cards/explanations.json``, merged at render time), a histogram of its nonzero activations
(inline SVG), the top and bottom tokens of its logit lens, and its contexts with every token
shaded by the latent's activation (orange for positive, blue for negative; the activation shows
on hover, the context's own token is underlined); contrastive negatives fold away. Nothing is
fetched: no images, fonts or scripts.
"""

from __future__ import annotations

import html
from pathlib import Path

from emdiff.analyses.cards_io import (
    apply_explanations,
    cards_files,
    explanations_path,
    load_cards,
    read_explanations,
)

CARD_STYLE = """
details.card{border:1px solid #ddd;border-radius:4px;margin:.4em 0;padding:.3em .6em}
details.card>summary{cursor:pointer}.cardbody{display:flex;flex-wrap:wrap;gap:1em}
.ctx{font-family:ui-monospace,monospace;font-size:.8em;white-space:pre-wrap;margin:.15em 0;
border-left:3px solid #eee;padding-left:.4em}.ctx .at{text-decoration:underline}
.expl{font-style:italic}.contexts{flex-basis:100%}
"""


def _e(x: object) -> str:
    return html.escape(str(x))


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _shade(act: float, top: float) -> str:
    if not act or not top:
        return ""
    a = min(abs(act) / top, 1.0)
    rgb = "255,140,0" if act > 0 else "60,120,255"
    return f' style="background:rgba({rgb},{a:.2f})"'


def _context(ctx: dict, top: float, before: int) -> str:
    at = min(int(ctx["pos"]), before)
    spans = []
    for i, (tok, act) in enumerate(zip(ctx["tokens"], ctx["acts"], strict=True)):
        text = _e(str(tok).replace("\n", "↵"))
        cls = ' class="at"' if i == at else ""
        spans.append(f'<span{cls} title="{act:.4g}"{_shade(act, top)}>{text}</span>')
    peak = max(ctx["acts"], default=0.0, key=abs)
    label = f'<span class="caption">row {ctx["seq"]} pos {ctx["pos"]}, max {peak:.3g}: </span>'
    return f'<div class="ctx">{label}{"".join(spans)}</div>'


def _histogram(hist: dict) -> str:
    counts, edges = hist["counts"], hist["edges"]
    frac = f"fires on {100 * hist['firing_fraction']:.3g}% of read tokens"
    if not counts:
        return f'<p class="caption">{frac}</p>'
    w, h, n, high = 240, 60, len(counts), max(counts) or 1
    bars = "".join(
        f'<rect x="{i * w / n:.1f}" y="{h - h * c / high:.1f}" width="{w / n * 0.9:.1f}" '
        f'height="{h * c / high:.1f}" fill="#e8890c"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: '
        f"{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (
        f'<div><svg width="{w}" height="{h}" role="img" aria-label="activation histogram">'
        f'{bars}</svg><p class="caption">{edges[0]:.3g} to {edges[-1]:.3g}; {frac}</p></div>'
    )


def _logits(logits: dict) -> str:
    rows = []
    for (t1, v1), (t2, v2) in zip(logits["top"], logits["bottom"], strict=False):
        rows.append(
            f"<tr><td>{_e(repr(t1))}</td><td>{v1:.3g}</td><td>{_e(repr(t2))}</td>"
            f"<td>{v2:.3g}</td></tr>"
        )
    head = "<tr><th>promotes</th><th></th><th>suppresses</th><th></th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _stats(stats: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{s['rank']}</td><td>{_num(s['effect'])}</td>"
        f"<td>[{_num(s['ci_low'])}, {_num(s['ci_high'])}]</td><td>{_num(s['q'])}</td></tr>"
        for name, s in stats.items()
    )
    head = "<tr><th>ranking</th><th>rank</th><th>effect</th><th>CI</th><th>q</th></tr>"
    return f'<table class="sortable"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def card_html(card: dict, meta: dict) -> str:
    """One card as a ``<details>`` block."""
    before = int(meta.get("window", {}).get("before", 0))
    e = card.get("explanation")
    expl = '<span class="caption">no explanation</span>'
    if e:
        by = ([f"score {e['score']:.3g}"] if e.get("score") is not None else []) + [e["source"]]
        expl = f'<span class="expl">{_e(e["text"])}</span> ({_e(", ".join(by))})'
    ranks = ", ".join(f"{_e(n)} #{s['rank']}" for n, s in card["stats"].items())
    top = max((abs(a) for c in card["contexts"] for a in c["acts"]), default=0.0)
    contexts = "".join(_context(c, top, before) for c in card["contexts"])
    negatives = "".join(_context(c, top, before) for c in card["negatives"])
    head = (
        f"<summary><b>layer {card['layer']} {_e(card['site'])}, latent {card['latent']}</b>"
        f" ({ranks}): {expl}</summary>"
    )
    body = (
        f'<div class="cardbody"><div>{_stats(card["stats"])}</div>'
        f"<div>{_histogram(card['histogram'])}</div><div>{_logits(card['logits'])}</div>"
        f'<div class="contexts"><p class="caption">top contexts</p>'
        f"{contexts or '<p class=caption>none: it never fires on a read token</p>'}"
        f"<details><summary>{len(card['negatives'])} contexts where it does not fire"
        f"</summary>{negatives}</details></div></div>"
    )
    return f'<details class="card">{head}{body}</details>'


def cards_section(run: str | Path) -> str:
    """Every cards file of ``run`` rendered (an empty string when there is none)."""
    files = cards_files(run)
    path = explanations_path(run)
    records = read_explanations(path) if path.exists() else []
    parts = []
    for p in files:
        doc = load_cards(p)
        apply_explanations(doc, records)
        meta = doc["meta"]
        about = (
            f"{p.name}: {len(doc['cards'])} cards of {', '.join(map(str, meta.get('rankings', [])))}"
            f", contexts from {meta.get('dataset', '?')} ({meta.get('n_rows', '?')} rows)"
        )
        parts.append(f'<p class="caption">{_e(about)}</p>')
        parts += [card_html(c, meta) for c in doc["cards"]]
    return "".join(parts)
