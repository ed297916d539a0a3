"""``emdiff run pipeline.yaml``: compose the stages of one config into one run folder.

Every stage has a key, the hash of its settings and of the content of everything it reads
(fingerprints of files, the keys of the stages it follows). ``stages/<stage>.json`` records it
(:class:`emdiff.runstate.RunState`); a rerun with ``--resume`` reuses each finished stage whose key
is unchanged and recomputes the rest, so after a crash the run continues, and with one analysis
changed only that analysis runs (and any earlier analysis whose result it reads, which is
recomputed from the cached statistics). Sampling, judging and statistics passes also resume
inside a stage from what is on disk. The run ends with ``manifest.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from emdiff import __version__
from emdiff.errors import InputError, ensure_writable, raise_disk_full_in
from emdiff.pipeline.config import PipelineConfig
from emdiff.provenance import package_versions
from emdiff.runstate import RunState, stage_key


class _Run:
    """Stage bookkeeping of one run: keys, statuses, seconds."""

    def __init__(self, out: Path, echo: Callable[[str], None]) -> None:
        self.out, self.echo, self.state = out, echo, RunState(out)
        self.stages: list[dict] = []

    def stage(self, name: str, key: str, compute: Callable[[bool], dict], force: bool = False):
        """Run ``compute(resumed)`` unless ``name`` finished with ``key`` (or ``force``: an input
        of a later stage that must be in memory); record status and seconds."""
        t0 = time.perf_counter()
        done = self.state.result(name, key)
        if done is not None and not force:
            status, result = "reused", done
        else:
            resumed = self.state.begin(name, key) and done is None
            result = self.state.finish(name, key, compute(done is not None))
            status = "recomputed (input of a later stage)" if done is not None else "computed"
            status += " after resume" if resumed else ""
        secs = round(time.perf_counter() - t0, 2)
        self.stages.append({"stage": name, "key": key, "status": status, "seconds": secs})
        self.echo(f"[{len(self.stages)}] {name}: {status} ({secs:.1f} s)")
        return result


def _refs(value, names: set[str]) -> set[str]:
    """Names in ``names`` that a config value (nested) mentions."""
    if isinstance(value, str):
        return {value} & names
    if isinstance(value, dict):
        return set().union(*(_refs(v, names) for v in value.values())) if value else set()
    if isinstance(value, list | tuple):
        return set().union(*(_refs(v, names) for v in value)) if value else set()
    return set()


def run_pipeline(
    cfg: PipelineConfig,
    out: str | Path,
    *,
    resume: bool = False,
    report: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run every stage of ``cfg`` into ``out``; returns the manifest (also ``manifest.json``)."""
    out = Path(out)
    if (out / "stages").is_dir() and not resume:
        raise InputError(
            f"{out} already holds a run: pass --resume to reuse its finished stages, or choose "
            "another --out"
        )
    out = ensure_writable(out)
    if cfg.toy is not None:
        manifest = _toy(cfg, out, echo)
        _report(out, report, echo)
        return manifest
    t0 = time.time()
    run = _Run(out, echo)
    try:
        summary = _stages(cfg, run)
    except BaseException as e:
        done = [k for k, v in run.state.summary().items() if v == "done"]
        echo(
            f"\nrun stopped ({type(e).__name__}{f': {e}' if str(e) else ''}). Finished and kept in "
            f"{out}: {', '.join(done) or 'nothing yet'}. Rerun with --resume to continue."
        )
        raise_disk_full_in(e, out)
        raise
    statuses = [s["status"] for s in run.stages]
    summary |= {
        "stages_computed": sum(not s.startswith("reused") for s in statuses),
        "stages_reused": statuses.count("reused"),
        "seconds": round(time.time() - t0, 1),
    }
    manifest = {
        "command": "run",
        "config": cfg.model_dump(mode="json", exclude_none=True),
        "config_folder": str(cfg.folder),
        "versions": package_versions(),
        "inputs": _inputs(cfg),
        "seeds": _seeds(cfg),
        "stages": run.stages,
        "summary": summary,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    _report(out, report, echo)
    return manifest


def _inputs(cfg: PipelineConfig) -> dict:
    """Content fingerprint of every input file or folder (a hub id stands for itself)."""
    from emdiff.pipeline.inputs import fingerprint
    from emdiff.pipeline.stages import base_path

    got = {"model": fingerprint(base_path(cfg))}
    if cfg.organism and cfg.organism.adapter:
        got["adapter"] = fingerprint(cfg.path(cfg.organism.adapter))
    got |= {f"data.{k}": fingerprint(cfg.path(v)) for k, v in cfg.data.datasets.items()}
    got |= {f"questions.{q}": fingerprint(cfg.path(q)) for q in cfg.data.questions}
    for i, e in enumerate(cfg.dictionaries.entries if cfg.dictionaries else ()):
        got[f"dictionaries.{i}"] = fingerprint(cfg.path(e.path)) if e.path else e.sae_id
    return got


def _seeds(cfg: PipelineConfig) -> dict:
    """Every seed the run used: fine-tune, sampling, and any analysis' own."""
    seeds = {}
    if cfg.organism and cfg.organism.finetune:
        seeds["finetune"] = cfg.organism.finetune.seed
    if cfg.eval:
        seeds["sampling"] = cfg.eval.sampling.seed
    for a in cfg.analysis_configs():
        found = _find(a.model_dump(), "seed")
        seeds |= {f"{a.stem}.{k}": v for k, v in found.items()}
    return seeds


def _find(value, key: str, where: str = "") -> dict:
    """Every ``key`` in a nested config, by its dotted path."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for k, v in value.items():
        path = f"{where}.{k}" if where else k
        if k == key:
            out[path] = v
        out |= _find(v, key, path)
    return out


def _report(out: Path, report: bool, echo: Callable[[str], None]) -> None:
    if report:
        from emdiff.report.html import build_report

        path = build_report(out)
        echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _toy(cfg: PipelineConfig, out: Path, echo) -> dict:
    """The toy benchmark (``emdiff demo``): its stages are the demo's own."""
    from emdiff.demo import DemoConfig, run_demo

    demo = DemoConfig.model_validate({**cfg.toy, "analyses": cfg.analyses or None})
    if demo.base is not None:
        demo = demo.model_copy(update={"base": cfg.path(demo.base)})
    return {"command": "run", "summary": run_demo(demo, out, echo=echo)}


def _stages(cfg: PipelineConfig, run: _Run) -> dict:
    from emdiff.pipeline import stages as st

    out, summary = run.out, {}
    loaded = st.load_base(cfg)
    org = cfg.organism
    if org is not None and org.finetune is not None:
        key = stage_key(
            {
                "base": loaded.keys["base"],
                "data": st.fingerprint(cfg.path(cfg.data.datasets[org.dataset]))
                if org.dataset in cfg.data.datasets
                else org.dataset,
                "finetune": org.finetune.model_dump(mode="json"),
                "v": __version__,
            }
        )
        folder = out / "adapters" / org.name
        run.stage(
            f"finetune-{org.name}",
            key,
            lambda _r: (st.finetune_organism(cfg, loaded, folder, False), {"adapter": str(folder)})[
                1
            ],
        )
        if not hasattr(loaded.model, "peft_config"):  # reused: load the trained adapter back
            st.finetune_organism(cfg, loaded, folder, True)
        loaded.keys[org.name] = key
    judged = {}
    if cfg.eval is not None:
        qprints = [st.fingerprint(cfg.path(q)) for q in cfg.data.questions]
        ev = cfg.eval.model_dump(mode="json")
        for name in cfg.eval.models:
            key = stage_key({"model": loaded.keys[name], "questions": qprints, "eval": ev})
            loaded.keys[f"eval-{name}"] = key
            res = run.stage(
                f"eval-{name}",
                key,
                lambda _r, n=name: _em(st.sample_and_judge(cfg, loaded, n, out, run.echo)),
            )
            judged[name] = _judged(out, name)
            summary[f"em_rate_{name}"] = res["em_rate"]
        st.em_rate_table(out, list(cfg.eval.models))
    if cfg.analyses:
        summary |= _analyses(cfg, run, loaded, judged)
    return summary


def _em(judged) -> dict:
    return {"n": len(judged), "em_rate": float(judged["em"].mean())}


def _judged(out: Path, name: str):
    from emdiff.analyses import load_judged

    return load_judged(out / "eval" / name / "judged.csv")


def _analyses(cfg: PipelineConfig, run: _Run, loaded, judged: dict) -> dict:
    """Every analysis in order; one whose key is unchanged is reused unless a later one that
    runs reads its result."""
    from emdiff.analyses import RunContext
    from emdiff.pipeline import stages as st
    from emdiff.stats.collect import StatsConfig

    read, dicts, prints = st.dictionaries(cfg, loaded) if cfg.dictionaries else (None, {}, {})
    rows = st.datasets(cfg, loaded, judged)
    keys = dict(loaded.keys)
    keys |= {n: st.fingerprint(cfg.path(p)) for n, p in cfg.data.datasets.items()}
    for name in judged:
        keys[f"answers_{name}"] = keys[f"judged_{name}"] = keys[f"eval-{name}"]
    fine = cfg.organism.name if cfg.organism else None
    tables = {f"judged_{n}": t for n, t in judged.items()}
    if fine in judged:
        tables["judged"] = tables[f"judged_{fine}"]
        keys["judged"] = keys[f"eval-{fine}"]
    keys["prompts"] = stage_key([st.fingerprint(cfg.path(q)) for q in cfg.data.questions])
    variants = {"base": (loaded.model, False)} if fine else {}
    if fine:
        variants[fine] = (loaded.model, True)
    configs = cfg.analysis_configs()
    stems = [a.stem for a in configs]
    deps, akeys = {}, {}
    for i, a in enumerate(configs):
        dump = a.model_dump(mode="json")
        deps[a.stem] = _refs(dump, set(stems[:i]))
        inputs = _refs(dump, set(keys)) | {"base", *([fine] if fine else [])}
        akeys[a.stem] = stage_key(
            {
                "kind": a.kind,
                "config": dump,
                "read": None if read is None else read.model_dump(mode="json"),
                "dictionaries": prints,
                "inputs": {k: keys[k] for k in sorted(inputs)},
                "after": {d: akeys[d] for d in sorted(deps[a.stem])},
                "v": __version__,
            }
        )
    needed: set[str] = set()
    for a in reversed(configs):  # a result read by a stage that will run must be in memory
        if a.stem in needed or run.state.result(f"analysis-{a.stem}", akeys[a.stem]) is None:
            needed |= deps[a.stem]
    ctx = RunContext(
        read,
        loaded.model,
        loaded.tokenizer,
        dicts,
        datasets=rows,
        tables=tables,
        variants=variants,
        out=run.out,
        stats_cfg=StatsConfig(batch_size=cfg.batch_size, progress=True),
        stats_keyed=True,
    )
    summary = {}
    for a in configs:

        def compute(_resumed: bool, a=a) -> dict:
            result = a.run(ctx)
            ctx.results[a.stem] = result
            files = result.save(run.out)
            return {"summary": result.summary(), "files": [_rel(f, run.out) for f in files]}

        name = f"analysis-{a.stem}"
        done = run.state.result(name, akeys[a.stem])
        force = a.stem in needed and not (done and _restore(a, done["files"], ctx, run.out))
        res = run.stage(name, akeys[a.stem], compute, force=force)
        summary |= {f"{a.stem}.{k}": v for k, v in res["summary"].items() if _flat(v)}
    return summary


DIFFS = ("dataset_diff", "model_diff", "response_diff")


def _restore(a, files: list[str], ctx, out: Path) -> bool:
    """Put a reused analysis' saved output back into ``ctx`` for a later analysis that reads
    it (a direction's files; a diff's ranking table); False: it must be recomputed."""
    import pandas as pd

    from emdiff.analyses.directions import DirectionResult

    paths = [out / f for f in files]
    if a.kind == "direction" and all(p.is_file() for p in paths):
        ctx.results[a.stem] = DirectionResult.from_files(a.stem, paths)
        return True
    table = out / "tables" / f"{a.stem}.parquet"
    if a.kind in DIFFS and table in paths and table.is_file():
        ctx.tables[a.stem] = pd.read_parquet(table)
        return True
    return False


def _rel(path: str | Path, out: Path) -> str:
    """``path`` relative to the run folder (the record stays true when the folder moves)."""
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return str(path)


def _flat(v) -> bool:
    return isinstance(v, int | float | str | bool) or v is None
