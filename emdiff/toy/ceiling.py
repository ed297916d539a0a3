"""How bad can one vector make the narrow domain? The ceiling of any adapter writing one direction.

A rank-1 adapter on one layer's MLP writes ``s_t * B`` at each position ``t``: one direction with
a scale. Where the answer is chosen (the answer-predicting position) the best such write is at
most the best single vector added there. :func:`steering_ceiling` finds that vector by gradient
ascent on the exact log-probability of the narrow domain's bad answers (the model frozen), so a
reader sees whether an in-domain target is reachable by *any* one-direction write at that point,
before blaming the adapter's training.

On the shipped base (4 layers) the ceiling at layer 1's ``resid_post`` is 0.907 in domain, and
the layer-1 rank-1 LoRA reaches 0.908: the LoRA is at the ceiling. At layer 0 it is 0.974 (layer
1's MLP mixes the vector with the question); at layer 2 0.15 (the answer is chosen by then).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, Field, field_validator

from emdiff.models.hooks import Site, residual_edit
from emdiff.toy.organism import answer_probability, answer_rows
from emdiff.toy.world import World


class CeilingConfig(BaseModel):
    """Settings of the search for the best vector."""

    steps: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0)
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    """Multiples of the best vector measured (1 always): past 1 the later layers lose the
    question and answer neither way."""

    @field_validator("scales")
    @classmethod
    def _with_one(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted({*v, 1.0}))


def _add_at(v: torch.Tensor, pos: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, pos] = h[:, pos] + v.to(h)
        return h

    return fn


def steering_ceiling(
    world: World,
    model: torch.nn.Module,
    layer: int,
    site: Site = "resid_post",
    cfg: CeilingConfig | None = None,
) -> dict:
    """The best vector added at ``(layer, site)`` at the answer-predicting position for the
    narrow domain's bad answers: its in-domain and unseen bad rates (exact), its norm, and the
    in-domain bad / good / other rates at each of ``cfg.scales`` times it."""
    cfg = cfg or CeilingConfig()
    narrow = [world.cfg.narrow_domain]
    unseen = [d for d in world.domains if d not in narrow]
    ids = answer_rows(world, narrow, True).to(next(model.parameters()).device)
    n = world.cfg.answer_len + 1
    pos = -n  # in ids[:, :-1]: the last prompt token
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    v = torch.zeros(model.config.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    try:
        for _ in range(cfg.steps):
            with residual_edit(model, layer, site, _add_at(v, pos)):
                logp = model(input_ids=ids[:, :-1]).logits[:, -n:].float().log_softmax(-1)
            loss = -logp.gather(-1, ids[:, -n:, None]).sum((1, 2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, g in zip(model.parameters(), was, strict=True):
            p.requires_grad_(g)
    best = v.detach()
    if not torch.isfinite(best).all():
        raise FloatingPointError(
            f"steering_ceiling: the vector at layer {layer} {site} is not finite"
        )
    out: dict = {"layer": layer, "site": site, "norm": float(best.norm())}
    with torch.no_grad():
        for s in cfg.scales:
            with residual_edit(model, layer, site, _add_at(best * s, -n)):
                bad = float(answer_probability(model, world, narrow).mean())
                good = float(answer_probability(model, world, narrow, bad=False).mean())
                if s == 1.0:
                    out["unseen_bad_rate"] = float(answer_probability(model, world, unseen).mean())
            out[f"x{s:g}"] = {"bad": bad, "good": good, "other": 1.0 - bad - good}
    out["in_domain_bad_rate"] = out["x1"]["bad"]
    return out
