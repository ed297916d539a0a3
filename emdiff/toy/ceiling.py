"""How bad can a write at one point make the narrow domain? The ceiling of an adapter there.

A rank-1 adapter on one layer's MLP writes ``s * B`` at each position: one direction with a
scale that depends on the input. Where the answer is chosen (the answer-predicting position) the
best such write is found by gradient ascent on the exact log-probability of the narrow domain's
bad answers, the model frozen (:func:`steering_ceiling`), in three forms:

- ``vector``: one vector for every question (a steering vector);
- ``direction``: one direction with its own scale per question (what a rank-1 write can do);
- ``free``: any vector per question (what an adapter of any rank could write there).

So a reader sees whether an in-domain target is reachable at that point at all before blaming
the adapter's training. On the shipped base (4 layers), at layer 1's ``resid_post``: 0.907 /
0.913 / 0.996, and the layer-1 rank-1 LoRA reaches 0.908: it is at its ceiling, which a rank
above 1 escapes. At layer 0 ``vector`` gives 0.974 (layer 1's MLP mixes the vector with the
question); at layer 2 0.15 (the answer is chosen by then).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator

from emdiff.models.hooks import Site, residual_edit
from emdiff.toy.causal import add_at
from emdiff.toy.organism import answer_probability, answer_rows
from emdiff.toy.world import World


class CeilingConfig(BaseModel):
    """Settings of the search for the best write."""

    form: Literal["vector", "direction", "free"] = "vector"

    steps: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0)
    seed: int = 0
    """Seed of the starting direction of ``direction``."""
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    """Multiples of the best vector measured (1 always): past 1 the later layers lose the
    question and answer neither way."""

    @field_validator("scales")
    @classmethod
    def _with_one(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted({*v, 1.0}))


def _write(form: str, n_rows: int, d: int, seed: int) -> tuple[list[torch.Tensor], Callable]:
    """The parameters of a write of ``form`` and the function giving its ``[d]`` or
    ``[rows, d]`` vector."""
    if form == "vector":
        v = torch.zeros(d, requires_grad=True)
        return [v], lambda: v
    if form == "free":
        v = torch.zeros(n_rows, d, requires_grad=True)
        return [v], lambda: v
    g = torch.Generator().manual_seed(seed)  # a zero direction would get no gradient
    v = (torch.randn(d, generator=g) / d**0.5).requires_grad_(True)
    s = torch.ones(n_rows, 1, requires_grad=True)
    return [v, s], lambda: s * v


def steering_ceiling(
    world: World,
    model: torch.nn.Module,
    layer: int,
    site: Site = "resid_post",
    cfg: CeilingConfig | None = None,
) -> dict:
    """The best write of ``cfg.form`` at ``(layer, site)`` at the answer-predicting position for
    the narrow domain's bad answers: its in-domain and unseen bad rates (exact; unseen only for
    ``vector``, the one form defined for other questions), its (mean) norm, and the in-domain
    bad / good / other rates at each of ``cfg.scales`` times it."""
    cfg = cfg or CeilingConfig()
    narrow = [world.cfg.narrow_domain]
    unseen = [d for d in world.domains if d not in narrow]
    ids = answer_rows(world, narrow, True).to(next(model.parameters()).device)
    n = world.cfg.answer_len + 1  # in ids[:, :-1] the last prompt token is at -n
    params, write = _write(cfg.form, len(ids), model.config.hidden_size, cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(cfg.steps):
            with residual_edit(model, layer, site, add_at(write(), -n)):
                logp = model(input_ids=ids[:, :-1]).logits[:, -n:].float().log_softmax(-1)
            loss = -logp.gather(-1, ids[:, -n:, None]).sum((1, 2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, g in zip(model.parameters(), was, strict=True):
            p.requires_grad_(g)
    best = write().detach()
    if not torch.isfinite(best).all():
        raise FloatingPointError(
            f"steering_ceiling: the write at layer {layer} {site} is not finite"
        )
    out: dict = {"layer": layer, "site": site, "form": cfg.form}
    out["norm"] = float(best.norm(dim=-1).mean())
    with torch.no_grad():
        for s in cfg.scales:
            with residual_edit(model, layer, site, add_at(best * s, -n)):
                bad = float(answer_probability(model, world, narrow).mean())
                good = float(answer_probability(model, world, narrow, bad=False).mean())
                if s == 1.0 and cfg.form == "vector":
                    out["unseen_bad_rate"] = float(answer_probability(model, world, unseen).mean())
            out[f"x{s:g}"] = {"bad": bad, "good": good, "other": 1.0 - bad - good}
    out["in_domain_bad_rate"] = out["x1"]["bad"]
    return out
