"""``emdiff direction | decompose | attribute | steer | ablate``: the misalignment direction, its
decomposition into latents, latent attribution, and interventions with random controls.

Each command runs one analysis (:mod:`emdiff.analyses.directions`, :mod:`emdiff.analyses.steer`)
and writes its tables and figures under ``--out``; options are checked before a model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_common import (
    Adapter,
    AsJson,
    BatchSize,
    Device,
    Dictionary,
    Dtype,
    Layer,
    Model,
    Out,
    Positions,
    Site,
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
from emdiff.cli_diff_io import ReadOptions, load_context, read_judged

Judged = Annotated[Path, typer.Option(help="Judged answers (.csv, .parquet, .jsonl).")]
DirectionFile = Annotated[
    Path, typer.Option(help="Direction file NAME.json (NAME.safetensors beside it).")
]


def _report(res, out: Path, as_json: bool, lines: list[str]) -> None:
    files = res.save(out)
    for line in lines:
        typer.echo(line)
    typer.echo("written: " + ", ".join(str(f) for f in files))
    if as_json:
        typer.echo(json.dumps(res.summary(), default=str))


def _layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        fail(f"--layers {text}: use comma-separated layer numbers >= 0, e.g. 10,20,30")
    return layers


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        scales = ()
    if not scales:
        fail(f"--scales {text}: use comma-separated numbers, e.g. 0,4,8,16")
    return scales


def direction_cmd(
    model: Model,
    judged: Judged,
    layers: Annotated[str, typer.Option(help="Layers, comma-separated (e.g. 10,20,30).")],
    out: Out,
    adapter: Adapter = None,
    site: Annotated[str, typer.Option(help="Hook site.")] = "resid_post",
    positions: Positions = "answer",
    compare_base: Annotated[
        bool, typer.Option(help="Also read the texts with the adapter off (Appendix B).")
    ] = True,
    batch_size: BatchSize = 8,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """The misalignment direction per layer: misaligned minus aligned answers (CLR's split).

    \bReads: --model (+ --adapter) and the judged answers (--judged).
    Writes under --out: directions/direction_L*.safetensors + .json (and
    direction_base_L* with --compare-base), tables/direction.csv (norm and
    cos(base, fine-tuned) per layer), plots/direction_base_vs_ft.png.

    \bExample:
      emdiff direction --model Qwen/Qwen2.5-14B-Instruct --adapter ./em-lora \\
        --judged runs/eval/judged.csv --layers 15,21,27 --out runs/dir
    """
    from emdiff.analyses import MeanDirection, RunContext
    from emdiff.data.positions import Positions as P
    from emdiff.models import load_model
    from emdiff.models.hooks import SITES
    from emdiff.models.read import ReadSpec
    from emdiff.stats.collect import StatsConfig

    check_model("--model", model)
    check_adapter("--adapter", adapter)
    check_choice("--site", site, SITES)
    check_dtype(dtype)
    check_device(device)
    table = read_judged("--judged", judged)
    wanted = _layers(layers)
    check_out(out)
    with value_errors():
        lm = load_model(model, adapter, dtype=dtype, device=device)
        read = ReadSpec(layers=wanted, site=site, positions=P.parse(positions))
        ctx = RunContext(
            read,
            lm.model,
            lm.tokenizer,
            tables={"judged": table},
            out=out,
            stats_cfg=StatsConfig(batch_size=batch_size, progress=True),
        )
        res = config(MeanDirection, compare_base=compare_base and adapter is not None).run(ctx)
    t = res.table.to_string(index=False, float_format=lambda x: f"{x:.4g}")
    _report(res, out, as_json, [f"read: {read.describe()}", t])


def decompose_cmd(
    direction: DirectionFile,
    dictionary: Dictionary,
    out: Out,
    ks: Annotated[str, typer.Option(help="Numbers of latents to reconstruct with.")] = "1,5,10,50",
    method: Annotated[str, typer.Option(help="nn_omp (non-negative) or omp (signed).")] = "nn_omp",
    n_null: Annotated[int, typer.Option(min=1, help="Random directions for the null.")] = 20,
    as_json: AsJson = False,
) -> None:
    """Decompose a direction into dictionary latents, against random directions.

    \bReads: a direction file (--direction, e.g. from emdiff direction) and a
    dictionary trained at its layer and site (--dictionary).
    Writes under --out: tables/decompose.parquet (top latents: decoder
    cosine), tables/decompose_explained.csv (explained fraction at each k and
    the null's mean and 95th percentile), plots/decompose.png.

    \bExample:
      emdiff decompose --direction runs/dir/directions/direction_L21.json \\
        --dictionary ./sae-layer21 --out runs/dir
    """
    from emdiff.analyses import Decompose, RunContext
    from emdiff.cli_common import parse_ks
    from emdiff.dictionaries import load_dictionary
    from emdiff.directions.decompose import DecomposeConfig

    check_file("--direction", direction)
    check_choice("--method", method, ("nn_omp", "omp"))
    settings = config(DecomposeConfig, ks=tuple(parse_ks("--ks", ks)), method=method, n_null=n_null)
    check_out(out)
    with value_errors():
        from emdiff.directions.direction import Direction

        v = Direction.load(direction)
        d = load_dictionary(dictionary)
        res = Decompose(direction=str(direction), settings=settings).run(
            RunContext(dictionaries={v.layer: d})
        )
    top = res.table.head(10).to_string(index=False, float_format=lambda x: f"{x:.4g}")
    e = res.explained.drop(columns="latents").to_string(
        index=False, float_format=lambda x: f"{x:.3f}"
    )
    _report(res, out, as_json, [f"{v.name} (layer {v.layer} {v.site}) over {dictionary}:", top, e])


def attribute_cmd(
    model: Model,
    dictionary: Dictionary,
    judged: Judged,
    out: Out,
    adapter: Adapter = None,
    layer: Layer = None,
    site: Site = None,
    check_top: Annotated[
        int, typer.Option(min=0, help="Top latents to ablate for the check.")
    ] = 20,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Rank latents by what they do: attribution of log P(misaligned) - log P(aligned answers).

    \bReads: --model (+ --adapter), the --dictionary and the judged answers.
    Writes under --out: tables/attribute.parquet (latent, attribution, rank,
    and the true ablation effect of the --check-top first).

    \bExample:
      emdiff attribute --model Qwen/Qwen2.5-14B-Instruct --adapter ./em-lora \\
        --dictionary ./sae-layer21 --judged runs/eval/judged.csv --out runs/attr
    """
    from emdiff.analyses import Attribute

    opts = ReadOptions(model, adapter, dictionary, layer, site, "answer", 8, dtype, device)
    opts.check()
    table = read_judged("--judged", judged)
    check_out(out)
    with value_errors():
        ctx = load_context(opts, out)
        ctx.tables = {"judged": table}
        res = Attribute(check_top=check_top).run(ctx)
    cols = ["latent", "attribution", "ablation_effect", "rank"]
    top = res.table[cols].head(20).to_string(index=False, float_format=lambda x: f"{x:.4g}")
    r = res.meta.get("ablation_pearson")
    check = f"attribution vs true ablation (top {check_top}): r = {r:.3f}" if r is not None else ""
    _report(res, out, as_json, [top, check])


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
    _report(res, out, runtime["as_json"], [t])


def _values(direction, questions, layers, kinds, scales, n_random, judge, judge_model, sampling):
    from emdiff.eval.run import JudgeConfig
    from emdiff.interventions.sweep import SweepConfig

    return {
        "direction": str(direction),
        "questions": tuple(str(q) for q in questions),
        "layers": _layers(layers) if layers else (),
        "sweep": config(SweepConfig, kinds=kinds, scales=scales, n_random=n_random),
        "judge": config(JudgeConfig, kind=judge, model=judge_model),
        "sampling": sampling,
    }


def _sampling(samples: int | None, max_new_tokens: int):
    from emdiff.eval.sample import SamplingConfig

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
        _scales(scales),
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
