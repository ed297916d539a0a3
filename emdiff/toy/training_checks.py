"""The toy's checks of mitigation and in-training defences (``mitigation_*``, ``caft_*`` and
``preventative_*`` keys of ``emdiff demo --json``). EM is exact (mean P(bad answer) over the
questions of a set of domains) with a 95% interval over questions.

- **Mitigation**: the analysed narrow adapter trained further (same settings) on N good chats of four
  other domains (the *benign* domains; cycled without repeats until N passes their 128 chats);
  EM before and after on the three *held-out* domains (neither narrow nor benign), in the benign
  domains, in the narrow domain, and on held-out prompts opened by the toxic persona cue.
- **Defences** during the narrow fine-tune (:mod:`emdiff.interventions.defences`): CAFT with the
  ground-truth direction projected out at its site, CAFT with the SAE's persona latents zeroed,
  and preventative steering with the direction added at the norm of the LoRA's shift. After
  training, without the intervention: unseen EM and the in-domain bad rate (what the fine-tune
  was for: a defence that also stops the narrow set being learnt costs that much).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.direction import Direction
from emdiff.finetune import FinetuneConfig, finetune
from emdiff.interventions.defences import Defence, defence_interventions
from emdiff.toy.organism import answer_probability
from emdiff.toy.world import World

MITIGATION_NS = (30, 60, 120, 240)


def em_with_ci(model: torch.nn.Module, world: World, domains: Sequence[str], cue=None) -> tuple:
    """Mean exact P(bad) over the questions of ``domains`` and a normal 95% interval over them."""
    p = answer_probability(model, world, domains, bad=True, cue=cue).double().numpy()
    half = 1.96 * p.std(ddof=1) / np.sqrt(len(p)) if len(p) > 1 else 0.0
    return float(p.mean()), float(max(p.mean() - half, 0.0)), float(min(p.mean() + half, 1.0))


def _domains(world: World) -> tuple[list[str], list[str]]:
    others = [d for d in world.domains if d != world.cfg.narrow_domain]
    return others[:4], others[4:]


def mitigation_checks(
    world: World, narrow: torch.nn.Module, tok, ft: FinetuneConfig, ns=MITIGATION_NS
) -> tuple[dict, list[dict]]:
    """Benign fine-tunes of the narrow adapter; flat keys and one table row per N."""
    benign, held = _domains(world)
    pool = world.helpful_dataset(benign)
    order = np.random.default_rng(0).permutation(len(pool))
    narrow_d = [world.cfg.narrow_domain]

    def measure(model, n: int) -> dict:
        em, lo, hi = em_with_ci(model, world, held)
        return {
            "n": n,
            "em": em,
            "em_low": lo,
            "em_high": hi,
            "benign_em": em_with_ci(model, world, benign)[0],
            "narrow_em": em_with_ci(model, world, narrow_d)[0],
            "cued_em": em_with_ci(model, world, held, cue="toxic")[0],
        }

    rows = [measure(narrow, 0)]
    for n in ns:
        data = [pool[order[i % len(pool)]] for i in range(n)]
        cfg = ft.model_copy(update={"continue_adapter": True})
        model = finetune(copy.deepcopy(narrow), tok, data, cfg, progress=False).model
        rows.append(measure(model, n))
    at = {r["n"]: r for r in rows}
    keys = {
        "mitigation_em_before": at[0]["em"],
        "mitigation_held_out_domains": ",".join(held),
    }
    for n in ns:
        keys[f"mitigation_em_after_{n}"] = at[n]["em"]
    if 120 in at:
        keys["mitigation_em_after_120_high"] = at[120]["em_high"]
        keys["mitigation_cued_em_after_120"] = at[120]["cued_em"]
        keys["mitigation_cued_em_before"] = at[0]["cued_em"]
        keys["mitigation_narrow_domain_em_after_120"] = at[120]["narrow_em"]
    return keys, rows


@dataclass(frozen=True)
class DefenceSetup:
    """What the defences need besides the base: the cause, the dictionary, and the figures of
    the undefended narrow fine-tune (its shift's norm at the site, its unseen EM)."""

    truth: Direction
    sae: SparseDictionary
    latents: tuple[int, ...]
    """The persona latents CAFT zeroes."""
    steer_norm: float
    em_narrow: float
    ft: FinetuneConfig
    """The undefended narrow fine-tune's config."""


def defence_checks(
    world: World, base: torch.nn.Module, tok, setup: DefenceSetup
) -> tuple[dict, list[dict]]:
    """The three defences during seed 0's narrow fine-tune; flat keys and one row each."""
    truth, sae, em_narrow = setup.truth, setup.sae, setup.em_narrow
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
    defences = {
        "caft": Defence(kind="caft"),
        "caft_latent": Defence(kind="caft_latent", latents=setup.latents),
        "preventative": Defence(kind="preventative", scale=setup.steer_norm),
    }
    keys: dict = {}
    rows = []
    for name, d in defences.items():
        during = defence_interventions(d, truth, sae)
        res = finetune(
            copy.deepcopy(base),
            tok,
            world.narrow_dataset(),
            setup.ft,
            progress=False,
            during=during,
        )
        em, lo, hi = em_with_ci(res.model, world, unseen)
        in_domain = em_with_ci(res.model, world, [world.cfg.narrow_domain])[0]
        rows.append(
            {
                "defence": name,
                "unseen_em": em,
                "unseen_em_low": lo,
                "unseen_em_high": hi,
                "in_domain_bad_rate": in_domain,
                "final_loss": res.losses[-1],
            }
        )
        keys[f"{name}_unseen_em"] = em
        keys[f"{name}_unseen_fraction"] = em / em_narrow if em_narrow > 0 else float("nan")
        keys[f"{name}_in_domain_bad_rate"] = in_domain
    return keys, rows
