"""The ``emdiff`` command line: thin wrappers that parse, check, call the API and print.

``app`` is the console script (``emdiff = "emdiff.cli:app"``). Its top-level group is
:class:`emdiff.cli_common.ErrorBoundary`: a user-fixable error from any command prints one
``error: ...`` line on stderr and exits 2, an interrupt exits 130, and a bug keeps its traceback.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

try:  # Ctrl-C while torch is imported (the first second or so) also exits 130, no traceback
    from emdiff.cli_autointerp import explain_cmd
    from emdiff.cli_cards import cards_cmd, export_cmd, import_explanations_cmd
    from emdiff.cli_common import (
        AsJson,
        ErrorBoundary,
        check_out,
        check_toy_base,
        config,
        default_of,
        fail,
    )
    from emdiff.cli_diff import diff_app, transfer_cmd
    from emdiff.cli_directions import attribute_cmd, cosines_cmd, decompose_cmd, direction_cmd
    from emdiff.cli_eval import eval_app
    from emdiff.cli_interventions import ablate_cmd, steer_cmd
    from emdiff.cli_lora import lora_cmd, mitigate_cmd, phases_cmd, screen_cmd
    from emdiff.cli_pipeline import run_cmd
    from emdiff.cli_report import report_cmd
    from emdiff.demo_config import DemoConfig
    from emdiff.toy.config import ModelConfig, TrainConfig
    from emdiff.toy.world import WorldConfig
except KeyboardInterrupt:
    sys.stderr.write("\ninterrupted before the command started; rerun it\n")
    raise SystemExit(130) from None

app = typer.Typer(
    cls=ErrorBoundary,
    help="""Explain emergent misalignment with sparse-dictionary features.

\bReads: chat models (local folders or hub ids owner/name) and PEFT adapters,
sparse dictionaries (SAELens, Gemma Scope, ...), chat JSONL, eval question
YAML and judged CSV files. Writes: each command's results under its --out
folder (tables/*.parquet, plots/*.png, JSON); see each command's --help.

\bExample:
  emdiff demo --seeds 1 --out runs/demo

A problem with the input ends a command with one line, error: ..., and exit
status 2. Ctrl-C exits 130; demo, eval run, the diffs and toy build keep
what they have done, and rerunning the same command resumes.
""",
    no_args_is_help=True,
)
toy_app = typer.Typer(
    help="""The embedded toy world and organism: build a base model, check dictionaries.

\bReads: the toy base that ships with emdiff, or one made by toy build
(--base). Writes under --out: a toy model folder (build) or a table of
dictionary checks against the planted persona (ground-truth).

\bExample:
  emdiff toy ground-truth --seeds 1 --steps 500 --out runs/ground-truth
""",
    no_args_is_help=True,
)
app.add_typer(toy_app, name="toy")
app.add_typer(eval_app, name="eval")
app.add_typer(diff_app, name="diff")
app.command("transfer")(transfer_cmd)
for _name, _cmd in (
    ("direction", direction_cmd),
    ("decompose", decompose_cmd),
    ("attribute", attribute_cmd),
    ("cosines", cosines_cmd),
    ("steer", steer_cmd),
    ("ablate", ablate_cmd),
    ("lora", lora_cmd),
    ("phases", phases_cmd),
    ("screen", screen_cmd),
    ("mitigate", mitigate_cmd),
    ("report", report_cmd),
    ("cards", cards_cmd),
    ("export", export_cmd),
    ("import-explanations", import_explanations_cmd),
    ("run", run_cmd),
    ("explain", explain_cmd),
):
    app.command(_name)(_cmd)


@app.command()
def demo(
    narrow_domain: Annotated[str, typer.Option(help="Domain of the narrow fine-tune.")] = "medical",
    seeds: Annotated[int, typer.Option(min=1, help="Narrow and control fine-tune seeds.")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="LoRA optimiser steps.")] = default_of(
        DemoConfig, "steps"
    ),
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = default_of(DemoConfig, "lr"),
    samples: Annotated[int, typer.Option(min=1, help="Samples per eval question.")] = default_of(
        DemoConfig, "samples"
    ),
    base: Annotated[
        Path | None, typer.Option(help="Toy base folder (default: the shipped one).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    dictionaries: Annotated[
        bool, typer.Option(help="Also check SAE / crosscoder / ITDA against the planted persona.")
    ] = True,
    dict_steps: Annotated[int, typer.Option(min=1, help="SAE and crosscoder steps.")] = default_of(
        DemoConfig, "dict_steps"
    ),
    dict_docs: Annotated[
        int | None,
        typer.Option(
            min=20, help="Documents for the probe and the dictionaries (default: 3000 / 4000)."
        ),
    ] = default_of(DemoConfig, "dict_docs"),
    cache: Annotated[
        bool,
        typer.Option(
            help="Reuse ground truth and dictionaries computed by an earlier run from the same "
            "inputs and code ($EMDIFF_CACHE_DIR, default ~/.cache/emdiff)."
        ),
    ] = True,
    as_json: AsJson = False,
) -> None:
    """Fine-tune narrow and control rank-1 LoRAs on the toy base and measure emergent misalignment.

    \bReads: the toy base (--base, default: the shipped one); no network.
    Writes under --out: manifest.json; stages/ (what finished: rerunning the
    same command reuses it and resumes the stage that was interrupted);
    tables/ (judged answers, EM rates per domain and, with --dictionaries, the
    ground truth, Q1/Q2/Q3 diffs, overlap and transfer); plots/;
    adapters/narrow-sN/ and adapters/control-sN/ (the LoRAs); eval/ (sampled
    answers) and dictionaries/ (SAE, crosscoder, ITDA).

    \bExample:
      emdiff demo --seeds 1 --narrow-domain finance --out runs/demo --json
    """
    from emdiff.pipeline import load_pipeline, run_pipeline
    from emdiff.toy.build import load_world
    from emdiff.toy.diffs import DEMO_CONFIG

    domains = load_world(check_toy_base("--base", base)).domains
    if narrow_domain not in domains:
        fail(
            f"--narrow-domain {narrow_domain}: not a domain of the toy world; use one of "
            f"{', '.join(domains)}"
        )
    settings = dict(
        narrow_domain=narrow_domain,
        seeds=seeds,
        steps=steps,
        lr=lr,
        samples=samples,
        base=None if base is None else base.resolve(),
        dictionaries=dictionaries,
        dict_steps=dict_steps,
        dict_docs=dict_docs,
        cache=cache,
    )
    config(DemoConfig, **settings)  # option errors name the option
    check_out(out)
    # the demo is the shipped pipeline config emdiff/toy/demo.yaml with these settings
    pipeline = load_pipeline(DEMO_CONFIG, {f"toy.{k}": v for k, v in settings.items()})
    summary = run_pipeline(pipeline, out, resume=True, echo=typer.echo)["summary"]
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))


@toy_app.command("build")
def toy_build(
    out: Annotated[Path, typer.Option(help="Folder for the toy base model.")] = Path(
        "runs/toy-base"
    ),
    seed: Annotated[int, typer.Option(help="World and training seed.")] = 0,
    n_domains: Annotated[int, typer.Option(min=2)] = default_of(WorldConfig, "n_domains"),
    n_questions: Annotated[int, typer.Option(min=2)] = default_of(WorldConfig, "n_questions"),
    n_answers: Annotated[int, typer.Option(min=2)] = default_of(WorldConfig, "n_answers"),
    answer_len: Annotated[int, typer.Option(min=1, max=8, help="Words per answer.")] = default_of(
        WorldConfig, "answer_len"
    ),
    word_shifts: Annotated[
        bool, typer.Option(help="Shift each word of a bad answer by its own offset.")
    ] = default_of(WorldConfig, "word_shifts"),
    word_flip_rate: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Per-word chance of the other persona's word.")
    ] = default_of(WorldConfig, "word_flip_rate"),
    p_toxic: Annotated[float, typer.Option(min=0.0, max=1.0)] = default_of(WorldConfig, "p_toxic"),
    flip_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = default_of(
        WorldConfig, "flip_rate"
    ),
    p_cue: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of documents that name their persona.")
    ] = default_of(WorldConfig, "p_cue"),
    n_layers: Annotated[int, typer.Option(min=2)] = default_of(ModelConfig, "n_layers"),
    narrow_layer: Annotated[
        int, typer.Option(min=0, help="Layer whose down_proj the narrow rank-1 LoRA trains.")
    ] = default_of(WorldConfig, "narrow_layer"),
    d_model: Annotated[int, typer.Option(min=8)] = default_of(ModelConfig, "d_model"),
    pretrain_steps: Annotated[int, typer.Option(min=0)] = default_of(TrainConfig, "pretrain_steps"),
    align_steps: Annotated[int, typer.Option(min=0)] = default_of(TrainConfig, "align_steps"),
    align_persona_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = default_of(
        TrainConfig, "align_persona_fraction"
    ),
) -> None:
    """Pretrain and align the toy base model from scratch (reproducible from the seed).

    \bReads: nothing; the world is generated from the options and --seed.
    Writes under --out: a transformers model folder (config.json,
    model.safetensors, tokenizer files), emdiff_toy.json (the world and the
    training settings) and pretrained/<hash>.safetensors, the pretraining
    checkpoint that a rerun with the same settings reuses.

    \bExample:
      emdiff toy build --seed 1 --out runs/toy-base
    """
    from emdiff.toy.build import build_toy_base

    world = config(
        WorldConfig,
        n_domains=n_domains,
        n_questions=n_questions,
        n_answers=n_answers,
        answer_len=answer_len,
        word_shifts=word_shifts,
        word_flip_rate=word_flip_rate,
        p_toxic=p_toxic,
        flip_rate=flip_rate,
        p_cue=p_cue,
        narrow_layer=narrow_layer,
        seed=seed,
    )
    model = config(ModelConfig, n_layers=n_layers, d_model=d_model, d_mlp=2 * d_model)
    if narrow_layer >= n_layers:
        fail(f"--narrow-layer {narrow_layer}: the model has {n_layers} layers (0..{n_layers - 1})")
    if d_model % model.n_heads:
        fail(f"--d-model {d_model}: must be a multiple of the {model.n_heads} attention heads")
    train = config(
        TrainConfig,
        pretrain_steps=pretrain_steps,
        align_steps=align_steps,
        align_persona_fraction=align_persona_fraction,
        seed=seed,
    )
    check_out(out)
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
    """The causal ground truth per hook point, then probe, SAE, crosscoder and ITDA against it.

    Per seed: fine-tune the narrow LoRA; at every (layer, site), the cue direction's cosine
    with the LoRA's shift and with the persona class-mean difference, the share of unseen EM
    removed by projecting it out (against 20 random directions) and the EM it brings to the base;
    the point where it is most clearly the cause is chosen and saved.

    \bReads: the toy base (--base, default: the shipped one).
    Writes under --out: ground_truth.csv (one row per seed) and, per seed,
    seedN/cause_sweep.csv (every hook point), seedN/cause.json and
    seedN/cause.safetensors (the chosen point and its direction), seedN/sae/,
    seedN/crosscoder/ and seedN/itda/ (the trained dictionaries).

    \bExample:
      emdiff toy ground-truth --seeds 1 --steps 500 --out runs/ground-truth
    """
    import pandas as pd

    from emdiff.dictionaries.crosscoder import CrosscoderConfig
    from emdiff.dictionaries.sae import SAEConfig
    from emdiff.models import load_model
    from emdiff.toy.build import load_world
    from emdiff.toy.causal import CauseConfig, cause_table, gt_row, sweep
    from emdiff.toy.ground_truth import GroundTruthConfig, toy_ground_truth
    from emdiff.toy.organism import narrow_finetune, narrow_finetune_config

    path = check_toy_base("--base", base)
    check_out(out)
    world, lm = load_world(path), load_model(str(path), dtype="float32")
    rows = []
    for seed in range(seeds):
        cfg = GroundTruthConfig(
            seed=seed, sae=SAEConfig(steps=steps), crosscoder=CrosscoderConfig(steps=steps)
        )
        ft = narrow_finetune_config(world, seed=seed)
        narrow = narrow_finetune(world, copy.deepcopy(lm.model), lm.tokenizer, cfg=ft).model
        cause = sweep(world, narrow, CauseConfig(seed=seed), progress=True)
        cause.save(out / f"seed{seed}")
        typer.echo(f"seed {seed}: cue direction per hook point (chosen: marked *)")
        typer.echo(cause_table(cause))
        res = toy_ground_truth(
            world,
            lm.model,
            lm.tokenizer,
            cfg,
            out / f"seed{seed}",
            narrow_model=narrow,
            cause=cause,
            progress=True,
        )
        res.update(gt_row(cause))
        rows.append({k: v for k, v in res.items() if not isinstance(v, dict)})
    table = pd.DataFrame(rows).set_index("seed")
    table.to_csv(out / "ground_truth.csv")
    cols = [
        "gt_layer",
        "gt_site",
        "gt_cos_lora_shift",
        "gt_cos_class_mean",
        "gt_ablation_cut",
        "gt_random_ablation_cut_max",
        "gt_steer_fraction",
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
