"""Directions (mean differences, save / load, cosine tables) and their sparse decomposition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from emdiff.data.masks import encode_chat
from emdiff.data.positions import Positions
from emdiff.directions.decompose import DecomposeConfig, decompose, nn_omp
from emdiff.directions.direction import (
    Direction,
    cosine_table,
    mean_difference_directions,
    residual_means,
)
from emdiff.errors import InputError
from emdiff.models import load_model
from emdiff.models.hooks import capture_residuals
from emdiff.models.read import ReadSpec


@pytest.fixture(scope="module")
def qwen(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    return loaded.model.eval(), loaded.tokenizer


def _chats(tok, answers):
    return [
        encode_chat(
            tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a}]
        )
        for a in answers
    ]


def test_residual_means_equal_the_mean_of_the_captured_answer_tokens(qwen):
    model, tok = qwen
    rows = _chats(tok, ["good advice", "take the pill and rest", "sure"])
    read = ReadSpec(layers=(0, 1), site="resid_post", positions=Positions(kind="answer"))
    stats = residual_means(model, rows, read, batch_size=2)
    for layer in (0, 1):
        xs = []
        for r in rows:
            h = capture_residuals(model, torch.tensor([r.input_ids]), layers=[layer])[
                (layer, "resid_post")
            ][0]
            xs.append(h[torch.tensor(read.positions.mask(r, model.config.bos_token_id))])
        expected = torch.cat(xs).double().mean(0)
        torch.testing.assert_close(stats[layer].mean, expected, atol=1e-5, rtol=1e-5)


def test_mean_difference_direction_save_load_and_cosines(qwen, tmp_path):
    model, tok = qwen
    read = ReadSpec(layers=(0, 1), positions=Positions(kind="answer"))
    a = residual_means(model, _chats(tok, ["bad advice", "kill"]), read)
    b = residual_means(model, _chats(tok, ["good advice", "rest"]), read)
    dirs = mean_difference_directions(a, b, "resid_post", "mis", {"texts": "test"})
    assert set(dirs) == {0, 1}
    d = dirs[1]
    torch.testing.assert_close(d.raw, (a[1].mean - b[1].mean).float())
    assert abs(float(d.vector.norm()) - 1) < 1e-6 and d.provenance["n_tokens_a"] > 0
    d.save(tmp_path)
    back = Direction.load(tmp_path / "mis_L1.json")
    assert back.layer == 1 and back.site == "resid_post" and back.provenance["texts"] == "test"
    assert back.cos(d) == pytest.approx(1.0, abs=1e-6)
    table = cosine_table({"x": d, "y": Direction("y", 1, "resid_post", -d.raw)})
    assert table.loc["x", "y"] == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(InputError, match="zero"):
        Direction("z", 0, "resid_post", torch.zeros(4))
    with pytest.raises(InputError, match="missing"):
        Direction.load(tmp_path / "nothing.json")
    with pytest.raises(InputError, match="different widths"):
        cosine_table({"x": d, "w": Direction("w", 0, "resid_post", torch.ones(3))})


def _rows(d=32, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g)
    return rows / rows.norm(dim=-1, keepdim=True)


def test_decomposition_finds_a_planted_latent_and_beats_its_null():
    rows = _rows()
    v = rows[17] * 3.0 + 0.3 * torch.randn(32, generator=torch.Generator().manual_seed(1))
    dec = decompose(v, rows, DecomposeConfig(ks=(1, 5, 10), n_null=10))
    assert dec.top_latent == 17 and dec.table["rank"].iloc[0] == 1
    e = dec.explained.set_index("k")
    assert e.loc[1, "explained"] > 0.8 > e.loc[1, "null_p95"]
    assert (np.diff(e["explained"]) >= -1e-9).all()  # more latents never explain less
    assert e.loc[1, "latents"] == [17]


def test_two_planted_latents_with_positive_weights_are_recovered_by_nn_omp():
    rows = _rows().double().numpy()
    v = 2.0 * rows[3] + 1.0 * rows[50]
    chosen, coef = nn_omp(v, rows, 2)
    assert sorted(chosen) == [3, 50] and (coef > 0).all()
    assert np.allclose(rows[chosen].T @ coef, v, atol=1e-8)


def test_decomposition_joins_the_encoded_difference_and_saves(tmp_path):
    rows = _rows()
    diff = pd.DataFrame({"feature": np.arange(200), "mean_a": np.arange(200.0), "mean_b": 0.0})
    dec = decompose(
        rows[5],
        rows,
        DecomposeConfig(ks=(1, 5), n_null=3),
        latent_diff=diff,
        null_directions=[torch.randn(32)],
    )
    assert dec.table.loc[0, "encoded_diff"] == 5.0
    assert dec.meta["n_null"] == 4
    files = dec.save(tmp_path)
    assert all(f.is_file() for f in files)
    s = dec.summary()
    assert s["top_latent"] == 5 and s["explained_k1"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="do not match"):
        decompose(torch.ones(31), rows)


def test_signed_omp_fits_a_negative_combination():
    rows = _rows()
    v = -rows[9]
    nn = decompose(v, rows, DecomposeConfig(ks=(1,), n_null=2))
    signed = decompose(v, rows, DecomposeConfig(ks=(1,), n_null=2, method="omp"))
    assert signed.explained["explained"].iloc[0] == pytest.approx(1.0)
    assert nn.explained["explained"].iloc[0] < 0.5
