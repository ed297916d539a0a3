"""Attribution of latents: which dictionary latents *do* the behaviour (sparse feature circuits).

The model runs with the tensor at the dictionary's hook point rewritten as ``D(f) + error`` (the
error detached, so the forward pass is unchanged) and the metric is back-propagated to the latent
activations ``f``. A latent's attribution is ``sum over tokens of f * d metric / d f``: the
first-order change of the metric when the latent is removed is ``-attribution``. The top latents
are then checked against true ablation (:class:`~emdiff.interventions.edits.SetLatent` to 0,
error kept) and the correlation is reported, so a reader sees how far the linear estimate holds.

The metric is any callable ``model -> scalar tensor``; :class:`ContrastMetric` is the usual one:
the mean log-probability of misaligned answers minus that of aligned answers to the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm

from emdiff.data.masks import EncodedChat, pad_batch
from emdiff.dictionaries.base import SparseDictionary
from emdiff.errors import InputError
from emdiff.interventions.edits import SetLatent, intervene
from emdiff.models.hooks import Site, residual_edit

Metric = Callable[[torch.nn.Module], torch.Tensor]


def _answer_logprob(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: summed log-probability of the tokens where ``mask`` is True."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    att = (ids != -1).long()
    logits = model(input_ids=ids.clamp_min(0), attention_mask=att, use_cache=False).logits
    logits = logits[:, :-1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    tok = logp.gather(-1, ids[:, 1:].clamp_min(0)[..., None])[..., 0]
    return (tok * mask[:, 1:]).sum(-1)


@dataclass
class ContrastMetric:
    """Mean over pairs of log P(misaligned answer) - log P(aligned answer): token rows and masks
    of the scored tokens (padding: id -1)."""

    bad_ids: torch.Tensor
    bad_mask: torch.Tensor
    good_ids: torch.Tensor
    good_mask: torch.Tensor

    @classmethod
    def from_chats(
        cls, misaligned: Sequence[EncodedChat], aligned: Sequence[EncodedChat]
    ) -> ContrastMetric:
        """Scored tokens: each chat's answer tokens (:meth:`EncodedChat.mask`)."""
        if not misaligned or not aligned:
            raise InputError("ContrastMetric: both sides need at least one chat")

        def pack(chats):
            ids, _ = pad_batch([c.input_ids for c in chats], -1, side="right")
            mask, _ = pad_batch([[int(m) for m in c.mask()] for c in chats], 0, side="right")
            if not mask.any(1).all():
                raise InputError("ContrastMetric: a chat has no answer token to score")
            return ids, mask.bool()

        return cls(*pack(misaligned), *pack(aligned))

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        bad = _answer_logprob(model, self.bad_ids, self.bad_mask).mean()
        return bad - _answer_logprob(model, self.good_ids, self.good_mask).mean()


def latent_attribution(
    model: torch.nn.Module,
    dictionary: SparseDictionary,
    metric: Metric,
    layer: int | None = None,
    site: Site | None = None,
) -> torch.Tensor:
    """``[d_sae]``: sum over every token the metric's forward passes read of ``f * dM/df``."""
    layer = dictionary.meta.layer if layer is None else layer
    site = site or dictionary.meta.site or "resid_post"
    if layer is None:
        raise InputError(f"latent_attribution: {dictionary!r} does not record its layer; pass it")
    seen: list[torch.Tensor] = []

    def splice(h: torch.Tensor) -> torch.Tensor:
        xn, state = dictionary.normalise(h.detach().to(dictionary.W_enc.dtype))
        f = dictionary._encode_normalised(xn).detach().requires_grad_(True)
        recon = dictionary.denormalise(dictionary.decode(f), state)
        seen.append(f)
        return (recon + (h.detach() - recon).detach()).to(h.dtype)

    with torch.enable_grad(), residual_edit(model, layer, site, splice):
        value = metric(model)
        if not value.requires_grad:
            raise InputError("latent_attribution: the metric does not depend on the model")
        value.backward()
    if not seen:
        raise InputError(f"latent_attribution: the metric never ran layer {layer} {site}")
    return sum((f * f.grad).reshape(-1, f.shape[-1]).sum(0) for f in seen).detach().cpu()


@dataclass
class Attribution:
    """Latents ranked by attribution, and the check of the top ones against true ablation."""

    name: str
    table: pd.DataFrame
    """``latent``, ``attribution``, ``rank``; for the checked ones ``ablation_effect`` (metric
    with the latent at 0 minus the metric)."""
    meta: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        path = Path(out) / "tables" / f"{self.name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(path)
        return [path]

    def summary(self) -> dict:
        return dict(self.meta)

    def rank_of(self, latent: int) -> int:
        return int(self.table.loc[self.table["latent"] == latent, "rank"].iloc[0])


def attribute(
    model: torch.nn.Module,
    dictionary: SparseDictionary,
    metric: Metric,
    check_top: int = 20,
    name: str = "attribution",
    progress: bool = False,
    layer: int | None = None,
    site: Site | None = None,
) -> Attribution:
    """Rank latents by |attribution| and ablate the ``check_top`` first one by one (at the
    dictionary's own point unless ``layer`` / ``site`` name another)."""
    attr = latent_attribution(model, dictionary, metric, layer, site)
    order = torch.argsort(attr.abs(), descending=True).numpy()
    table = pd.DataFrame(
        {"latent": order, "attribution": attr[order].numpy(), "rank": np.arange(1, len(order) + 1)}
    )
    with torch.no_grad():
        base = float(metric(model))
        effects = []
        for latent in tqdm(order[:check_top], desc="ablate latents", disable=not progress):
            with intervene(model, SetLatent(dictionary, int(latent), 0.0, layer, site)):
                effects.append(float(metric(model)) - base)
    table["ablation_effect"] = effects + [np.nan] * (len(order) - len(effects))
    predicted = -table["attribution"].to_numpy()[: len(effects)]
    meta: dict = {"metric": base, "checked": len(effects)}
    if len(effects) >= 3 and np.std(effects) > 0 and np.std(predicted) > 0:
        meta["ablation_pearson"] = float(pearsonr(predicted, effects)[0])
        meta["ablation_spearman"] = float(spearmanr(predicted, effects)[0])
    return Attribution(name, table, meta)
