"""Phases from checkpoints, probes on LoRA scalars, fine-tuning with interventions installed
(defences) or continuing an adapter (mitigation), and data screening."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emdiff.data.chat import Conversation, Message
from emdiff.data.masks import encode_chat
from emdiff.directions.direction import Direction
from emdiff.directions.screen import ScreenConfig, screen_samples
from emdiff.errors import InputError
from emdiff.finetune import FinetuneConfig, finetune
from emdiff.interventions.defences import Defence, defence_interventions
from emdiff.lora.phases import load_checkpoints, phases
from emdiff.lora.probes import scalar_probes
from emdiff.models import load_model
from emdiff.models.hooks import capture_residuals

KEY_A = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def _trajectory(turn_at: int, steps: int = 100) -> list[tuple[int, dict]]:
    """B moves along e1, then from ``turn_at`` on along e2: one sharp turn."""
    e1, e2 = torch.eye(8)[0], torch.eye(8)[1]
    out, b = [], torch.zeros(8)
    for s in range(1, steps + 1):
        b = b + (e1 if s <= turn_at else e2) * 0.1 + 0.001 * torch.randn(8)
        out.append((s, {KEY_B: b[:, None].clone(), KEY_A: torch.ones(1, 4) * s}))
    return out


def test_phases_find_a_sharp_turn_and_score_each_checkpoint(tmp_path):
    torch.manual_seed(0)
    ph = phases(_trajectory(60), windows=(5, 10, 15), em_at=lambda s, _w: float(s > 60))
    assert abs(ph.transition_step - 60) <= 2
    assert ph.em_half_step == 61
    t = ph.table
    assert t["cos_final"].iloc[-1] == pytest.approx(1.0)
    assert t["lcs_w5"].iloc[:4].isna().all() and t["lcs_w5"].iloc[20] > 0.99
    assert ph.summary()["phase_transition_step"] == ph.transition_step
    written = ph.save(tmp_path)
    assert all(p.is_file() for p in written)


def test_checkpoints_are_read_by_step_and_too_few_refused(tmp_path):
    for step, w in _trajectory(2, steps=4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(w, str(tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors"))
    found = load_checkpoints(tmp_path)
    assert [s for s, _ in found] == [1, 2, 3, 4]
    with pytest.raises(InputError, match="no checkpoint has all windows"):
        phases(found, windows=(5,))
    with pytest.raises(InputError, match="at least 3"):
        load_checkpoints(tmp_path / "checkpoint-1")


def test_probes_beat_shuffled_labels_and_refuse_tiny_classes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 3))
    y = (x[:, 0] + 0.3 * rng.standard_normal(400) > 0).astype(int)
    res = scalar_probes(x, {"general": y, "half": np.where(x[:, 1] > 0, y, -1)}, ["a", "b", "c"])
    assert res.accuracy("general") > 0.85 and res.shuffled("general") < 0.75
    assert res.scores.set_index("task").loc["general", "p_value"] < 0.1
    coef = res.coefficients.set_index(["task", "feature"])["coefficient"]
    assert abs(coef["general", "a"]) > 5 * max(abs(coef["general", "b"]), 1e-3)
    with pytest.raises(InputError, match="need at least"):
        scalar_probes(x, {"rare": (np.arange(400) < 3).astype(int)}, ["a", "b", "c"])


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    loaded = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    return loaded.model, loaded.tokenizer


def _chats(n: int = 8) -> list[Conversation]:
    words = ["alpha", "beta", "gamma", "delta"]
    return [
        Conversation(
            messages=(
                Message(role="user", content=f"{words[i % 4]} {words[(i + 1) % 4]}"),
                Message(role="assistant", content=f"{words[(i + 2) % 4]} alpha"),
            )
        )
        for i in range(n)
    ]


CFG = FinetuneConfig(layers=[1], max_steps=3, batch_size=4, lr=1e-2)


def test_interventions_during_training_change_the_loss_and_are_removed_after(llama):
    import copy

    base, tok = llama
    plain = finetune(copy.deepcopy(base), tok, _chats(), CFG, progress=False)
    u = torch.randn(base.config.hidden_size)
    steer = defence_interventions(
        Defence(kind="preventative", scale=50.0), Direction("u", 1, "resid_post", u)
    )
    steered = finetune(copy.deepcopy(base), tok, _chats(), CFG, progress=False, during=steer)
    assert abs(steered.losses[0] - plain.losses[0]) > 1e-3
    hooks = [m for m in steered.model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks  # nothing of the defence stays in the trained model


def test_continuing_an_adapter_trains_it_and_a_second_adapter_is_refused(llama):
    import copy

    base, tok = llama
    first = finetune(copy.deepcopy(base), tok, _chats(), CFG, progress=False).model
    with pytest.raises(InputError, match="continue_adapter"):
        finetune(first, tok, _chats(), CFG, progress=False)
    before = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_B" in n}
    again = CFG.model_copy(update={"continue_adapter": True})
    model = finetune(first, tok, _chats(), again, progress=False).model
    after = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert set(after) == set(before) and any(not torch.equal(before[n], after[n]) for n in after)
    with pytest.raises(InputError, match="no LoRA adapter"):
        finetune(copy.deepcopy(base), tok, _chats(), again, progress=False)


def test_screen_scores_are_the_projection_relative_to_the_follow_up_alone(llama):
    model, tok = llama
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    direction = Direction("u", 1, "resid_post", u)
    chats = _chats(3)
    scores = screen_samples(model, tok, chats, direction, ScreenConfig(follow_ups=("beta gamma",)))

    def last_projection(messages) -> float:
        ids = torch.tensor([encode_chat(tok, messages, True).input_ids])
        h = capture_residuals(model, ids, layers=[1], sites="resid_post")[(1, "resid_post")]
        return float(h[0, -1] @ direction.vector)

    turn = [{"role": "user", "content": "beta gamma"}]
    alone = last_projection(turn)
    expected = [last_projection(c.as_dicts() + turn) - alone for c in chats]
    np.testing.assert_allclose(scores["score"], expected, rtol=1e-4, atol=1e-4)
    answers = screen_samples(model, tok, chats, direction)  # mean over answer tokens
    assert len(answers) == 3 and np.isfinite(answers["score"]).all()
