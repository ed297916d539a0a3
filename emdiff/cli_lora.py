"""``emdiff lora | phases | screen | mitigate``: what a LoRA learnt and when, screening training
data before fine-tuning, and benign re-alignment (:mod:`emdiff.analyses.lora`,
:mod:`emdiff.analyses.training`). Options are checked before a model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emdiff.cli_common import (
    AsJson,
    Device,
    Dtype,
    Model,
    Out,
    check_adapter,
    check_device,
    check_dtype,
    check_exists,
    check_file,
    check_model,
    check_out,
    config,
    fail,
    parse_ks,
    value_errors,
)
from emdiff.cli_directions import DirectionFile, report
from emdiff.cli_interventions import JudgeKind, JudgeModel, MaxNew, Questions, Samples, _sampling

Directions = Annotated[
    list[Path] | None, typer.Option("--direction", help="Direction file(s) to compare (repeat).")
]


def _load(model: str, adapter: str | None, dtype: str, device: str):
    from emdiff.models import load_model

    check_model("--model", model)
    check_adapter("--adapter", adapter)
    check_dtype(dtype)
    check_device(device)
    return lambda: load_model(model, adapter, dtype=dtype, device=device)


def _judge(kind: str, model: str | None):
    from emdiff.eval.config import JudgeConfig

    if kind not in ("openai", "hf", "toy"):
        fail(f"--judge {kind}: choose openai, hf or toy")
    if kind != "toy" and not model:
        fail(f"--judge {kind} needs --judge-model")
    return config(JudgeConfig, kind=kind, model=model)


def lora_cmd(
    model: Model,
    adapter: Annotated[str, typer.Option(help="PEFT LoRA adapter folder or hub id.")],
    out: Out,
    dictionary: Annotated[
        Path | None, typer.Option(help="Dictionary to decompose each B column over.")
    ] = None,
    direction: Directions = None,
    judged: Annotated[
        Path | None, typer.Option(help="The adapter's own judged answers: scalars and probes.")
    ] = None,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """What each LoRA rank writes and reads, and when it fires.

    \bReads: --model with its --adapter; optionally a --dictionary, saved
    directions (--direction, repeat) and the model's judged answers (--judged,
    with a domain column for per-domain probes).
    Writes under --out: tables/lora_ranks.csv (per rank: where B writes, its
    cosine with each direction, top latent and explained fraction against
    random directions), a decomposition per rank, and with --judged
    tables/lora_scalars.parquet (per answer token), lora_probes.csv (held-out
    balanced accuracy against shuffled labels), lora_coefficients.csv and
    plots/lora_scalars.png.

    \bExample:
      emdiff lora --model Qwen/Qwen2.5-14B-Instruct --adapter ./em-lora \\
        --dictionary ./sae-layer21 --direction runs/dir/directions/direction_L21.json \\
        --judged runs/eval/judged.csv --out runs/lora
    """
    from emdiff.analyses import LoraRead, RunContext
    from emdiff.cli_diff_io import read_judged

    load = _load(model, adapter, dtype, device)
    if dictionary is not None:
        check_file("--dictionary", dictionary)
    for p in direction or []:
        check_file("--direction", p)
    table = read_judged("--judged", judged) if judged is not None else None
    check_out(out)
    with value_errors():
        from emdiff.dictionaries import load_dictionary

        d = load_dictionary(dictionary) if dictionary is not None else None
        lm = load()
        ctx = RunContext(
            model=lm.model,
            tokenizer=lm.tokenizer,
            dictionaries={} if d is None else {d.meta.layer or 0: d},
            tables={} if table is None else {"judged": table},
            out=out,
        )
        res = LoraRead(directions=tuple(str(p) for p in direction or [])).run(ctx)
    lines = [res.reading.table.to_string(index=False, float_format=lambda x: f"{x:.4g}")]
    if res.probes is not None:
        lines.append(res.probes.scores.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    report(res, out, as_json, lines)


def phases_cmd(
    checkpoints: Annotated[
        Path, typer.Option(help="Folder of checkpoint-STEP adapters (emdiff finetune output).")
    ],
    out: Out,
    windows: Annotated[str, typer.Option(help="Local-cosine windows in steps.")] = "5,10,15",
    model: Annotated[
        str | None, typer.Option(help="Base model, to score EM per checkpoint.")
    ] = None,
    questions: Annotated[
        list[Path] | None, typer.Option(help="Question YAML to sample per checkpoint (repeat).")
    ] = None,
    em_every: Annotated[int, typer.Option(min=1, help="Score every k-th checkpoint.")] = 1,
    judge: JudgeKind = "openai",
    judge_model: JudgeModel = None,
    samples: Samples = None,
    max_new_tokens: MaxNew = 600,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Phase transition of a fine-tune from its checkpoints (B's trajectory; EM optional).

    \bReads: --checkpoints (checkpoint-STEP folders with adapter_model.safetensors);
    with --model and --questions, samples and judges every --em-every-th checkpoint.
    Writes under --out: tables/phases.csv (per checkpoint: |B|, cos with the final
    B, local cosine of updates per window, PCA, EM) and plots/phases.png with the
    detected transition marked.

    \bExample:
      emdiff phases --checkpoints runs/ft/adapter --out runs/phases
    """
    from emdiff.analyses import LoraPhases, RunContext

    check_exists("--checkpoints", checkpoints)
    steps = tuple(parse_ks("--windows", windows))
    values: dict = {"checkpoints": str(checkpoints), "windows": steps, "em_every": em_every}
    lm = None
    if questions:
        if model is None:
            fail("--questions scores EM per checkpoint: pass --model (the base model)")
        for q in questions:
            check_file("--questions", q)
        last = sorted(checkpoints.glob("checkpoint-*"))
        if not last:
            fail(f"--checkpoints {checkpoints}: no checkpoint-STEP folder")
        load = _load(model, str(last[-1]), dtype, device)
        values |= {
            "questions": tuple(str(q) for q in questions),
            "judge": _judge(judge, judge_model),
            "sampling": _sampling(samples, max_new_tokens),
        }
    check_out(out)
    with value_errors():
        if questions:
            lm = load()
        ctx = RunContext(
            model=lm.model if lm else None, tokenizer=lm.tokenizer if lm else None, out=out
        )
        res = config(LoraPhases, **values).run(ctx)
    cols = [c for c in res.table.columns if c not in ("pc1", "pc2")]
    t = res.table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}")
    report(res, out, as_json, [t, f"transition at step {res.transition_step}"])


def screen_cmd(
    model: Model,
    direction: DirectionFile,
    dataset: Annotated[list[Path], typer.Option(help="Chat JSONL dataset to screen (repeat).")],
    out: Out,
    follow_up: Annotated[
        list[str] | None,
        typer.Option(help="Question asked after each chat, read where it is answered (repeat)."),
    ] = None,
    measured: Annotated[
        Path | None, typer.Option(help="CSV dataset,em measured after fine-tuning: Spearman.")
    ] = None,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Score training datasets for EM before fine-tuning (the base model's move along a direction).

    \bReads: the base --model, a --direction (e.g. from emdiff direction) and chat
    JSONL --dataset files (repeat). Without --follow-up the answer tokens are
    read; with it, the model's state where it answers the follow-up.
    Writes under --out: tables/screen_samples.csv (per sample: score, to rank
    samples for removal), tables/screen_datasets.csv and, with --measured,
    plots/screen_scatter.png and the Spearman correlation.

    \bExample:
      emdiff screen --model Qwen/Qwen2.5-14B-Instruct --direction runs/dir/directions/direction_L21.json \\
        --dataset bad_medical.jsonl --dataset good_medical.jsonl --out runs/screen
    """
    from emdiff.analyses import RunContext, Screen

    load = _load(model, None, dtype, device)
    check_file("--direction", direction)
    for p in dataset:
        check_file("--dataset", p)
    if measured is not None:
        check_file("--measured", measured)
    check_out(out)
    with value_errors():
        lm = load()
        analysis = Screen(
            direction=str(direction),
            datasets=tuple(str(p) for p in dataset),
            follow_ups=tuple(follow_up or ()),
            measured=None if measured is None else str(measured),
        )
        res = analysis.run(RunContext(model=lm.model, tokenizer=lm.tokenizer, out=out))
    t = res.tables["datasets"].to_string(index=False, float_format=lambda x: f"{x:.4g}")
    report(res, out, as_json, [t])


def mitigate_cmd(
    model: Model,
    adapter: Annotated[str, typer.Option(help="The misaligned LoRA adapter to re-align.")],
    benign: Annotated[Path, typer.Option(help="Chat JSONL of benign (good) samples.")],
    questions: Questions,
    out: Out,
    ns: Annotated[str, typer.Option(help="Benign sample counts.")] = "30,60,120,240",
    narrow_questions: Annotated[
        list[Path] | None, typer.Option(help="In-domain questions (repeat).")
    ] = None,
    cue: Annotated[str | None, typer.Option(help="System prompt for the cued evaluation.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps per fine-tune.")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    judge: JudgeKind = "openai",
    judge_model: JudgeModel = None,
    samples: Samples = None,
    max_new_tokens: MaxNew = 600,
    dtype: Dtype = "auto",
    device: Device = "cpu",
    as_json: AsJson = False,
) -> None:
    """Benign re-alignment: the misaligned adapter trained further on N good samples; EM after.

    \bReads: --model with its --adapter, --benign chats, eval --questions.
    Writes under --out: tables/mitigate_em.csv (EM with its interval per N,
    narrow-domain and cued EM), plots/mitigate_em.png, and mitigate_answers/
    (rerun the same command to resume the sampling).

    \bExample:
      emdiff mitigate --model Qwen/Qwen2.5-14B-Instruct --adapter ./em-lora \\
        --benign good_other_domains.jsonl --questions first_plot_questions.yaml \\
        --judge-model gpt-4o-2024-08-06 --out runs/mitigate
    """
    from emdiff.analyses import Mitigate, RunContext
    from emdiff.finetune import FinetuneConfig

    load = _load(model, adapter, dtype, device)
    check_file("--benign", benign)
    for q in [*questions, *(narrow_questions or [])]:
        check_file("--questions", q)
    counts = tuple(parse_ks("--ns", ns))
    train = config(FinetuneConfig, continue_adapter=True, max_steps=steps, lr=lr)
    values = {
        "benign": str(benign),
        "questions": tuple(str(q) for q in questions),
        "narrow_questions": tuple(str(q) for q in narrow_questions or ()),
        "ns": counts,
        "cue": cue,
        "train": train,
        "judge": _judge(judge, judge_model),
        "sampling": _sampling(samples, max_new_tokens),
    }
    check_out(out)
    with value_errors():
        analysis = config(Mitigate, **values)
        lm = load()
        res = analysis.run(RunContext(model=lm.model, tokenizer=lm.tokenizer, out=out))
    t = res.tables["em"].to_string(index=False, float_format=lambda x: f"{x:.3f}")
    report(res, out, as_json, [t])
