"""Which model a crosscoder latent belongs to: decoder norms and latent scaling.

- **Relative decoder-norm difference** ``dn_j = ((|d_ft| - |d_base|) / max(|d_ft|, |d_base|) + 1) / 2``:
  0 for a base-only latent, 1 for a fine-tune-only latent, 0.5 for a shared one.
- **Latent scaling** (Minder et al.): for latent ``j`` with decoder direction ``d`` (the fine-tune
  decoder for a fine-tune-only candidate, the base one for a base-only candidate), the closed-form
  least-squares scale ``beta = sum_x f_j (d . y) / (|d|^2 sum_x f_j^2)`` against four targets
  ``y``: each model's reconstruction ``x_hat_m`` and each model's error with latent ``j``'s own
  term put back (``x_m - x_hat_m + f_j d_j^m``); both are about 1 in the latent's own model. The ratios
  ``nu_r = beta_r(other) / beta_r(own)`` and ``nu_eps = beta_eps(other) / beta_eps(own)`` are
  near zero for a latent that is truly specific to one model; a high ``nu_eps`` means the other
  model does contain the direction but the crosscoder left it in the error (complete shrinkage),
  a high ``nu_r`` that other latents reconstruct it there (latent decoupling).

  emdiff fits each beta *with an intercept* (a covariance over all tokens, not the paper's raw
  sum over active tokens): with nonnegative codes, the decoder bias and the mean of the other
  latents otherwise load on every latent's direction equally in both models, which pushes
  ``nu_r`` towards 1 for every latent.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch
from pydantic import BaseModel

from emdiff.dictionaries.crosscoder import BASE, FT, Crosscoder


def relative_norm_difference(cc: Crosscoder) -> torch.Tensor:
    """``[h]``: 0 = base-only, 0.5 = shared, 1 = fine-tune-only."""
    n = cc.decoder_norms()
    return ((n[:, FT] - n[:, BASE]) / n.max(-1).values.clamp_min(1e-12) + 1) / 2


class ScalingThresholds(BaseModel):
    """Cut-offs of the latent classes (emdiff's defaults; tune them on your own data)."""

    specific: float = 0.9
    """``dn >= specific``: fine-tune-only candidate; ``dn <= 1 - specific``: base-only candidate."""
    shared_band: float = 0.1
    """``|dn - 0.5| <= shared_band``: shared."""
    nu_eps: float = 0.2
    nu_r: float = 0.5


@torch.no_grad()
def latent_scaling(
    cc: Crosscoder,
    batches: Iterable[torch.Tensor],
    thresholds: ScalingThresholds | None = None,
) -> pd.DataFrame:
    """Per-latent table: decoder norms, ``dn``, the eight betas, ``nu_eps``, ``nu_r`` and the class
    (``ft_only``, ``base_only``, ``shared``, ``other``), from paired batches ``[n, 2, d]``.

    A candidate whose other model reconstructs its direction (``nu_eps`` or ``nu_r`` above the
    thresholds) is classed ``shared``: latent scaling shows the direction is present in both.
    """
    th = thresholds or ScalingThresholds()
    h = cc.d_sae
    D = cc.W_dec  # [h, 2, d]
    # sums over tokens for a least-squares fit with intercept: [direction, target model, kind]
    kw = dict(dtype=torch.float64, device=D.device)
    s_fy = torch.zeros(2, 2, 2, h, **kw)
    s_y = torch.zeros(2, 2, 2, h, **kw)
    s_f = torch.zeros(h, **kw)
    s_f2 = torch.zeros(h, **kw)
    n = 0
    n_active = torch.zeros(h, dtype=torch.long, device=D.device)
    for x in batches:
        x = x.to(D.device, D.dtype)
        f = cc.encode(x)
        x_hat = cc.decode(f)
        n += len(x)
        s_f += f.double().sum(0)
        s_f2 += f.double().pow(2).sum(0)
        n_active += (f > 0).sum(0)
        for dirn in (BASE, FT):
            d = D[:, dirn]  # [h, d]
            for m in (BASE, FT):
                own = (D[:, m] * d).sum(-1)  # d_j^m . d_j
                rec = x_hat[:, m] @ d.T  # d . x_hat_m
                eps = (x[:, m] - x_hat[:, m]) @ d.T + f * own
                for kind, y in ((0, rec), (1, eps)):
                    s_fy[dirn, m, kind] += (f * y).double().sum(0)
                    s_y[dirn, m, kind] += y.double().sum(0)
    cov = s_fy - s_f * s_y / max(n, 1)
    var_f = s_f2 - s_f.pow(2) / max(n, 1)
    dn2 = D.double().pow(2).sum(-1)  # [h, 2]
    beta = (cov / (dn2.T[:, None, None, :] * var_f.clamp_min(1e-30))).cpu()
    n_active = n_active.cpu()
    norms = cc.decoder_norms().double().cpu()
    dn = relative_norm_difference(cc).double().cpu()
    table = pd.DataFrame(
        {
            "latent": range(h),
            "norm_base": norms[:, BASE],
            "norm_ft": norms[:, FT],
            "dn": dn,
            "n_active": n_active,
        }
    )
    for dirn, dname in ((BASE, "dbase"), (FT, "dft")):
        for m, mname in ((BASE, "base"), (FT, "ft")):
            table[f"beta_r_{mname}_{dname}"] = beta[dirn, m, 0].numpy()
            table[f"beta_eps_{mname}_{dname}"] = beta[dirn, m, 1].numpy()
    ft_cand = dn >= th.specific
    base_cand = dn <= 1 - th.specific
    # the ratio is other-model / own-model, read with the candidate's own decoder direction
    nu_r = torch.where(
        base_cand, beta[BASE, FT, 0] / beta[BASE, BASE, 0], beta[FT, BASE, 0] / beta[FT, FT, 0]
    )
    nu_e = torch.where(
        base_cand, beta[BASE, FT, 1] / beta[BASE, BASE, 1], beta[FT, BASE, 1] / beta[FT, FT, 1]
    )
    table["nu_r"], table["nu_eps"] = nu_r.numpy(), nu_e.numpy()
    specific = (nu_e.abs() < th.nu_eps) & (nu_r.abs() < th.nu_r)
    cls = pd.Series("other", index=table.index)
    cls[((dn - 0.5).abs() <= th.shared_band).numpy()] = "shared"
    cls[((ft_cand | base_cand) & ~specific).numpy()] = "shared"
    cls[(ft_cand & specific).numpy()] = "ft_only"
    cls[(base_cand & specific).numpy()] = "base_only"
    cls[(n_active == 0).numpy()] = "dead"
    table["class"] = cls
    return table
