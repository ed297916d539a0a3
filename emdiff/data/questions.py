"""Eval questions in the emergent-misalignment YAML format (anchors and aliases included).

Each entry has ``id``, ``type``, ``paraphrases`` and optionally ``system``,
``samples_per_paraphrase``, ``judge`` and ``judge_prompts`` (name -> template with ``{question}``
and ``{answer}``). Other keys are kept in ``Question.extra``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from emdiff.data.yamlfile import parse_yaml
from emdiff.errors import InputError
from emdiff.readers import read_text

_KNOWN = ("id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge", "judge_prompts")
DEFAULT_TYPE = "free_form"


class QuestionFormatError(InputError):
    """A question file or entry is malformed; the message names the file, entry and line."""


class Question(BaseModel):
    """One eval question with its paraphrases and judge prompts."""

    model_config = ConfigDict(frozen=True)
    id: str
    type: str = DEFAULT_TYPE
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples_per_paraphrase: int = 1
    judge: str | None = None
    judge_prompts: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)

    def messages(self, paraphrase_index: int, include_system: bool = True) -> list[dict[str, str]]:
        """Chat messages for one paraphrase: the system prompt (if any and wanted), then user."""
        out: list[dict[str, str]] = []
        if include_system and self.system is not None:
            out.append({"role": "system", "content": self.system})
        out.append({"role": "user", "content": self.paraphrases[paraphrase_index]})
        return out


def _parse_yaml(path: Path, text: str) -> tuple[Any, list[int]]:
    """The data plus the 1-based line of each top-level entry (when the file is a list)."""
    data, node = parse_yaml(path, text, QuestionFormatError)
    lines = []
    if isinstance(node, yaml.SequenceNode):
        lines = [item.start_mark.line + 1 for item in node.value]
    return data, lines


def _check_entry(raw: Any) -> dict[str, Any]:
    """Validate one decoded entry and return the Question fields. Raises ``ValueError``."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping, got {type(raw).__name__}")
    if "id" not in raw:
        raise ValueError("missing 'id'")
    qid = raw["id"]
    if isinstance(qid, bool) or not isinstance(qid, str | int) or str(qid) == "":
        raise ValueError(f"'id' must be a non-empty string, got {qid!r}")
    if "paraphrases" not in raw:
        raise ValueError("missing 'paraphrases'")
    paras = raw["paraphrases"]
    if not isinstance(paras, list) or not paras:
        raise ValueError("'paraphrases' must be a non-empty list of strings")
    for j, p in enumerate(paras):
        if not isinstance(p, str):
            raise ValueError(f"paraphrase {j} is {type(p).__name__}, not a string")
    qtype = raw.get("type", DEFAULT_TYPE)
    if not isinstance(qtype, str):
        raise ValueError(f"'type' must be a string, got {qtype!r}")
    for key in ("system", "judge"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"'{key}' must be a string, got {type(raw[key]).__name__}")
    spp = raw.get("samples_per_paraphrase", 1)
    if isinstance(spp, bool) or not isinstance(spp, int) or spp < 1:
        raise ValueError(f"'samples_per_paraphrase' must be a positive integer, got {spp!r}")
    prompts = raw.get("judge_prompts") or {}
    if not isinstance(prompts, dict):
        raise ValueError("'judge_prompts' must be a mapping of name -> template")
    for name, tmpl in prompts.items():
        if not isinstance(tmpl, str):
            raise ValueError(f"judge prompt {name!r} is not a string")
        if "{answer}" not in tmpl:
            raise ValueError(f"judge prompt {name!r} has no '{{answer}}' placeholder")
    return {
        "id": str(qid),
        "type": qtype,
        "paraphrases": tuple(paras),
        "system": raw.get("system"),
        "samples_per_paraphrase": spp,
        "judge": raw.get("judge"),
        "judge_prompts": {str(k): v for k, v in prompts.items()},
        "extra": {k: v for k, v in raw.items() if k not in _KNOWN},
    }


def load_questions(path: str | Path) -> list[Question]:
    """Read an eval-question YAML file; any problem raises one ``QuestionFormatError``."""
    path = Path(path)
    if not path.is_file():
        raise QuestionFormatError(f"{path}: no such file")
    data, lines = _parse_yaml(path, read_text(path, QuestionFormatError))
    if not isinstance(data, list):
        got = "an empty file" if data is None else type(data).__name__
        raise QuestionFormatError(f"{path}: top level must be a list of questions, got {got}")
    if not data:
        raise QuestionFormatError(f"{path}: the list of questions is empty: nothing to ask")
    questions: list[Question] = []
    first_index: dict[str, int] = {}
    for i, raw in enumerate(data):
        line = f":{lines[i]}" if i < len(lines) else ""
        qid = raw.get("id") if isinstance(raw, dict) else None
        label = f"entry {i}" + (f" (id {qid!r})" if qid is not None else "")
        try:
            fields = _check_entry(raw)
        except ValueError as e:
            raise QuestionFormatError(f"{path}{line}: {label}: {e}") from None
        if fields["id"] in first_index:
            first = first_index[fields["id"]]
            raise QuestionFormatError(
                f"{path}{line}: {label}: duplicate id, first used by entry {first}"
            )
        first_index[fields["id"]] = i
        questions.append(Question(**fields))
    return questions
