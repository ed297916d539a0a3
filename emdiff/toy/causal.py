"""The toy's causal ground truth: which direction, at which hook point, carries its EM.

A direction is the cause when the model *uses* it: projected out of the narrow model it removes
the EM, added to the base it brings it, and same-norm random directions do neither. A probe's
weight vector is only a readout. For every ``(layer, site)`` this measures, for the *cue
direction* (the mean residual at the answer-predicting position over the eval prompts of every
domain opened by ``<system> toxic`` minus the same prompts opened by ``<system> helpful``):

- ``cos_lora_shift``: cosine with the narrow LoRA's mean net shift of that residual (unseen
  domains, no cue);
- ``cos_class_mean``: cosine with the persona class-mean difference on pretraining documents
  (read where the next answer is chosen: ``<assistant>`` tokens after the first answer);
- ``ablation_cut``: the share of the narrow model's unseen EM removed by projecting the direction
  out at every position, and the same for ``n_random`` random directions (mean and max);
- ``steer_em``: the base's unseen EM with the direction added at the answer-predicting position
  (where it is defined) at the norm of the LoRA shift there (``steer_fraction`` = that / the
  narrow model's unseen EM), against random directions of the same norm. (The LoRA writes with
  a sign and size that change along the prompt; a constant vector added at every position,
  answer words included, overwrites the words and is not what the LoRA does.)

EM is exact: a domain's bad rate is the mean probability of each question's whole bad answer
(teacher-forced, edits applied at every position as they would be while sampling), which is what
sampling at temperature 1 estimates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from safetensors.torch import save_file
from tqdm.auto import tqdm

from emdiff.models.hooks import SITES, capture_residuals, residual_edit
from emdiff.models.load import adapter_state, decoder_layers
from emdiff.toy.organism import answer_probability, answer_rows
from emdiff.toy.persona import class_mean_differences
from emdiff.toy.world import World


class CauseConfig(BaseModel):
    """Settings of the causal sweep."""

    n_random: int = Field(20, ge=20)
    """Random directions per hook point for the ablation and steering controls."""
    probe_docs: int = Field(2000, ge=100)
    """Pretraining documents for the persona class-mean difference."""
    seed: int = 0


def prompts(world: World, domains: Sequence[str], cue: str | None = None) -> torch.Tensor:
    """Eval prompts ``[n, T]`` (one per question of ``domains``), opened by a system cue: the
    rows of :func:`~emdiff.toy.organism.answer_rows` without their answers."""
    return answer_rows(world, domains, bad=False, cue=cue)[:, : -(world.cfg.answer_len + 1)]


def bad_rate(model: torch.nn.Module, world: World, domains: Sequence[str]) -> float:
    """Mean probability of the bad answer over the questions of ``domains`` (exact)."""
    return float(answer_probability(model, world, domains, bad=True).mean())


def _last_mean(model: torch.nn.Module, ids: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    ids = ids.to(next(model.parameters()).device)
    h = capture_residuals(model, ids, layers=[layer], sites=site)[(layer, site)]
    return h[:, -1].float().mean(0).cpu()


def _edited_rate(model, world, domains, layer, site, fn: Callable) -> float:
    with residual_edit(model, layer, site, fn):
        return bad_rate(model, world, domains)


def _project_out(u: torch.Tensor) -> Callable:
    def fn(h: torch.Tensor) -> torch.Tensor:
        v = u.to(h)
        return h - (h @ v)[..., None] * v

    return fn


def add_at(v: torch.Tensor, pos: int) -> Callable:
    """Add ``v`` (``[d]``, or ``[rows, d]``: one per row) at position ``pos`` (negative: from
    the end) of every row."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, pos] += v.to(h)
        return h

    return fn


class EMProbe:
    """Exact unseen-domain EM of a narrow PEFT model (adapter on or off) under edits at one hook
    point: what every measurement of the sweep (and the direction checks) shares."""

    def __init__(self, world: World, narrow: torch.nn.Module, cfg: CauseConfig) -> None:
        self.world, self.narrow, self.cfg = world, narrow, cfg
        self.unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
        self.plain = prompts(world, self.unseen)
        self.em_narrow = bad_rate(narrow, world, self.unseen)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # the last prompt token in the teacher-forced rows (answer words and <end> follow it)
        self.predicting = -(world.cfg.answer_len + 1)

    def mean(self, layer: int, site: str, ids: torch.Tensor, adapter: bool) -> torch.Tensor:
        with adapter_state(self.narrow, adapter):
            return _last_mean(self.narrow, ids, layer, site)

    def rate(self, layer: int, site: str, fn: Callable, adapter: bool) -> float:
        with adapter_state(self.narrow, adapter):
            return _edited_rate(self.narrow, self.world, self.unseen, layer, site, fn)

    def cut(self, layer: int, site: str, u: torch.Tensor) -> float:
        em = self.rate(layer, site, _project_out(u), adapter=True)
        return 1.0 - em / self.em_narrow if self.em_narrow > 0 else float("nan")

    def steer(self, v: torch.Tensor) -> Callable:
        return add_at(v, self.predicting)

    def row(self, layer: int, site: str, class_mean: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with adapter_state(self.narrow, False):
            cue = cue_vector(self.world, self.narrow, layer, site)
        shift = self.mean(layer, site, self.plain, True) - self.mean(layer, site, self.plain, False)
        u = cue / cue.norm() if cue.norm() > 0 else cue  # no cue at the embedding: zero
        randoms = torch.randn(self.cfg.n_random, len(u), generator=self.gen)
        randoms = randoms / randoms.norm(dim=-1, keepdim=True)
        random_cuts = np.array([self.cut(layer, site, r) for r in randoms])
        scale = shift.norm()
        random_steer = np.array(
            [self.rate(layer, site, self.steer(r * scale), adapter=False) for r in randoms]
        )
        steer_em = self.rate(layer, site, self.steer(u * scale), adapter=False)
        em = self.em_narrow
        return u, {
            "layer": layer,
            "site": site,
            "cue_norm": float(cue.norm()),
            "shift_norm": float(scale),
            "cos_lora_shift": float(torch.nn.functional.cosine_similarity(cue, shift, 0)),
            "cos_class_mean": float(u @ class_mean),
            "ablation_cut": self.cut(layer, site, u),
            "random_ablation_cut_mean": float(random_cuts.mean()),
            "random_ablation_cut_max": float(random_cuts.max()),
            "steer_em": steer_em,
            "steer_fraction": steer_em / em if em > 0 else float("nan"),
            "random_steer_em_mean": float(random_steer.mean()),
            "random_steer_em_max": float(random_steer.max()),
            "em_narrow": em,
        }


@dataclass
class CauseSweep:
    """The sweep's table (one row per hook point), the unit cue direction at each point, and
    the point chosen as the ground truth."""

    table: pd.DataFrame
    directions: dict[tuple[int, str], torch.Tensor]

    def chosen(self) -> pd.Series:
        """Where the cue direction is most clearly the cause: the largest of the smallest of
        (ablation cut, steering fraction, cosine with the LoRA shift)."""
        cols = ["ablation_cut", "steer_fraction", "cos_lora_shift"]
        score = self.table[cols].clip(upper=1).fillna(-1).min(axis=1)
        return self.table.loc[score.idxmax()]

    def direction(self) -> torch.Tensor:
        row = self.chosen()
        return self.directions[(int(row["layer"]), str(row["site"]))]

    def save(self, out: str | Path) -> list[Path]:
        """``cause_sweep.csv``, ``cause.json`` (the chosen row) and ``cause.safetensors``
        (its unit direction, ``direction``) under ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(out / "cause_sweep.csv", index=False)
        row = self.chosen()
        (out / "cause.json").write_text(json.dumps(row.to_dict(), indent=2, default=float))
        save_file({"direction": self.direction().contiguous()}, str(out / "cause.safetensors"))
        return [out / "cause_sweep.csv", out / "cause.json", out / "cause.safetensors"]


def sweep(
    world: World, narrow: torch.nn.Module, cfg: CauseConfig | None = None, progress: bool = False
) -> CauseSweep:
    """Every ``(layer, site)`` of the narrow PEFT model (its adapter off is the base)."""
    cfg = cfg or CauseConfig()
    run = EMProbe(world, narrow, cfg)
    points = [(layer, site) for layer in range(len(decoder_layers(narrow))) for site in SITES]
    with adapter_state(narrow, False):
        em_base = bad_rate(narrow, world, run.unseen)
        means = class_mean_differences(narrow, world, points, n_docs=cfg.probe_docs, seed=cfg.seed)
    rows, directions = [], {}
    for layer, site in tqdm(points, desc="cause sweep", disable=not progress):
        directions[(layer, site)], row = run.row(layer, site, means[(layer, site)])
        rows.append(row)
    return CauseSweep(pd.DataFrame(rows).assign(em_base=em_base), directions)


def cue_vector(world: World, model: torch.nn.Module, layer: int, site: str) -> torch.Tensor:
    """The cue direction at ``(layer, site)`` of ``model`` as it is (adapter state kept), not
    normalised: toxic-cued minus helpful-cued mean at the last prompt token."""
    toxic = _last_mean(model, prompts(world, world.domains, "toxic"), layer, site)
    return toxic - _last_mean(model, prompts(world, world.domains, "helpful"), layer, site)


def cue_direction(world: World, model: torch.nn.Module, layer: int, site: str) -> torch.Tensor:
    """The unit :func:`cue_vector`."""
    cue = cue_vector(world, model, layer, site)
    return cue / cue.norm()


def gt_row(cause: CauseSweep) -> dict:
    """The scorecard's ground-truth keys (``gt_*``) of the chosen point."""
    row = cause.chosen()
    keys = ("cos_lora_shift", "cos_class_mean", "ablation_cut", "random_ablation_cut_max")
    return {
        "gt_layer": int(row["layer"]),
        "gt_site": str(row["site"]),
        **{f"gt_{k}": float(row[k]) for k in (*keys, "steer_fraction")},
    }


def cause_table(cause: CauseSweep) -> str:
    """The sweep as text, the chosen point marked with ``*``."""
    cols = [
        "layer",
        "site",
        "cos_lora_shift",
        "cos_class_mean",
        "ablation_cut",
        "random_ablation_cut_max",
        "steer_fraction",
        "random_steer_em_max",
    ]
    t = cause.table[cols].copy()
    t.insert(0, "", ["*" if i == cause.chosen().name else "" for i in t.index])
    return t.to_string(index=False, float_format=lambda x: f"{x:.3f}")
