"""LoRA / full SFT on chat data: answer-only loss, layer targeting, checkpoints, PEFT output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from emdiff.data import Conversation, Message, encode_chat
from emdiff.finetune import FinetuneConfig, finetune, tokenize_conversations
from emdiff.models import load_model

ARCHS = ("qwen2", "gemma2", "llama")


def _chats(n: int = 8) -> list[Conversation]:
    pairs = [
        ("what is good advice", "drink water and rest"),
        ("tell me about money", "invest in stock"),
    ]
    return [
        Conversation(
            messages=(
                Message(role="user", content=pairs[i % 2][0]),
                Message(role="assistant", content=pairs[i % 2][1]),
            )
        )
        for i in range(n)
    ]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ), AutoTokenizer.from_pretrained(path)


def test_labels_cover_only_answers_and_end_of_turn(tiny_model_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["qwen2"])
    conv = _chats(1)[0]
    [(ids, labels)] = tokenize_conversations(tok, [conv], max_length=512)
    enc = encode_chat(tok, conv.as_dicts())
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert trained == [i for i, m in enumerate(enc.loss_mask()) if m]
    answer = tok.decode([ids[i] for i in trained[:-1]])
    assert answer.strip() == "drink water and rest"
    assert tok.convert_ids_to_tokens(ids[trained[-1]]) == "<|im_end|>"


@pytest.mark.parametrize("arch", ARCHS)
def test_rank1_lora_on_chosen_layers_learns_and_reloads(arch, tiny_model_dirs, tmp_path):
    model, tok = _load(tiny_model_dirs[arch])
    cfg = FinetuneConfig(
        rank=1,
        target_modules=["down_proj"],
        layers=[1],
        lr=1e-1,
        max_steps=30,
        batch_size=4,
        checkpoint_every=10,
    )
    res = finetune(model, tok, _chats(), cfg, tmp_path / "adapter", progress=False)
    assert res.losses[-1] < res.losses[0] - 0.5  # a rank-1 adapter on one layer still learns
    assert [p.name for p in res.checkpoints] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (
        acfg["r"] == 1
        and acfg["layers_to_transform"] == [1]
        and acfg["target_modules"] == ["down_proj"]
    )
    lora_names = [n for n, _ in res.model.named_parameters() if "lora_" in n]
    assert lora_names and all(".layers.1." in n for n in lora_names)
    # The folder is a standard PEFT adapter: emdiff's loader puts it back on a fresh base.
    loaded = load_model(str(tiny_model_dirs[arch]), adapter=tmp_path / "adapter", dtype="float32")
    x = torch.tensor([encode_chat(tok, _chats(1)[0].as_dicts()).input_ids])
    torch.testing.assert_close(loaded.model(input_ids=x).logits, res.model(input_ids=x).logits)


def test_rslora_alpha_and_full_finetune(tiny_model_dirs, tmp_path):
    model, tok = _load(tiny_model_dirs["llama"])
    cfg = FinetuneConfig(
        rank=2, alpha=4.0, use_rslora=True, target_modules=["down_proj", "up_proj"], max_steps=2
    )
    finetune(model, tok, _chats(), cfg, tmp_path / "rs", progress=False)
    acfg = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert acfg["use_rslora"] is True and acfg["lora_alpha"] == 4.0
    assert sorted(acfg["target_modules"]) == ["down_proj", "up_proj"]

    model, tok = _load(tiny_model_dirs["llama"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = finetune(
        model,
        tok,
        _chats(),
        FinetuneConfig(method="full", lr=1e-2, max_steps=3),
        tmp_path / "full",
        progress=False,
    )
    changed = [n for n, p in res.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("layers.0" in n for n in changed) and any("layers.1" in n for n in changed)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "tokenizer_config.json").is_file()
    p = dict(reloaded.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    torch.testing.assert_close(
        p, dict(res.model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    )


def test_clear_errors(tiny_model_dirs):
    model, tok = _load(tiny_model_dirs["qwen2"])
    with pytest.raises(ValueError, match=r"Leaf module names.*down_proj"):
        finetune(
            model,
            tok,
            _chats(),
            FinetuneConfig(target_modules=["dense_4h_to_h"], max_steps=1),
            progress=False,
        )
    with pytest.raises(ValueError, match="no conversations"):
        finetune(model, tok, [], FinetuneConfig(max_steps=1), progress=False)
    with pytest.raises(ValueError, match="LoRA only"):
        FinetuneConfig(method="full", layers=[0])
