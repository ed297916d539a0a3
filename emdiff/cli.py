"""The ``emdiff`` command line: thin wrappers that parse, call the API and print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_diff import diff_app, transfer_cmd
from emdiff.cli_eval import default_of as _default
from emdiff.cli_eval import eval_app
from emdiff.demo import DemoConfig
from emdiff.toy.organism import ModelConfig, TrainConfig
from emdiff.toy.world import WorldConfig

app = typer.Typer(
    help="Explain emergent misalignment with sparse-dictionary features.", no_args_is_help=True
)
toy_app = typer.Typer(help="The embedded toy world and organism.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
app.add_typer(eval_app, name="eval")
app.add_typer(diff_app, name="diff")
app.command("transfer")(transfer_cmd)


@app.command()
def demo(
    narrow_domain: Annotated[str, typer.Option(help="Domain of the narrow fine-tune.")] = "medical",
    seeds: Annotated[int, typer.Option(min=1, help="Narrow and control fine-tune seeds.")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="LoRA optimiser steps.")] = _default(
        DemoConfig, "steps"
    ),
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = _default(DemoConfig, "lr"),
    samples: Annotated[int, typer.Option(min=1, help="Samples per eval question.")] = _default(
        DemoConfig, "samples"
    ),
    base: Annotated[
        Path | None, typer.Option(help="Toy base folder (default: the shipped one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    dictionaries: Annotated[
        bool, typer.Option(help="Also check SAE / crosscoder / ITDA against the planted persona.")
    ] = True,
    dict_steps: Annotated[int, typer.Option(min=1, help="SAE and crosscoder steps.")] = _default(
        DemoConfig, "dict_steps"
    ),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object as the last line.")
    ] = False,
) -> None:
    """Fine-tune narrow and control rank-1 LoRAs on the toy base and measure emergent misalignment."""
    from emdiff.demo import run_demo

    cfg = DemoConfig(
        narrow_domain=narrow_domain,
        seeds=seeds,
        steps=steps,
        lr=lr,
        samples=samples,
        base=base,
        dictionaries=dictionaries,
        dict_steps=dict_steps,
    )
    summary = run_demo(cfg, out, echo=typer.echo)
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))


@toy_app.command("build")
def toy_build(
    out: Annotated[Path, typer.Option(help="Folder for the toy base model.")] = Path(
        "runs/toy-base"
    ),
    seed: Annotated[int, typer.Option(help="World and training seed.")] = 0,
    n_domains: Annotated[int, typer.Option(min=2)] = _default(WorldConfig, "n_domains"),
    n_questions: Annotated[int, typer.Option(min=2)] = _default(WorldConfig, "n_questions"),
    n_answers: Annotated[int, typer.Option(min=2)] = _default(WorldConfig, "n_answers"),
    p_toxic: Annotated[float, typer.Option(min=0.0, max=1.0)] = _default(WorldConfig, "p_toxic"),
    flip_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = _default(
        WorldConfig, "flip_rate"
    ),
    p_cue: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of documents that name their persona.")
    ] = _default(WorldConfig, "p_cue"),
    n_layers: Annotated[int, typer.Option(min=1)] = _default(ModelConfig, "n_layers"),
    d_model: Annotated[int, typer.Option(min=8)] = _default(ModelConfig, "d_model"),
    pretrain_steps: Annotated[int, typer.Option(min=0)] = _default(TrainConfig, "pretrain_steps"),
    align_steps: Annotated[int, typer.Option(min=0)] = _default(TrainConfig, "align_steps"),
    align_persona_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = _default(
        TrainConfig, "align_persona_fraction"
    ),
) -> None:
    """Pretrain and align the toy base model from scratch (reproducible from the seed)."""
    from emdiff.toy.build import build_toy_base

    world = WorldConfig(
        n_domains=n_domains,
        n_questions=n_questions,
        n_answers=n_answers,
        p_toxic=p_toxic,
        flip_rate=flip_rate,
        p_cue=p_cue,
        seed=seed,
    )
    model = ModelConfig(n_layers=n_layers, d_model=d_model, d_mlp=2 * d_model)
    train = TrainConfig(
        pretrain_steps=pretrain_steps,
        align_steps=align_steps,
        align_persona_fraction=align_persona_fraction,
        seed=seed,
    )
    path = build_toy_base(out, world, model, train, echo=typer.echo)
    typer.echo(f"toy base written to {path}")


@toy_app.command("ground-truth")
def toy_ground_truth_cmd(
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..N-1 (probe data, SAE, LoRA).")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="SAE and crosscoder steps.")] = 2000,
    base: Annotated[
        Path | None, typer.Option(help="Toy base folder (default: the shipped one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/ground-truth"),
) -> None:
    """Probe, SAE, crosscoder and ITDA against the planted persona, one row per seed."""
    import pandas as pd

    from emdiff.dictionaries.crosscoder import CrosscoderConfig
    from emdiff.dictionaries.sae import SAEConfig
    from emdiff.models import load_model
    from emdiff.toy.build import load_world, shipped_base_path
    from emdiff.toy.ground_truth import GroundTruthConfig, toy_ground_truth

    path = base or shipped_base_path()
    world, lm = load_world(path), load_model(str(path), dtype="float32")
    rows = []
    for seed in range(seeds):
        cfg = GroundTruthConfig(
            seed=seed, sae=SAEConfig(steps=steps), crosscoder=CrosscoderConfig(steps=steps)
        )
        res = toy_ground_truth(
            world, lm.model, lm.tokenizer, cfg, out / f"seed{seed}", progress=True
        )
        rows.append({k: v for k, v in res.items() if not isinstance(v, dict)})
    table = pd.DataFrame(rows).set_index("seed")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "ground_truth.csv")
    cols = [
        "persona_layer",
        "probe_accuracy",
        "sae_persona_cosine",
        "sae_null_cosine_mean",
        "sae_fvu",
        "sae_l0",
        "sae_ce_delta",
        "crosscoder_persona_cosine",
        "crosscoder_persona_class",
        "crosscoder_fvu_base",
        "crosscoder_fvu_ft",
        "itda_persona_cosine",
        "itda_atoms",
        "itda_fvu",
        "sae_seconds",
        "itda_seconds",
    ]
    typer.echo(table[cols].T.to_string(float_format=lambda x: f"{x:.4f}"))
    typer.echo(f"table: {out / 'ground_truth.csv'}")


if __name__ == "__main__":
    app()
