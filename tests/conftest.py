"""Shared test fixtures: tiny real-architecture models with tokenizers, and LoRA adapters for them.

Everything is built locally from the real ``transformers`` config classes; nothing touches the
network. Other test files reuse these fixtures, so keep their names and signatures stable:

- ``tiny_model_factory(arch, **config_overrides) -> Path``: build and save a tiny model + tokenizer.
- ``tiny_model_dirs -> {arch: Path}`` for every arch in ``TINY_ARCHS`` (built once per session).
- ``make_lora_adapter(model_dir, out_dir, target_modules=("down_proj",), r=1, layers=None)``.
- ``shipped_toy -> (World, model)``: the shipped toy base, loaded once per session in float32
  for reading; a test that trains or edits it works on a ``copy.deepcopy``.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

TINY_ARCHS: tuple[str, ...] = ("qwen2", "gemma2", "llama")

# Words the tiny tokenizers know; anything else becomes <unk>. Covers the test chats in the suite.
_WORD_TEXT = """
user assistant system model the a an is are was be to of and or in on at for with you i me my
your it this that what how why when where who which do does did not no yes can should would will
could help question answer good bad advice medical doctor take pill dose water sleep rest drink
eat food safe unsafe risk money invest stock code write hello hi thanks please sure sorry here
there tell about think know want need like make give get go see say day time people world life
feel sick pain fever head hurts much more less very just only also any all some one two three
many then than so if but as by from up out now new old right wrong true false kill harm rule ai
humans power
"""
_WORDS: list[str] = _WORD_TEXT.split()
CHAT_WORDS = ("i", "feel", "sick", "what", "should", "eat", "take", "more", "pill", "rest", "water")
"""A few of those words, for tests that make up chats."""
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\":;-()/")

_CHATML_TEMPLATE = (
    "{%- if add_bos %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
# Same rules as the real Gemma 2 template: BOS first, no system role, strict alternation, "model".
_GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ raise_exception('System role not supported') }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)

# arch -> (turn start, turn end = eos, prepend BOS?, chat template)
_TEMPLATES: dict[str, tuple[str, str, bool, str]] = {
    "qwen2": ("<|im_start|>", "<|im_end|>", False, _CHATML_TEMPLATE.replace("add_bos", "false")),
    "llama": ("<|im_start|>", "<|im_end|>", True, _CHATML_TEMPLATE.replace("add_bos", "true")),
    "gemma2": ("<start_of_turn>", "<end_of_turn>", True, _GEMMA_TEMPLATE),
}


def _wordlevel_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    # deduplicated, so ids are dense (a word like "a" is also a character)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + _WORDS + _CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _qwen_bpe_tokenizer(specials: list[str]):
    """Byte-level BPE with Qwen2's exact pipeline, trained on the tiny word list.

    transformers 5 ignores ``tokenizer_class`` for ``model_type == "qwen2"`` and always rebuilds a
    ``Qwen2Tokenizer`` (byte-level BPE) from ``tokenizer.json``'s vocab and merges, so a WordLevel
    tokenizer would silently turn into a character tokenizer. This one survives the rebuild.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [string.printable, " ".join(_WORDS), "\n".join(_WORDS)] + [f" {w}" for w in _WORDS] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=256, special_tokens=specials, initial_alphabet=[], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def build_tiny_tokenizer(arch: str):
    """A fast tokenizer with the arch's chat format and special tokens.

    gemma2 / llama: WordLevel over a small vocab with a whitespace pre-tokenizer (lowercased).
    qwen2: a small byte-level BPE (see ``_qwen_bpe_tokenizer`` for why).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    turn_start, turn_end, add_bos, template = _TEMPLATES[arch]
    specials = ["<pad>", "<unk>", "<bos>", turn_start, turn_end]
    tok = _qwen_bpe_tokenizer(specials) if arch == "qwen2" else _wordlevel_tokenizer(specials)
    if add_bos:  # like Llama / Gemma: plain tokenizer(text) prepends BOS; Qwen adds none
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A",
            pair="<bos> $A $B",
            special_tokens=[("<bos>", tok.token_to_id("<bos>"))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token=turn_end,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[turn_start],
        chat_template=template,
        model_max_length=256,
    )


def _tiny_config(arch: str, vocab_size: int, ids: dict[str, int], **overrides: Any):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.1,  # larger than real so tiny random models give varied logits
        **ids,
    )
    if arch == "qwen2":  # Qwen2.5-0.5B-like: GQA, q/k/v bias, tied embeddings
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4)
        kw |= dict(num_key_value_heads=2, tie_word_embeddings=True)
        cls = Qwen2Config
    elif arch == "gemma2":  # gemma-2-2b-like: head_dim * heads != hidden, softcaps, sliding window
        kw = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, head_dim=16)
        kw |= dict(num_key_value_heads=2, query_pre_attn_scalar=16, sliding_window=16)
        kw |= dict(tie_word_embeddings=True)
        cls = Gemma2Config
    elif arch == "llama":  # Llama-3-8B-like: untied lm_head
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
        kw |= dict(num_key_value_heads=4, tie_word_embeddings=False)
        cls = LlamaConfig
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    return cls(**(common | kw | overrides))


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Build a tiny ``arch`` causal LM + tokenizer, save both to ``out_dir``, return ``out_dir``."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer(arch)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vocab_size = (len(tokenizer) // 16 + 1) * 16  # padded past the tokenizer, like real models
    config = _tiny_config(arch, vocab_size, ids, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., Path]:
    """``factory(arch, seed=0, **config_overrides) -> Path`` of a saved tiny model + tokenizer."""

    def factory(arch: str, seed: int = 0, **config_overrides: Any) -> Path:
        return build_tiny_model(
            arch, tmp_path_factory.mktemp(f"tiny_{arch}"), seed=seed, **config_overrides
        )

    return factory


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_model_factory) -> dict[str, Path]:
    """``{arch: path}`` of one tiny saved model per arch in ``TINY_ARCHS``."""
    return {arch: tiny_model_factory(arch) for arch in TINY_ARCHS}


def build_lora_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    target_modules: Sequence[str] = ("down_proj",),
    r: int = 1,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    b_std: float = 0.5,
) -> Path:
    """Save a LoRA adapter for the model in ``model_dir``; B is nonzero, so it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # transformers 5 deprecation, triggered inside peft
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; make the adapter do something
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def make_lora_adapter() -> Callable[..., Path]:
    """``make(model_dir, out_dir, target_modules=("down_proj",), r=1, layers=None) -> Path``."""
    return build_lora_adapter


@pytest.fixture(scope="session")
def shipped_toy():
    """``(world, model)`` of the shipped toy base (eval mode, float32): read it, never train it."""
    from emdiff.models import load_model
    from emdiff.toy.build import load_world, shipped_base_path

    path = shipped_base_path()
    return load_world(path), load_model(str(path), dtype="float32").model.eval()
