"""``emdiff steer | ablate``: interventions with a direction, each setting beside matched random
directions, scored by sampling and judging (:mod:`emdiff.analyses.steer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_common import (
    Adapter,
    AsJson,
    Device,
    Dtype,
    Model,
    Out,
    check_adapter,
    check_choice,
    check_device,
    check_dtype,
    check_file,
    check_model,
    check_out,
    config,
    fail,
    value_errors,
)
from emdiff.cli_directions import DirectionFile, layers_option, report


def scales_option(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        scales = ()
    if not scales:
        fail(f"--scales {text}: use comma-separated numbers, e.g. 0,4,8,16")
    return scales


Questions = Annotated[
    list[Path], typer.Option(help="Question YAML file(s) to sample (repeat the option).")
]
JudgeKind = Annotated[str, typer.Option(help="openai, hf or toy (exact, toy models only).")]
JudgeModel = Annotated[str | None, typer.Option(help="Judge model (openai: API name; hf: path).")]
Samples = Annotated[int | None, typer.Option(min=1, help="Answers per question paraphrase.")]
MaxNew = Annotated[int, typer.Option(min=1, help="Tokens per answer.")]
NRandom = Annotated[int, typer.Option(min=0, help="Random directions beside each setting.")]


def _run_sweep(analysis_values: dict, model: str, adapter: str | None, runtime: dict) -> None:
    """Check the options, build the ``steer`` analysis, load the model, run and report."""
    from emdiff.analyses import RunContext, Steer
    from emdiff.models import load_model

    check_model("--model", model)
    check_adapter("--adapter", adapter)
    check_file("--direction", Path(analysis_values["direction"]))
    for q in analysis_values["questions"]:
        check_file("--questions", Path(q))
    check_choice("--judge", analysis_values["judge"].kind, ("openai", "hf", "toy"))
    if analysis_values["judge"].kind != "toy" and not analysis_values["judge"].model:
        fail(f"--judge {analysis_values['judge'].kind} needs --judge-model")
    check_dtype(runtime["dtype"])
    check_device(runtime["device"])
    analysis = config(Steer, **analysis_values)
    out = check_out(runtime["out"])
    with value_errors():
        lm = load_model(model, adapter, dtype=runtime["dtype"], device=runtime["device"])
        res = analysis.run(RunContext(model=lm.model, tokenizer=lm.tokenizer, out=out))
    keep = ("kind", "layer", "scale", "em", "em_low", "em_high", "coherent")
    cols = [c for c in res.summary_table if c in keep or c.startswith("random_em")]
    t = res.summary_table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")
    report(res, out, runtime["as_json"], [t])


def _values(direction, questions, layers, kinds, scales, n_random, judge, judge_model, sampling):
    from emdiff.eval.config import JudgeConfig
    from emdiff.interventions.sweep import SweepConfig

    return {
        "direction": str(direction),
        "questions": tuple(str(q) for q in questions),
        "layers": layers_option(layers) if layers else (),
        "sweep": config(SweepConfig, kinds=kinds, scales=scales, n_random=n_random),
        "judge": config(JudgeConfig, kind=judge, model=judge_model),
        "sampling": sampling,
    }


def _sampling(samples: int | None, max_new_tokens: int):
    from emdiff.eval.config import SamplingConfig

    return config(
        SamplingConfig,
        {"samples_per_paraphrase": "--samples"},
        samples_per_paraphrase=samples,
        max_new_tokens=max_new_tokens,
    )


def steer_cmd(
    model: Model,
    direction: DirectionFile,
    questions: Questions,
    out: Out,
    adapter: Adapter = None,
    layers: Annotated[
        str | None, typer.Option(help="Layers to steer at (default: the direction's).")
    ] = None,
    scales: Annotated[str, typer.Option(help="Norms of the added vector.")] = "0,4,8,16",
    last_prompt_token: Annotated[
        bool, typer.Option(help="Add it only at the last prompt token (else everywhere).")
    ] = False,
    n_random: NRandom = 20,
    judge: JudgeKind = "openai",
    judge_model: JudgeModel = None,
    samples: Samples = None,
    max_new_tokens: MaxNew = 600,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Steer with a direction (scale x layer), beside matched random directions; judged EM.

    \bReads: --model (+ --adapter), the --direction and the --questions.
    Writes under --out: tables/steer.csv (EM with CI and coherence per layer
    and scale, and the random directions' mean, min and max),
    tables/steer_runs.parquet, plots/steer.png, and steer_answers/ (sampled
    answers per setting: rerun the same command to resume).

    \bExample:
      emdiff steer --model Qwen/Qwen2.5-14B-Instruct --direction \
        runs/dir/directions/direction_L21.json --questions first_plot_questions.yaml \
        --judge-model gpt-4o-2024-08-06 --scales 0,4,8 --out runs/steer
    """
    values = _values(
        direction,
        questions,
        layers,
        ("steer",),
        scales_option(scales),
        n_random,
        judge,
        judge_model,
        _sampling(samples, max_new_tokens),
    )
    if last_prompt_token:
        values["sweep"] = values["sweep"].model_copy(update={"position": -1, "prompt_only": True})
    runtime = {"out": out, "dtype": dtype, "device": device, "as_json": as_json}
    _run_sweep(values, model, adapter, runtime)


def ablate_cmd(
    model: Model,
    direction: DirectionFile,
    questions: Questions,
    out: Out,
    adapter: Adapter = None,
    layers: Annotated[
        str | None, typer.Option(help="Layers to ablate at (default: the direction's).")
    ] = None,
    where: Annotated[
        str, typer.Option(help="Comma-separated: ablate (one layer), ablate_all, lora_b.")
    ] = "ablate,ablate_all",
    n_random: NRandom = 20,
    judge: JudgeKind = "openai",
    judge_model: JudgeModel = None,
    samples: Samples = None,
    max_new_tokens: MaxNew = 600,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Project a direction out (one layer, every layer, or the LoRA's B), beside random ones.

    \bReads: --model (+ --adapter; lora_b needs one), the --direction and the
    --questions. Writes under --out: tables/ablate.csv, tables/ablate_runs.parquet,
    plots/ablate.png and ablate_answers/ (rerun the same command to resume).

    \bExample:
      emdiff ablate --model Qwen/Qwen2.5-14B-Instruct --adapter ./em-lora \
        --direction runs/dir/directions/direction_L21.json --questions q.yaml \
        --where ablate_all,lora_b --judge-model gpt-4o-2024-08-06 --out runs/ablate
    """
    kinds = tuple(k.strip() for k in where.split(",") if k.strip())
    for k in kinds:
        check_choice("--where", k, ("ablate", "ablate_all", "lora_b"))
    if "lora_b" in kinds and adapter is None:
        fail("--where lora_b edits the LoRA's B: pass --adapter")
    values = _values(
        direction,
        questions,
        layers,
        kinds,
        (0.0,),
        n_random,
        judge,
        judge_model,
        _sampling(samples, max_new_tokens),
    )
    values["name"] = "ablate"
    runtime = {"out": out, "dtype": dtype, "device": device, "as_json": as_json}
    _run_sweep(values, model, adapter, runtime)
