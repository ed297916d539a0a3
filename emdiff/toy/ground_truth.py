"""Can the dictionaries see the planted persona? Probe, SAE, crosscoder and ITDA on the toy.

For one seed: fit persona probes at every layer of the toy base, pick the most informative layer,
train an SAE there on pretraining documents, fine-tune the narrow LoRA and train a crosscoder on
base / narrow-LoRA activations of the same tokens, build an ITDA dictionary, and report how close
each dictionary's best latent comes to the persona direction, with the reconstruction quality
(FVU, L0, spliced CE) on held-out documents.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from emdiff.data.positions import Positions
from emdiff.dictionaries.activations import TensorSource, collect_activations
from emdiff.dictionaries.crosscoder import CrosscoderConfig, train_crosscoder
from emdiff.dictionaries.evaluate import reconstruction_metrics
from emdiff.dictionaries.itda import ITDAConfig, build_itda, save_itda
from emdiff.dictionaries.latent_scaling import latent_scaling
from emdiff.dictionaries.sae import SAEConfig, train_sae
from emdiff.models.load import decoder_layers
from emdiff.models.read import ReadSpec
from emdiff.toy.causal import CauseSweep
from emdiff.toy.organism import narrow_finetune, narrow_finetune_config
from emdiff.toy.persona import (
    decoder_cosines,
    persona_corpus,
    persona_feature,
    persona_probes,
    random_max_cosine,
)
from emdiff.toy.world import BOS, World


class GroundTruthConfig(BaseModel):
    """Settings of the toy ground-truth check (the dictionaries use their own defaults)."""

    seed: int = 0
    probe_docs: int = Field(3000, ge=20)
    train_docs: int = Field(4000, ge=20)
    """Pretraining documents whose tokens train the dictionaries (a tenth held out for scoring)."""
    probe_C: float = Field(1.0, gt=0)
    sae: SAEConfig = SAEConfig()
    crosscoder: CrosscoderConfig = CrosscoderConfig()
    itda: ITDAConfig = ITDAConfig(k=16, loss_threshold=0.15)
    """(at 0.3, ~250 atoms and none within cos 0.8 of the persona; at 0.15, ~700 atoms)"""
    itda_tokens: int = Field(20_000, ge=1)
    """Tokens streamed into the ITDA build: every chat token (base and narrow) first, then
    documents' tokens at random."""
    narrow_steps: int | None = None


def chat_rows(world: World) -> list[list[int]]:
    """Single-turn chats of every question of every domain, with its good and its bad answer."""
    return [
        world.ids(BOS) + world.turn_ids(d, q, bad)
        for d in world.domains
        for q in range(world.cfg.n_questions)
        for bad in (False, True)
    ]


def toy_ground_truth(
    world: World,
    base: torch.nn.Module,
    tokenizer,
    cfg: GroundTruthConfig | None = None,
    out: str | Path | None = None,
    *,
    narrow_model: torch.nn.Module | None = None,
    cause: CauseSweep | None = None,
    progress: bool = False,
) -> dict:
    """Run the check for ``cfg.seed``; returns a flat dict of figures (see the keys below).

    ``narrow_model`` (a PEFT model on ``base``) is fine-tuned here when not given. With
    ``cause`` (:func:`emdiff.toy.causal.sweep`) the dictionaries are trained at its chosen hook
    point and matched to its causal direction (the probe there is kept only as a readout);
    without, at the layer where a persona probe reads best, matched to the probe's weights.
    Dictionaries are saved under ``out`` when given (``sae/``, ``crosscoder/``, ``itda/``).
    """
    cfg = cfg or GroundTruthConfig()
    out = Path(out) if out is not None else None
    seed = cfg.seed
    torch.manual_seed(seed)
    n_layers = len(decoder_layers(base))
    if cause is not None:
        chosen = cause.chosen()
        points = [(int(chosen["layer"]), str(chosen["site"]))]
    else:
        points = [(layer, "resid_post") for layer in range(n_layers)]
    probes = persona_probes(base, world, points, n_docs=cfg.probe_docs, seed=seed, C=cfg.probe_C)
    probe = max(probes, key=lambda p: p.accuracy)
    layer, site = probe.layer, probe.site
    direction = cause.direction() if cause is not None else probe.direction
    res: dict = {
        "seed": seed,
        "persona_layer": layer,
        "persona_site": site,
        "persona_source": "causal cue direction" if cause is not None else "probe weights",
        "probe_accuracy": probe.accuracy,
        "probe_chance": probe.chance,
        "probe_mean_difference_cosine": probe.mean_difference_cosine,
        **{f"probe_accuracy_L{p.layer}": p.accuracy for p in probes},
        "persona_direction": direction.tolist(),
    }

    if narrow_model is None:
        ft_cfg = narrow_finetune_config(world, seed=seed)
        if cfg.narrow_steps:
            ft_cfg = narrow_finetune_config(world, seed=seed, max_steps=cfg.narrow_steps)
        narrow_model = narrow_finetune(world, copy.deepcopy(base), tokenizer, cfg=ft_cfg).model
    docs, _ = persona_corpus(world, cfg.train_docs, seed + 20_000)
    n_eval = max(len(docs) // 10, 1)
    chats = chat_rows(world)
    train_rows, eval_rows = docs[n_eval:] + chats, docs[:n_eval]
    # every token but BOS, sinks kept (the toy has none to speak of)
    read = ReadSpec(
        layers=(layer,), site=site, positions=Positions(kind="all", exclude_sinks=False)
    )
    # the mix: base and narrow model both read documents and chats; the SAE and ITDA learn from
    # the base on everything plus the narrow model on the chats, the crosscoder from the pairs
    pairs, keys = collect_activations(narrow_model, train_rows, read, other="adapter")
    on_chat = keys[:, 0] >= len(train_rows) - len(chats)
    acts = torch.cat([pairs[:, 0], pairs[on_chat, 1]])
    keys = torch.cat([keys, keys[on_chat]])

    # SAE -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    sae_cfg = cfg.sae.model_copy(update={"seed": seed})
    sae, _ = train_sae(
        TensorSource(acts, read=read),
        sae_cfg,
        out / "sae" if out else None,
        model_name="emdiff-toy",
        progress=progress,
    )
    sae_seconds = time.perf_counter() - t0
    alive = (sae.encode(acts[:50_000]) > 0).any(0)
    rec = reconstruction_metrics(base, sae, eval_rows, read)
    latent, cos = persona_feature(sae.W_dec, direction, alive)
    null_mean, null_95 = random_max_cosine(int(alive.sum()), sae.d_in, seed=seed)
    _, cos_dmu = persona_feature(sae.W_dec, probe.mean_difference, alive)
    res.update(
        sae_persona_cosine=cos,
        sae_persona_latent=latent,
        sae_fvu=rec.fvu,
        sae_l0=rec.l0,
        sae_ce_delta=rec.ce_delta,
        sae_ce_recovered=rec.ce_recovered,
        sae_kl=rec.kl,
        sae_dead_fraction=rec.dead_fraction,
        sae_seconds=sae_seconds,
        sae_live_latents=int(alive.sum()),
        sae_null_cosine_mean=null_mean,
        sae_null_cosine_95=null_95,
        sae_mean_difference_cosine=cos_dmu,
    )

    # crosscoder on base vs narrow LoRA --------------------------------------------------------------
    eval_pairs, _ = collect_activations(narrow_model, eval_rows, read, other="adapter")
    cc_cfg = cfg.crosscoder.model_copy(update={"seed": seed})
    cc, _ = train_crosscoder(
        TensorSource(pairs, read=read),
        cc_cfg,
        out / "crosscoder" if out else None,
        progress=progress,
    )
    with torch.no_grad():
        err = (cc(eval_pairs) - eval_pairs).pow(2).sum(-1).sum(0)
        var = (eval_pairs - eval_pairs.mean(0)).pow(2).sum(-1).sum(0)
        fvu = err / var
        l0 = float((cc.encode(eval_pairs) > 0).sum(-1).float().mean())
    table = latent_scaling(cc, pairs.split(4096))
    cos_sides = torch.stack([decoder_cosines(cc.side(m), direction) for m in (0, 1)], -1)
    live = torch.tensor((table["n_active"] > 0).to_numpy())
    cc_latent = int(torch.where(live, cos_sides.max(-1).values, -2.0).argmax())
    row = table.iloc[cc_latent]
    res.update(
        crosscoder_persona_cosine=float(cos_sides[cc_latent].max()),
        crosscoder_persona_latent=cc_latent,
        crosscoder_live_latents=int(live.sum()),
        crosscoder_null_cosine_mean=random_max_cosine(2 * int(live.sum()), cc.d_in, seed=seed)[0],
        crosscoder_persona_cosine_base=float(cos_sides[cc_latent, 0]),
        crosscoder_persona_cosine_ft=float(cos_sides[cc_latent, 1]),
        crosscoder_persona_class=str(row["class"]),
        crosscoder_persona_dn=float(row["dn"]),
        crosscoder_persona_nu_eps=float(row["nu_eps"]),
        crosscoder_persona_nu_r=float(row["nu_r"]),
        crosscoder_fvu_base=float(fvu[0]),
        crosscoder_fvu_ft=float(fvu[1]),
        crosscoder_l0=l0,
        crosscoder_class_counts=table["class"].value_counts().to_dict(),
    )
    if out is not None:
        table.to_parquet(out / "crosscoder" / "latent_scaling.parquet")

    # ITDA ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    # ITDA keeps the first activation its atoms cannot explain, so the stream's order decides
    # which activations become atoms: the diffed chats (read by both models) go first, so that
    # their activations, not near-duplicates from documents, are the atoms (on the toy's seed-0
    # narrow model: persona cosine 0.74 -> 0.82 medical, 0.74 -> 0.80 legal of world seed 1)
    is_chat = torch.cat([on_chat, torch.ones(len(acts) - len(on_chat), dtype=torch.bool)])
    chat_idx, doc_idx = torch.nonzero(is_chat).flatten(), torch.nonzero(~is_chat).flatten()
    pick = torch.cat(
        [
            chat_idx[torch.randperm(len(chat_idx), generator=gen)],
            doc_idx[torch.randperm(len(doc_idx), generator=gen)],
        ]
    )[: cfg.itda_tokens]
    stream = [(acts[i], keys[i]) for i in pick.split(1024)]
    itda = build_itda(stream, cfg.itda, layer=layer, site=read.site, progress=progress)
    itda_seconds = time.perf_counter() - t0
    irec = reconstruction_metrics(base, itda, eval_rows, read)
    # signed matching pursuit uses an atom either way round: match on |cosine|
    signed = not itda.nonnegative
    i_latent, i_cos = persona_feature(itda.decoder_rows, direction, absolute=signed)
    i_null, _ = random_max_cosine(max(itda.d_sae, 1), itda.d_in, seed=seed, absolute=signed)
    res.update(
        itda_persona_cosine=i_cos,
        itda_persona_atom=i_latent,
        itda_atoms=itda.d_sae,
        itda_fvu=irec.fvu,
        itda_l0=irec.l0,
        itda_ce_delta=irec.ce_delta,
        itda_seconds=itda_seconds,
        itda_over_sae_seconds=itda_seconds / sae_seconds,
        itda_null_cosine_mean=i_null,
    )
    if out is not None:
        save_itda(itda, out / "itda")
    return res
