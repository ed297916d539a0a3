"""Interventions on a model, composable in one context manager, for scoring, generation and
fine-tuning alike.

Each intervention is a small frozen dataclass with ``apply(model)``, a context manager that
installs it and removes it on exit; :func:`intervene` stacks any number of them:

    with intervene(model, Steer(2, "resid_post", v, scale=4.0), ProjectOut(u, layers="all")):
        model.generate(...)

- :class:`Steer` adds ``scale * vector`` at one hook point (every position, or one index);
- :class:`ProjectOut` removes the component along a direction at one, several or all layers;
- :class:`SetLatent` clamps (or zeroes) one latent of a dictionary while keeping the
  dictionary's reconstruction error, so only that latent's contribution changes;
- :class:`EditLoraB` projects a direction out of the B matrices of a PEFT LoRA and / or scales
  them (CLR's vector-ablated adapters), restoring the weights on exit.

Activation edits run inside the forward hooks of :func:`emdiff.models.hooks.residual_edit`; they
keep gradients, so they also apply during a fine-tune. With a KV cache (generation) they apply to
each new token as it is computed; ``Steer(position=...)`` counts positions of the tensor each
forward pass sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from emdiff.dictionaries.base import SparseDictionary
from emdiff.errors import InputError
from emdiff.models.hooks import residual_edit
from emdiff.models.load import decoder_layers
from emdiff.models.sites import Site


class Intervention(Protocol):
    """Anything that can be installed on a model for the length of a ``with`` block."""

    def apply(self, model: nn.Module) -> AbstractContextManager[None]: ...


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    v = v.detach().flatten().float()
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise InputError(f"{what}: the direction is zero or not finite")
    return v / n


@dataclass(frozen=True)
class Steer:
    """Add ``scale * vector`` at ``(layer, site)``: at every position, or only at ``position``
    (an index into each forward pass' sequence; negative counts from the end), optionally only
    while the prompt is read."""

    layer: int
    site: Site
    vector: torch.Tensor
    scale: float = 1.0
    position: int | None = None
    prompt_only: bool = False
    """Only in forward passes over more than one token: during generation with a KV cache, the
    prompt's pass and not the generated tokens (with ``position=-1``: the last prompt token)."""

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        if self.prompt_only and h.shape[1] == 1:
            return h
        add = (self.scale * self.vector).to(h)
        if self.position is None:
            return h + add
        h = h.clone()
        h[:, self.position] += add
        return h

    def apply(self, model: nn.Module) -> AbstractContextManager[None]:
        return residual_edit(model, self.layer, self.site, self.edit)


@dataclass(frozen=True)
class ProjectOut:
    """Remove the component of the tensor at ``site`` along ``direction`` (normalised here) at
    ``layers``: one layer, several, or ``"all"``."""

    direction: torch.Tensor
    layers: int | Sequence[int] | Literal["all"]
    site: Site = "resid_post"

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        u = _unit(self.direction, "ProjectOut").to(h)
        return h - (h @ u)[..., None] * u

    def apply(self, model: nn.Module) -> AbstractContextManager[None]:
        if self.layers == "all":
            layers = list(range(len(decoder_layers(model))))
        else:
            layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        return _stack(residual_edit(model, layer, self.site, self.edit) for layer in layers)


@dataclass(frozen=True)
class SetLatent:
    """Set latent ``latent`` of ``dictionary`` to ``value`` (0: ablate it) at its hook point,
    keeping the reconstruction error: the tensor becomes ``x + D(f') - D(f)`` where ``f`` is its
    encoding and ``f'`` the same with that one latent replaced. ``only_active`` leaves tokens
    where the latent is zero alone (clamping where it fires, as in feature-steering work)."""

    dictionary: SparseDictionary
    latent: int
    value: float = 0.0
    layer: int | None = None
    site: Site | None = None
    only_active: bool = False
    factor: float | None = None
    """Multiply the latent by this instead of setting it (a small change, for finite
    differences; ``value`` is then unused)."""

    def point(self) -> tuple[int, Site]:
        layer = self.layer if self.layer is not None else self.dictionary.meta.layer
        site = self.site or self.dictionary.meta.site or "resid_post"
        if layer is None:
            raise InputError(
                f"SetLatent: {self.dictionary!r} does not record its layer; pass layer="
            )
        return int(layer), site

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        d = self.dictionary
        xn, state = d.normalise(h.to(d.W_enc.dtype))
        f = d._encode_normalised(xn)
        old = f[..., self.latent]
        new = old * self.factor if self.factor is not None else torch.full_like(old, self.value)
        if self.only_active:
            new = torch.where(old > 0, new, old)
        f2 = f.clone()
        f2[..., self.latent] = new
        delta = d.denormalise(d.decode(f2), state) - d.denormalise(d.decode(f), state)
        return h + delta.to(h)

    def apply(self, model: nn.Module) -> AbstractContextManager[None]:
        if not 0 <= self.latent < self.dictionary.d_sae:
            raise InputError(
                f"SetLatent: latent {self.latent} is not in 0..{self.dictionary.d_sae - 1}"
            )
        layer, site = self.point()
        return residual_edit(model, layer, site, self.edit)


def lora_b_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA B weight of a PEFT model by module name (``[out_features, rank]``)."""
    out = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict):
            for adapter, lin in lora_b.items():
                out[f"{name}.lora_B.{adapter}"] = lin.weight
    if not out:
        raise InputError("the model has no LoRA B weights (not a PEFT LoRA model)")
    return out


@dataclass(frozen=True)
class EditLoraB:
    """Project ``direction`` out of the columns of every LoRA B (in the space B writes: the
    residual for ``down_proj`` / ``o_proj``) and multiply B by ``scale``; ``modules`` keeps only
    B weights whose name contains one of these strings. Weights are restored on exit."""

    direction: torch.Tensor | None = None
    scale: float = 1.0
    modules: tuple[str, ...] = ()

    def apply(self, model: nn.Module) -> AbstractContextManager[None]:
        return self._apply(model)

    @contextmanager
    def _apply(self, model: nn.Module) -> Iterator[None]:
        weights = {
            k: w
            for k, w in lora_b_weights(model).items()
            if not self.modules or any(m in k for m in self.modules)
        }
        if not weights:
            raise InputError(f"EditLoraB: no LoRA B weight matches {list(self.modules)}")
        saved = {k: w.detach().clone() for k, w in weights.items()}
        try:
            with torch.no_grad():
                for name, w in weights.items():
                    if self.direction is not None:
                        if w.shape[0] != self.direction.numel():
                            raise InputError(
                                f"EditLoraB: {name} writes vectors of width {w.shape[0]}, the "
                                f"direction has {self.direction.numel()}"
                            )
                        u = _unit(self.direction, "EditLoraB").to(w)
                        w -= u[:, None] * (u @ w)[None, :]
                    w *= self.scale
            yield
        finally:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(saved[name])


def _stack(managers) -> AbstractContextManager[None]:
    @contextmanager
    def run() -> Iterator[None]:
        with ExitStack() as stack:
            for m in managers:
                stack.enter_context(m)
            yield

    return run()


def intervene(model: nn.Module, *interventions: Intervention) -> AbstractContextManager[None]:
    """Install every intervention for the ``with`` block (in order: hooks at one point run in
    the order given)."""
    return _stack(i.apply(model) for i in interventions)
