"""``emdiff explain RUN``: explain dictionary latents from their feature cards, scored by detection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emdiff.autointerp.config import AutoInterpConfig
from emdiff.cli_common import AsJson, check_exists, config, default_of, fail, value_errors


def _cards_files(run: Path, cards: list[Path] | None) -> list[Path]:
    """The cards files to explain: the given ones (paths, or names under RUN/cards), else all."""
    folder = run / "cards"
    if cards:
        found = []
        for c in cards:
            path = c if c.exists() else folder / (c.name if c.suffix else f"{c.name}.json")
            if not path.is_file():
                fail(f"--cards {c}: no such file (looked in {folder} too)")
            found.append(path)
        return found
    found = sorted(p for p in folder.glob("*.json") if p.name != "explanations.json")
    if not found:
        fail(f"{run}: no feature cards (cards/*.json); write them first, or pass --cards")
    return found


def explain_cmd(
    run: Annotated[Path, typer.Argument(help="Run folder holding cards/<name>.json.")],
    url: Annotated[str, typer.Option(help="OpenAI-compatible server root, with /v1.")] = default_of(
        AutoInterpConfig, "url"
    ),
    model: Annotated[
        str | None, typer.Option(help="Model that explains and scores (needed unless --toy).")
    ] = None,
    toy: Annotated[
        bool, typer.Option("--toy", help="The toy world's reference explainer; no server.")
    ] = False,
    cards: Annotated[
        list[Path] | None,
        typer.Option(help="Cards file(s), path or name in RUN/cards (default: all there)."),
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="NAME of the environment variable holding the API key.")
    ] = "OPENAI_API_KEY",
    n_explain: Annotated[
        int, typer.Option(min=1, help="Most activating contexts shown to the explainer.")
    ] = default_of(AutoInterpConfig, "n_explain"),
    n_holdout: Annotated[
        int, typer.Option(min=1, help="Most held-out contexts of each class for detection.")
    ] = default_of(AutoInterpConfig, "n_holdout"),
    batch_size: Annotated[
        int, typer.Option(min=1, help="Detection contexts per scorer prompt.")
    ] = default_of(AutoInterpConfig, "batch_size"),
    seed: Annotated[int, typer.Option(help="Seed of the split and shuffles.")] = 0,
    logprobs: Annotated[
        bool, typer.Option(help="Ask for log-probabilities of detection answers (AUC).")
    ] = False,
    concurrency: Annotated[int, typer.Option(min=1, help="Latents worked on at once.")] = (
        default_of(AutoInterpConfig, "concurrency")
    ),
    max_retries: Annotated[int, typer.Option(min=0)] = default_of(AutoInterpConfig, "max_retries"),
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds per HTTP attempt.")] = (
        default_of(AutoInterpConfig, "timeout")
    ),
    base: Annotated[
        Path | None,
        typer.Option(
            help="Toy model folder whose world --toy uses, when neither the cards' meta nor "
            "RUN/manifest.json records one (default: the shipped toy)."
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Explain latents from their top contexts and score each explanation by detection.

    \bReads: RUN/cards/*.json (feature cards: top-activating contexts and
    non-activating ones per latent). An explainer model (any OpenAI-compatible
    chat server; key from --api-key-env) reads half of each latent's contexts;
    the same model, shown the explanation, sorts the held-out half mixed with
    non-activating contexts; the score is its balanced accuracy (0.5 = chance).
    --toy uses the toy world's labels instead, through the same scoring.
    Writes: RUN/cards/explanations.json (merged), RUN/tables/autointerp.csv,
    and RUN/cards/autointerp_cache.jsonl (rerun the same command to resume).

    \bExample:
      emdiff explain runs/demo --url http://localhost:8000/v1 \\
        --model Qwen/Qwen2.5-32B-Instruct --api-key-env VLLM_KEY
      emdiff explain runs/demo --toy
    """
    from emdiff.autointerp.config import AutoInterpError
    from emdiff.autointerp.run import run_autointerp
    from emdiff.eval.chat_client import ENV_NAME

    check_exists("RUN", run)
    if not toy and not model:
        fail("--model is required (the explainer and scorer model), or pass --toy")
    if api_key_env and not ENV_NAME.fullmatch(api_key_env):  # never echo it: it may be the key
        fail("--api-key-env must be the NAME of an environment variable, not the key itself")
    files = _cards_files(run, cards)
    cfg = config(
        AutoInterpConfig,
        url=url,
        model=model or "toy",
        api_key_env=api_key_env,
        n_explain=n_explain,
        n_holdout=n_holdout,
        batch_size=batch_size,
        seed=seed,
        logprobs=logprobs,
        concurrency=concurrency,
        max_retries=max_retries,
        timeout=timeout,
    )
    summary = []
    for path in files:
        with value_errors():
            interpreter = _toy(path, run, base, cfg.threshold) if toy else None
            try:
                out = run_autointerp(path, cfg, interpreter=interpreter, progress=True)
            except AutoInterpError as e:  # finished latents are cached
                fail(e)
        scores = [r.score for r in out.results if r.score is not None]
        mean = sum(scores) / len(scores) if scores else None
        typer.echo(
            f"{path}: {len(out.records)} of {len(out.results)} latents explained, "
            f"{len(scores)} scored; mean detection balanced accuracy "
            + ("n/a" if mean is None else f"{mean:.3f}")
        )
        for r in out.results:
            ba = "  -  " if r.score is None else f"{r.score:.3f}"
            what = r.explanation or f"(failed: {r.error})"
            typer.echo(f"  L{r.layer} {r.site} #{r.latent}: {ba}  {what[:90]}")
        typer.echo(f"written: {out.explanations}, {out.table}")
        summary.append({"cards": str(path), "scored": len(scores), "mean_balanced_accuracy": mean})
    if as_json:
        typer.echo(json.dumps(summary))


def _toy(path: Path, run: Path, base: Path | None, threshold: float):
    from emdiff.autointerp.cards import load_cards
    from emdiff.autointerp.toy import ToyExplainer, toy_world

    meta, _ = load_cards(path)
    return ToyExplainer(toy_world(meta, run, base), threshold=threshold)
