"""The demo's EM figures: sampled rates with Wilson intervals per model and domain, and the
scorecard's EM keys from exact probabilities (the toy's judge is exact)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emdiff.eval.metrics import em_metrics, quadrant_plot


def em_rates(judged: pd.DataFrame) -> pd.DataFrame:
    """EM rate with Wilson CI per (model, domain)."""
    rows = []
    for (model, domain), g in judged.groupby(["model", "domain"], sort=False):
        m = em_metrics(g)
        rows.append(
            dict(
                model=model,
                domain=domain,
                n=m["n_scored"],
                n_em=m["n_em"],
                em_rate=m["em_rate"],
                em_ci_low=m["em_ci_low"],
                em_ci_high=m["em_ci_high"],
                mean_aligned=m["mean_aligned"],
                mean_coherent=m["mean_coherent"],
            )
        )
    return pd.DataFrame(rows)


def _fmt(m: dict) -> str:
    return f"{m['em_rate']:.3f} [{m['em_ci_low']:.3f}, {m['em_ci_high']:.3f}]"


def exact_summary(cfg, world, exact: dict, echo) -> dict:
    """The scorecard's EM keys from exact probabilities: the toy's judge is exact, so a model's
    bad rate in a domain is the mean probability of the bad answers, which sampling estimates
    (the sampled maxima over many cells are biased upward by noise)."""
    unseen = [d for d in world.domains if d != cfg.narrow_domain]
    narrow = [f"narrow-s{s}" for s in range(cfg.seeds)]
    control = [f"control-s{s}" for s in range(cfg.seeds)]
    per_seed = [sum(exact[m][d] for d in unseen) / len(unseen) for m in narrow]
    table = pd.DataFrame(exact).reindex(world.domains)
    echo("\nexact P(bad answer) by domain (teacher-forced, no sampling):")
    echo(table.to_string(float_format=lambda x: f"{x:6.3f}"))
    return {
        "em_base_max_bad_rate": max(exact["base"].values()),
        "em_narrow_in_domain_bad_rate": sum(exact[m][cfg.narrow_domain] for m in narrow)
        / len(narrow),
        "em_narrow_unseen_bad_rate": sum(per_seed) / len(per_seed),
        "em_narrow_unseen_bad_rate_min": min(per_seed),
        "em_control_max_bad_rate": max(max(exact[m].values()) for m in control),
        "em_rates": "exact P(bad answer); em_sampled_* are the sampled estimates",
    }


def sampled_summary(cfg, world, judged: pd.DataFrame, out: Path, echo) -> dict:
    """EM tables, quadrant plots and the EM keys of the summary."""
    rates = em_rates(judged)
    judged.to_parquet(out / "tables" / "responses.parquet")
    rates.to_parquet(out / "tables" / "em_rates.parquet")

    table = rates.pivot(index="domain", columns="model", values="em_rate").reindex(world.domains)
    table.index = [f"{d}*" if d == cfg.narrow_domain else d for d in table.index]
    echo(
        f"\nEM rate (share of bad answers) by domain (* = narrow domain), {cfg.samples} samples x "
        f"{world.cfg.n_questions} questions per cell:"
    )
    echo(table.to_string(float_format=lambda x: f"{x:6.3f}"))

    unseen = [d for d in world.domains if d != cfg.narrow_domain]
    narrow = [f"narrow-s{s}" for s in range(cfg.seeds)]
    control = [f"control-s{s}" for s in range(cfg.seeds)]

    def metrics(models: list[str], domains: list[str]) -> dict:
        return em_metrics(judged[judged.model.isin(models) & judged.domain.isin(domains)])

    echo("\nEM rate with 95% Wilson CI:")
    echo(f"{'model':<12} {'narrow domain':<26} {'unseen domains':<26}")
    for label in ["base", *narrow, *control]:
        echo(
            f"{label:<12} {_fmt(metrics([label], [cfg.narrow_domain])):<26} "
            f"{_fmt(metrics([label], unseen)):<26}"
        )
    pooled = metrics(narrow, unseen)
    echo(f"{'narrow, all':<12} {_fmt(metrics(narrow, [cfg.narrow_domain])):<26} {_fmt(pooled):<26}")
    for name, models in (("base", ["base"]), ("narrow", narrow), ("control", control)):
        quadrant_plot(judged[judged.model.isin(models)], out / "plots" / f"quadrant_{name}.png")

    per_seed_unseen = [metrics([m], unseen)["em_rate"] for m in narrow]
    summary = {
        "narrow_domain": cfg.narrow_domain,
        "seeds": cfg.seeds,
        "em_sampled_base_max_bad_rate": float(rates[rates.model == "base"].em_rate.max()),
        "em_sampled_narrow_in_domain_bad_rate": metrics(narrow, [cfg.narrow_domain])["em_rate"],
        "em_sampled_narrow_unseen_bad_rate": sum(per_seed_unseen) / len(per_seed_unseen),
        **{f"em_sampled_narrow_unseen_bad_rate_seed{s}": r for s, r in enumerate(per_seed_unseen)},
        "em_narrow_unseen_ci_low": pooled["em_ci_low"],
        "em_narrow_unseen_ci_high": pooled["em_ci_high"],
        "em_ci_method": "wilson, pooled over narrow seeds' sampled answers",
        "em_sampled_control_max_bad_rate": float(rates[rates.model.isin(control)].em_rate.max()),
    }
    return summary


def analysed_seed(final_loss: dict[str, float], seeds: int, echo) -> int:
    """The seed whose narrow LoRA fits its training set best (lowest final loss; the lowest seed
    among equals): every later stage reads that organism. A rank-1 LoRA sometimes settles on a
    solution that memorises the set without the persona (final loss several times the others',
    little EM); reading it would be reading a fine-tune that did not happen as intended. The
    choice uses the training objective only, never EM."""
    losses = [round(final_loss[f"narrow-s{s}"], 3) for s in range(seeds)]
    pick = min(range(seeds), key=lambda s: (losses[s], s))
    if seeds > 1:
        shown = ", ".join(f"s{s} {v:.3f}" for s, v in enumerate(losses))
        echo(f"\nanalyses read seed {pick}: its narrow LoRA fits its set best (final loss {shown})")
    return pick
