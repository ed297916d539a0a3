"""YAML read strictly, with the line of every value kept, so any error can name ``file:line``.

:func:`parse_yaml` refuses a key given twice in one mapping (PyYAML keeps the last silently) and
turns a syntax error into one line at the place that locates it. :func:`line_of` finds the line
of a value from its path of keys and indices (a pydantic error's ``loc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# a YAML error "while scanning" a token or "while parsing a flow" collection starts where the
# unclosed construct began (its context mark); any other error is at its problem mark
_CONTEXT_FIRST = ("while scanning", "while parsing a flow")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping. Keys brought in by a ``<<``
    merge may be overridden, as YAML allows."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if first != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {first + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _syntax_error(path: Path, e: yaml.YAMLError) -> str:
    """One line for a YAML error, at the mark that locates it (PyYAML's marks are 0-based)."""
    problem_mark = getattr(e, "problem_mark", None)
    context_mark = getattr(e, "context_mark", None)
    context = getattr(e, "context", None) or ""
    mark, other = problem_mark, context_mark
    if context_mark is not None and (problem_mark is None or context.startswith(_CONTEXT_FIRST)):
        mark, other = context_mark, problem_mark
    where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e)
    detail = problem
    if context and other is not None and other.line != mark.line:
        label = "found at" if other is problem_mark else "started at"
        detail = f"{context}: {problem} ({label} line {other.line + 1})"
    elif context:
        detail = f"{context}: {problem}"
    return f"{where}: YAML syntax error: {detail}"


def parse_yaml(path: Path, text: str, error: type[Exception]) -> tuple[Any, yaml.Node | None]:
    """The data of ``text`` and its node tree (for :func:`line_of`); ``error`` is raised with
    one line naming ``path:line`` on bad YAML."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise error(_syntax_error(path, e)) from None
    finally:
        loader.dispose()
    return data, node


def line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the value at ``loc`` (keys and list indices), or of the deepest part of
    it that exists (a missing key is reported at its mapping)."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            nxt = node.value[part] if 0 <= part < len(node.value) else None
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line
