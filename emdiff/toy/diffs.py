"""Q1, Q2, Q3, overlap and transfer on the toy organism, scored against the known persona latent.

- Q1: the narrow domain's bad answers against its good answers (paired by question), read by the
  aligned base model where it is about to answer a follow-up question of another domain (the
  toy's persona is inferred from context and used where an answer is chosen; it is not written
  at every answer word, see the README); the same at the answer tokens (CLR's read) beside it.
- Q2: base against the narrow LoRA (adapter off / on) on the unseen-domain eval prompts with the
  narrow model's own sampled answers; the same for the control LoRA with its own answers.
- Q3: the narrow model's misaligned against aligned answers (all domains, CLR split, balanced),
  read at the same follow-up questions, and at the answer tokens beside it.
- Overlap of the Q1 and Q2 rankings; transfer of the base-trained SAE to the narrow model.

The persona latent is the SAE latent matched to the persona probe in
:func:`emdiff.toy.ground_truth.toy_ground_truth`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import yaml

from emdiff.analyses import (
    ANALYSES,
    Analysis,
    DiffResult,
    ResponseDiff,
    ResponseSplit,
    RunContext,
    encode_qa,
)
from emdiff.data.masks import encode_chat
from emdiff.dictionaries.base import SparseDictionary
from emdiff.models.read import ReadSpec
from emdiff.toy.persona import decoder_cosines
from emdiff.toy.world import World


def _persona(res: DiffResult, latents: Sequence[int]) -> dict:
    """The best rank by increase of any persona latent, ordered as the analysis ordered
    (``rank_by``: effect or diff; ties share their best rank: 1 + how many are larger), with
    that latent's figures."""
    t = res.table
    by = res.meta.get("rank_by", "effect")
    ranked = []
    for latent in latents:
        row = t[t["feature"] == latent].iloc[0]
        value = 0.0 if pd.isna(row[by]) else float(row[by])
        ranked.append((1 + int((t[by].fillna(0.0) > value).sum()), row))
    rank, row = min(ranked, key=lambda r: r[0])
    return {
        "latent": int(row["feature"]),
        "rank": rank,
        "q": float(row["q"]),
        "effect": float(row["effect"]),
        "effect_ci_low": float(row["effect_ci_low"]),
        "effect_ci_high": float(row["effect_ci_high"]),
    }


def _max_significant_effect(res: DiffResult, alpha: float = 0.05) -> tuple[float, int]:
    """Largest |effect| among features with q < alpha (0 when none) and how many pass."""
    sig = res.table[res.table["q"] < alpha]
    return (float(sig["effect"].abs().max()) if len(sig) else 0.0), len(sig)


def _answers(judged: pd.DataFrame, model: str, domains: list[str]) -> pd.DataFrame:
    rows = judged[(judged["model"] == model) & judged["domain"].isin(domains)]
    if rows.empty:
        raise ValueError(f"no judged answers of {model!r} in {domains}")
    return rows.reset_index(drop=True)


@dataclass
class ToyModels:
    """One seed's toy organism: the aligned base, its narrow and control LoRAs (PEFT models on
    the base), the tokenizer, and the judged eval answers (``model`` and ``domain`` columns, as
    written by ``emdiff demo``) under the labels ``narrow_label`` / ``control_label``."""

    base: torch.nn.Module
    tokenizer: object
    narrow: torch.nn.Module
    control: torch.nn.Module
    judged: pd.DataFrame
    narrow_label: str = "narrow-s0"
    control_label: str = "control-s0"


def follow_ups(world: World, n: int = 4) -> tuple[str, ...]:
    """Follow-up questions for the toy's Q1 and Q3: one of each of ``n`` non-narrow domains."""
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
    return tuple(world.q_token(d, i) for i, d in enumerate(unseen[:n]))


FOLLOW_UPS_PER_ANSWER = 8
"""Follow-ups each judged answer is read before (Q3 and its direction), drawn from
:func:`every_follow_up`."""


def every_follow_up(world: World) -> tuple[str, ...]:
    """Every question of every non-narrow domain: the follow-ups a direction is averaged over.

    A direction read at a follow-up mixes in how the answer meets that follow-up, and over a
    handful of them that part does not average out. Measured on the shipped base's medical and
    finance organisms: with four follow-ups the Q3 direction has cosine 0.97 with the ground
    truth and its ablation removes 87% of the EM; with other handfuls (7 to 21) 0.97-0.99 and
    85-93%; with every unseen question 0.99 and 92% / 91%.
    """
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]
    return tuple(world.q_token(d, q) for d in unseen for q in range(world.cfg.n_questions))


def toy_context(
    world: World, models: ToyModels, sae: SparseDictionary, read: ReadSpec
) -> RunContext:
    """The run context the toy's analyses share: datasets, judged answers and variants by name."""
    tok, judged = models.tokenizer, models.judged
    unseen = [d for d in world.domains if d != world.cfg.narrow_domain]

    def rows_of(convs):
        return [encode_chat(tok, c.as_dicts()) for c in convs]

    def qa(label: str):
        answers = _answers(judged, label, unseen)
        return encode_qa(tok, answers["question"], answers["answer"])

    def then_asked(bad: bool):  # each chat once per follow-up question, read where answered
        narrow = world.cfg.narrow_domain
        qs = [world.q_token(narrow, q) for q in range(world.cfg.n_questions)]
        answer = world.bad_answer if bad else world.good_answer
        ans = [answer(narrow, q) for q in range(world.cfg.n_questions)]
        return [row for f in follow_ups(world) for row in encode_qa(tok, qs, ans, f)]

    return RunContext(
        read=read,
        model=models.narrow,
        tokenizer=tok,
        dictionaries={read.layer: sae},
        datasets={
            "bad": rows_of(world.narrow_dataset(bad=True)),
            "good": rows_of(world.narrow_dataset(bad=False)),
            "bad_then_asked": then_asked(bad=True),
            "good_then_asked": then_asked(bad=False),
            "then_asked": then_asked(bad=True) + then_asked(bad=False),
            "unseen_eval": qa(models.narrow_label),
            "unseen_prompts": [
                encode_chat(tok, [{"role": "user", "content": world.q_token(d, q)}], True)
                for d in unseen
                for q in range(world.cfg.n_questions)
            ],
        },
        tables={"judged": judged[judged["model"] == models.narrow_label]},
        variants={"base": (models.narrow, False), "narrow": (models.narrow, True)},
    )


DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
"""The demo as a pipeline config: its ``toy`` settings and the analyses the toy runs."""


def toy_analyses(raw: Sequence[dict] | None = None) -> tuple[Analysis, ...]:
    """The analyses a user runs, as the toy runs them: ``raw`` configs (``kind`` plus fields),
    default the ``analyses`` of :data:`DEMO_CONFIG` (the control's Q2 is run on its own model)."""
    if raw is None:
        raw = yaml.safe_load(DEMO_CONFIG.read_text())["analyses"]
    return tuple(
        ANALYSES[a["kind"]].model_validate({k: v for k, v in a.items() if k != "kind"}) for a in raw
    )


def toy_diffs(
    world: World,
    models: ToyModels,
    sae: SparseDictionary,
    read: ReadSpec,
    persona_latents: Sequence[int],
    *,
    out: str | Path | None = None,
    seed: int = 0,
    direction: torch.Tensor | None = None,
    analyses: Sequence[Analysis] | None = None,
) -> dict:
    """Run the analyses (default :func:`toy_analyses`) on one seed's models; flat dict of the persona's ranks and the controls.

    With the persona ``direction`` (the probe's), the decoder cosine of each analysis' top
    feature with it is reported too (``*_top_cosine``).
    """
    ctx = toy_context(world, models, sae, read)
    results = {}
    analyses = toy_analyses() if analyses is None else analyses
    for a in analyses:
        if isinstance(a, ResponseDiff):
            q3 = a.name == "q3_response_diff"
            update = {
                "split": ResponseSplit(seed=seed),
                "follow_up": every_follow_up(world) if q3 else (),
                "follow_ups_per_answer": FOLLOW_UPS_PER_ANSWER if q3 else None,
            }
            a = a.model_copy(update=update)
        results[a.stem] = ctx.results[a.stem] = a.run(ctx)
    control_ctx = RunContext(
        read=read,
        model=models.control,
        dictionaries=ctx.dictionaries,
        datasets={"unseen_prompts": ctx.datasets["unseen_prompts"]},
    )
    q2_cfg = next(a for a in analyses if a.name == "q2_model_diff")
    q2c = q2_cfg.model_copy(update={"name": "q2_control_model_diff"}).run(control_ctx)
    q1, q2, q3 = (results[k] for k in ("q1_dataset_diff", "q2_model_diff", "q3_response_diff"))
    ov, tr = results["overlap_q1_q2"], results["transfer"].table
    if out is not None:
        for r in (q1, q2, q2c, q3, results["q1_answer_tokens"], results["q3_answer_tokens"]):
            r.highlight = persona_latents[0]
        for r in (*results.values(), q2c):
            r.save(out)

    q1a, q3a = results["q1_answer_tokens"], results["q3_answer_tokens"]
    p1, p2, p3 = (_persona(r, persona_latents) for r in (q1, q2, q3))
    c_max, c_n = _max_significant_effect(q2c)
    n_max, n_n = _max_significant_effect(q2)
    jac = ov.jaccard.set_index("k")["jaccard"]
    fve = tr.set_index("variant")
    res = {
        "q1_persona_rank": p1["rank"],
        "q1_persona_q": p1["q"],
        "q1_persona_effect": p1["effect"],
        "q1_top_feature": int(q1.table.loc[q1.table.rank_increase == 1, "feature"].iloc[0]),
        "q1_n_significant": int((q1.table.q < 0.05).sum()),
        "q2_persona_rank": p2["rank"],
        "q2_persona_q": p2["q"],
        "q2_persona_effect": p2["effect"],
        "q2_persona_effect_ci_low": p2["effect_ci_low"],
        "q2_persona_effect_ci_high": p2["effect_ci_high"],
        "q2_top_feature": int(q2.table.loc[q2.table.rank_increase == 1, "feature"].iloc[0]),
        "q2_n_significant": n_n,
        "q2_max_effect": n_max,
        "q3_persona_rank": p3["rank"],
        "q3_persona_q": p3["q"],
        "q3_persona_effect": p3["effect"],
        "q3_n_misaligned": q3.meta["n_rows_a"],
        "q1_answer_persona_rank": _persona(q1a, persona_latents)["rank"],
        "q3_answer_persona_rank": _persona(q3a, persona_latents)["rank"],
        "control_q2_max_effect": c_max,
        "control_q2_n_significant": c_n,
        "control_q2_persona_effect": _persona(q2c, persona_latents)["effect"],
        "q2_control_persona_rank": _persona(q2c, persona_latents)["rank"],
        "control_q2_target_met": bool(p2["q"] < 0.05 and c_max < abs(p2["effect"])),
        "q1_top10_q2_top10_jaccard": float(jac.get(10, float("nan"))),
        "q1_q2_spearman": ov.spearman,
        "q1_q2_kendall": ov.kendall,
        "transfer_fve_base": float(fve.loc["base", "fve"]),
        "transfer_fve_narrow": float(fve.loc["narrow", "fve"]),
        "transfer_ce_delta_base": float(fve.loc["base", "ce_delta"]),
        "transfer_ce_delta_narrow": float(fve.loc["narrow", "ce_delta"]),
        "transfer_kl_narrow": float(fve.loc["narrow", "kl"]),
    }
    if out is not None and "cards" in results:
        res.update(_explained(world, Path(out) / "cards" / "cards.json", persona_latents))
    if direction is not None:
        cos = decoder_cosines(sae.W_dec, direction)
        u = direction.float() / direction.float().norm()
        named = (("q1", q1), ("q2", q2), ("q3", q3), ("control_q2", q2c))
        for name, r in (*named, ("q1_answer", q1a), ("q3_answer", q3a)):
            top = int(r.table.loc[r.table.rank_increase == 1, "feature"].iloc[0])
            res[f"{name}_top_cosine"] = float(cos[top])
            # the raw mean difference (CLR's direction for Q3) against the persona direction
            res[f"{name}_direction_cosine"] = float(r.direction() @ u)
            res[f"{name}_persona_projection"] = float(r.mean_difference[read.layer] @ u)
    return res


def _explained(world: World, cards: Path, persona_latents: Sequence[int]) -> dict:
    """The reference explainer (it knows the world's labels) on the demo's cards: the persona
    latent's explanation and held-out detection score, and the mean over the cards."""
    from emdiff.autointerp import AutoInterpConfig, run_autointerp
    from emdiff.autointerp.toy import ToyExplainer

    run = run_autointerp(cards, AutoInterpConfig(), interpreter=ToyExplainer(world))
    scored = [r.score for r in run.results if r.score is not None]
    persona = [r for r in run.results if r.latent in persona_latents and r.score is not None]
    best = max(persona, key=lambda r: r.score, default=None)
    return {
        "cards_mean_detection": sum(scored) / len(scored) if scored else float("nan"),
        "cards_persona_detection": best.score if best else float("nan"),
        "cards_persona_explanation": best.explanation if best else "",
    }
