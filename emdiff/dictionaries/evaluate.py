"""How well a dictionary stands in for the residual stream of a model: FVU, L0, and the loss change
when its reconstruction is spliced into the forward pass.

For each batch of rows this runs the model three times with the same inputs: clean, with the
residual at the read spec's ``(layer, site)`` replaced by the dictionary's reconstruction, and with it replaced by
zeros (the reference for "loss recovered"). Only the selected tokens (by the spec's positions, never BOS, no
attention sinks unless kept) are replaced and scored; the next-token loss is read at those positions:

- ``ce_delta = CE(spliced) - CE(clean)`` (nats per token),
- ``ce_recovered = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))``,
- ``kl = KL(clean || spliced)`` of the next-token distributions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from emdiff.dictionaries.base import SparseDictionary, check_fits
from emdiff.errors import InputError
from emdiff.models.hooks import residual_edit
from emdiff.models.read import ReadSpec, Row, read_batches, require_tokens, selected, selection


class ReconstructionMetrics(BaseModel):
    """A dictionary's reconstruction quality on one model and dataset."""

    n_tokens: int
    fvu: float
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    l0: float
    """Mean number of active latents per token."""
    dead_fraction: float
    """Share of latents that never fired on these tokens."""
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None
    ce_delta: float | None = None
    ce_recovered: float | None = None
    kl: float | None = None


@torch.no_grad()
def reconstruction_metrics(
    model: torch.nn.Module,
    dictionary: torch.nn.Module,
    rows: Sequence[Row],
    read: ReadSpec,
    *,
    batch_size: int = 32,
    splice: bool = True,
    progress: bool = False,
) -> ReconstructionMetrics:
    """FVU, L0, dead fraction, and (with ``splice``) CE and KL changes of ``dictionary`` on
    ``model`` at ``read`` (one layer). ``dictionary`` needs ``encode(x)`` and ``forward(x)``; it
    is moved (in place) to the model's device. A latent counts as active when its code is
    nonzero."""
    layer = read.layer
    if isinstance(dictionary, SparseDictionary):  # it knows where it was trained: check it
        check_fits(dictionary, model, layer, read.site)
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, "reconstruction_metrics")
    device = next(model.parameters()).device
    dictionary = dictionary.to(device)
    sums = dict(n=0, sq_err=0.0, l0=0.0, ce_clean=0.0, ce_spliced=0.0, ce_zero=0.0, kl=0.0, n_ce=0)
    x_sum = x_sq = fired = None
    state: dict = {}

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        sel = selected(hidden, state["batch"], read, layer)
        state["sel_final"] = sel
        x = hidden[sel].float()
        if state["mode"] == "zero":
            new = torch.zeros_like(x)
        else:
            f = dictionary.encode(x)
            new = dictionary(x)
            state["f"], state["x"], state["x_hat"] = f, x, new
        out = hidden.clone()
        out[sel] = new.to(hidden.dtype)
        return out

    n_batches = -(-len(rows) // batch_size)
    batches = read_batches(rows, masks, batch_size, 0, device)
    for batch in tqdm(
        batches, total=n_batches, desc=f"reconstruction L{layer}", disable=not progress
    ):
        state["batch"] = batch
        ids, att = batch.ids, batch.att
        logits = {}
        modes = ("splice", "zero") if splice else ("splice",)
        for mode in modes:
            state["mode"] = mode
            with residual_edit(model, layer, read.site, edit):
                logits[mode] = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        x, x_hat, f = state["x"], state["x_hat"], state["f"]
        sums["n"] += len(x)
        sums["sq_err"] += float((x - x_hat).pow(2).sum())
        sums["l0"] += float((f != 0).sum())  # ITDA codes may be negative
        x_sum = x.double().sum(0) if x_sum is None else x_sum + x.double().sum(0)
        x_sq = float(x.double().pow(2).sum()) + (x_sq or 0.0)
        fired = (f != 0).any(0) if fired is None else fired | (f != 0).any(0)
        if splice:
            clean = model(input_ids=ids, attention_mask=att, use_cache=False).logits
            _add_ce(sums, clean, logits, ids, state["sel_final"], att)
    n = sums["n"]
    if n == 0:
        raise InputError(
            f"no {read.positions} token left in any of {len(rows)} rows once attention sinks are "
            "excluded: nothing to measure"
        )
    total_var = x_sq - float(x_sum.pow(2).sum()) / n
    out = ReconstructionMetrics(
        n_tokens=n,
        fvu=sums["sq_err"] / max(total_var, 1e-12),
        l0=sums["l0"] / n,
        dead_fraction=float(1 - fired.float().mean()),
    )
    if splice and sums["n_ce"]:
        m = sums["n_ce"]
        ce = {k: sums[k] / m for k in ("ce_clean", "ce_spliced", "ce_zero")}
        gap = ce["ce_zero"] - ce["ce_clean"]
        out = out.model_copy(
            update=dict(
                **ce,
                ce_delta=ce["ce_spliced"] - ce["ce_clean"],
                kl=sums["kl"] / m,
                ce_recovered=(ce["ce_zero"] - ce["ce_spliced"]) / gap if gap > 0 else None,
            )
        )
    return out


def _add_ce(sums: dict, clean: torch.Tensor, logits: dict, ids: torch.Tensor, sel, att) -> None:
    """Accumulate next-token CE at selected positions that have a next token, and KL."""
    pos = sel[:, :-1] & att[:, 1:].bool()
    target = ids[:, 1:][pos]
    lp_clean = clean[:, :-1][pos].float().log_softmax(-1)
    lp_splice = logits["splice"][:, :-1][pos].float().log_softmax(-1)
    sums["n_ce"] += int(pos.sum())
    sums["ce_clean"] += float(-lp_clean.gather(-1, target[:, None]).sum())
    sums["ce_spliced"] += float(-lp_splice.gather(-1, target[:, None]).sum())
    if "zero" in logits:
        lp_zero = logits["zero"][:, :-1][pos].float().log_softmax(-1)
        sums["ce_zero"] += float(-lp_zero.gather(-1, target[:, None]).sum())
    sums["kl"] += float((lp_clean.exp() * (lp_clean - lp_splice)).sum())
