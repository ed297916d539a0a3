"""The toy's checks of directions, decomposition, attribution and interventions against its
known cause (the ``dir_*``, ``latent_*``, ``decomp_*``, ``attribution_*``, ``lora_*``,
``appendix_b_*`` and ``cross_organism_*`` keys of ``emdiff demo --json``).

Everything is measured where the ground truth lives (its layer and site, where the SAE was
trained), with exact EM (:class:`~emdiff.toy.causal.EMProbe`) and a random control beside each
causal figure:

- the **Q3 direction** is CLR's: the narrow model's misaligned minus aligned answers (balanced
  split), read where it answers a follow-up question of another domain (as Q3 reads), each
  answer before follow-ups drawn from every unseen question, raw residual mean difference;
  ``dir_cosine`` is its cosine with the ground truth;
- ``dir_ablation_cut``: projecting it out of the narrow model removes this share of unseen EM
  (``dir_random_ablation_cut_max``: the largest share removed by 20 random directions);
- ``dir_steer_fraction`` / ``latent_steer_fraction``: the base steered at the answer-predicting
  position with the direction / the persona latent's decoder row, at the norm of the LoRA's
  shift there, as a share of the narrow model's unseen EM (random directions beside);
- ``decomp_*``: the direction decomposed over the SAE's decoder rows against a random null;
- ``attribution_persona_rank``: the persona latent's rank by attribution of log P(bad) - log
  P(good) on unseen prompts in the narrow model (with the correlation to true ablation);
- ``lora_weight_ablation_cut``: the direction projected out of the LoRA's B (weights, not
  activations);
- ``appendix_b_cosine``: the same texts read by the base: does the direction already exist there;
- ``cross_organism_cosine_min``: Q3 directions of narrow fine-tunes on other domains, pairwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emdiff.analyses.response_diff import FollowUps, ResponseSplit, split_responses
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import SparseDictionary
from emdiff.directions.attribution import ContrastMetric, attribute
from emdiff.directions.decompose import DecomposeConfig, decompose
from emdiff.directions.direction import Direction, cosine_table, residual_means
from emdiff.interventions.edits import EditLoraB, intervene
from emdiff.interventions.sweep import random_directions
from emdiff.models.load import adapter_state
from emdiff.models.read import ReadSpec
from emdiff.toy.causal import CauseConfig, EMProbe
from emdiff.toy.diffs import FOLLOW_UPS_PER_ANSWER, every_follow_up
from emdiff.toy.organism import answer_rows
from emdiff.toy.world import World

JudgeAnswers = Callable[[torch.nn.Module, str], pd.DataFrame]
"""``(model, label) -> judged answers`` (``question``, ``answer``, ``aligned``, ``coherent``)."""
Finetune = Callable[[str], torch.nn.Module]
"""``domain -> narrow PEFT model`` fine-tuned on that domain's bad answers."""


def q3_direction(
    world: World,
    model: torch.nn.Module,
    tok,
    judged: pd.DataFrame,
    read: ReadSpec,
    name: str,
    per_answer: int = FOLLOW_UPS_PER_ANSWER,
) -> dict[bool, Direction]:
    """The Q3 direction of ``model``'s own judged answers, read by the model with its adapter
    on (``True``) and off (``False``, Appendix B: the base reading the same texts).

    Each answer is read before ``per_answer`` follow-ups drawn (seeded) from every unseen
    question, so the direction estimates the mean over the whole unseen set at a few rows per
    answer."""
    mis, good = split_responses(judged, ResponseSplit(), source=f"judged answers of {name}")
    draw = FollowUps(every_follow_up(world), per_answer)
    rows = {"mis": draw.rows(tok, mis, 0), "good": draw.rows(tok, good, 1)}
    out = {}
    for adapter in (True, False):
        with adapter_state(model, adapter):
            a = residual_means(model, rows["mis"], read, batch_size=256)[read.layer]
            b = residual_means(model, rows["good"], read, batch_size=256)[read.layer]
        out[adapter] = Direction(
            f"{name}_{'narrow' if adapter else 'base'}_L{read.layer}",
            read.layer,
            read.site,
            a.mean - b.mean,
            {
                "texts": f"{name} judged answers, each + {per_answer} unseen follow-ups",
                "n_misaligned": len(mis),
            },
        )
    return out


def _contrast(world: World, domains: list[str]) -> ContrastMetric:
    n = world.cfg.answer_len + 1

    def pack(bad: bool):
        ids = answer_rows(world, domains, bad)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, -n:] = True
        return ids, mask

    return ContrastMetric(*pack(True), *pack(False))


def toy_direction_checks(
    world: World,
    narrow: torch.nn.Module,
    tok,
    sae: SparseDictionary,
    gt: dict,
    judged: pd.DataFrame,
    finetune: Finetune,
    judge_answers: JudgeAnswers,
    out: Path | None = None,
    n_random: int = 20,
) -> dict:
    """Every check above on one seed's narrow model; flat figures (and tables under ``out``)."""
    layer, site = int(gt["gt_layer"]), str(gt["gt_site"])
    truth = torch.tensor(gt["persona_direction"], dtype=torch.float32)
    latents = [int(x) for x in gt["sae_persona_latents"]]
    latent = latents[0]
    read = ReadSpec(layers=(layer,), site=site, positions=Positions.parse("last"))
    dirs = q3_direction(world, narrow, tok, judged, read, world.cfg.narrow_domain)
    v = dirs[True]
    probe = EMProbe(world, narrow, CauseConfig(n_random=n_random))
    shift = probe.mean(layer, site, probe.plain, True) - probe.mean(layer, site, probe.plain, False)
    scale = float(shift.norm())
    randoms = random_directions(len(v.raw), n_random, seed=1)
    steer_em = lambda u: probe.rate(layer, site, probe.steer(u * scale), adapter=False)  # noqa: E731
    em = probe.em_narrow
    res: dict = {
        "dir_cosine": v.cos(truth),
        "dir_ablation_cut": probe.cut(layer, site, v.vector),
        "dir_random_ablation_cut_max": max(probe.cut(layer, site, r) for r in randoms),
        "dir_steer_fraction": steer_em(v.vector) / em,
        "dir_random_steer_fraction_max": max(steer_em(r) for r in randoms) / em,
    }
    row = sae.W_dec[latent].detach().float()
    res["latent_steer_fraction"] = steer_em(row / row.norm()) / em
    # decomposition of the Q3 direction over the SAE's decoder rows, against random directions
    dec = decompose(v.raw, sae.W_dec, DecomposeConfig(n_null=n_random), name="q3_decomposition")
    e = dec.explained.set_index("k")
    res.update(
        decomp_top_is_persona=int(dec.top_latent in latents),
        decomp_top_latent=dec.top_latent,
        decomp_explained_k1=float(e.loc[1, "explained"]),
        decomp_null_k1=float(e.loc[1, "null_p95"]),
        decomp_k1_margin=float(e.loc[1, "explained"] - e.loc[1, "null_p95"]),
    )
    # attribution in the narrow model, checked against true ablation
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
    with adapter_state(narrow, True):
        att = attribute(narrow, sae, _contrast(world, unseen), check_top=20, name="attribution")
    res["attribution_persona_rank"] = min(att.rank_of(x) for x in latents)
    res["attribution_ablation_pearson"] = att.meta.get("ablation_pearson", float("nan"))
    # the direction projected out of the LoRA's B
    with intervene(narrow, EditLoraB(direction=v.vector)):
        left = probe.rate(layer, site, lambda h: h, adapter=True)
    res["lora_weight_ablation_cut"] = 1.0 - left / em
    res["appendix_b_cosine"] = v.cos(dirs[False])
    # other organisms: narrow fine-tunes on other domains, their own answers, their Q3 direction
    others = [d for d in world.domains if d != world.cfg.narrow_domain][:2]
    organisms = {world.cfg.narrow_domain: v}
    for d in others:
        model = finetune(d)
        answers = judge_answers(model, f"narrow-{d}")
        other_world = World(world.cfg.model_copy(update={"narrow_domain": d}))
        organisms[d] = q3_direction(other_world, model, tok, answers, read, d)[True]
    table = cosine_table(organisms)
    upper = table.to_numpy()[np.triu_indices(len(table), 1)]
    res["cross_organism_cosine_min"] = float(upper.min())
    res["cross_organism_domains"] = ",".join(organisms)
    if out is not None:
        folder = Path(out) / "directions"
        for direction in (*dirs.values(), *organisms.values()):
            direction.save(folder)
        dec.save(out)
        att.save(out)
        table.to_csv(Path(out) / "tables" / "cross_organism_cosines.csv")
    return res
