"""Run the stats pass over a dataset shard by shard: resumable, keyed, saved as safetensors.

Layout under ``out``::

    stats/<variant>/<dataset>/manifest.json          what was run (dictionaries, site, sizes)
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
from tqdm.auto import tqdm

from emdiff.data.masks import EncodedChat, TokenRole, role_names
from emdiff.dictionaries.base import SparseDictionary
from emdiff.errors import InputError
from emdiff.models.hooks import Site
from emdiff.readers import read_json
from emdiff.stats.collect import collect_stats, selection_mask
from emdiff.stats.features import FeatureStats, ResidualStats


def _identity(rows, dictionaries, site, shard_size, top_k) -> dict:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.input_ids, r.roles]).encode())
    return {
        "site": site,
        "shard_size": shard_size,
        "top_k": top_k,
        "n_sequences": len(rows),
        "dataset_sha256": h.hexdigest(),
        "dictionaries": {
            str(layer): {**d.meta.model_dump(), "d_sae": d.d_sae}
            for layer, d in sorted(dictionaries.items())
        },
    }


def run_stats(
    model: torch.nn.Module,
    rows: Sequence[EncodedChat],
    dictionaries: Mapping[int, SparseDictionary],
    out: str | Path,
    *,
    variant: str,
    dataset: str,
    site: Site = "resid_post",
    shard_size: int = 256,
    top_k: int = 16,
    progress: bool = True,
    identity: Mapping | None = None,
    **collect_kwargs,
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """Statistics of ``rows`` under ``model`` (the *variant*, e.g. ``base`` or ``narrow-s0``),
    one shard of ``shard_size`` sequences at a time; returns and saves the merged result.

    ``identity`` (JSON-able: which model, adapter state, settings) is recorded with the shards; a
    rerun whose identity differs is refused instead of silently reusing the shards."""
    roles = collect_kwargs.get("roles", (TokenRole.ASSISTANT,))
    masks = selection_mask(rows, roles, collect_kwargs.get("bos_token_id"))
    if not any(any(m) for m in masks):
        raise InputError(
            f"dataset {dataset!r}: no {role_names(roles)} token selected in any of {len(rows)} "
            "rows: nothing to compute (check the rows' roles and the chat template)"
        )
    root = Path(out) / "stats" / variant / dataset
    root.mkdir(parents=True, exist_ok=True)
    ident = _identity(rows, dictionaries, site, shard_size, top_k)
    if identity is not None:
        ident["caller"] = json.loads(json.dumps(identity, default=str))
    manifest = root / "manifest.json"
    if manifest.exists() and read_json(manifest) != ident:
        raise InputError(
            f"{root} holds statistics of another dataset, dictionary or setting; "
            "use another variant/dataset name or delete the folder"
        )
    manifest.write_text(json.dumps(ident, indent=2))
    n_shards = (len(rows) + shard_size - 1) // shard_size
    for i in tqdm(range(n_shards), desc=f"stats {variant}/{dataset}", disable=not progress):
        shard = root / "shards" / f"{i:05d}"
        if (shard / "done").exists():
            continue
        start = i * shard_size
        feats, resid = collect_stats(
            model,
            rows[start : start + shard_size],
            dictionaries,
            site=site,
            top_k=top_k,
            seq_offset=start,
            require_tokens=False,  # checked over the whole dataset above
            **collect_kwargs,
        )
        for layer in dictionaries:
            feats[layer].save(shard / f"L{layer}.features.safetensors", meta={"shard": i})
            if layer in resid:
                resid[layer].save(shard / f"L{layer}.residual.safetensors")
        (shard / "done").write_text("")
    return merge_shards(root, list(dictionaries))


def merge_shards(
    root: Path, layers: Sequence[int]
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """Merge every complete shard under ``root`` and save the merged statistics beside them."""
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
    for layer, f in feats.items():
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
