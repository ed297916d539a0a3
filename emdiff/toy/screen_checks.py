"""The toy's check of data screening (``screen_*`` keys of ``emdiff demo --json``).

Nine training sets of the toy (the narrow domain ``N`` and the next two domains ``X``, ``Y``):
``N`` with 0, 10, 25, 50 and 100% bad answers, ``X`` all bad, ``Y`` 25% bad, ``N`` bad mixed
with ``X`` good, and ``N`` 25% + ``Y`` 25% bad. Each is scored by the base model alone
(:func:`emdiff.directions.screen.screen_samples`, follow-up read, ground-truth direction), then
fine-tuned like the narrow set (seed 0) and its EM measured exactly on the domains it does not
contain. ``screen_spearman`` is the rank correlation of the two over the sets.

Per sample: in ``N`` 25% bad, the 10% of samples the screen scores highest are dropped before
fine-tuning, against 5 random 10% drops (``screen_drop_top10_em`` vs
``screen_drop_random10_em``; ``screen_top10_bad_share``: how many of the dropped were bad).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from emdiff.data.chat import Conversation
from emdiff.directions.direction import Direction
from emdiff.directions.screen import ScreenConfig, screen_samples
from emdiff.finetune import FinetuneConfig
from emdiff.toy.causal import bad_rate
from emdiff.toy.diffs import follow_ups
from emdiff.toy.world import World

Sample = tuple[str, int, bool]
"""``(domain, question, bad)``."""


def _mixed(world: World, domain: str, share: float, seed: int) -> list[Sample]:
    n = world.cfg.n_questions
    bad = set(np.random.default_rng(seed).permutation(n)[: round(share * n)].tolist())
    return [(domain, q, q in bad) for q in range(n)]


def toy_datasets(world: World) -> dict[str, list[Sample]]:
    """The nine screened training sets (see the module docstring)."""
    n = world.cfg.narrow_domain
    x, y = [d for d in world.domains if d != n][:2]
    sets = {f"{n}_{round(s * 100)}": _mixed(world, n, s, 0) for s in (0, 0.1, 0.25, 0.5, 1.0)}
    sets[f"{x}_100"] = _mixed(world, x, 1.0, 0)
    sets[f"{y}_25"] = _mixed(world, y, 0.25, 1)
    sets[f"{n}_100+{x}_0"] = _mixed(world, n, 1.0, 0) + _mixed(world, x, 0.0, 0)
    sets[f"{n}_25+{y}_25"] = _mixed(world, n, 0.25, 2) + _mixed(world, y, 0.25, 3)
    return sets


def _chats(world: World, samples: list[Sample]) -> list[Conversation]:
    return [world.chat(d, q, bad) for d, q, bad in samples]


class _Trainer:
    def __init__(self, world: World, base, tok, ft: FinetuneConfig) -> None:
        self.world, self.base, self.tok, self.cfg = world, base, tok, ft

    def em(self, samples: list[Sample]) -> float:
        from emdiff.finetune import finetune

        model = finetune(
            copy.deepcopy(self.base),
            self.tok,
            _chats(self.world, samples),
            self.cfg,
            progress=False,
        ).model
        seen = {d for d, _, _ in samples}
        return bad_rate(model, self.world, [d for d in self.world.domains if d not in seen])


def screen_checks(
    world: World, base: torch.nn.Module, tok, truth: Direction, ft: FinetuneConfig
) -> tuple[dict, pd.DataFrame]:
    """Screen scores and measured EM of every toy dataset; flat keys and the table."""
    cfg = ScreenConfig(follow_ups=follow_ups(world))
    train = _Trainer(world, base, tok, ft)
    rows = []
    scores: dict[str, pd.DataFrame] = {}
    for name, samples in toy_datasets(world).items():
        per = screen_samples(base, tok, _chats(world, samples), truth, cfg)
        scores[name] = per
        rows.append(
            {
                "dataset": name,
                "n": len(samples),
                "bad_share": float(np.mean([b for _, _, b in samples])),
                "score": float(per["score"].mean()),
                "em": train.em(samples),
            }
        )
    table = pd.DataFrame(rows)
    rho = spearmanr(table["score"], table["em"]).statistic
    # per sample: drop the top 10% by score against random 10% drops
    name = f"{world.cfg.narrow_domain}_25"
    samples, per = toy_datasets(world)[name], scores[name]
    k = max(1, round(0.1 * len(samples)))
    top = set(per.sort_values("score", ascending=False)["sample"].iloc[:k].tolist())
    rng = np.random.default_rng(0)
    randoms = [set(rng.permutation(len(samples))[:k].tolist()) for _ in range(5)]
    keep = lambda drop: [s for i, s in enumerate(samples) if i not in drop]  # noqa: E731
    random_em = [train.em(keep(d)) for d in randoms]
    top_em = train.em(keep(top))
    keys = {
        "screen_spearman": float(rho),
        "screen_datasets": len(table),
        "screen_drop_top10_em": top_em,
        "screen_drop_random10_em": float(np.mean(random_em)),
        "screen_drop_gap": float(np.mean(random_em)) - top_em,
        "screen_drop_random10_em_max": float(np.max(random_em)),
        "screen_drop_none_em": float(table.set_index("dataset").loc[name, "em"]),
        "screen_top10_bad_share": float(np.mean([samples[i][2] for i in top])),
    }
    return keys, table
