"""Models: load a causal LM (± PEFT adapter), find and check its decoder layers."""

from emdiff.models.checks import ModelLoadError
from emdiff.models.load import (
    AdapterMismatchError,
    LayerIndexError,
    LoadedModel,
    adapter_disabled,
    adapter_state,
    check_layer,
    check_layers,
    decoder_layers,
    has_adapter,
    load_adapter,
    load_model,
    resolve_dtype,
)

__all__ = [
    "AdapterMismatchError",
    "LayerIndexError",
    "LoadedModel",
    "ModelLoadError",
    "adapter_disabled",
    "adapter_state",
    "check_layer",
    "check_layers",
    "decoder_layers",
    "has_adapter",
    "load_adapter",
    "load_model",
    "resolve_dtype",
]
