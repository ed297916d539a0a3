"""Ground truth of the toy: the persona direction (a probe) and the dictionary latent that matches it.

Every pretraining document of the toy world is written by one persona, so each token's label is
known. A logistic-regression probe per layer, fitted on the residual stream of held-in documents
and scored on held-out ones, gives the *true persona direction* (its unit weight vector, pointing
to "toxic"). The *persona feature* of a dictionary is the latent whose decoder row has the highest
cosine with that direction.

Which tokens the probe reads matters: the persona is decided by the documents' answers, so before
the first answer there is nothing to read. By default the probe reads the ``<assistant>`` tokens
after the first answer, the positions where the model must use the persona to choose the next
answer (``tokens="after_first_answer"`` reads every token after the first answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from emdiff.data.masks import pad_batch
from emdiff.data.positions import Positions
from emdiff.dictionaries.activations import collect_activations
from emdiff.models.hooks import Site, capture_residuals
from emdiff.models.read import ReadSpec
from emdiff.toy.world import World

ProbeTokens = Literal["assistant", "after_first_answer"]


def persona_corpus(world: World, n_docs: int, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """``n_docs`` pretraining documents and their personas (True = toxic)."""
    rng = np.random.default_rng(seed)
    docs = [world.persona_document(rng) for _ in range(n_docs)]
    return [d for d, _ in docs], np.array([t for _, t in docs], dtype=bool)


def probe_mask(
    world: World, rows: list[list[int]], keys: torch.Tensor, tokens: ProbeTokens
) -> np.ndarray:
    """Which captured tokens (``keys`` = (row, position)) the probe reads."""
    asst = world.token_id["<assistant>"]
    first = np.array([r.index(asst) + 1 if asst in r else len(r) for r in rows])
    seq, pos = keys[:, 0].numpy(), keys[:, 1].numpy()
    after = pos > first[seq]
    if tokens == "after_first_answer":
        return after
    tok = np.array([rows[s][p] for s, p in zip(seq, pos, strict=True)])
    return after & (tok == asst)


@dataclass
class PersonaProbe:
    """A fitted persona probe at one hook point."""

    layer: int
    site: str
    accuracy: float
    """Held-out accuracy (documents not used for fitting)."""
    chance: float
    """Accuracy of always answering the majority persona on the held-out tokens."""
    direction: torch.Tensor
    """Unit weight vector, pointing to the toxic persona."""
    mean_difference: torch.Tensor
    """Unit toxic-minus-helpful difference of the class means (training documents)."""
    mean_difference_cosine: float
    """Cosine between ``direction`` and ``mean_difference``."""
    n_train: int
    n_test: int


def fit_probe(
    acts: np.ndarray, labels: np.ndarray, groups: np.ndarray, C: float, test_fraction: float = 0.25
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Logistic regression with a held-out split by ``groups`` (documents).

    Returns ``(accuracy, chance, unit weight vector, unit difference of the class means)``.
    """
    from sklearn.linear_model import LogisticRegression

    cut = np.quantile(np.unique(groups), 1 - test_fraction)
    train, test = groups < cut, groups >= cut
    if labels[train].all() or not labels[train].any():
        raise ValueError("the probe's training split holds only one persona; use more documents")
    clf = LogisticRegression(C=C, max_iter=5000).fit(acts[train], labels[train])
    w = clf.coef_[0] / np.linalg.norm(clf.coef_[0])
    dmu = acts[train][labels[train]].mean(0) - acts[train][~labels[train]].mean(0)
    chance = max(labels[test].mean(), 1 - labels[test].mean())
    dmu = dmu / max(float(np.linalg.norm(dmu)), 1e-12)  # zero where both classes look alike
    return float(clf.score(acts[test], labels[test])), float(chance), w, dmu


def persona_probes(
    model: torch.nn.Module,
    world: World,
    points: list[tuple[int, Site]],
    *,
    n_docs: int = 3000,
    seed: int = 0,
    tokens: ProbeTokens = "assistant",
    C: float = 1.0,
) -> list[PersonaProbe]:
    """One probe per ``(layer, site)`` on ``n_docs`` fresh documents (a quarter held out)."""
    rows, labels = persona_corpus(world, n_docs, seed + 10_000)
    out = []
    for layer, site in points:
        read = ReadSpec(
            layers=(layer,), site=site, positions=Positions(kind="all", exclude_sinks=False)
        )
        acts, keys = collect_activations(model, rows, read)
        m = probe_mask(world, rows, keys, tokens)
        seq = keys[:, 0].numpy()[m]
        acc, chance, w, dmu = fit_probe(acts.numpy()[m].astype(np.float64), labels[seq], seq, C)
        n_test = int((seq >= np.quantile(np.unique(seq), 0.75)).sum())
        out.append(
            PersonaProbe(
                layer,
                site,
                acc,
                chance,
                torch.tensor(w, dtype=torch.float32),
                torch.tensor(dmu, dtype=torch.float32),
                float(w @ dmu),
                len(seq) - n_test,
                n_test,
            )
        )
    return out


@torch.no_grad()
def class_mean_differences(
    model: torch.nn.Module,
    world: World,
    points: list[tuple[int, Site]],
    *,
    n_docs: int = 2000,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[tuple[int, Site], torch.Tensor]:
    """The unit toxic-minus-helpful difference of the class means at every point, from one
    forward pass per batch over ``n_docs`` fresh documents, read at the ``<assistant>`` tokens
    after the first answer (the probe's tokens)."""
    rows, labels = persona_corpus(world, n_docs, seed + 10_000)
    asst = world.token_id["<assistant>"]
    layers = sorted({layer for layer, _ in points})
    sites = sorted({site for _, site in points})
    sums = {p: torch.zeros(2, model.config.hidden_size, dtype=torch.float64) for p in points}
    counts = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, att = pad_batch(chunk, world.token_id["<pad>"])
        first = torch.tensor([r.index(asst) + 1 if asst in r else len(r) for r in chunk])
        pos = torch.arange(ids.shape[1])
        m = (ids == asst) & (pos[None] > first[:, None]) & att.bool()
        y = torch.as_tensor(labels[i : i + batch_size], dtype=torch.long)
        one_hot = torch.nn.functional.one_hot(y, 2).double()  # [B, 2]
        weight = one_hot[:, None, :] * m[..., None].double()  # [B, T, 2]
        counts += weight.sum((0, 1))
        hidden = capture_residuals(model, ids, att, layers=layers, sites=sites)
        for p in points:
            sums[p] += torch.einsum("btc,btd->cd", weight, hidden[p].double().cpu())
    if (counts == 0).any():
        raise ValueError("the documents hold only one persona; use more documents")
    out = {}
    for p, s in sums.items():
        d = (s[1] / counts[1] - s[0] / counts[0]).float()
        out[p] = d / d.norm().clamp_min(1e-12)
    return out


def decoder_cosines(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Cosine of each decoder row with ``direction`` (0 for all-zero rows), on the CPU."""
    rows = rows.detach().float().cpu()
    d = direction.detach().float().cpu()
    return rows @ d / (rows.norm(dim=-1) * d.norm()).clamp_min(1e-12)


PERSONA_COSINE = 0.8
"""Decoder cosine with the persona direction at which a latent counts as a persona latent (the
dictionary target of the toy benchmark)."""


def persona_latents(
    decoder_rows: torch.Tensor, direction: torch.Tensor, threshold: float = PERSONA_COSINE
) -> list[int]:
    """Every latent whose decoder row has cosine >= ``threshold`` with ``direction``, best
    first; at least the best one. A dictionary can split one feature over several latents (two
    at 0.87 and 0.85 with the same direction): each is the persona, and an analysis that ranks
    either first has found it."""
    cos = decoder_cosines(decoder_rows, direction)
    order = torch.argsort(cos, descending=True)
    keep = [int(i) for i in order if cos[i] >= threshold]
    return keep or [int(order[0])]


def persona_feature(
    decoder_rows: torch.Tensor,
    direction: torch.Tensor,
    alive: torch.Tensor | None = None,
    *,
    absolute: bool = False,
) -> tuple[int, float]:
    """``(latent, cosine)`` of the decoder row most aligned with ``direction`` (signed cosine).

    ``alive`` (bool per latent) leaves out latents that never fire: a dead latent's decoder row
    is still its random initialisation and would match by chance. ``absolute`` matches on
    ``|cosine|`` (for dictionaries with signed codes, such as ITDA).
    """
    norms = decoder_rows.detach().float().norm(dim=-1).cpu()
    cos = decoder_cosines(decoder_rows, direction)
    ok = norms > 0 if alive is None else (norms > 0) & alive.cpu()
    if not ok.any():
        raise ValueError("no live latent to compare with the persona direction")
    cos = cos.abs() if absolute else cos
    cos = torch.where(ok, cos, torch.full_like(cos, -2.0))
    i = int(cos.argmax())
    return i, float(cos[i])


def random_max_cosine(
    n: int, d: int, trials: int = 200, seed: int = 0, absolute: bool = False
) -> tuple[float, float]:
    """Null of :func:`persona_feature`: the best cosine of ``n`` random unit rows with a fixed
    direction in ``d`` dimensions; returns its mean and 95th percentile over ``trials``."""
    gen = torch.Generator().manual_seed(seed)
    best = []
    for _ in range(trials):
        rows = torch.randn(n, d, generator=gen)
        cos = rows[:, 0] / rows.norm(dim=-1)
        best.append(float((cos.abs() if absolute else cos).max()))
    t = torch.tensor(best)
    return float(t.mean()), float(t.quantile(0.95))
