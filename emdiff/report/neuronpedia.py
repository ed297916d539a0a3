"""Neuronpedia: feature cards out in SAEDashboard's upload format, explanations in from an export.

**Export.** SAEDashboard's ``NeuronpediaRunner`` writes, per SAE, a folder
``<model_id>_<sae_set>_<hook_name>_<d_sae>/`` holding ``run_settings.json`` and
``batch-<n>.json`` files; each batch is ``{"model_id", "layer", "sae_set", "features": [...]}``
and each feature carries the fields of its ``NeuronpediaDashboardFeature.to_dict()``
(``feature_index``, ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``, ``frac_nonzero``,
``freq_hist_data_bar_values`` / ``_heights``, ``activations`` of ``{"bin_min", "bin_max",
"bin_contains", "tokens", "values"}``, ...), values rounded to 3 decimals. Cards fill what they
have: top contexts become the "top activations" bin (``bin_min = bin_contains = -1``, ``bin_max``
the largest activation, as SAEDashboard parses its "TOP ACTIVATIONS" group); neuron alignment,
correlations, the logit histogram and decoder weight distribution stay empty lists; the
contrastive negatives have no Neuronpedia field and are left out.

**Import.** Neuronpedia exports explanations as records with ``modelId``, ``layer`` (its source
id, ``<layer>-<set>``, e.g. ``20-gemmascope-res-16k``), ``index`` (a string), ``description``,
``typeName`` and ``explanationModelName``: the JSON list of ``GET /api/explanation/export`` and
the ``explanations/batch-<n>.jsonl(.gz)`` files of its dataset exports. They become records of
``RUN/cards/explanations.json`` matched to cards by (layer number, index).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from pydantic import ValidationError

from emdiff.analyses.cards_io import (
    Explanation,
    attach_explanations,
    cards_files,
    explanations_path,
    load_cards,
    write_explanations,
)
from emdiff.errors import InputError
from emdiff.readers import decode_utf8, read_bytes

EMPTY_FIELDS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
)
"""SAEDashboard feature fields that cards have nothing for (written as empty lists)."""


def _round(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def np_feature(card: dict, meta: dict) -> dict:
    """One card as a SAEDashboard / Neuronpedia feature (``NeuronpediaDashboardFeature``)."""
    hist, logits = card["histogram"], card["logits"]
    edges = hist["edges"]
    centres = [(a + b) / 2 for a, b in pairwise(edges)]
    top = max((max(c["acts"], default=0.0) for c in card["contexts"]), default=0.0)
    window = meta.get("window", {})
    return {
        "feature_index": int(card["latent"]),
        **{k: [] for k in EMPTY_FIELDS},
        "neg_str": [t for t, _ in logits["bottom"]],
        "neg_values": _round(v for _, v in logits["bottom"]),
        "pos_str": [t for t, _ in logits["top"]],
        "pos_values": _round(v for _, v in logits["top"]),
        "frac_nonzero": float(hist["firing_fraction"]),
        "freq_hist_data_bar_values": _round(centres),
        "freq_hist_data_bar_heights": [int(c) for c in hist["counts"]],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": int(meta.get("n_rows", 0)),
        "n_tokens_in_prompt": int(window.get("before", 0)) + int(window.get("after", 0)) + 1,
        "dataset": str(meta.get("dataset", "")),
        "decoder_weights_dist": [],
        "activations": [
            {
                "bin_min": -1,
                "bin_max": round(float(top), 3),
                "bin_contains": -1,
                "tokens": list(c["tokens"]),
                "values": _round(c["acts"]),
            }
            for c in card["contexts"]
        ],
    }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def export_neuronpedia(
    cards_path: str | Path,
    out: str | Path,
    model_id: str | None = None,
    sae_set: str | None = None,
    per_batch: int = 128,
) -> list[Path]:
    """Write the cards at ``cards_path`` as SAEDashboard's Neuronpedia output under ``out``: one
    folder per layer with ``run_settings.json`` and ``batch-<n>.json``. ``model_id`` defaults to
    the last part of the model's name, ``sae_set`` to ``emdiff-<site>``. Returns the files."""
    doc = load_cards(cards_path)
    meta = doc["meta"]
    model_id = model_id or _safe(Path(str(meta.get("model") or "model")).name).lower()
    by_layer: dict[int, list[dict]] = {}
    for card in doc["cards"]:
        by_layer.setdefault(int(card["layer"]), []).append(card)
    written = []
    for layer, cards in sorted(by_layer.items()):
        site = cards[0]["site"]
        info = meta.get("dictionaries", {}).get(str(layer), {})
        hook = info.get("hook") or f"blocks.{layer}.hook_{site}"
        sae = sae_set or f"emdiff-{site.replace('_', '-')}"
        folder = Path(out) / f"{model_id}_{_safe(sae)}_{_safe(hook)}_{info.get('d_sae', 'na')}"
        folder.mkdir(parents=True, exist_ok=True)
        settings = {
            "model_id": model_id,
            "layer": layer,
            "sae_set": sae,
            "hook_name": hook,
            "d_sae": info.get("d_sae"),
            "huggingface_dataset_path": meta.get("dataset"),
            "n_prompts_total": meta.get("n_rows"),
            "n_features_at_a_time": per_batch,
            "source": f"emdiff cards {Path(cards_path).name}",
        }
        (folder / "run_settings.json").write_text(json.dumps(settings, indent=4))
        written.append(folder / "run_settings.json")
        for b, start in enumerate(range(0, len(cards), per_batch)):
            batch = {
                "model_id": model_id,
                "layer": layer,
                "sae_set": sae,
                "features": [np_feature(c, meta) for c in cards[start : start + per_batch]],
            }
            path = folder / f"batch-{b}.json"
            path.write_text(json.dumps(batch, ensure_ascii=False), encoding="utf-8")
            written.append(path)
    return written


# ---- import -------------------------------------------------------------------------------------
def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of a JSON list (or ``{"explanations": [...]}``) or JSON Lines file."""
    data = read_bytes(path)
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise InputError(f"{path}: not a readable gzip file ({e})") from None
    text = decode_utf8(data, path)
    if ".jsonl" in path.suffixes:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(doc, dict) and isinstance(doc.get("explanations"), list):
        doc = doc["explanations"]
    if not isinstance(doc, list):
        raise InputError(f"{path}: expected a JSON list of explanation records (or JSON Lines)")
    for i, row in enumerate(doc):
        yield f"record {i}", row


_SOURCE = re.compile(r"(\d+)(?:-(\S+))?")


def _neuronpedia(row: dict, where: str) -> tuple[str, Explanation | None]:
    """``(source id, record)`` of one Neuronpedia explanation row (None: empty description)."""
    missing = [k for k in ("layer", "index", "description") if k not in row]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}")
    layer = str(row["layer"])
    m = _SOURCE.fullmatch(layer)
    if m is None:
        raise InputError(
            f"{where}: layer {row['layer']!r} is not a Neuronpedia source id "
            "(<layer>-<set>, e.g. 20-gemmascope-res-16k)"
        )
    index = row["index"]
    if isinstance(index, bool) or not re.fullmatch(r"\d+", str(index)):
        raise InputError(f"{where}: index {index!r} is not a whole number >= 0")
    text = row["description"]
    if not isinstance(text, str):
        raise InputError(f"{where}: description {text!r} is not text")
    if not text.strip():
        return layer, None
    by = row.get("explanationModelName")
    source = "neuronpedia " + "/".join(str(p) for p in (row.get("modelId"), layer) if p)
    score = row.get("score")
    try:
        return layer, Explanation(
            layer=int(m.group(1)),
            latent=int(str(index)),
            explanation=text.strip(),
            score=score if isinstance(score, int | float) and not isinstance(score, bool) else None,
            source=f"{source} ({by})" if by else source,
        )
    except ValidationError as e:
        raise InputError(f"{where}: {e.errors()[0]['msg']}") from None


def read_explanation_file(path: str | Path, source_id: str | None = None) -> list[Explanation]:
    """Explanations from a Neuronpedia export (JSON list, JSON Lines, ``.gz``) or an emdiff
    explanations file. With ``source_id`` (``20-gemmascope-res-16k``) only its rows count;
    without, one layer's rows must all come from one source. A bad row fails naming the file
    and the row."""
    path = Path(path)
    out: list[Explanation] = []
    sources: dict[int, str] = {}
    for where, row in _rows(path):
        at = f"{path}: {where}"
        if not isinstance(row, dict):
            raise InputError(f"{at}: expected a JSON object, got {type(row).__name__}")
        if "explanation" in row and "latent" in row:  # emdiff's own format
            try:
                out.append(Explanation.model_validate(row))
            except ValidationError as e:
                err = e.errors()[0]
                raise InputError(f"{at}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
            continue
        source, record = _neuronpedia(row, at)
        if source_id is not None and source != source_id:
            continue
        if record is None:
            continue
        seen = sources.setdefault(record.layer, source)
        if seen != source:
            raise InputError(
                f"{at}: layer {record.layer} has explanations from {seen!r} and {source!r}; "
                "keep one by its source id (import-explanations --source)"
            )
        out.append(record)
    return out


@dataclass
class Imported:
    """What :func:`import_explanations` did."""

    read: int
    """Explanations read from the file (after the source filter)."""
    matched: int
    """Of those, explanations of a latent that has a card."""
    attached: dict[str, int]
    """Per cards file, how many cards show an explanation (the best of the explanations file)."""
    path: Path
    """The explanations file written."""


def import_explanations(
    run: str | Path, file: str | Path, source_id: str | None = None
) -> Imported:
    """Add the explanations in ``file`` whose (layer, latent) has a card in ``run`` to
    ``RUN/cards/explanations.json`` and attach them to every cards file."""
    files = cards_files(run)
    if not files:
        raise InputError(f"{run}: no cards/*.json: make feature cards first (emdiff cards)")
    keys = {(int(c["layer"]), int(c["latent"])) for p in files for c in load_cards(p)["cards"]}
    records = read_explanation_file(file, source_id)
    if not records:
        of = f" of source {source_id!r}" if source_id else ""
        raise InputError(f"{file}: no explanations{of} in it (empty descriptions do not count)")
    matched = [e for e in records if (e.layer, e.latent) in keys]
    if not matched:
        layers = sorted({e.layer for e in records})
        raise InputError(
            f"{file}: none of its {len(records)} explanations (layers {layers}) is of a latent "
            f"with a card in {run} (layers {sorted({k[0] for k in keys})})"
        )
    path = write_explanations(explanations_path(run), matched)
    attached = {p.name: attach_explanations(p) for p in files}
    return Imported(len(records), len(matched), attached, path)
