"""Fingerprint, manifest, quarantine file and the too-many-bad-rows error of the prepare stage.

The fingerprint is a sha256 over everything that changes the written rows: input content (decompressed bytes
of each file, or the synthetic task and seed, or the HF dataset fingerprint), layouts and field mapping,
tokenizer (its serialised vocabulary/merges/normaliser, special ids, chat template), template, length limits,
split and dedup settings, shard count, and the code version (a hash of this package's sources).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.data import template as tpl

log = logging.getLogger(__name__)


def code_version() -> str:
    """sha256 (first 16 hex) of the prepare code (pipeline/data/*.py and evaluation/synthetic.py)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in [*sorted(here.glob("*.py")), here.parents[1] / "evaluation" / "synthetic.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's output: a hash of its serialised backend plus specials and template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest()[:16],
        "vocab_size": len(tokenizer),
        "template": tpl.template_name(tokenizer),
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]
        if tpl.has_chat_template(tokenizer)
        else None,
        "bos_prefix": tpl.bos_prefix(tokenizer),
        "eos_id": tpl.eos_id(tokenizer),
        "pad_id": tokenizer.pad_token_id,
    }


def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts`` (the tokenizer's path is left out: content identifies it)."""
    clean = dict(parts)
    if isinstance(clean.get("tokenizer"), dict):
        clean["tokenizer"] = {k: v for k, v in clean["tokenizer"].items() if k != "name"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when absent; a corrupt one is logged and treated as absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable manifest %s (%s); the stage will run again", path, exc)
        return None


def is_cache_hit(manifest: Mapping[str, Any] | None, fp: str, data_dir: Path) -> bool:
    """The manifest matches ``fp`` and every shard it lists is still there."""
    if not manifest or manifest.get("fingerprint") != fp:
        return False
    files = [f for split in manifest.get("splits", {}).values() for f in split.get("files", [])]
    return all((data_dir / f).is_file() for f in files)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _raw_value(raw: str) -> Any:
    """The record when ``raw`` is strict JSON (no NaN/Infinity), else the text itself."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, TypeError, RecursionError):
        return raw


def quarantine_line(record: Mapping[str, Any]) -> str:
    """One quarantine record as a line of strict JSON that is valid UTF-8, whatever the row held."""
    rec = {
        "source": str(record["source"]),
        "index": int(record["index"]),
        "reason": str(record["reason"]),
        "detail": str(record["detail"]),
        "raw": _raw_value(record["raw"] or ""),
    }
    try:
        line = json.dumps(rec, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):  # a record that does not print back: keep its text
        rec = {**rec, "raw": str(record["raw"] or "")}
        line = json.dumps(rec, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: escaped, so the file stays UTF-8
        line = json.dumps(rec, ensure_ascii=True)
    # Characters that str.splitlines() (and some JSONL readers) take for line ends; they occur only inside
    # JSON strings here, where the escape means the same.
    return line.translate(_LINE_BREAKS)


def write_quarantine(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """One JSON line per rejected row: source, index, reason, detail, raw (the record, or its text prefix)."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(quarantine_line(r) + "\n")
            n += 1
    return n


def too_many_bad_message(
    *, read: int, bad_by_source: Counter, reasons: Counter, limit: float, quarantine_path: Path
) -> str:
    """The error for a quarantined fraction above ``data.max_bad_fraction``: files, top reasons, where to look."""
    bad = sum(bad_by_source.values())
    files = ", ".join(f"{src} ({n} rows)" for src, n in bad_by_source.most_common(3))
    top = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common(3))
    return (
        f"{bad} of {read} rows ({bad / read:.1%}) were quarantined, above data.max_bad_fraction={limit}: "
        f"in {files}; top reasons: {top}; see {quarantine_path}"
    )
