"""Load a causal LM, its tokenizer and optionally a PEFT adapter; find and check decoder layers.

The adapter stays a separate ``peft.PeftModel`` layer, so the base and the adapted model can be run
on the same tokens without loading the weights twice (see ``adapter_disabled``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emdiff.errors import InputError
from emdiff.models.checks import (
    ADAPTER_WEIGHTS,
    ModelLoadError,
    check_device,
    check_source,
    check_tokenizer,
    load_failed,
)
from emdiff.readers import check_tensors

DTYPES: dict[str, torch.dtype] = dict(
    float32=torch.float32,
    fp32=torch.float32,
    bfloat16=torch.bfloat16,
    bf16=torch.bfloat16,
    float16=torch.float16,
    fp16=torch.float16,
    half=torch.float16,
)


class AdapterMismatchError(InputError):
    """The adapter was trained on a base model with other shapes than the one it is loaded onto."""


class LayerIndexError(IndexError, InputError):
    """A decoder-layer index is outside the model's layers."""


@dataclass
class LoadedModel:
    """A model ready for inference, with what the rest of the toolkit needs to know about it."""

    model: Any
    """A ``transformers`` causal LM, or a ``peft.PeftModel`` around one when there is an adapter."""
    tokenizer: Any
    """The tokenizer; ``pad_token`` is set (to EOS when the checkpoint has none)."""
    base_name: str
    """The base model's hub id or local path, as given."""
    adapter_path: str | None
    """The adapter's hub id or local path, as given, or None."""
    n_layers: int
    """Number of decoder layers (``len(decoder_layers(model))``)."""
    d_model: int
    """Residual-stream width (``hidden_size``)."""


def resolve_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """Map ``"auto"``, a dtype name (``"bfloat16"``, ``"bf16"``, ...) or a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(DTYPES)}"
        ) from None


def load_model(
    name_or_path: str,
    adapter: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM (hub id or local dir) and its tokenizer, plus an optional PEFT adapter.

    ``device`` is ``"cpu"``, a torch device such as ``"cuda"`` / ``"cuda:1"``, or ``"auto"``
    (spread over the available GPUs with accelerate; CPU when there is none). Raises
    ``AdapterMismatchError`` when the adapter was made for a base model with other shapes.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code)
    load_kwargs = dict(kwargs, dtype=resolve_dtype(dtype))
    check_device(device)
    local = check_source(name_or_path, "model", "config.json")
    if adapter is not None:
        check_source(adapter, "adapter", "adapter_config.json", ADAPTER_WEIGHTS)
    if device == "auto":
        load_kwargs["device_map"] = "auto" if torch.cuda.is_available() else "cpu"
    elif device != "cpu":
        load_kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_kwargs)
    except (OSError, SafetensorError, ValueError) as e:
        raise load_failed(name_or_path, "model", local, e) from e
    model.eval()

    tok_source: str | Path = name_or_path
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
        tok_source, kwargs = adapter, dict(trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **kwargs)
    except (OSError, ValueError) as e:
        is_local = Path(tok_source).is_dir()
        raise load_failed(tok_source, "tokenizer", Path(tok_source) if is_local else None, e) from e
    check_tokenizer(tokenizer, tok_source)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token

    if adapter is not None:
        model = load_adapter(model, adapter, base_name=name_or_path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        base_name=str(name_or_path),
        adapter_path=None if adapter is None else str(adapter),
        n_layers=len(decoder_layers(model)),
        d_model=hidden_size(model),
    )


def load_adapter(model: nn.Module, adapter: str | Path, base_name: str | None = None) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with ``adapter``, checking that it fits the model.

    Shapes are compared before loading; after loading, the LoRA modules peft created must be
    exactly the ones the adapter file has weights for (a model with more or fewer layers fails).
    """
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights

    base_name = base_name or getattr(model, "name_or_path", None) or type(model).__name__
    local = check_source(adapter, "adapter", "adapter_config.json", ADAPTER_WEIGHTS)
    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except Exception as e:  # peft raises ValueError, OSError, JSON and hub errors alike
        raise ModelLoadError(
            f"cannot read adapter_config.json of adapter {str(adapter)!r}: {e}. Pass the folder "
            "written by peft's save_pretrained, or its hub id."
        ) from e
    recorded = config.base_model_name_or_path

    def mismatch(detail: str) -> AdapterMismatchError:
        return AdapterMismatchError(
            f"adapter {str(adapter)!r} was made for base model {recorded!r}, which does not match "
            f"the loaded base {base_name!r} ({_describe(model)}): {detail}"
        )

    is_lora = str(config.peft_type).upper().endswith("LORA")
    weights = load_peft_weights(str(adapter), device="cpu") if is_lora else {}
    check_tensors(weights, local / "adapter_model.safetensors" if local else adapter)
    problems = _lora_shape_problems(model, weights)
    if problems:
        raise mismatch(_summarise(problems))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # checked below
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        text = str(e)
        if "size mismatch" in text or "not found in the base model" in text:
            raise mismatch(_summarise(text.strip().splitlines())) from e
        raise
    if is_lora:
        in_file = {k.split(".lora_")[0] for k in weights if ".lora_" in k}
        injected = {n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
        detail = ""
        if extra := sorted(in_file - injected):
            detail = f"the base has no module for {_summarise(extra)}"
        elif missing := sorted(injected - in_file):
            detail = f"the adapter has no weights for {_summarise(missing)}"
        if detail:
            peft_model.unload()  # take the half-fitting LoRA layers out of the caller's model
            raise mismatch(detail)
    if recorded and _norm_name(recorded) != _norm_name(base_name):
        warnings.warn(
            f"adapter {str(adapter)!r} records base model {recorded!r} but was loaded onto "
            f"{base_name!r}; the shapes match, but make sure it is the same model",
            stacklevel=3,
        )
    peft_model.eval()
    return peft_model


def _lora_shape_problems(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Compare each LoRA A/B matrix with the in/out size of the base module it attaches to."""
    problems = []
    for key, tensor in weights.items():
        if ".lora_" not in key:
            continue
        path, suffix = key.split(".lora_", 1)
        try:
            module = model.get_submodule(path.removeprefix("base_model.model."))
        except AttributeError:
            continue  # a missing module is reported after loading, with peft's own key mapping
        if isinstance(module, nn.Linear):
            n_in, n_out = module.in_features, module.out_features
        elif isinstance(module, nn.Embedding):
            n_in, n_out = module.num_embeddings, module.embedding_dim
        else:
            continue
        shape = tuple(tensor.shape)
        if suffix.startswith(("A.", "embedding_A")) and shape[-1] != n_in:
            problems.append(f"{key} has input size {shape[-1]}, but the base module takes {n_in}")
        if suffix.startswith(("B.", "embedding_B")) and shape[0] != n_out:
            problems.append(f"{key} has output size {shape[0]}, but the base module gives {n_out}")
    return problems


def _summarise(items: list[str], limit: int = 3) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _norm_name(name: str | Path) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else str(name).rstrip("/")


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width (``hidden_size`` of the text config; looks through PEFT)."""
    config = unwrap(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _describe(model: nn.Module) -> str:
    base = unwrap(model)
    try:
        n_layers = len(decoder_layers(base))
    except ValueError:
        n_layers = "?"
    return f"{type(base).__name__}, {n_layers} layers, hidden size {hidden_size(base)}"


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``PeftModel`` (and similar) wrappers down to the transformers model."""
    while hasattr(model, "get_base_model"):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


_LAYER_PATHS = ("model.layers", "layers", "model.language_model.layers", "language_model.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.model.layers`` for Qwen2 / Gemma2 / Llama / Mistral).

    Looks through ``PeftModel`` wrappers, then falls back to the first ``ModuleList`` named
    ``layers`` anywhere in the model.
    """
    base = unwrap(model)
    for path in _LAYER_PATHS:
        try:
            found = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__}: expected a ModuleList at "
        f"model.model.layers (or any submodule named 'layers'); pass a decoder-only causal LM"
    )


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a decoder-layer index (negative counts from the end); return it in ``0..n-1``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {layer!r}")
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise LayerIndexError(
            f"layer {layer} is out of range for {type(unwrap(model)).__name__} with {n} decoder "
            f"layers: valid layers are 0..{n - 1} (negative indices -{n}..-1)"
        )
    return layer % n


def check_layers(model: nn.Module, layers: int | Iterable[int]) -> list[int]:
    """``check_layer`` for each index; keeps the given order (and any duplicates)."""
    if isinstance(layers, int):
        layers = [layers]
    return [check_layer(model, layer) for layer in layers]


def _adapters_enabled(model: nn.Module) -> bool | None:
    """Whether the tuner layers in ``model`` are active; None when it has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return not module.disable_adapters
    return None


def model_identity(model: nn.Module) -> str:
    """``name_or_path`` and dtype of the base, plus a hash of the adapter weights if any."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    name = f"{name}[{str(next(model.parameters()).dtype).removeprefix('torch.')}]"
    if not hasattr(model, "peft_config"):
        return name
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if "lora_" in key:
            h.update(key.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return f"{name}+adapter:{h.hexdigest()[:16]}"


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` carries PEFT tuner layers (LoRA and the like) that can be switched."""
    return _adapters_enabled(model) is not None


@contextmanager
def adapter_state(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Run the block with the model's adapter on (``enabled=True``) or off; restore it after.

    Works on a ``peft.PeftModel``, on the model inside one, and on a transformers model with an
    adapter from ``model.load_adapter``. A model without an adapter is left as it is (a no-op).
    Nests: an inner block restores the state the outer block set.
    """
    from peft import PeftModel

    was = _adapters_enabled(model)
    if was is None:  # no tuner layers: a plain model, or peft prompt learning
        if isinstance(model, PeftModel) and not enabled:
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    was_flag = getattr(model, "_adapters_disabled", None)  # PeftModel's own record of the state
    _switch_adapters(model, enabled)
    try:
        yield model
    finally:
        _switch_adapters(model, was)
        if was_flag is not None:
            model._adapters_disabled = was_flag


def _switch_adapters(model: nn.Module, on: bool) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel):
        layers = model.base_model
        (layers.enable_adapter_layers if on else layers.disable_adapter_layers)()
        model._adapters_disabled = not on
    else:  # transformers' PEFT integration, or the model inside a PeftModel
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(on)


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block on the base model: the adapter is switched off, then restored.

    ``with adapter_disabled(lm.model): base_logits = lm.model(ids).logits``. No-op without an
    adapter, so the same code runs on plain models.
    """
    with adapter_state(model, enabled=False) as m:
        yield m
