"""``emdiff demo``: the whole main job on the toy organism.

Loads the shipped toy base (through the same loader as a real model), fine-tunes narrow and control
rank-1 LoRAs for several seeds, samples answers in every domain, judges them exactly, and writes a
run folder with a manifest and tables.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from emdiff.demo_config import DemoConfig
from emdiff.demo_print import print_dictionaries, print_diffs, print_directions, print_lora
from emdiff.errors import ensure_writable, raise_disk_full_in
from emdiff.eval.judge import ToyJudge
from emdiff.eval.metrics import em_flags
from emdiff.eval.sample import SamplingConfig, sample_responses
from emdiff.eval.score import judge_responses
from emdiff.models import load_model
from emdiff.models.load import load_adapter
from emdiff.provenance import package_versions, sha256_file
from emdiff.runstate import RunState, stage_key
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.em_summary import analysed_seed, exact_summary, sampled_summary
from emdiff.toy.organism import answer_probability, narrow_finetune, narrow_finetune_config
from emdiff.toy.scorecard import score_table
from emdiff.toy.world import World


def sample_and_judge(
    world: World, model: torch.nn.Module, tokenizer, samples: int, seed: int, label: str, out: Path
) -> pd.DataFrame:
    """Sample answers to every toy eval question through ``emdiff.eval`` and judge them exactly."""
    questions = world.eval_questions(samples=samples)
    cfg = SamplingConfig(
        temperature=1.0, max_new_tokens=world.cfg.answer_len + 2, seed=seed, batch_size=1024
    )
    responses = sample_responses(
        model, tokenizer, questions, out / "eval" / label / "responses.jsonl", cfg, model_id=label
    )
    judged = judge_responses(responses, questions, ToyJudge(world))
    domain = {q.id: q.extra["domain"] for q in questions}
    judged.insert(0, "model", label)
    judged.insert(1, "domain", judged.question_id.map(domain))
    judged["em"] = em_flags(judged)
    return judged


def _dictionaries(cfg: DemoConfig, world, base, tok, narrow, out: Path) -> dict:
    """Probe, SAE, crosscoder and ITDA against the planted persona (the analysed seed's narrow
    model); flat summary keys."""
    from emdiff.dictionaries.crosscoder import CrosscoderConfig
    from emdiff.dictionaries.sae import SAEConfig
    from emdiff.toy.causal import CauseConfig, gt_row, sweep
    from emdiff.toy.ground_truth import GroundTruthConfig, toy_ground_truth
    from emdiff.toy.incontext import in_context_inference

    docs = {"probe_docs": cfg.dict_docs, "train_docs": cfg.dict_docs} if cfg.dict_docs else {}
    gt_cfg = GroundTruthConfig(
        seed=0,
        sae=SAEConfig(steps=cfg.dict_steps),
        crosscoder=CrosscoderConfig(steps=cfg.dict_steps),
        **docs,
    )
    cause = sweep(world, narrow, CauseConfig(probe_docs=cfg.dict_docs or 2000))
    cause.save(out / "dictionaries")
    gt = toy_ground_truth(
        world, base, tok, gt_cfg, out / "dictionaries", narrow_model=narrow, cause=cause
    )
    gt.update(gt_row(cause))
    chosen = cause.chosen()
    layer, site = int(chosen["layer"]), str(chosen["site"])
    gt.update(in_context_inference(world, base, layer, site, cause.direction(), chosen["cue_norm"]))
    (out / "tables" / "ground_truth.json").write_text(json.dumps(gt, indent=2, default=str))
    return {k: v for k, v in gt.items() if k != "seed"}


def _diffs(cfg: DemoConfig, world, st: _Stages, gt: dict, models: dict, judged) -> dict:
    """Q1, Q2 (narrow and control), Q3, overlap and transfer with the analysed seed's SAE, read
    where the SAE was trained (its own layer and site), on answer tokens with sinks kept."""
    from emdiff.data.positions import Positions
    from emdiff.dictionaries import load_dictionary
    from emdiff.models.read import ReadSpec
    from emdiff.toy.diffs import ToyModels, toy_analyses, toy_diffs

    base, tok, out = st.base, st.tok, st.out
    sae = load_dictionary(out / "dictionaries" / "sae")
    read = ReadSpec(
        layers=(sae.meta.layer,),
        site=sae.meta.site,
        positions=Positions(exclude_sinks=False),
        dictionary=str(out / "dictionaries" / "sae"),
    )
    labels = {"narrow_label": f"narrow-s{st.pick}", "control_label": f"control-s{st.pick}"}
    toy = ToyModels(base, tok, models["narrow"], models["control"], judged, **labels)
    direction = torch.tensor(gt["persona_direction"])
    latents = gt["sae_persona_latents"]
    analyses = toy_analyses(cfg.analyses)
    res = toy_diffs(world, toy, sae, read, latents, out=out, direction=direction, analyses=analyses)
    # the run folder is the frame of reference: the same run read from another folder says the same
    res["read"] = read.model_copy(update={"dictionary": "dictionaries/sae"}).describe()
    (out / "tables" / "diffs.json").write_text(json.dumps(res, indent=2))
    return res


def _persona_latents(out: Path, gt: dict) -> list[int]:
    """The SAE's persona latents (:func:`emdiff.toy.persona.persona_latents`)."""
    from emdiff.dictionaries import load_dictionary
    from emdiff.toy.persona import persona_latents

    sae = load_dictionary(out / "dictionaries" / "sae")
    return persona_latents(sae.W_dec, torch.tensor(gt["persona_direction"]))


def _finetune(cfg: DemoConfig, st: _Stages, label: str, bad: bool, seed: int) -> torch.nn.Module:
    """Train one LoRA, or load it back when a finished one with the same key is on disk."""
    folder = st.out / "adapters" / label
    settings = cfg.model_dump(include={"steps", "lr", "narrow_domain"})
    key = stage_key({"base": st.base_sha, "label": label, "bad": bad, "seed": seed, **settings})
    st.keys[label] = key
    done = st.state.result(f"lora-{label}", key)
    if done is not None and (folder / "adapter_config.json").is_file():
        st.echo(f"{label}: reusing the adapter in {folder} (final loss {done['final_loss']:.3f})")
        st.final_loss[label] = done["final_loss"]
        st.skipped.append(f"lora {label}")
        return load_adapter(copy.deepcopy(st.base), folder)
    st.state.begin(f"lora-{label}", key, (folder,))
    ft_cfg = narrow_finetune_config(st.world, seed=seed, max_steps=cfg.steps, lr=cfg.lr)
    res = narrow_finetune(
        st.world, copy.deepcopy(st.base), st.tok, bad=bad, cfg=ft_cfg, out_dir=folder
    )
    st.echo(f"{label}: trained {cfg.steps} steps, final loss {res.losses[-1]:.3f}")
    st.state.finish(f"lora-{label}", key, {"final_loss": res.losses[-1]})
    st.final_loss[label] = res.losses[-1]
    return res.model


def _evaluate(cfg: DemoConfig, st: _Stages, model: torch.nn.Module, label: str, seed: int):
    """Sample and judge one model; sampling resumes from its responses.jsonl."""
    key = stage_key(
        {"model": st.keys.get(label, st.base_sha), "samples": cfg.samples, "seed": seed}
    )
    done = st.state.result(f"eval-{label}", key) is not None
    if st.state.begin(f"eval-{label}", key, (st.out / "eval" / label,)):
        st.skipped.append(f"eval {label}" + ("" if done else " (resumed its responses.jsonl)"))
    judged = sample_and_judge(st.world, model, st.tok, cfg.samples, seed, label, st.out)
    st.state.finish(f"eval-{label}", key, {"n": len(judged)})
    st.keys[f"eval-{label}"] = key
    st.exact[label] = {
        d: float(answer_probability(model, st.world, [d]).mean()) for d in st.world.domains
    }
    return judged


class _Stages:
    """What the stages of one demo run share."""

    def __init__(self, out: Path, base_path: Path, world: World, loaded, echo) -> None:
        self.out, self.world, self.echo = out, world, echo
        self.base, self.tok = loaded.model, loaded.tokenizer
        self.base_sha = sha256_file(Path(base_path) / "model.safetensors")
        self.state = RunState(out)
        self.keys: dict[str, str] = {}
        self.skipped: list[str] = []
        self.current = "load"
        self.seconds: dict[str, float] = {}
        self.final_loss: dict[str, float] = {}
        """Final training loss per LoRA label (which seed the analyses read)."""
        self.pick = 0
        self.exact: dict[str, dict[str, float]] = {}
        """Exact P(bad answer) per model label and domain (what sampling estimates)."""
        self._since = time.perf_counter()

    def enter(self, stage: str) -> None:
        """Start ``stage``; the time since the last call goes to the previous stage's kind
        (its first word: load, eval, lora, dictionaries, diffs, directions, adapters)."""
        now = time.perf_counter()
        kind = self.current.split()[0]
        self.seconds[kind] = round(self.seconds.get(kind, 0.0) + now - self._since, 1)
        self.current, self._since = stage, now


def run_demo(cfg: DemoConfig, out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Run the demo and return the flat summary that ``--json`` prints.

    Every stage is recorded under ``out/stages``; rerunning the same command reuses finished
    LoRAs, evaluations, dictionaries and diffs, and resumes the one that was interrupted.
    """
    out = ensure_writable(out)
    t0 = time.time()
    base_path = cfg.base or shipped_base_path()
    world = load_world(base_path, narrow_domain=cfg.narrow_domain)
    st = _Stages(out, Path(base_path), world, load_model(str(base_path), dtype="float32"), echo)
    st.seconds["load"] = round(time.time() - t0, 1)
    try:
        summary = _run(cfg, st)
    except BaseException as e:
        done = [k for k, v in st.state.summary().items() if v == "done"]
        echo(
            f"\ndemo stopped in stage '{st.current}' ({type(e).__name__}{f': {e}' if str(e) else ''})."
            f" Finished and kept in {out}: {', '.join(done) or 'nothing yet'}. Rerun the same "
            "command to resume."
        )
        raise_disk_full_in(e, out)
        raise
    st.enter("done")
    summary["stage_seconds"] = st.seconds
    summary["seconds"] = round(time.time() - t0, 1)
    summary["reused_stages"] = len(st.skipped)
    manifest = {
        "command": "demo",
        "config": json.loads(cfg.model_dump_json()),
        "versions": package_versions(),
        "inputs": {"base": str(base_path), "base_sha256": st.base_sha},
        "world": world.cfg.model_dump(),
        "reused": st.skipped,
        "summary": summary,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if st.skipped:
        echo(f"\nreused from an earlier run: {'; '.join(st.skipped)}")
    echo("\nscorecard: the toy benchmark's targets")
    echo(score_table(summary))
    echo("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in st.seconds.items()))
    echo(f"\nrun folder: {out}  ({summary['seconds']} s). Open first:")
    echo(
        f"  {out / 'plots' / 'quadrant_narrow.png'}  aligned vs coherent scores of the narrow LoRAs"
    )
    echo(f"  {out / 'tables' / 'em_rates.parquet'}  EM rate with 95% CI per model and domain")
    if cfg.dictionaries:
        echo(
            f"  {out / 'plots' / 'q2_model_diff.png'}  Q2: which SAE latents the narrow LoRA moves"
        )
    echo(f"  {out / 'manifest.json'}  settings, input hashes and every figure above")
    return summary


def _cached_dictionaries(cfg: DemoConfig, st: _Stages, key: str, narrow) -> dict:
    """The dictionaries stage: from the cross-run cache when it has this key, else computed (and
    stored there)."""
    from emdiff.stagecache import StageCache

    out = st.out
    st.state.begin("dictionaries", key, (out / "dictionaries",))
    cache = StageCache() if cfg.cache else None
    gt = cache.restore("demo-dictionaries", key, out / "dictionaries") if cache else None
    if gt is not None:
        st.skipped.append(
            f"dictionaries (probe, SAE, crosscoder, ITDA) from the cache {cache.root}"
        )
        (out / "tables" / "ground_truth.json").write_text(json.dumps(gt, indent=2, default=str))
    else:
        gt = _dictionaries(cfg, st.world, st.base, st.tok, narrow, out)
        if cache:
            cache.store("demo-dictionaries", key, gt, out / "dictionaries")
    return st.state.finish("dictionaries", key, gt)


def _run(cfg: DemoConfig, st: _Stages) -> dict:
    out, world, echo = st.out, st.world, st.echo
    (out / "tables").mkdir(parents=True, exist_ok=True)
    st.enter("eval base")
    frames = [_evaluate(cfg, st, st.base, "base", cfg.eval_seed)]
    models: dict[str, torch.nn.Module] = {}
    for seed in range(cfg.seeds):
        for kind, bad in (("narrow", True), ("control", False)):
            label = f"{kind}-s{seed}"
            st.enter(f"lora {label}")
            models[label] = _finetune(cfg, st, label, bad, seed)
            st.enter(f"eval {label}")
            frames.append(_evaluate(cfg, st, models[label], label, cfg.eval_seed + seed + 1))
    judged = pd.concat(frames, ignore_index=True)
    summary = sampled_summary(cfg, world, judged, out, echo)
    summary.update(exact_summary(cfg, world, st.exact, echo))
    pick = st.pick = analysed_seed(st.final_loss, cfg.seeds, echo)
    summary["analysis_seed"] = pick
    first = {"narrow": models[f"narrow-s{pick}"], "control": models[f"control-s{pick}"]}
    first_labels = {"narrow": f"narrow-s{pick}", "control": f"control-s{pick}"}
    if not cfg.dictionaries:
        return summary
    st.enter("dictionaries")
    key = stage_key(
        {
            "narrow": st.keys[first_labels["narrow"]],
            "ground_truth": "causal sweep v2",  # what the stage computes; old folders redo it
            **cfg.model_dump(include={"dict_steps", "dict_docs"}),
        }
    )
    gt = st.state.result("dictionaries", key)
    if gt is None:
        gt = _cached_dictionaries(cfg, st, key, first["narrow"])
    else:
        st.skipped.append("dictionaries (probe, SAE, crosscoder, ITDA)")
    gt = {**gt, "sae_persona_latents": _persona_latents(out, gt)}
    print_dictionaries(gt, echo)
    summary.update({k: v for k, v in gt.items() if isinstance(v, int | float | str)})
    summary["sae_persona_latents"] = ",".join(map(str, gt["sae_persona_latents"]))
    st.enter("diffs")
    dict_key = key
    evals = [st.keys[f"eval-{m}"] for m in ("base", *first_labels.values())]
    from emdiff.toy.diffs import toy_analyses

    analyses = [{"kind": a.kind, **a.model_dump(mode="json")} for a in toy_analyses(cfg.analyses)]
    key = stage_key(
        {
            "dictionaries": key,
            "control": st.keys[first_labels["control"]],
            "evals": evals,
            "analyses": analyses,  # another analysis config redoes the stage
            "persona": "latents at decoder cos >= 0.8",
            "cards": "toy explainer v1",  # the reference explanation of the cards
        }
    )
    res = st.state.result("diffs", key)
    if res is None:
        st.state.begin("diffs", key)
        res = st.state.finish("diffs", key, _diffs(cfg, world, st, gt, first, judged))
    else:
        st.skipped.append("feature diffs (Q1, Q2, Q3, overlap, transfer)")
    print_diffs(res, gt["sae_persona_latents"], echo)
    summary.update(res)
    from emdiff.demo_checks import adapters_stage, directions_stage

    st.enter("directions")
    # the directions and adapters checks read the organism, its answers and the dictionaries,
    # not the diffs: a changed feature diff does not redo them
    after = {"dictionaries": dict_key, "control": st.keys[first_labels["control"]], "evals": evals}
    key = stage_key({**after, "checks": "directions v1"})
    res = st.state.result("directions", key)
    if res is None:
        st.state.begin("directions", key, (out / "directions",))
        res = st.state.finish(
            "directions", key, directions_stage(cfg, st, gt, first["narrow"], judged)
        )
    else:
        st.skipped.append("directions (decomposition, attribution, interventions)")
    print_directions(res, echo)
    summary.update(res)
    st.enter("adapters")  # what the adapters learnt, when, and how to undo or prevent it
    key = stage_key({**after, "checks": "adapters v1"})
    res = st.state.result("adapters", key)
    if res is None:
        st.state.begin("adapters", key, (out / "adapters" / "narrow-phases",))
        res = st.state.finish("adapters", key, adapters_stage(cfg, st, gt, first["narrow"], judged))
    else:
        st.skipped.append("lora (interpretation, phases, mitigation, defences, screening)")
    print_lora(res, echo)
    summary.update(res)
    return summary
