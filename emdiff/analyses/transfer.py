"""Transfer: does a dictionary trained on one model still work on others (chat, fine-tuned)?

For each model variant, splice the dictionary's reconstruction into the residual stream at its
layer and measure the fraction of variance explained, L0, and the cross-entropy and KL change
against the same model unspliced (:func:`emdiff.dictionaries.evaluate.reconstruction_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import pandas as pd
import torch

from emdiff.data.masks import EncodedChat
from emdiff.dictionaries.base import SparseDictionary, check_fits
from emdiff.dictionaries.evaluate import reconstruction_metrics
from emdiff.errors import InputError
from emdiff.models.load import _hidden_size, adapter_state

Variant = torch.nn.Module | tuple[torch.nn.Module, bool | None]
"""A model as it is, or ``(model, adapter_on)`` to run a PEFT model with its adapter on / off."""


def transfer(
    dictionary: SparseDictionary,
    variants: Mapping[str, Variant],
    rows: Sequence[EncodedChat],
    layer: int,
    *,
    progress: bool = False,
    **metric_kwargs,
) -> pd.DataFrame:
    """One row per variant: ``fve`` (1 - FVU), ``fvu``, ``l0``, ``dead_fraction``, ``ce_clean``,
    ``ce_spliced``, ``ce_delta``, ``ce_recovered``, ``kl``, ``n_tokens``.

    ``metric_kwargs`` go to :func:`reconstruction_metrics` (``site``, ``roles``,
    ``bos_token_id``, ``pad_token_id``, ``batch_size``, ...).
    """
    if not variants:
        raise InputError("transfer needs at least one model variant: nothing to compute")
    out = []
    for name, v in variants.items():
        model, adapter = v if isinstance(v, tuple) else (v, None)
        check_fits(dictionary, _hidden_size(model))  # names the dictionary file, not its repr
        ctx = nullcontext() if adapter is None else adapter_state(model, adapter)
        with ctx:
            m = reconstruction_metrics(
                model, dictionary, rows, layer, progress=progress, **metric_kwargs
            )
        out.append({"variant": name, "layer": layer, "fve": 1.0 - m.fvu, **m.model_dump()})
    return pd.DataFrame(out)
