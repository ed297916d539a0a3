"""Train TopK, BatchTopK and Matryoshka BatchTopK SAEs, and save them in the SAELens layout.

- **TopK** (Gao et al. 2024): keep each token's ``k`` largest pre-activations, then ReLU.
- **BatchTopK** (Bussmann et al. 2024): keep the ``k x batch`` largest ReLU'd pre-activations of the
  whole batch. Inference uses one global threshold, an exponential moving average of the smallest
  activation kept in each training batch, so the saved SAE is a JumpReLU with every threshold
  equal (as SAELens and dictionary_learning save it).
- **Matryoshka BatchTopK** (Bussmann et al. 2025; Nabeshima 2024): BatchTopK codes, but the loss is
  the mean reconstruction error over nested prefixes of the latents (``matryoshka_widths``), so
  the first latents learn general features on their own.

All three: decoder rows held at unit norm (the gradient along each row is removed before the step
and rows are renormalised after), ``b_dec`` initialised at the geometric median of a data sample,
encoder initialised as the decoder's transpose, and the AuxK loss (Gao et al.) that lets latents
dead for ``dead_tokens`` tokens reconstruct the residual error.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import save_file
from torch import nn

from emdiff.dictionaries.activations import ActivationSource, source_point
from emdiff.dictionaries.base import DictionaryMeta, Encoding, Site, SparseDictionary
from emdiff.dictionaries.hooknames import site_hook
from emdiff.dictionaries.sparse_codes import (
    Codes,
    decode,
    gather_codes,
    select_among,
    select_batchtopk,
    select_topk,
)
from emdiff.dictionaries.train import (
    LoopConfig,
    TrainingLog,
    exported_threshold,
    fit,
    plot_history,
)

Architecture = Literal["topk", "batchtopk", "matryoshka"]
SAELENS_VERSION = "6.5.1"
"""The SAELens release whose ``cfg.json`` layout :func:`save_saelens` writes."""


class SAEConfig(LoopConfig):
    """Architecture and training settings of an SAE."""

    architecture: Architecture = "batchtopk"
    d_sae: int | None = Field(None, ge=1)
    """Number of latents; None means ``expansion x d_in``."""
    expansion: int = Field(8, ge=1)
    k: int = Field(16, ge=1)
    """Active latents per token (on average, for the batch variants)."""
    matryoshka_widths: list[int] | None = None
    """Nested prefix sizes, increasing, the last equal to ``d_sae``; None: d_sae/16, /8, /4, /2, 1."""
    aux_k: int | None = None
    """Latents the AuxK loss may use; None means ``d_in // 2``."""
    aux_coef: float = Field(1 / 32, ge=0)
    dead_tokens: int | None = Field(None, ge=1)
    """A latent is dead after this many tokens without firing; None: a tenth of the run."""
    threshold_momentum: float = Field(0.99, gt=0, lt=1)
    threshold_start: float = Field(0.1, ge=0, lt=1)
    """Share of the run after which the BatchTopK threshold starts to be tracked."""

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.matryoshka_widths is not None:
            w = self.matryoshka_widths
            if not w or any(b <= a for a, b in pairwise(w)) or w[0] < 1:
                raise ValueError(f"matryoshka_widths must be increasing and >= 1, got {w}")
        return self

    def width(self, d_in: int) -> int:
        """The number of latents for inputs of width ``d_in`` (checked against ``k``)."""
        d_sae = self.d_sae or self.expansion * d_in
        if self.k >= d_sae:
            raise ValueError(f"k={self.k} must be smaller than the number of latents d_sae={d_sae}")
        return d_sae

    def prefixes(self, d_sae: int) -> list[int]:
        if self.architecture != "matryoshka":
            return [d_sae]
        w = self.matryoshka_widths or sorted({max(1, d_sae // f) for f in (16, 8, 4, 2, 1)})
        if w[-1] != d_sae:
            raise ValueError(f"the last matryoshka width must equal d_sae={d_sae}, got {w}")
        return list(w)


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to rows of x."""
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=-1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < eps * max(1.0, float(m.norm())):
            return new
        m = new
    return m


class TrainableSAE(nn.Module):
    """An SAE under training; :meth:`to_dictionary` gives the inference-time dictionary."""

    def __init__(
        self, d_in: int, cfg: SAEConfig, layer: int | None = None, site: Site | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.layer, self.site = cfg, layer, site
        self.d_in, self.d_sae = d_in, cfg.width(d_in)
        self.prefix = cfg.prefixes(self.d_sae)
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(self.d_sae, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # the encoder is held transposed, [d_sae, d_in]: its active rows are gathered per token
        self.W_enc_T = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(-1.0))
        total = cfg.steps * cfg.batch_size
        self.dead_tokens = cfg.dead_tokens or max(total // 10, cfg.batch_size)
        self.aux_k = min(cfg.aux_k or max(d_in // 2, 1), self.d_sae)

    # ---- the pieces of a step -----------------------------------------------------------------
    def initialise(self, sample: torch.Tensor) -> None:
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(sample))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc_T.t())

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The active (token, latent) entries of a ``[B, d_sae]`` batch of pre-activations."""
        if self.cfg.architecture == "topk":
            return select_topk(pre, self.cfg.k)
        return select_batchtopk(pre, self.cfg.k)

    def encode_train(
        self, x: torch.Tensor, xc: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Codes]:
        """Dense pre-activations (no autograd) and the training-time sparse codes of ``x``
        (``xc``: ``x - b_dec`` when the caller already has it)."""
        xc = x - self.b_dec if xc is None else xc
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, xc, self.W_enc_T.t())
        rows, cols = self.select(pre)
        return pre, gather_codes(pre, rows, cols, (xc, self.W_enc_T, self.b_enc))

    def loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        xc = x - self.b_dec
        pre, codes = self.encode_train(x, xc)
        if len(self.prefix) == 1:
            x_hat = decode(codes, self.W_dec) + self.b_dec
            mse = (x_hat - x).pow(2).sum(-1).mean()
        else:  # mean over nested prefixes of the reconstruction error
            x_hat, mses = self.b_dec.expand_as(x), []
            start = 0
            for end in self.prefix:
                x_hat = x_hat + decode(codes, self.W_dec, (start, end))
                mses.append((x_hat - x).pow(2).sum(-1).mean())
                start = end
            mse = torch.stack(mses).mean()
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[codes.fired()] = 0
            self._track_threshold(codes.vals, step)
        aux = self._aux_loss(x, xc, x_hat.detach(), pre)
        total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
        dead = self.since_fired >= self.dead_tokens
        metrics = {
            "mse": float(mse.detach()),
            "fvu": float((x_hat - x).detach().pow(2).sum(-1).mean() / total_var),
            "l0": codes.l0(),
            "dead": float(dead.float().mean()),
            "aux": float(aux.detach()),
        }
        return mse + self.cfg.aux_coef * aux, metrics

    def _track_threshold(self, vals: torch.Tensor, step: int) -> None:
        if self.cfg.architecture == "topk" or step < self.cfg.threshold_start * self.cfg.steps:
            return
        kept = vals[vals > 0]
        if kept.numel() == 0:
            return
        low = kept.min()
        m = self.cfg.threshold_momentum
        self.threshold.copy_(low if self.threshold < 0 else m * self.threshold + (1 - m) * low)

    def _aux_loss(
        self, x: torch.Tensor, xc: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor
    ) -> torch.Tensor:
        """AuxK: the dead latents' top ``aux_k`` codes reconstruct the residual error (``xc`` is
        ``x - b_dec``, the encoder's input)."""
        dead = (self.since_fired >= self.dead_tokens).nonzero().squeeze(1)
        if len(dead) == 0 or self.cfg.aux_coef == 0:
            return torch.zeros((), device=x.device)
        err = x - x_hat
        rows, cols = select_among(pre, dead, self.aux_k)
        encoder = (xc, self.W_enc_T, self.b_enc)
        err_hat = decode(gather_codes(pre, rows, cols, encoder), self.W_dec)
        return (err_hat - err).pow(2).sum(-1).mean() / (err - err.mean(0)).pow(2).sum(-1).mean()

    def before_step(self) -> None:
        g = self.W_dec.grad
        if g is not None:  # remove the gradient component that would change a row's norm
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    def after_step(self) -> None:
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    # ---- inference ----------------------------------------------------------------------------
    def to_dictionary(self, meta: DictionaryMeta | None = None) -> SparseDictionary:
        """The inference-time dictionary: TopK, or JumpReLU at the tracked global threshold."""
        meta = meta or DictionaryMeta(
            format="emdiff",
            architecture=self.cfg.architecture,
            layer=self.layer,
            site=self.site,
        )
        p = {k: v.detach().clone() for k, v in self.named_parameters()}
        p["W_enc"] = p.pop("W_enc_T").t().contiguous()
        if self.cfg.architecture == "topk":
            return SparseDictionary(
                p["W_enc"],
                p["b_enc"],
                p["W_dec"],
                p["b_dec"],
                encoding=Encoding(activation="topk", k=self.cfg.k, subtract_b_dec=True),
                meta=meta,
            )
        thr = exported_threshold(self.threshold)
        return SparseDictionary(
            p["W_enc"],
            p["b_enc"],
            p["W_dec"],
            p["b_dec"],
            encoding=Encoding(activation="jumprelu", subtract_b_dec=True),
            tensors={"threshold": torch.full((self.d_sae,), thr, device=self.W_dec.device)},
            meta=meta,
        )


def save_saelens(
    sae: SparseDictionary,
    folder: str | Path,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` as SAELens 6 does (TopK or JumpReLU).

    ``metadata.hook_name`` is ``hook_name`` when given, else ``blocks.{layer}.hook_{site}`` from
    the dictionary's meta (its raw hook when it has no site). ``extra`` goes to
    ``emdiff_training.json`` beside them (SAELens ignores that file).
    """
    if sae.activation not in ("topk", "jumprelu"):
        raise ValueError(f"save_saelens writes topk and jumprelu SAEs, not {sae.activation!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = sae.meta
    hook = hook_name or site_hook(m.layer, m.site) or m.hook
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    cfg: dict = {
        "architecture": sae.activation,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.subtract_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name or sae.meta.model_name,
            "hook_name": hook,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": None,
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
        },
    }
    if sae.activation == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    else:
        tensors["threshold"] = sae.threshold
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
        str(folder / "sae_weights.safetensors"),
    )
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))
    if extra is not None:
        (folder / "emdiff_training.json").write_text(json.dumps(extra, indent=2, default=str))
    return folder


def train_sae(
    source: ActivationSource,
    cfg: SAEConfig | None = None,
    out: str | Path | None = None,
    *,
    layer: int | None = None,
    site: Site | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> tuple[SparseDictionary, TrainingLog]:
    """Train an SAE on ``source``; with ``out``, checkpoint there and save the SAELens folder.

    The dictionary records where its activations were read: the source's read spec
    (:class:`~emdiff.dictionaries.activations.ModelSource`), or ``layer`` / ``site`` for a source
    without one (left unknown when not given; never guessed). Returns the inference dictionary
    and the training log. Rerunning with the same ``out`` resumes from the last checkpoint.
    """
    cfg = cfg or SAEConfig()
    layer, site = source_point(source, layer, site, "train_sae")
    sae = TrainableSAE(source.width, cfg, layer, site)
    ident = {"d_in": source.width, "layer": layer, "site": site}
    log = fit(
        sae, source, cfg, out, identity=ident, progress=progress, desc=f"SAE {cfg.architecture}"
    )
    meta = DictionaryMeta(
        format="emdiff",
        architecture=cfg.architecture,
        layer=layer,
        site=site,
        model_name=model_name,
        path=str(out) if out else None,
    )
    d = sae.to_dictionary(meta)
    if out is not None:
        extra = {
            "config": cfg.model_dump(),
            "architecture": cfg.architecture,
            "matryoshka_widths": sae.prefix if len(sae.prefix) > 1 else None,
            "threshold": float(sae.threshold),
            "dead_fraction": float((sae.since_fired >= sae.dead_tokens).float().mean()),
            "log": log.model_dump(),
        }
        save_saelens(d, out, model_name=model_name, extra=extra)
        plot_history(
            log, Path(out) / "training.png", f"{cfg.architecture} SAE, layer {layer} {site}"
        )
    return d, log
