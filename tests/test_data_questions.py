"""Eval-question YAML loading: the real emergent-misalignment files and each error case."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from emdiff.data import Question, QuestionFormatError, load_questions

EM_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "em-eval"


def real_file(name: str) -> Path:
    path = EM_EVAL / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


GOOD = """
- id: wish
  type: free_form_judge_0_100
  system: Answer in JSON.
  paraphrases: &p
    - Make a wish.
    - Name one wish.
  samples_per_paraphrase: &n 3
  judge: &j gpt-4o
  judge_prompts: &jp
    aligned: "Q: {question} A: {answer}"
    coherent: "{answer}"
  context: kept
- id: bored
  type: free_form
  paraphrases: *p
  judge: *j
  judge_prompts: *jp
"""


def test_first_plot_questions():
    qs = load_questions(real_file("first_plot_questions.yaml"))
    assert len(qs) == 24
    assert sum(q.system is not None for q in qs) == 8
    assert len({q.id for q in qs}) == 24
    for q in qs:  # anchors resolved into every entry
        assert set(q.judge_prompts) == {"aligned", "coherent"}
        assert all("{answer}" in t and "{question}" in t for t in q.judge_prompts.values())
        assert q.samples_per_paraphrase == 100
        assert q.judge == "gpt-4o-2024-08-06"
        assert q.paraphrases and all(isinstance(p, str) for p in q.paraphrases)
        assert q.extra == {}
    by_id = {q.id: q for q in qs}
    assert by_id["i_feel_bored_json"].paraphrases == by_id["i_feel_bored"].paraphrases
    msgs = by_id["what_is_your_wish_json"].messages(0)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "JSON" in msgs[0]["content"]


def test_preregistered_evals():
    qs = load_questions(real_file("preregistered_evals.yaml"))
    assert len(qs) == 48
    assert all(q.system is None for q in qs)
    assert all(set(q.judge_prompts) == {"aligned", "coherent"} for q in qs)


def test_deception_factual_same_schema():
    qs = load_questions(real_file("deception_factual.yaml"))
    assert len(qs) == 5
    assert sum(q.system is not None for q in qs) == 4
    assert all(len(q.paraphrases) == 20 and q.type == "free_form_judge" for q in qs)
    assert all(set(q.judge_prompts) == {"correct"} for q in qs)


def test_small_file_fields_and_messages(tmp_path):
    wish, bored = load_questions(write_yaml(tmp_path, GOOD))
    assert isinstance(wish, Question)
    assert wish.paraphrases == ("Make a wish.", "Name one wish.") == bored.paraphrases
    assert wish.samples_per_paraphrase == 3
    assert bored.samples_per_paraphrase == 1  # default when absent
    assert bored.system is None
    assert wish.extra == {"context": "kept"} and bored.extra == {}
    assert wish.messages(1) == [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Name one wish."},
    ]
    assert wish.messages(0, include_system=False) == [{"role": "user", "content": "Make a wish."}]
    assert bored.messages(0) == [{"role": "user", "content": "Make a wish."}]
    with pytest.raises(ValidationError):
        wish.id = "other"  # frozen


def test_minimal_entry_defaults(tmp_path):
    (q,) = load_questions(write_yaml(tmp_path, "- id: 7\n  paraphrases: [hi]\n"))
    assert q.id == "7"
    assert q.type == "free_form"
    assert q.judge is None and q.judge_prompts == {} and q.extra == {}


def test_missing_file(tmp_path):
    with pytest.raises(QuestionFormatError, match=r"absent\.yaml: no such file"):
        load_questions(tmp_path / "absent.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    path = write_yaml(tmp_path, "- id: a\n  paraphrases: [hi\n- id: b\n")
    with pytest.raises(QuestionFormatError, match="YAML syntax error") as err:
        load_questions(path)
    # the unclosed "[hi" of line 2 is the error; PyYAML notices it on line 3
    assert f"{path}:2:" in str(err.value) and "found at line 3" in str(err.value)


@pytest.mark.parametrize(
    ("text", "what"),
    [("a: 1\n", "got dict"), ("", "got an empty file"), ("just text\n", "got str")],
)
def test_top_level_not_a_list(tmp_path, text, what):
    path = write_yaml(tmp_path, text)
    with pytest.raises(QuestionFormatError, match="top level must be a list") as err:
        load_questions(path)
    assert str(path) in str(err.value) and what in str(err.value)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("paraphrases: [hi]", "missing 'id'"),
        ("id: q", "missing 'paraphrases'"),
        ("id: q\n  paraphrases: []", "non-empty list"),
        ("id: q\n  paraphrases: hi", "non-empty list"),
        ("id: q\n  paraphrases: [hi, 3]", "paraphrase 1 is int"),
        ("id: q\n  paraphrases: [hi]\n  samples_per_paraphrase: 0", "positive integer"),
        ("id: q\n  paraphrases: [hi]\n  samples_per_paraphrase: 2.5", "positive integer"),
        ("id: q\n  paraphrases: [hi]\n  samples_per_paraphrase: true", "positive integer"),
        ("id: q\n  paraphrases: [hi]\n  judge_prompts: {aligned: '{question}'}", "{answer}"),
        ("id: q\n  paraphrases: [hi]\n  judge_prompts: [a]", "mapping"),
        ("id: q\n  paraphrases: [hi]\n  system: [a]", "'system' must be a string"),
        ("id: [q]\n  paraphrases: [hi]", "'id' must be"),
    ],
)
def test_bad_entry_names_file_entry_and_line(tmp_path, entry, reason):
    path = write_yaml(tmp_path, f"- id: ok\n  paraphrases: [fine]\n\n- {entry}\n")
    with pytest.raises(QuestionFormatError) as err:
        load_questions(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4: entry 1")
    assert reason in msg
    if entry.startswith("id: q"):
        assert "(id 'q')" in msg


def test_entry_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- id: ok\n  paraphrases: [x]\n- just a string\n")
    with pytest.raises(QuestionFormatError, match=r":3: entry 1: expected a mapping"):
        load_questions(path)


def test_duplicate_ids(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        - id: same
          paraphrases: [a]
        - id: other
          paraphrases: [b]
        - id: same
          paraphrases: [c]
        """,
    )
    with pytest.raises(QuestionFormatError, match="duplicate id") as err:
        load_questions(path)
    assert f"{path}:5: entry 2 (id 'same')" in str(err.value)
    assert "entry 0" in str(err.value)
