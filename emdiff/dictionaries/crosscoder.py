"""A BatchTopK crosscoder on paired base / fine-tune activations.

One shared set of latents reads both models' activations at the same token and has one decoder
per model (Lindsey et al. 2024). Sparsity is BatchTopK on ``f_j * (|d_j^base| + |d_j^ft|)``
(Minder et al. 2025), whose decoder norms are free, so they can tell which model a latent
writes to: :mod:`emdiff.dictionaries.latent_scaling` reads that from the norms and by latent
scaling.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from emdiff.dictionaries.activations import ActivationSource, source_point
from emdiff.dictionaries.hooknames import locate
from emdiff.dictionaries.sae import geometric_median
from emdiff.dictionaries.train import (
    LoopConfig,
    TrainingLog,
    exported_threshold,
    fit,
    plot_history,
)
from emdiff.errors import InputError
from emdiff.readers import load_safetensors, read_json, require

BASE, FT = 0, 1


class CrosscoderFormatError(InputError):
    """A crosscoder folder misses a file, a key or a tensor, or is corrupt; names the file."""


class CrosscoderConfig(LoopConfig):
    """Width, sparsity and training settings of a BatchTopK crosscoder."""

    d_sae: int | None = Field(None, ge=1)
    expansion: int = Field(8, ge=1)
    k: int = Field(16, ge=1)
    aux_k: int | None = None
    aux_coef: float = Field(1 / 32, ge=0)
    dead_tokens: int | None = Field(None, ge=1)
    decoder_init_norm: float = Field(0.1, gt=0)
    threshold_momentum: float = Field(0.99, gt=0, lt=1)
    threshold_start: float = Field(0.1, ge=0, lt=1)

    def width(self, d_in: int) -> int:
        d_sae = self.d_sae or self.expansion * d_in
        if self.k >= d_sae:
            raise ValueError(f"k={self.k} must be smaller than the number of latents d_sae={d_sae}")
        return d_sae


class Crosscoder(nn.Module):
    """Encoder ``W_enc [2, d, h]``, decoders ``W_dec [h, 2, d]``, biases; index 0 = base, 1 = fine-tune.

    ``encode`` takes ``[..., 2, d]`` and keeps latents whose scaled activation
    ``f_j * (|d_j^base| + |d_j^ft|)`` exceeds the global ``threshold`` (the inference rule of a
    BatchTopK crosscoder).

    ``meta`` always holds ``layer``, ``site`` and ``hook`` (None when not recorded).
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, threshold: float, meta: dict | None = None):
        super().__init__()
        if W_enc.shape[0] != 2 or W_dec.shape[1] != 2 or W_dec.shape[0] != W_enc.shape[2]:
            raise ValueError(
                f"bad crosscoder shapes W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}"
            )
        self.W_enc, self.b_enc = nn.Parameter(W_enc), nn.Parameter(b_enc)
        self.W_dec, self.b_dec = nn.Parameter(W_dec), nn.Parameter(b_dec)
        self.register_buffer("threshold", torch.as_tensor(float(threshold)))
        self.meta = {"layer": None, "site": None, "hook": None, **(meta or {})}
        self.requires_grad_(False)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[2]

    def decoder_norms(self) -> torch.Tensor:
        """``[h, 2]``: each latent's decoder norm in the base and the fine-tuned model."""
        return self.W_dec.norm(dim=-1)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...md,mdh->...h", x.to(self.W_enc.dtype), self.W_enc) + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (2, self.d_in):
            raise ValueError(
                f"a crosscoder reads [..., 2, {self.d_in}] pairs, got {tuple(x.shape)}"
            )
        f = torch.relu(self.pre_acts(x))
        return f * (f * self.decoder_norms().sum(-1) > self.threshold)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...h,hmd->...md", f, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def side(self, model: int) -> torch.Tensor:
        """Decoder rows ``[h, d]`` of one model (0 = base, 1 = fine-tune)."""
        return self.W_dec[:, model]


class TrainableCrosscoder(nn.Module):
    """A crosscoder under training (BatchTopK on decoder-norm-scaled activations, AuxK)."""

    def __init__(self, d_in: int, cfg: CrosscoderConfig) -> None:
        super().__init__()
        self.cfg, self.d_in, self.d_sae = cfg, d_in, cfg.width(d_in)
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(self.d_sae, 2, d_in, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(2, d_in))
        self.register_buffer("since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.dead_tokens = cfg.dead_tokens or max(cfg.steps * cfg.batch_size // 10, cfg.batch_size)
        self.aux_k = min(cfg.aux_k or max(d_in // 2, 1), self.d_sae)

    def initialise(self, sample: torch.Tensor) -> None:
        with torch.no_grad():
            for m in (BASE, FT):
                self.b_dec[m] = geometric_median(sample[:, m])

    def loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        pre = torch.einsum("bmd,mdh->bh", x, self.W_enc) + self.b_enc
        post = torch.relu(pre)
        scale = self.W_dec.norm(dim=-1).sum(-1)
        scaled = (post * scale).flatten()
        top = scaled.topk(min(self.cfg.k * x.shape[0], scaled.numel())).indices
        keep = torch.zeros_like(scaled, dtype=torch.bool).scatter(0, top, True).view_as(post)
        keep &= post > 0  # fewer than k x batch positive activations: never keep zeros
        f = post * keep
        x_hat = torch.einsum("bh,hmd->bmd", f, self.W_dec) + self.b_dec
        err = (x_hat - x).pow(2).sum(-1)  # [b, 2]
        mse = err.sum(-1).mean()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[keep.any(0)] = 0
            kept = (post * scale)[keep]
            if step >= self.cfg.threshold_start * self.cfg.steps and kept.numel():
                m, low = self.cfg.threshold_momentum, kept.min()
                self.threshold.copy_(
                    low if self.threshold < 0 else m * self.threshold + (1 - m) * low
                )
        aux = self._aux(x, x_hat.detach(), pre)
        var = (x - x.mean(0)).pow(2).sum(-1).mean(0)  # [2]
        fvu = err.detach().mean(0) / var
        dead = (self.since_fired >= self.dead_tokens).float().mean()
        metrics = {
            "mse": float(mse.detach()),
            "fvu": float(fvu.mean()),
            "fvu_base": float(fvu[0]),
            "fvu_ft": float(fvu[1]),
            "l0": float(keep.sum(-1).float().mean()),
            "dead": float(dead),
            "aux": float(aux.detach()),
        }
        return mse + self.cfg.aux_coef * aux, metrics

    def _aux(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.aux_coef == 0:
            return torch.zeros((), device=x.device)
        e = x - x_hat
        scaled = torch.relu(pre) * self.W_dec.norm(dim=-1).sum(
            -1
        )  # rank as the main selection does
        top = scaled.masked_fill(~dead, float("-inf")).topk(min(self.aux_k, n_dead), dim=-1)
        f_aux = torch.zeros_like(pre).scatter(
            -1, top.indices, torch.relu(pre).gather(-1, top.indices)
        )
        e_hat = torch.einsum("bh,hmd->bmd", f_aux, self.W_dec)
        return (e_hat - e).pow(2).sum((-1, -2)).mean() / (e - e.mean(0)).pow(2).sum((-1, -2)).mean()

    def before_step(self) -> None:
        return None

    def after_step(self) -> None:
        return None

    def to_crosscoder(self, meta: dict | None = None) -> Crosscoder:
        thr = exported_threshold(self.threshold)
        p = {k: v.detach().clone() for k, v in self.named_parameters()}
        return Crosscoder(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], thr, meta)


def train_crosscoder(
    source: ActivationSource,
    cfg: CrosscoderConfig | None = None,
    out: str | Path | None = None,
    *,
    meta: dict | None = None,
    progress: bool = True,
) -> tuple[Crosscoder, TrainingLog]:
    """Train on paired ``[n, 2, d]`` activations (index 0 base, 1 fine-tune); resumable under
    ``out``, where the crosscoder is saved (``crosscoder.safetensors`` + ``cfg.json``).

    ``meta`` records where the activations were read, ``{"layer": L, "site": S}`` (plus anything
    JSON-able), filled from the source's read spec when it has one; the crosscoder's ``meta``
    adds the hook name ``blocks.L.hook_S``."""
    cfg = cfg or CrosscoderConfig()
    meta = dict(meta or {})
    layer, site = source_point(source, meta.get("layer"), meta.get("site"), "train_crosscoder")
    meta.update({k: v for k, v in (("layer", layer), ("site", site)) if v is not None})
    meta = _placed(meta, "train_crosscoder(meta=...)", InputError)
    sample = source.sample(1)
    if sample.ndim != 3 or sample.shape[1] != 2:
        raise ValueError(
            f"a crosscoder trains on paired activations [n, 2, d], got {tuple(sample.shape)}; two "
            "models of different widths cannot be paired"
        )
    module = TrainableCrosscoder(source.width, cfg)
    ident = {"d_in": source.width, "meta": meta}
    log = fit(module, source, cfg, out, identity=ident, progress=progress, desc="crosscoder")
    cc = module.to_crosscoder({**meta, "config": cfg.model_dump()})
    if out is not None:
        save_crosscoder(cc, out)
        plot_history(log, Path(out) / "training.png", "BatchTopK crosscoder")
    return cc, log


def _placed(meta: dict, where, error: type[Exception]) -> dict:
    """``meta`` with its layer, site and hook checked against each other and completed."""
    return {
        **meta,
        **locate(meta.get("hook"), meta.get("layer"), meta.get("site"), where=where, error=error),
    }


def save_crosscoder(cc: Crosscoder, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = {
        k: getattr(cc, k).detach().float().contiguous().cpu()
        for k in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    save_file(t, str(folder / "crosscoder.safetensors"))
    cfg = {
        "format": "emdiff_crosscoder",
        "architecture": "batchtopk",
        "d_in": cc.d_in,
        "d_sae": cc.d_sae,
        "threshold": float(cc.threshold),
        "models": ["base", "finetune"],
        **{k: cc.meta.get(k) for k in ("layer", "site", "hook")},
        "meta": cc.meta,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2, default=str))
    return folder


def load_crosscoder(folder: str | Path) -> Crosscoder:
    """Read a folder written by :func:`save_crosscoder`; a missing file or key, a truncated file
    or a NaN weight raises :class:`CrosscoderFormatError` (or ``NonFiniteError``) naming it."""
    folder = Path(folder)
    cpath, wpath = folder / "cfg.json", folder / "crosscoder.safetensors"
    for p in (wpath, cpath):
        if not p.is_file():
            raise CrosscoderFormatError(f"{p} is missing: not an emdiff crosscoder folder")
    cfg = read_json(cpath, CrosscoderFormatError)
    for key in ("threshold", "d_in", "d_sae"):
        require(cfg, key, cpath, "emdiff crosscoder config", CrosscoderFormatError)
    t = load_safetensors(wpath, CrosscoderFormatError)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in t]
    if missing:
        raise CrosscoderFormatError(f"{wpath}: missing tensor(s) {missing}; has {sorted(t)}")
    recorded = {k: cfg[k] for k in ("layer", "site", "hook") if cfg.get(k) is not None}
    meta = _placed({**(cfg.get("meta") or {}), **recorded}, cpath, CrosscoderFormatError)
    try:
        cc = Crosscoder(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], cfg["threshold"], meta)
    except ValueError as e:
        raise CrosscoderFormatError(f"{wpath}: {e}") from None
    if cc.d_in != cfg["d_in"] or cc.d_sae != cfg["d_sae"]:
        raise CrosscoderFormatError(f"{cpath}: d_in/d_sae disagree with the weights in {wpath}")
    return cc
