"""BatchTopK crosscoder: planted shared / fine-tune-only / base-only latents are told apart."""

from __future__ import annotations

import pytest
import torch

from emdiff.dictionaries.activations import TensorSource
from emdiff.dictionaries.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    load_crosscoder,
    train_crosscoder,
)
from emdiff.dictionaries.latent_scaling import latent_scaling, relative_norm_difference


def paired(n: int = 6000, d: int = 16, seed: int = 0):
    """Base/fine-tune pairs from 12 shared, 4 fine-tune-only and 4 base-only directions."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(20, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    codes = (torch.rand(n, 20, generator=g) < 0.12) * (0.5 + torch.rand(n, 20, generator=g))
    base = codes[:, :12] @ D[:12] + codes[:, 16:] @ D[16:]
    ft = codes[:, :12] @ D[:12] + codes[:, 12:16] @ D[12:16]
    return torch.stack([base, ft], 1) + 0.5, D


def test_crosscoder_separates_shared_and_model_specific_latents(tmp_path):
    x, D = paired()
    cfg = CrosscoderConfig(d_sae=40, k=3, steps=800, batch_size=256, lr=4e-3, warmup_steps=20)
    cc, log = train_crosscoder(TensorSource(x), cfg, tmp_path / "cc", progress=False)
    assert log.history[-1]["fvu"] < 0.2
    table = latent_scaling(cc, x.split(1000))
    best = (torch.nn.functional.normalize(cc.W_dec.sum(1), dim=-1) @ D.T).argmax(0)  # per planted
    cls = table["class"].to_numpy()
    dn = relative_norm_difference(cc)
    assert all(cls[int(i)] == "shared" for i in best[:12]), (cls[best[:12].numpy()], dn[best[:12]])
    assert all(cls[int(i)] == "ft_only" for i in best[12:16]), (
        cls[best[12:16].numpy()],
        dn[best[12:16]],
    )
    assert all(cls[int(i)] == "base_only" for i in best[16:]), (
        cls[best[16:].numpy()],
        dn[best[16:]],
    )
    back = load_crosscoder(tmp_path / "cc")
    assert torch.equal(back.encode(x[:100]), cc.encode(x[:100]))
    assert (tmp_path / "cc" / "training.png").is_file()


def test_latent_scaling_recovers_a_planted_beta():
    """Base activations hold the fine-tune latent's direction at 0.3 of its strength (complete
    shrinkage): the crosscoder leaves it in the base error, and nu_eps reads back 0.3."""
    g = torch.Generator().manual_seed(0)
    d = 8
    v = torch.zeros(d)
    v[0] = 1.0
    f = torch.rand(5000, generator=g) * (torch.rand(5000, generator=g) < 0.3)
    noise = torch.randn(5000, 2, d, generator=g) * 0.05
    noise[..., 0] = 0
    x = noise.clone()
    x[:, 1] += f[:, None] * v  # fine-tune: the latent, full strength
    x[:, 0] += 0.3 * f[:, None] * v  # base: the same direction, weaker
    W_enc = torch.zeros(2, d, 1)
    W_enc[1, 0, 0] = 1.0  # reads the fine-tune activation
    W_dec = torch.zeros(1, 2, d)
    W_dec[0, 1] = v  # decodes into the fine-tune model only
    cc = Crosscoder(W_enc, torch.zeros(1), W_dec, torch.zeros(2, d), threshold=0.0)
    row = latent_scaling(cc, x.split(999)).iloc[0]
    assert row["dn"] == pytest.approx(1.0)
    assert row["beta_eps_ft_dft"] == pytest.approx(1.0, abs=1e-4)
    assert row["nu_eps"] == pytest.approx(0.3, abs=1e-3)
    assert row["class"] == "shared"  # flagged: the base model does have the direction


def test_crosscoder_rejects_unpaired_or_mismatched_input():
    with pytest.raises(ValueError, match=r"paired activations \[n, 2, d\]"):
        train_crosscoder(TensorSource(torch.randn(100, 16)), CrosscoderConfig(d_sae=32, k=2))
    with pytest.raises(ValueError, match="k=32 must be smaller"):
        train_crosscoder(TensorSource(torch.randn(100, 2, 16)), CrosscoderConfig(d_sae=32, k=32))
    cc = Crosscoder(
        torch.zeros(2, 16, 4), torch.zeros(4), torch.zeros(4, 2, 16), torch.zeros(2, 16), 0.0
    )
    with pytest.raises(ValueError, match=r"reads \[..., 2, 16\] pairs"):
        cc.encode(torch.zeros(3, 2, 8))
