"""Run the stats pass over a dataset shard by shard: resumable, keyed, saved as safetensors.

Layout under ``out``::

    stats/<variant>/<dataset>/manifest.json          what was run (read spec, dictionaries, sizes)
    stats/<variant>/<dataset>/shards/00003/L12.features.safetensors (+ .json), L12.residual...
    stats/<variant>/<dataset>/shards/00003/done       written last: the shard is complete
    stats/<variant>/<dataset>/L12.features.safetensors  the merged result

A rerun skips every shard with a ``done`` marker, so an interrupted run loses at most one shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from emdiff.data.masks import EncodedChat
from emdiff.dictionaries.base import SparseDictionary
from emdiff.errors import InputError
from emdiff.models.read import ReadSpec, Row, require_tokens, selection
from emdiff.readers import read_json
from emdiff.stats.collect import StatsConfig, stats_pass
from emdiff.stats.distributed import rank_world
from emdiff.stats.features import FeatureStats, ResidualStats


def _identity(rows, dictionaries, read: ReadSpec, cfg: StatsConfig) -> dict:
    h = hashlib.sha256()
    for r in rows:
        ids, roles = (r.input_ids, r.roles) if isinstance(r, EncodedChat) else (list(r), None)
        h.update(json.dumps([ids, roles]).encode())
    return {
        "read": read.model_dump(mode="json"),
        "shard_size": cfg.shard_size,
        "top_k": cfg.top_k,
        "sequence_means": cfg.sequence_means,
        "residual": cfg.residual,
        # attention sinks are thresholded per batch: shards of other batch sizes differ
        **({"batch_size": cfg.batch_size} if read.positions.exclude_sinks else {}),
        "n_sequences": len(rows),
        "dataset_sha256": h.hexdigest(),
        "dictionaries": {
            str(layer): {**d.meta.model_dump(mode="json"), "d_sae": d.d_sae}
            for layer, d in sorted(dictionaries.items())
        },
    }


def run_stats(
    model: torch.nn.Module,
    rows: Sequence[Row],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    root: str | Path,
    cfg: StatsConfig | None = None,
    identity: Mapping | None = None,
    keyed: bool = False,
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """Statistics of ``rows`` read at ``read``, one shard of ``cfg.shard_size`` sequences at a
    time under the folder ``root`` (``<out>/stats/<variant>/<dataset>`` by convention); returns
    and saves the merged result.

    ``identity`` (JSON-able: which model, adapter state) is recorded with the shards together
    with the read spec; a rerun whose identity differs is refused instead of silently reusing
    the shards. ``keyed``: the folder is ``<root>-<hash of that identity>`` instead, so other
    settings get their own folder and earlier ones stay reusable (a pipeline's stats cache)."""
    cfg = cfg or StatsConfig()
    root = Path(root)
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, f"dataset {root.name!r}")
    ident = _identity(rows, dictionaries, read, cfg)
    if identity is not None:
        ident["caller"] = json.loads(json.dumps(identity, default=str))
    if keyed:
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
        root = root.with_name(f"{root.name}-{digest}")
    rank, world = rank_world()
    manifest = root / "manifest.json"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _check_manifest(manifest, ident, root)
        manifest.write_text(json.dumps(ident, indent=2))
    if world > 1:  # under torchrun: rank r computes shards r, r + world, ... (shared folder)
        dist.barrier()
        _check_manifest(manifest, ident, root)
    n_shards = (len(rows) + cfg.shard_size - 1) // cfg.shard_size
    shard_cfg = cfg.model_copy(update={"progress": False})
    bar = tqdm(
        range(n_shards),
        desc=f"stats {root.parent.name}/{root.name}",
        disable=not cfg.progress or rank > 0,
    )
    for i in bar:
        shard = root / "shards" / f"{i:05d}"
        if i % world != rank or (shard / "done").exists():
            continue
        s = slice(i * cfg.shard_size, (i + 1) * cfg.shard_size)
        feats, resid = stats_pass(
            model, rows[s], masks[s], dictionaries, read, shard_cfg, seq_offset=s.start
        )
        for layer in dictionaries:
            feats[layer].save(shard / f"L{layer}.features.safetensors", meta={"shard": i})
            if layer in resid:
                resid[layer].save(shard / f"L{layer}.residual.safetensors")
        (shard / "done").write_text("")
    if world > 1:
        dist.barrier()
    return merge_shards(root, list(dictionaries), save=rank == 0)


def _check_manifest(manifest: Path, ident: dict, root: Path) -> None:
    if manifest.exists() and read_json(manifest) != ident:
        raise InputError(
            f"{root} holds statistics of another dataset, dictionary, read spec or setting; "
            "use another variant/dataset name or delete the folder"
        )


def merge_shards(
    root: Path, layers: Sequence[int], save: bool = True
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """Merge every complete shard under ``root`` and (``save``) save the merged statistics
    beside them."""
    shards = sorted(p.parent for p in (root / "shards").glob("*/done"))
    feats: dict[int, FeatureStats] = {}
    resid: dict[int, ResidualStats] = {}
    for shard in shards:
        for layer in layers:
            f = FeatureStats.load(shard / f"L{layer}.features.safetensors")
            feats[layer] = feats[layer].merge(f) if layer in feats else f
            rp = shard / f"L{layer}.residual.safetensors"
            if rp.exists():
                r = ResidualStats.load(rp)
                resid[layer] = resid[layer].merge(r) if layer in resid else r
    for layer, f in feats.items() if save else ():
        f.save(root / f"L{layer}.features.safetensors", meta={"shards": len(shards)})
        if layer in resid:
            resid[layer].save(root / f"L{layer}.residual.safetensors")
    return feats, resid


def top_contexts(
    stats: FeatureStats,
    rows: Sequence[EncodedChat],
    tokenizer,
    feature: int,
    *,
    before: int = 8,
    after: int = 2,
    seq_offset: int = 0,
) -> list[dict]:
    """The top activations of ``feature`` as readable contexts (strongest first).

    Each item: ``value``, ``seq``, ``pos``, ``before`` / ``token`` / ``after`` (decoded strings).
    ``rows`` are the sequences the statistics were collected on (ids offset by ``seq_offset``).
    """
    out = []
    for v, s, p in zip(
        stats.top_val[feature].tolist(),
        stats.top_seq[feature].tolist(),
        stats.top_pos[feature].tolist(),
        strict=True,
    ):
        if s < 0:
            break
        ids = rows[s - seq_offset].input_ids
        out.append(
            {
                "value": v,
                "seq": s,
                "pos": p,
                "before": tokenizer.decode(ids[max(0, p - before) : p]),
                "token": tokenizer.decode(ids[p : p + 1]),
                "after": tokenizer.decode(ids[p + 1 : p + 1 + after]),
            }
        )
    return out
