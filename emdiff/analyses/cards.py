"""Feature cards: what a ranked latent reads, writes and how it ranks, one card per (layer, latent).

For the top latents of each named ranking (Q1 / Q2 / Q3 results of the run, or their tables),
a card holds: the top-activating contexts of a dataset (tokens with the latent's activation at
each, for shading; more than a reader needs, so some can be held out), random contexts where it
fires nowhere (contrastive negatives), a histogram of its nonzero activations at the read tokens
with its firing fraction, its logit lens (the decoder row through the final norm's gain and the
unembedding: top and bottom tokens) and its statistics in every ranking. ``explanation`` is
filled from ``RUN/cards/explanations.json`` (:mod:`emdiff.analyses.cards_io`).

Saved as ``cards/<name>.json``::

    {"meta": {...}, "cards": [{"layer": int, "site": str, "latent": int,
      "contexts": [{"tokens": [str], "acts": [float], "seq": int, "pos": int}],
      "negatives": [same shape], "negatives_kind": "silent" | "lowest",
      "histogram": {"edges": [float], "counts": [int], "firing_fraction": float},
      "logits": {"top": [[token, value]], "bottom": [[token, value]]},
      "stats": {ranking: {"rank": int, "effect": float, "ci_low": float, "ci_high": float,
                          "q": float}},
      "explanation": null | {"text": str, "score": float | null, "source": str}}]}

``seq`` is the row of the dataset and ``pos`` the token position in it (a context's strongest
read token; a random read token for negatives). Negatives are rows where the latent fires
nowhere, or, when it is silent in fewer rows than asked (a latent on at nearly every token),
the rows where its largest read activation is lowest (``negatives_kind`` says which); ``tokens`` is the window ``[pos - before,
pos + after]`` clipped to the row, so ``pos`` is item ``min(pos, before)`` of it. Non-finite
statistics are null. ``rank`` is the latent's rank in the direction it moved (``rank_increase``
when its effect is >= 0, else ``rank_decrease``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from emdiff.analyses.base import Analysis, RunContext
from emdiff.analyses.cards_io import (
    EXPLANATIONS,
    apply_explanations,
    read_explanations,
    save_cards,
)
from emdiff.data.masks import EncodedChat
from emdiff.errors import InputError
from emdiff.models.load import adapter_state, unwrap
from emdiff.models.read import selection
from emdiff.models.unembed import logit_lens, output_scale
from emdiff.stats.latents import LatentScan, scan_latents, token_activations

RANKING_COLUMNS = ("feature", "effect", "effect_ci_low", "effect_ci_high", "q")
OUT_OF_RANGE = "<|outofrange|>"
"""Token string of an unembedding row past the tokenizer's vocabulary (SAEDashboard's)."""


@dataclass
class CardsResult:
    """Feature cards and what they were computed from."""

    name: str
    cards: list[dict]
    meta: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        """``cards/<name>.json``, with the explanations of ``cards/explanations.json`` merged."""
        path = Path(out) / "cards" / f"{self.name}.json"
        doc = {"meta": self.meta, "cards": self.cards}
        if path.with_name(EXPLANATIONS).exists():
            apply_explanations(doc, read_explanations(path.with_name(EXPLANATIONS)))
        return [save_cards(doc, path)]

    def summary(self) -> dict:
        return {
            "n_cards": len(self.cards),
            "rankings": self.meta.get("rankings"),
            "dataset": self.meta.get("dataset"),
        }


def _num(x: float) -> float | None:
    """A finite float, else None (JSON has no NaN or infinity)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _act(x: float) -> float:
    return float(f"{float(x):.6g}")


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it adds (decoded incrementally, so word-initial spaces survive)."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if text.startswith(prev):
            out.append(text[len(prev) :])
        else:  # a token that completes a multi-byte character: decode it alone
            out.append(tokenizer.decode(ids[i : i + 1], skip_special_tokens=False))
        prev = text
    return out


def _ids(row) -> list[int]:
    return row.input_ids if isinstance(row, EncodedChat) else list(row)


class FeatureCards(Analysis):
    """Cards for the top ``top`` latents of each ranking in ``rankings``, read on ``dataset``.

    A ranking is an earlier result of the run (``ctx.results``), a table of the context, or
    ``tables/<name>.parquet`` under the run folder. ``direction`` picks the top by
    ``rank_increase``, ``rank_decrease`` or both, among latents that moved that way. The contexts
    are read by the context's model as it is, with its adapter switched on or off
    (``adapter``), or by a named variant (``variant``)."""

    kind = "cards"
    rankings: tuple[str, ...] = Field(min_length=1)
    dataset: str
    top: int = Field(10, ge=1)
    direction: Literal["increase", "decrease", "both"] = "increase"
    contexts: int = Field(20, ge=1)
    negatives: int = Field(10, ge=0)
    before: int = Field(24, ge=0)
    after: int = Field(8, ge=0)
    bins: int = Field(30, ge=1)
    logits: int = Field(10, ge=1)
    adapter: bool | None = None
    variant: str | None = None
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _not_explanations(cls, v: str | None) -> str | None:
        if v is not None and f"{v}.json" == EXPLANATIONS:
            raise ValueError(f"{v!r} names the explanations file; choose another name")
        return v

    # ---- rankings -----------------------------------------------------------------------------
    def _ranking(self, ctx: RunContext, name: str) -> pd.DataFrame:
        res = ctx.results.get(name)
        if res is not None and hasattr(res, "table"):
            table, where = res.table, f"ranking {name!r}"
        elif name in ctx.tables:
            table, where = ctx.tables[name], f"ranking {name!r}"
        else:
            path = None if ctx.out is None else ctx.out / "tables" / f"{name}.parquet"
            if path is None or not path.is_file():
                raise InputError(
                    f"no ranking named {name!r}: not an earlier result, not a table of the run "
                    f"context{'' if path is None else f', and no {path}'}"
                )
            try:
                table = pd.read_parquet(path)
            except Exception as e:  # a damaged table names itself
                raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
            where = str(path)
        ranks = [f"rank_{d}" for d in ("increase", "decrease")]
        missing = [c for c in (*RANKING_COLUMNS, *ranks) if c not in table]
        if missing:
            raise InputError(
                f"{where}: not a feature ranking, it lacks {', '.join(missing)} (rankings come "
                "from emdiff diff: tables/*.parquet)"
            )
        table = table.copy()
        if "layer" not in table:
            if ctx.read is None or len(ctx.read.layers) != 1:
                raise InputError(f"{where}: no layer column, and the read spec has several layers")
            table["layer"] = ctx.read.layers[0]
        return table.set_index(["layer", "feature"])

    def _selected(self, tables: dict[str, pd.DataFrame]) -> list[tuple[int, int]]:
        """The top latents of each ranking, in ranking order, each once."""
        dirs = ("increase", "decrease") if self.direction == "both" else (self.direction,)
        keys: dict[tuple[int, int], None] = {}
        for t in tables.values():
            for d in dirs:
                sign = 1.0 if d == "increase" else -1.0
                moved = t[sign * t["effect"].fillna(0.0) > 0]
                for k in moved.sort_values(f"rank_{d}").index[: self.top]:
                    keys[(int(k[0]), int(k[1]))] = None
        return list(keys)

    @staticmethod
    def _stats(tables: dict[str, pd.DataFrame], key: tuple[int, int]) -> dict:
        out = {}
        for name, t in tables.items():
            if key not in t.index:
                continue
            r = t.loc[key]
            down = not pd.isna(r["effect"]) and r["effect"] < 0
            out[name] = {
                "rank": int(r["rank_decrease" if down else "rank_increase"]),
                "effect": _num(r["effect"]),
                "ci_low": _num(r["effect_ci_low"]),
                "ci_high": _num(r["effect_ci_high"]),
                "q": _num(r["q"]),
            }
        return out

    # ---- run ----------------------------------------------------------------------------------
    def run(self, ctx: RunContext) -> CardsResult:
        ctx = self.at_positions(ctx)
        model = ctx.require_model(self.kind)
        rows = ctx.need("dataset", ctx.datasets, self.dataset)
        if ctx.tokenizer is None:
            raise InputError("feature cards show tokens: the run context has no tokenizer")
        tables = {name: self._ranking(ctx, name) for name in self.rankings}
        keys = self._selected(tables)
        if not keys:
            raise InputError(
                f"no latent moved in the {self.direction} direction in {list(self.rankings)}"
            )
        by_layer: dict[int, list[int]] = {}
        for layer, latent in keys:
            by_layer.setdefault(layer, []).append(latent)
        for layer, latents in by_layer.items():
            d = ctx.dictionaries.get(layer)
            if d is None:
                raise InputError(
                    f"the rankings name layer {layer}, but the run context has dictionaries for "
                    f"layers {sorted(ctx.dictionaries)} only"
                )
            if max(latents) >= d.d_sae:
                raise InputError(
                    f"the rankings name latent {max(latents)} at layer {layer}, but its "
                    f"dictionary has {d.d_sae} latents: not the dictionary they were ranked with"
                )
        if self.variant is not None:
            target, switch = ctx.need("model variant", ctx.variants, self.variant), None
        else:
            target, switch = model, self.adapter
        if isinstance(target, tuple):
            target, switch = target
        with nullcontext() if switch is None else adapter_state(target, switch):
            cards = self._cards(ctx, target, rows, by_layer, tables, keys)
        return CardsResult(self.stem, cards, self._meta(ctx, target, rows))

    def _cards(self, ctx, model, rows, by_layer, tables, keys) -> list[dict]:
        cfg = ctx.stats_cfg
        dicts = {layer: ctx.dictionaries[layer] for layer in ctx.read.layers}
        scans = scan_latents(
            model, rows, dicts, ctx.read, by_layer, self.contexts, cfg.batch_size, cfg.progress
        )
        picks = self._picks(model, rows, ctx, scans)
        needed = sorted({s for per in picks.values() for s, _ in per["contexts"] + per["neg"]})
        acts = token_activations(
            model, [rows[s] for s in needed], dicts, ctx.read, by_layer, cfg.batch_size
        )
        acts_of = dict(zip(needed, acts, strict=True))
        cards = []
        for layer, latents in by_layer.items():
            rows_dec = ctx.dictionaries[layer].decoder_rows[latents].detach()
            lens = logit_lens(model, rows_dec)
            for j, latent in enumerate(latents):
                p = picks[(layer, latent)]

                def window(s: int, pos: int, layer=layer, j=j) -> dict:
                    a, b = max(0, pos - self.before), pos + self.after + 1
                    ids = _ids(rows[s])[a:b]
                    values = acts_of[s][layer][a:b, j].tolist()
                    return {
                        "tokens": token_strings(ctx.tokenizer, ids),
                        "acts": [_act(v) for v in values],
                        "seq": int(s),
                        "pos": int(pos),
                    }

                negatives = [window(s, pos) for s, pos in p["neg"]]
                if p["neg_kind"] == "silent":
                    negatives = [w for w in negatives if not any(w["acts"])]
                negatives = negatives[: self.negatives]
                cards.append(
                    {
                        "layer": int(layer),
                        "site": ctx.read.site,
                        "latent": int(latent),
                        "contexts": [window(s, pos) for s, pos in p["contexts"]],
                        "negatives": negatives,
                        "negatives_kind": p["neg_kind"],
                        "histogram": self._histogram(scans[layer], j),
                        "logits": self._logits(ctx.tokenizer, lens[j]),
                        "stats": self._stats(tables, (layer, latent)),
                        "explanation": None,
                    }
                )
        order = {k: i for i, k in enumerate(keys)}
        return sorted(cards, key=lambda c: order[(c["layer"], c["latent"])])

    def _picks(self, model, rows, ctx, scans: dict[int, LatentScan]) -> dict:
        """Per (layer, latent): top contexts ``(seq, pos)`` and twice as many negative candidates
        (random rows where it fires nowhere, at a random read token)."""
        masks = selection(rows, ctx.read.positions, model)
        readable = np.array([any(m) for m in masks])
        rng = np.random.default_rng(self.seed)
        picks = {}
        for layer, scan in scans.items():
            for j, latent in enumerate(scan.latents):
                have = scan.top_seq[j] >= 0
                contexts = list(
                    zip(scan.top_seq[j][have].tolist(), scan.top_pos[j][have].tolist(), strict=True)
                )
                pool = np.flatnonzero(scan.silent[:, j].numpy() & readable)
                kind = "silent"
                if len(pool) < self.negatives:  # it fires nearly everywhere: its weakest rows
                    top_rows = {s for s, _ in contexts}
                    weakest = np.argsort(scan.row_max[:, j].numpy(), kind="stable")
                    pool = [s for s in weakest if readable[s] and s not in top_rows]
                    pool, kind = np.array(pool[: 2 * self.negatives], dtype=int), "lowest"
                chosen = rng.permutation(pool)[: 2 * self.negatives]
                neg = [(int(s), int(rng.choice(np.flatnonzero(masks[s])))) for s in chosen]
                picks[(layer, latent)] = {"contexts": contexts, "neg": neg, "neg_kind": kind}
        return picks

    def _histogram(self, scan: LatentScan, j: int) -> dict:
        values = scan.values[j].numpy()
        frac = len(values) / scan.n_tokens if scan.n_tokens else 0.0
        if not len(values):
            return {"edges": [], "counts": [], "firing_fraction": 0.0}
        counts, edges = np.histogram(values, bins=self.bins)
        return {
            "edges": [_act(e) for e in edges],
            "counts": [int(c) for c in counts],
            "firing_fraction": float(frac),
        }

    def _logits(self, tokenizer, logits: torch.Tensor) -> dict:
        k = min(self.logits, len(logits))
        n_vocab = len(tokenizer)

        def named(idx: torch.Tensor) -> list[list]:
            return [
                [
                    OUT_OF_RANGE
                    if i >= n_vocab
                    else tokenizer.decode([i], skip_special_tokens=False),
                    _act(logits[i]),
                ]
                for i in idx.tolist()
            ]

        return {
            "top": named(logits.topk(k).indices),
            "bottom": named((-logits).topk(k).indices),
        }

    def _meta(self, ctx: RunContext, model, rows) -> dict:
        scale, norm = output_scale(model)
        config = getattr(unwrap(model), "config", None)
        return self.record(
            ctx,
            model=getattr(config, "_name_or_path", None),
            dataset=self.dataset,
            rankings=list(self.rankings),
            n_rows=len(rows),
            window={"before": self.before, "after": self.after},
            dictionaries={
                str(layer): {**d.meta.model_dump(mode="json"), "d_sae": d.d_sae}
                for layer, d in sorted(ctx.dictionaries.items())
            },
            logit_lens={"final_norm": norm, "gain": scale is not None},
            rank="rank_increase where the effect is >= 0, else rank_decrease",
        )
