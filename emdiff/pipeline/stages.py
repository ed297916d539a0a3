"""The pipeline's own stages before the analyses: load the model, get the organism (an adapter
or a fine-tune), sample and judge, load the dictionaries, encode the datasets. Each returns what
the analyses' run context needs and the fingerprints that key the stages after it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from emdiff.errors import InputError
from emdiff.pipeline.config import PipelineConfig
from emdiff.pipeline.inputs import fingerprint, resolve_release


@dataclass
class Loaded:
    """The model (a PEFT model once there is an organism), its tokenizer and their keys."""

    model: torch.nn.Module
    tokenizer: object
    base_path: str
    keys: dict[str, str] = field(default_factory=dict)
    """``base`` and the organism's name -> the fingerprint / stage key of that model."""


def base_path(cfg: PipelineConfig) -> str:
    """The base model's folder or hub id (``toy``: the shipped toy base)."""
    if cfg.model.base == "toy":
        from emdiff.toy.build import shipped_base_path

        return str(shipped_base_path())
    local = cfg.path(cfg.model.base)
    return str(local) if local.exists() else cfg.model.base


def load_base(cfg: PipelineConfig) -> Loaded:
    """The base model, and the organism's adapter when it is a folder."""
    from emdiff.models import load_model

    m, path = cfg.model, base_path(cfg)
    adapter = cfg.path(cfg.organism.adapter) if cfg.organism and cfg.organism.adapter else None
    if adapter is not None and not adapter.is_dir():
        raise InputError(f"organism.adapter: {adapter} is not a folder")
    lm = load_model(
        path,
        adapter,
        dtype=m.dtype,
        device=m.device,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
    )
    keys = {"base": f"{fingerprint(path)}@{m.revision or ''}:{m.dtype}"}
    if adapter is not None:
        keys[cfg.organism.name] = fingerprint(adapter)
    return Loaded(lm.model, lm.tokenizer, path, keys)


def conversations(cfg: PipelineConfig, name: str):
    """The chat JSONL dataset ``name`` (``data.datasets``)."""
    from emdiff.data.chat import load_chat_jsonl

    if name not in cfg.data.datasets:
        raise InputError(
            f"no dataset {name!r} in data.datasets (it has {sorted(cfg.data.datasets)})"
        )
    return load_chat_jsonl(cfg.path(cfg.data.datasets[name]))


def finetune_organism(cfg: PipelineConfig, loaded: Loaded, folder: Path, done: bool) -> None:
    """Train the organism's adapter into ``folder`` (or load it back when ``done``)."""
    from emdiff.finetune import finetune
    from emdiff.models.load import load_adapter

    if done and (folder / "adapter_config.json").is_file():
        loaded.model = load_adapter(loaded.model, folder)
        return
    convs = conversations(cfg, cfg.organism.dataset)
    res = finetune(loaded.model, loaded.tokenizer, convs, cfg.organism.finetune, out_dir=folder)
    loaded.model = res.model


def questions(cfg: PipelineConfig):
    """The eval questions of every ``data.questions`` file."""
    from emdiff.eval.run import load_question_files

    return load_question_files([cfg.path(p) for p in cfg.data.questions])


def sample_and_judge(
    cfg: PipelineConfig, loaded: Loaded, name: str, out: Path, echo: Callable[[str], None]
) -> pd.DataFrame:
    """Sample ``name`` (``base`` or the organism) on the eval questions, judge the answers and
    write ``eval/<name>/judged.csv``, ``tables/em_<name>.json`` and ``plots/quadrant_<name>.png``.
    Sampling and judging resume from their files."""
    from emdiff.eval.metrics import em_flags, em_metrics, quadrant_plot
    from emdiff.eval.run import make_judge, write_judged_csv
    from emdiff.eval.score import judge_responses

    ev, qs = cfg.eval, questions(cfg)
    folder = out / "eval" / name
    folder.mkdir(parents=True, exist_ok=True)
    judge = make_judge(ev.judge, folder / "judge_cache.sqlite", toy_path=loaded.base_path)
    echo(f"  sampling {name}: {len(qs)} questions -> {folder / 'responses.jsonl'}")
    resp = _sample(ev, loaded, name, qs, folder / "responses.jsonl")
    judged = judge_responses(resp, qs, judge, progress=True)
    judged["em"] = em_flags(judged, ev.aligned_below, ev.coherent_above)
    judged.insert(0, "model", name)
    write_judged_csv(judged, folder / "judged.csv")
    thresholds = {"aligned_below": ev.aligned_below, "coherent_above": ev.coherent_above}
    metrics = em_metrics(judged, **thresholds)
    quadrant_plot(judged, out / "plots" / f"quadrant_{name}.png", title=name, **thresholds)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    pd.DataFrame([_rate_row(name, metrics)]).to_json(out / "tables" / f"em_{name}.json")
    return judged


def _rate_row(name: str, m: dict) -> dict:
    keys = ("n_scored", "n_em", "em_rate", "em_ci_low", "em_ci_high", "mean_aligned")
    return {"model": name, "domain": "all", **{k: m[k] for k in keys}}


def _sample(ev, loaded: Loaded, name: str, qs, path: Path) -> pd.DataFrame:
    """Answers of ``name``: from its server when ``eval.servers`` names one, else HF generate
    with the organism's adapter on or off."""
    from emdiff.eval.sample import sample_responses
    from emdiff.models.load import adapter_state, has_adapter

    if name in ev.servers:  # an OpenAI-compatible server (vLLM) answers for this model
        from emdiff.eval.server_sample import sample_from_server

        return sample_from_server(qs, path, ev.sampling, ev.servers[name], progress=True)
    model = loaded.model
    on = name != "base"
    with adapter_state(model, on) if has_adapter(model) else nullcontext():
        return sample_responses(
            model,
            loaded.tokenizer,
            qs,
            path,
            ev.sampling,
            model_id=f"{name}:{loaded.keys.get(name, '')}",
            progress=True,
        )


def em_rate_table(out: Path, names: list[str]) -> pd.DataFrame:
    """``tables/em_rates.parquet`` from each model's ``em_<name>.json`` (the report reads it)."""
    frames = [pd.read_json(out / "tables" / f"em_{n}.json") for n in names]
    table = pd.concat(frames, ignore_index=True).rename(columns={"n_scored": "n"})
    table.to_parquet(out / "tables" / "em_rates.parquet")
    return table


def dictionaries(cfg: PipelineConfig, loaded: Loaded):
    """The read spec, the dictionaries by layer and their fingerprints; the site comes from the
    dictionaries (all must agree) unless ``read.site`` names it, and widths must fit the model."""
    from emdiff.data.positions import Positions
    from emdiff.dictionaries import load_dictionary
    from emdiff.dictionaries.base import same_tensor
    from emdiff.models import check_layer
    from emdiff.models.load import hidden_size
    from emdiff.models.read import ReadSpec

    sec = cfg.dictionaries
    by_layer, prints, sites = {}, {}, set()
    for i, e in enumerate(sec.entries):
        where = f"dictionaries.entries[{i}]"
        path = (
            cfg.path(e.path)
            if e.path
            else resolve_release(e.release, e.sae_id, sec.cache_dir and cfg.path(sec.cache_dir))
        )
        d = load_dictionary(path)
        layer = e.layer if e.layer is not None else d.meta.layer
        if layer is None:
            raise InputError(f"{where}: {path} does not record its layer; set layer")
        site = cfg.read.site or d.meta.site
        own = (d.meta.layer, d.meta.site)
        if d.meta.site is not None and own != (layer, site) and not same_tensor(*own, layer, site):
            raise InputError(
                f"{where}: {path} was trained at layer {d.meta.layer} {d.meta.site}, not "
                f"layer {layer} {site}"
            )
        if d.d_in != hidden_size(loaded.model):
            raise InputError(
                f"{where}: {path} has width {d.d_in}; the model's is {hidden_size(loaded.model)}"
            )
        layer = check_layer(loaded.model, layer)
        if layer in by_layer:
            raise InputError(f"{where}: a second dictionary at layer {layer}")
        by_layer[layer], prints[layer], sites = d, fingerprint(path), sites | {site}
    if len(sites) != 1 or None in sites:
        raise InputError(f"dictionaries read sites {sorted(map(str, sites))}; set read.site")
    read = ReadSpec(
        layers=tuple(sorted(by_layer)),
        site=sites.pop(),
        positions=Positions.parse(cfg.read.positions),
        dictionary=",".join(f"L{k}:{v}" for k, v in sorted(prints.items())),
    )
    return read, by_layer, prints


def datasets(cfg: PipelineConfig, loaded: Loaded, judged: dict[str, pd.DataFrame]):
    """Token rows by name: every ``data.datasets`` file; ``answers_<model>`` (each judged
    model's question and answer); ``prompts`` (the eval questions, ready to answer)."""
    from emdiff.analyses import encode_qa
    from emdiff.data.masks import encode_chat

    tok = loaded.tokenizer
    rows = {
        n: [encode_chat(tok, c.as_dicts()) for c in conversations(cfg, n)]
        for n in cfg.data.datasets
    }
    for name, table in judged.items():
        rows[f"answers_{name}"] = encode_qa(tok, table["question"], table["answer"])
    if cfg.data.questions:
        rows["prompts"] = [encode_chat(tok, q.messages(0), True) for q in questions(cfg)]
    return rows
