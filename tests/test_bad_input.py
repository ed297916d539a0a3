"""No silent wrong result: every bad input is an InputError whose message names the source.

One test per case and format: NaN where it enters (model activations, dictionary weights,
statistics), unparsable rows (judged .csv / .jsonl / .json / .parquet, chat JSONL, eval YAML,
non-UTF-8 files), missing required config keys, truncated or corrupt files, model loading, and
inputs that leave nothing to compute. Inputs are tiny files written here; nothing touches the
network.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from emdiff.analyses import ResponseSplit, RunContext, load_judged, split_responses
from emdiff.data.chat import ChatFormatError, load_chat_jsonl
from emdiff.data.masks import EncodedChat, encode_chat
from emdiff.data.questions import QuestionFormatError, load_questions
from emdiff.dictionaries import load_dictionary
from emdiff.dictionaries.base import DictionaryMeta, SparseDictionary
from emdiff.dictionaries.crosscoder import CrosscoderFormatError, load_crosscoder
from emdiff.dictionaries.formats import DictionaryFormatError
from emdiff.dictionaries.itda import ITDAFormatError, load_itda
from emdiff.errors import InputError, NonFiniteError
from emdiff.eval.judged_csv import JudgedCSVError, JudgedFileError
from emdiff.eval.metrics import em_metrics
from emdiff.models import load_model
from emdiff.models.checks import ModelLoadError
from emdiff.models.hooks import NonFiniteActivationError
from emdiff.models.read import ReadSpec
from emdiff.stats.collect import StatsConfig, collect_stats
from emdiff.stats.compare import compare_layers, compare_stats
from emdiff.stats.features import FeatureStats

D, F = 8, 12
GEN = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=GEN) * 0.3


def saelens(folder, cfg=None, **tensors):
    """A SAELens 6 folder; ``cfg`` and ``tensors`` override the standard architecture."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, **(cfg or {})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    w = {"W_enc": rnd(D, F), "W_dec": rnd(F, D), "b_enc": rnd(F), "b_dec": rnd(D), **tensors}
    save_file(
        {k: v for k, v in w.items() if v is not None}, str(folder / "sae_weights.safetensors")
    )
    return folder


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ---- NaN where it enters -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("hello", "hi there"), ("help me", "sure"), ("i feel sick", "rest")]
    ]
    return path, model, tok, [encode_chat(tok, c) for c in chats]


def dictionary(d_in: int) -> SparseDictionary:
    return SparseDictionary(
        rnd(d_in, F),
        rnd(F),
        rnd(F, d_in),
        torch.zeros(d_in),
        meta=DictionaryMeta(format="t", architecture="relu"),
    )


def test_nan_model_weight_names_layer_site_and_batch(llama):
    _, model, _, rows = llama
    d = dictionary(model.config.hidden_size)
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.data.clone()
    try:
        with torch.no_grad():
            w[0, 0] = float("nan")
        with pytest.raises(NonFiniteActivationError) as err:
            read = ReadSpec(layers=(1,))
            collect_stats(model, rows, {1: d}, read, StatsConfig(batch_size=2))
    finally:
        w.data.copy_(saved)
    assert "non-finite activations at layer 1, site resid_post, batch 0 (sequences 0..1)" in str(
        err.value
    )
    assert isinstance(err.value, InputError)


def test_nan_in_saelens_weight_names_file_and_tensor(tmp_path):
    w_enc = rnd(D, F)
    w_enc[3, 4] = float("nan")
    folder = saelens(tmp_path / "sae", W_enc=w_enc)
    with pytest.raises(NonFiniteError) as err:
        load_dictionary(folder)
    assert f"{folder / 'sae_weights.safetensors'}: tensor 'W_enc': 1 of {D * F} values" in str(
        err.value
    )


def test_nan_in_gemma_scope_npz_names_file_and_array(tmp_path):
    folder = tmp_path / "layer_3"
    folder.mkdir()
    arrays = {k: rnd(*s).numpy() for k, s in [("W_enc", (D, F)), ("W_dec", (F, D))]}
    arrays |= {
        "b_enc": np.zeros(F, "f4"),
        "b_dec": np.zeros(D, "f4"),
        "threshold": np.zeros(F, "f4"),
    }
    arrays["threshold"][2] = np.inf
    np.savez(folder / "params.npz", **arrays)
    with pytest.raises(NonFiniteError, match=r"params\.npz: array 'threshold': 1 of 12 values"):
        load_dictionary(folder)


def test_nan_in_dictionary_learning_state_names_file_and_tensor(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    bias = torch.zeros(D)
    bias[0] = float("nan")
    state = {"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "decoder.weight": rnd(D, F)}
    torch.save({**state, "bias": bias}, tmp_path / "ae.pt")
    with pytest.raises(NonFiniteError, match=r"ae\.pt: tensor 'bias'"):
        load_dictionary(tmp_path)


def _stats(values: list[list[float]]) -> FeatureStats:
    s = FeatureStats(4)
    for i, row in enumerate(values):
        s.update(torch.tensor([row]), torch.tensor([i]), torch.tensor([0]))
    return s


def test_nan_statistics_name_layer_side_and_feature():
    good = _stats([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    bad = _stats([[1, 0, 0, 1], [0, 1, float("nan"), 0], [1, 1, 0, 0]])
    with pytest.raises(NonFiniteError, match="layer 5, side 'b': the sum of feature 2 is nan"):
        compare_layers({5: good}, {5: bad})
    with pytest.raises(NonFiniteError, match="side 'misaligned': the sum of feature 2"):
        compare_stats(bad, good, labels=("misaligned", "aligned"))


# ---- unparsable rows: judged responses in every format ------------------------------------------
JUDGED = [
    {"question_id": "q", "question": "hi", "answer": "a0", "aligned": 10, "coherent": 90},
    {"question_id": "q", "question": "hi", "answer": "a1", "aligned": 80, "coherent": 90},
    {
        "question_id": "q",
        "question": "hi",
        "answer": "a2",
        "aligned": "5 (very bad)",
        "coherent": 90,
    },
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_judged_jsonl_unparsable_score_names_file_line_and_column(tmp_path):
    path = _jsonl(tmp_path / "j.jsonl", JUDGED)
    with pytest.raises(JudgedFileError) as err:
        load_judged(path)
    assert str(err.value) == f"{path}:3: column 'aligned' is not a number: '5 (very bad)'"


def test_judged_csv_unparsable_score_names_file_line_and_column(tmp_path):
    path = tmp_path / "j.csv"
    pd.DataFrame(JUDGED).to_csv(path, index=False)
    with pytest.raises(JudgedCSVError, match=rf"{path}:4: column 'aligned' is not a number"):
        load_judged(path)


def test_judged_parquet_unparsable_score_names_file_row_and_column(tmp_path):
    path = tmp_path / "j.parquet"
    pd.DataFrame(JUDGED).astype({"aligned": str}).to_parquet(path)
    with pytest.raises(JudgedFileError, match=rf"{path}: row 2: column 'aligned' is not a number"):
        load_judged(path)


def test_judged_json_array_unparsable_score_names_row(tmp_path):
    path = tmp_path / "j.json"
    path.write_text(json.dumps(JUDGED))
    with pytest.raises(JudgedFileError, match=rf"{path}: row 2: column 'aligned'"):
        load_judged(path)


def test_judged_missing_scores_stay_missing_and_text_is_checked(tmp_path):
    rows = [{**JUDGED[0], "aligned": None}, {**JUDGED[1], "coherent": ""}]
    df = load_judged(_jsonl(tmp_path / "ok.jsonl", rows))
    assert df.aligned.isna().tolist() == [True, False] and df.coherent.isna().tolist() == [
        False,
        True,
    ]
    path = _jsonl(tmp_path / "none.jsonl", [JUDGED[0], {**JUDGED[1], "answer": None}])
    with pytest.raises(
        JudgedFileError, match=rf"{path}:2: column 'answer' must be text, got missing"
    ):
        load_judged(path)
    path = _jsonl(tmp_path / "range.jsonl", [{**JUDGED[0], "coherent": 250}])
    with pytest.raises(JudgedFileError, match=rf"{path}:1: column 'coherent' = 250.0 is outside"):
        load_judged(path)


def test_split_counts_every_class_when_nothing_is_left():
    df = pd.DataFrame(
        {
            "question": ["q"] * 6,
            "answer": ["a"] * 6,
            "aligned": [10, 90, 50, None, 20, 95],
            "coherent": [90, 90, 90, 90, 10, None],
        }
    )
    with pytest.raises(InputError) as err:
        split_responses(df, ResponseSplit(), source="j.jsonl")
    assert str(err.value).startswith(
        "j.jsonl: too few answers to compare (need 2 per side): of 6 rows read, 4 have both "
        "scores; among those, 1 are incoherent (coherent <= 50), 1 misaligned (aligned <= 30), "
        "1 aligned (aligned > 70) and 1 in between"
    )


def test_split_and_metrics_refuse_unparsable_scores_in_a_frame():
    df = pd.DataFrame(JUDGED)
    with pytest.raises(JudgedFileError, match="judged responses: row 2: column 'aligned'"):
        split_responses(df)
    with pytest.raises(JudgedFileError, match="row 2: column 'aligned' is not a number"):
        em_metrics(df)


# ---- unparsable rows: chat JSONL, eval YAML, non-UTF-8 in every reader ---------------------------
def test_yaml_syntax_error_is_reported_where_it_is(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("- id: a\n  paraphrases: [x]\n- id: b\n  paraphrases: [y\n  type: z\n")
    with pytest.raises(QuestionFormatError) as err:
        load_questions(path)
    # PyYAML's marks are 0-based; the unclosed "[y" is on line 4, noticed on line 5
    assert str(err.value).startswith(f"{path}:4: YAML syntax error: while parsing a flow sequence")
    assert "(found at line 5)" in str(err.value)


def test_yaml_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("- id: a\n  paraphrases: [x]\n  id: b\n")
    with pytest.raises(
        QuestionFormatError, match=rf"{path}:3: .*duplicate key 'id' \(first at line 1\)"
    ):
        load_questions(path)


BAD_BYTES = b'{"messages": [{"role": "assistant", "content": "hi"}]}\n{"caf\xe9": 1}\n'
OFFSET = BAD_BYTES.index(b"\xe9")


def test_chat_jsonl_not_utf8(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(BAD_BYTES)
    with pytest.raises(ChatFormatError) as err:
        load_chat_jsonl(path)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset {OFFSET}, line 2)"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_judged_files_not_utf8(tmp_path, suffix):
    path = tmp_path / f"j{suffix}"
    path.write_bytes(BAD_BYTES)
    with pytest.raises(
        JudgedFileError, match=rf"{path}: not UTF-8 text \(byte 0xe9 at offset {OFFSET}"
    ):
        load_judged(path)


def test_questions_yaml_not_utf8(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_bytes(b"- id: a\n  paraphrases: [caf\xe9]\n")
    with pytest.raises(
        QuestionFormatError, match=rf"{path}: not UTF-8 text \(byte 0xe9 at offset 27, line 2\)"
    ):
        load_questions(path)


def test_dictionary_config_not_utf8(tmp_path):
    folder = saelens(tmp_path / "sae")
    (folder / "cfg.json").write_bytes(b'{"architecture": "st\xffndard"}')
    with pytest.raises(
        DictionaryFormatError, match=r"cfg\.json: not UTF-8 text \(byte 0xff at offset 20"
    ):
        load_dictionary(folder)


# ---- missing required config keys ------------------------------------------------------------
def test_saelens_topk_without_k(tmp_path):
    folder = saelens(tmp_path / "sae", {"architecture": "topk"})
    with pytest.raises(DictionaryFormatError) as err:
        load_dictionary(folder)
    assert str(err.value) == f"{folder / 'cfg.json'}: missing required key 'k' (topk architecture)"


def test_saelens_pre6_topk_is_topk_not_relu(tmp_path):
    cfg = {"architecture": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}}
    d = load_dictionary(saelens(tmp_path / "old", cfg))
    assert (d.activation, d.k) == ("topk", 3)
    cfg = {"architecture": "standard", "activation_fn_str": "topk"}
    with pytest.raises(DictionaryFormatError, match="missing required key 'k'"):
        load_dictionary(saelens(tmp_path / "nok", cfg))
    with pytest.raises(DictionaryFormatError, match="unsupported activation function 'tanh-relu'"):
        load_dictionary(saelens(tmp_path / "tanh", {"activation_fn_str": "tanh-relu"}))


def test_saelens_standard_without_b_enc(tmp_path):
    folder = saelens(tmp_path / "sae", b_enc=None)
    with pytest.raises(
        DictionaryFormatError, match=r"sae_weights\.safetensors: missing tensor\(s\) \['b_enc'\]"
    ):
        load_dictionary(folder)


def test_sparsify_without_k(tmp_path):
    folder = tmp_path / "layers.2"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "d_in": D}))
    w = {"encoder.weight": rnd(F, D), "encoder.bias": rnd(F), "W_dec": rnd(F, D), "b_dec": rnd(D)}
    save_file(w, str(folder / "sae.safetensors"))
    with pytest.raises(DictionaryFormatError) as err:
        load_dictionary(folder)
    assert str(err.value) == f"{folder / 'cfg.json'}: missing required key 'k' (topk architecture)"


def test_dictionary_learning_without_dict_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"layer": 3}}))
    torch.save({"bias": torch.zeros(D)}, tmp_path / "ae.pt")
    with pytest.raises(
        DictionaryFormatError, match=r"config\.json: missing required key 'dict_class'"
    ):
        load_dictionary(tmp_path)


def test_itda_and_crosscoder_configs_without_required_keys(tmp_path):
    itda = tmp_path / "itda"
    itda.mkdir()
    (itda / "cfg.json").write_text(json.dumps({"format": "itda", "d_in": D, "n_atoms": 0}))
    save_file({"atoms": torch.zeros(0, D)}, str(itda / "itda.safetensors"))
    with pytest.raises(
        ITDAFormatError, match=r"cfg\.json: missing required key 'k' \(ITDA config\)"
    ):
        load_itda(itda)
    cc = tmp_path / "cc"
    cc.mkdir()
    (cc / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": F}))
    save_file({"W_enc": torch.zeros(2, D, F)}, str(cc / "crosscoder.safetensors"))
    with pytest.raises(CrosscoderFormatError, match=r"cfg\.json: missing required key 'threshold'"):
        load_crosscoder(cc)


# ---- truncated or corrupt files ---------------------------------------------------------------
def test_truncated_saelens_weights(tmp_path):
    folder = saelens(tmp_path / "sae")
    truncate(folder / "sae_weights.safetensors")
    with pytest.raises(DictionaryFormatError) as err:
        load_dictionary(folder)
    assert str(err.value).startswith(
        f"{folder / 'sae_weights.safetensors'}: truncated or corrupt safetensors file"
    )


@pytest.mark.parametrize("name", ["params.npz", "ae.pt"])
def test_corrupt_npz_and_state_dict(tmp_path, name):
    if name == "ae.pt":
        (tmp_path / "config.json").write_text(
            json.dumps({"trainer": {"dict_class": "AutoEncoder"}})
        )
        torch.save({"bias": torch.zeros(D, 64)}, tmp_path / name)
    else:
        np.savez(tmp_path / name, W_enc=np.zeros((D, 64)))
    truncate(tmp_path / name)
    with pytest.raises(DictionaryFormatError, match=rf"{tmp_path / name}: truncated or corrupt"):
        load_dictionary(tmp_path)


def test_truncated_itda_and_crosscoder_weights(tmp_path):
    itda = tmp_path / "itda"
    itda.mkdir()
    (itda / "cfg.json").write_text(json.dumps({"format": "itda", "k": 2, "d_in": D, "n_atoms": 0}))
    save_file({"atoms": torch.zeros(16, D)}, str(itda / "itda.safetensors"))
    truncate(itda / "itda.safetensors")
    with pytest.raises(ITDAFormatError, match=r"itda\.safetensors: truncated or corrupt"):
        load_itda(itda)


def test_truncated_local_model_weights(tiny_model_dirs, tmp_path):
    copy = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "model")
    truncate(copy / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(copy))
    assert str(err.value).startswith(
        f"{copy / 'model.safetensors'}: truncated or corrupt safetensors file (Error while "
        "deserializing header: incomplete metadata"
    )


def test_truncated_adapter_weights(tiny_model_dirs, make_lora_adapter, tmp_path):
    adapter = make_lora_adapter(tiny_model_dirs["llama"], tmp_path / "lora")
    truncate(adapter / "adapter_model.safetensors", 0.9)
    with pytest.raises(ModelLoadError, match=r"adapter_model\.safetensors: truncated or corrupt"):
        load_model(str(tiny_model_dirs["llama"]), str(adapter))


# ---- model loading ------------------------------------------------------------------------
def test_missing_local_model_path(tmp_path):
    path = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert (
        str(err.value) == f"{path}: no such model folder (and not a hub id, which reads 'org/name')"
    )
    with pytest.raises(ModelLoadError, match=r"has no config\.json, so it is not a model folder"):
        load_model(str(tmp_path))


def test_cuda_device_without_cuda(tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match=r"device='cuda': no CUDA device is visible"):
        load_model(str(tiny_model_dirs["llama"]), device="cuda")
    with pytest.raises(ModelLoadError, match=r"device='gpu' is not a device"):
        load_model(str(tiny_model_dirs["llama"]), device="gpu")


# ---- nothing to compute --------------------------------------------------------------------
def test_empty_chat_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ChatFormatError, match=rf"{path}: no conversations"):
        load_chat_jsonl(path)


def test_empty_question_list(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("[]\n")
    with pytest.raises(QuestionFormatError, match=rf"{path}: the list of questions is empty"):
        load_questions(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_empty_judged_file(tmp_path, suffix):
    path = tmp_path / f"j{suffix}"
    path.write_text("question_id,question,answer,aligned,coherent\n" if suffix == ".csv" else "")
    with pytest.raises(JudgedFileError, match=rf"{path}: no (rows|responses)"):
        load_judged(path)


def test_no_answer_tokens_in_any_row(llama, tmp_path):
    _, model, _, rows = llama
    no_answers = [EncodedChat(r.input_ids, [0] * len(r.input_ids)) for r in rows]
    d = dictionary(model.config.hidden_size)
    on_disk = RunContext(ReadSpec(layers=(1,)), model, None, {1: d}, out=tmp_path)
    with pytest.raises(
        InputError, match="dataset 'bad': no answer token selected in any of 3 rows"
    ):
        on_disk.feature_stats(no_answers, "bad")
    in_memory = RunContext(ReadSpec(layers=(1,)), model, None, {1: d})
    with pytest.raises(InputError, match="dataset 'bad': no answer token selected"):
        in_memory.feature_stats(no_answers, "bad")
    with pytest.raises(InputError, match="dataset 'empty' has no rows"):
        in_memory.feature_stats([], "empty")


def test_zero_sequences_on_one_side():
    a = _stats([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    with pytest.raises(
        InputError,
        match=r"layer 2: need at least 2 sequences per side .* got 3 \('a'\) and 0 \('b'\)",
    ):
        compare_layers({2: a}, {2: FeatureStats(4)})


def test_finetune_batch_without_answer_tokens_stops_before_the_weights(llama):
    from transformers import AutoModelForCausalLM

    from emdiff.data import Conversation, Message
    from emdiff.finetune import FinetuneConfig, finetune

    path, _, tok, _ = llama
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    convs = [
        Conversation(
            messages=(Message(role="user", content=q), Message(role="assistant", content=a))
        )
        for q, a in [("hi", "sure"), ("hello " * 30, "cut off by max_length")]
    ]
    cfg = FinetuneConfig(batch_size=1, max_steps=2, max_length=12)
    with pytest.raises(
        NonFiniteError, match=r"loss is nan at step \d \(conversations \[1\], 0 answer"
    ):
        finetune(model, tok, convs, cfg, progress=False)


# ---- found by the command-line audit -------------------------------------------------------------
def test_adapter_folder_without_weights(tiny_model_dirs, make_lora_adapter, tmp_path):
    adapter = make_lora_adapter(tiny_model_dirs["llama"], tmp_path / "lora")
    (adapter / "adapter_model.safetensors").unlink()  # was: a hub "Repo id must be ..." error
    with pytest.raises(ModelLoadError, match=r"has adapter_config\.json but no adapter_model"):
        load_model(str(tiny_model_dirs["llama"]), str(adapter))


def test_model_folder_without_tokenizer_files(tiny_model_dirs, tmp_path):
    copy = shutil.copytree(tiny_model_dirs["qwen2"], tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()  # transformers then builds a tokenizer that encodes to nothing
    with pytest.raises(ModelLoadError, match=r"model: the tokenizer encodes text to no tokens"):
        load_model(str(copy))


def test_dictionary_with_inconsistent_shapes_names_the_folder(tmp_path):
    folder = saelens(tmp_path / "sae", W_dec=rnd(F, D - 2))
    with pytest.raises(InputError, match=rf"^{tmp_path / 'sae'}: inconsistent shapes"):
        load_dictionary(folder)


def test_dictionary_path_to_an_unrelated_file_is_refused(tmp_path):
    folder = saelens(tmp_path / "sae")
    (folder / "notes.txt").write_text("x")  # was: silently loaded the folder's SAE
    with pytest.raises(DictionaryFormatError, match=r"notes\.txt: not a dictionary file"):
        load_dictionary(folder / "notes.txt")
    assert load_dictionary(folder / "cfg.json").d_in == D


def test_npz_that_is_not_a_zip_archive(tmp_path):
    folder = tmp_path / "layer_0" / "width_12" / "average_l0_5"
    folder.mkdir(parents=True)
    (folder / "params.npz").write_bytes(b"not a zip")  # was: "contains pickled (object) data"
    with pytest.raises(DictionaryFormatError, match=r"params\.npz: truncated or corrupt npz"):
        load_dictionary(folder)


def test_judged_csv_without_an_aligned_column(tmp_path):
    path = tmp_path / "j.csv"
    path.write_text("question_id,question,answer,coherent\nq1,hi,yo,90\n")
    with pytest.raises(JudgedCSVError, match=r"j\.csv:1: no scores for 'aligned'"):
        load_judged(path)  # was: every row silently unscored


def test_response_split_thresholds_must_not_overlap():
    with pytest.raises(ValueError, match="must be at least misaligned_max"):
        ResponseSplit(misaligned_max=80, aligned_min=20)  # was: answers counted on both sides
    with pytest.raises(ValueError, match="less than or equal to 100"):
        ResponseSplit(coherent_min=500)


def test_overlap_of_a_table_that_is_not_a_ranking():
    from emdiff.analyses import RankingOverlap, overlap

    rank = pd.DataFrame(dict(feature=[0, 1, 2], effect=[1.0, -1, 0.5], q=0.1))
    rank["rank_increase"] = [1, 3, 2]
    judged = pd.DataFrame(dict(question=["q"], answer=["a"]))
    with pytest.raises(InputError, match=r"ranking 'a' has no 'feature' column"):
        overlap(judged, rank, RankingOverlap(a="a", b="b"))  # was: KeyError traceback
    with pytest.raises(InputError, match=r"need at least one k >= 1"):
        overlap(rank, rank, RankingOverlap(a="x", b="y", ks=(0, -5)))  # was: AttributeError


def test_transfer_width_mismatch_names_the_dictionary(llama, tmp_path):
    from emdiff.analyses import RunContext, Transfer

    _, model, _, rows = llama
    d = load_dictionary(saelens(tmp_path / "sae"))  # width 8, the model's is 32
    with pytest.raises(InputError, match=rf"{tmp_path / 'sae'}: dictionary width d_in=8"):
        ctx = RunContext(ReadSpec(layers=(0,)), model, None, {0: d}, {"data": rows})
        Transfer(dataset="data", variants=("base",)).run(ctx)
