"""``emdiff direction | decompose | attribute | cosines``: the misalignment direction, its
decomposition into latents, latent attribution, and directions compared across organisms.

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


def report(res, out: Path, as_json: bool, lines: list[str]) -> None:
    files = res.save(out)
    for line in lines:
        typer.echo(line)
    typer.echo("written: " + ", ".join(str(f) for f in files))
    if as_json:
        typer.echo(json.dumps(res.summary(), default=str))


def layers_option(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        fail(f"--layers {text}: use comma-separated layer numbers >= 0, e.g. 10,20,30")
    return layers


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
    shuffles: Annotated[
        int, typer.Option(min=0, help="Shuffled-label directions to save (nulls for decompose).")
    ] = 0,
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
    wanted = layers_option(layers)
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
        res = config(
            MeanDirection, compare_base=compare_base and adapter is not None, shuffles=shuffles
        ).run(ctx)
    t = res.table.to_string(index=False, float_format=lambda x: f"{x:.4g}")
    report(res, out, as_json, [f"read: {read.describe()}", t])


def decompose_cmd(
    direction: DirectionFile,
    dictionary: Dictionary,
    out: Out,
    ks: Annotated[str, typer.Option(help="Numbers of latents to reconstruct with.")] = "1,5,10,50",
    method: Annotated[str, typer.Option(help="nn_omp (non-negative) or omp (signed).")] = "nn_omp",
    n_null: Annotated[int, typer.Option(min=1, help="Random directions for the null.")] = 20,
    diff: Annotated[
        Path | None,
        typer.Option(help="Ranking of the same two sets (tables/*.parquet of emdiff diff)."),
    ] = None,
    null_direction: Annotated[
        list[Path] | None,
        typer.Option(help="Directions added to the null (repeat; e.g. direction_shuffled*)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Decompose a direction into dictionary latents, against random directions.

    \bReads: a direction file (--direction, e.g. from emdiff direction) and a
    dictionary trained at its layer and site (--dictionary).
    Writes under --out: tables/decompose.parquet (top latents: decoder
    cosine, and with --diff the encoded difference of the two sets per latent),
    tables/decompose_explained.csv (explained fraction at each k and
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
    if diff is not None:
        check_file("--diff", diff)
    for p in null_direction or []:
        check_file("--null-direction", p)
    check_choice("--method", method, ("nn_omp", "omp"))
    settings = config(DecomposeConfig, ks=tuple(parse_ks("--ks", ks)), method=method, n_null=n_null)
    check_out(out)
    with value_errors():
        from emdiff.directions.direction import Direction

        v = Direction.load(direction)
        d = load_dictionary(dictionary)
        analysis = Decompose(
            direction=str(direction),
            settings=settings,
            diff=None if diff is None else str(diff),
            null_directions=tuple(str(p) for p in null_direction or []),
        )
        res = analysis.run(RunContext(dictionaries={v.layer: d}))
    top = res.table.head(10).to_string(index=False, float_format=lambda x: f"{x:.4g}")
    e = res.explained.drop(columns="latents").to_string(
        index=False, float_format=lambda x: f"{x:.3f}"
    )
    report(res, out, as_json, [f"{v.name} (layer {v.layer} {v.site}) over {dictionary}:", top, e])


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
    report(res, out, as_json, [top, check])


def cosines_cmd(
    direction: Annotated[
        list[Path], typer.Option(help="Direction files NAME.json (repeat; two or more).")
    ],
    out: Out,
    as_json: AsJson = False,
) -> None:
    """Pairwise cosine of directions (other narrow domains, seeds, base vs fine-tuned).

    \bReads: two or more direction files (--direction, repeated).
    Writes under --out: tables/direction_cosines.csv and plots/direction_cosines.png.

    \bExample:
      emdiff cosines --direction runs/medical/directions/direction_L21.json \\
        --direction runs/finance/directions/direction_L21.json --out runs/cos
    """
    from emdiff.directions.direction import Direction, cosine_table
    from emdiff.report.direction_plots import cosine_heatmap

    if len(direction) < 2:
        fail("--direction: give two or more direction files")
    for p in direction:
        check_file("--direction", p)
    check_out(out)
    with value_errors():
        dirs = [Direction.load(p) for p in direction]
        names = [f"{d.name} ({p.parent.parent.name})" for d, p in zip(dirs, direction, strict=True)]
        if len(set(names)) < len(names):
            names = [str(p) for p in direction]
        table = cosine_table(dict(zip(names, dirs, strict=True)))
    csv = out / "tables" / "direction_cosines.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv)
    plot = cosine_heatmap(table, out / "plots" / "direction_cosines.png")
    typer.echo(table.to_string(float_format=lambda x: f"{x:.3f}"))
    upper = [table.iloc[i, j] for i in range(len(table)) for j in range(i + 1, len(table))]
    typer.echo(f"min pairwise cosine {min(upper):.3f}\nwritten: {csv}, {plot}")
    if as_json:
        typer.echo(json.dumps({"min_cosine": float(min(upper)), "n": len(table)}))
