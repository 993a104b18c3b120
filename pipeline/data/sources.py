"""Reading preference files into raw rows: one dict per record, never losing a row.

``data.path`` is a file, a folder (every supported file under it, sorted) or a glob. Supported containers:
``.jsonl``, ``.json`` (a list of records or an object of equal-length lists), ``.parquet``, ``.csv``, each
optionally ``.gz``. A raw row is ``{"source", "index", "raw", "error"}``: ``index`` is the 0-based record number
in its file (for JSONL the line number; blank lines are skipped and counted), ``raw`` the record as JSON text
(or a readable prefix of what could not be decoded or was too large) and ``error`` a quarantine reason from
reading (``bad_json``, ``bad_number``, ``too_deep``, ``invalid_utf8``, ``row_too_large``, ``bad_csv``) or
``""``: no bytes in a row make the reader raise. JSONL is streamed (a line over ``max_row_bytes`` is skipped
through, not held), so memory stays flat; ``.json``/``.csv``/``.parquet`` are parsed whole, up to
:data:`MAX_DOCUMENT_BYTES` decompressed. A file that cannot be read at all (a truncated gzip, a corrupt Parquet
file, malformed JSON, too large) raises :class:`DataFileError`, which names the file.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

KINDS = ("jsonl", "json", "parquet", "csv")
PREFIX_CHARS = 500  # how much of an undecodable or oversized row the quarantine keeps
MAX_ROW_BYTES = 1 << 20
"""Default limit on one record's size (a JSONL line, or a record as JSON text); larger rows are quarantined
as ``row_too_large`` instead of reaching the tokenizer (a 50 MB line took a tokenizer worker to 12 GB)."""
MAX_DOCUMENT_BYTES = 1 << 30
"""Largest decompressed ``.json``/``.csv``/``.parquet`` file: those are parsed whole, JSONL is streamed."""
_CHUNK = 1 << 20


class DataFileError(ConfigError):
    """A whole input file is unreadable; the message names it."""


def file_kind(path: str | Path) -> tuple[str, bool]:
    """(container kind, gzipped) from the file name; raises ConfigError for anything else."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = suffixes[-2 if gz else -1][1:] if len(suffixes) > int(gz) else ""
    if ext not in KINDS:
        raise ConfigError(f"{path}: unsupported file type; expected .jsonl, .json, .parquet or .csv (optionally .gz)")
    return ext, gz


def _supported(path: Path) -> bool:
    try:
        file_kind(path)
    except ConfigError:
        return False
    return path.is_file()


def resolve_files(spec: str) -> list[Path]:
    """The input files of ``data.path`` (file, folder or glob), sorted; raises FileNotFoundError when none."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _supported(f) and not f.name.startswith("."))
        where = f"folder {p}"
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if _supported(Path(f)))
        where = f"glob {spec!r}"
    elif p.is_file():
        file_kind(p)
        return [p]
    else:
        raise FileNotFoundError(f"data.path: no such file, folder or glob: {spec}")
    if not files:
        raise FileNotFoundError(f"data.path: no .jsonl/.json/.parquet/.csv(.gz) files in {where}")
    return files


def _open(path: str | Path) -> Any:
    """A binary stream of the file's content, gunzipped on the fly if ``.gz``."""
    return gzip.open(path, "rb") if file_kind(path)[1] else open(path, "rb")  # noqa: SIM115


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[Any]:
    """``_open`` with a truncated or corrupt gzip, or an unreadable file, as :class:`DataFileError`."""
    try:
        with _open(path) as handle:
            yield handle
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFileError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read file ({exc})") from None


def read_bytes(path: str | Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The whole (decompressed) content, read in chunks and refused past ``limit`` bytes (a gzip bomb stops
    there instead of inflating in memory): :class:`DataFileError` naming the file."""
    chunks, total = [], 0
    with _reading(path) as handle:
        while chunk := handle.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise DataFileError(
                    f"{path}: decompresses to more than {limit} bytes; .json, .csv and .parquet files are read "
                    "whole: split it, or use JSONL (streamed)"
                )
            chunks.append(chunk)
    return b"".join(chunks)


def file_stats(path: str | Path) -> tuple[str, int]:
    """(sha256 of the decompressed content, blank JSONL lines skipped), streamed in 1 MiB chunks; surfaces a
    truncated gzip early. Memory stays flat whatever the file expands to."""
    digest, blank = hashlib.sha256(), 0
    jsonl = file_kind(path)[0] == "jsonl"
    line_blank, line_len = True, 0  # the line being read spans chunks
    with _reading(path) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if not jsonl:
                continue
            *ended, rest = chunk.split(b"\n")
            for part in ended:
                blank += line_blank and not part.strip()
                line_blank, line_len = True, 0
            line_blank, line_len = line_blank and not rest.strip(), line_len + len(rest)
    blank += jsonl and line_len > 0 and line_blank  # a last line without a newline, whitespace only
    return digest.hexdigest(), int(blank)


def _row(source: str, index: int, raw: str, error: str = "") -> dict[str, Any]:
    return {"source": source, "index": index, "raw": raw, "error": error}


def _lines(handle: Any, limit: int) -> Iterator[tuple[bytes, int, bool]]:
    """(line without its newline, its length, whether it is whitespace only) per line; of a line over ``limit``
    bytes only the first ``limit`` bytes are kept, the rest is read through in chunks."""
    while line := handle.readline(limit + 1):
        size, blank = len(line) - line.endswith(b"\n"), not line.strip()
        if size > limit:
            while more := handle.readline(_CHUNK):
                size += len(more) - more.endswith(b"\n")
                blank = blank and not more.strip()
                if more.endswith(b"\n"):
                    break
            line = line[:limit]
        yield line.rstrip(b"\n"), size, blank


def _prefix(data: bytes) -> str:
    return data[: 4 * PREFIX_CHARS].decode("utf-8", "replace")[:PREFIX_CHARS]


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120]


def json_problem(text: str) -> str:
    """``""`` when ``text`` parses as JSON, else an error ``reason:detail`` (never raises)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return f"bad_json:{exc.msg} at column {exc.colno}"
    except RecursionError:
        return "too_deep:nested deeper than the JSON parser's recursion limit"
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        return f"bad_number:{_short(exc)}"
    return ""


def _too_large(size: int, limit: int) -> str:
    return f"row_too_large:{size} bytes, over the {limit}-byte row limit (data.max_row_bytes)"


def _jsonl_rows(handle: Any, source: str, limit: int) -> Iterator[dict[str, Any]]:
    for index, (line, size, blank) in enumerate(_lines(handle, limit)):
        if blank:
            continue  # blank lines are not rows (counted by file_stats)
        if size > limit:
            yield _row(source, index, _prefix(line), _too_large(size, limit))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _row(source, index, _prefix(line), f"invalid_utf8:byte {exc.start}")
            continue
        problem = json_problem(text)
        yield _row(source, index, text[:PREFIX_CHARS] if problem else text, problem)


def dump_record(record: Any) -> str:
    """A record as JSON text that is valid UTF-8 (lone surrogates escaped), for the raw column."""
    text = json.dumps(record, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record, ensure_ascii=True, default=str)
    return text


def record_row(source: str, index: int, record: Any, limit: int) -> dict[str, Any]:
    """The raw row of one decoded record (JSON list, CSV, Parquet, HF): too deep or too large is an error row."""
    try:
        raw = dump_record(record)
    except RecursionError:
        return _row(source, index, "", "too_deep:nested deeper than the JSON encoder's recursion limit")
    except ValueError as exc:  # an integer too long to print
        return _row(source, index, "", f"bad_number:{_short(exc)}")
    size = len(raw.encode("utf-8"))
    if size > limit:
        return _row(source, index, raw[:PREFIX_CHARS], _too_large(size, limit))
    return _row(source, index, raw)


def _json_rows(data: bytes, source: str, limit: int) -> Iterator[dict[str, Any]]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        why = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:200]
        if data.lstrip().startswith(b"{") and data.count(b"\n") > 1:
            raise DataFileError(
                f"{source}: not valid JSON ({why}); if it holds one record per line, name it .jsonl"
            ) from None
        raise DataFileError(f"{source}: not valid JSON ({why})") from None
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        lengths = {k: len(v) for k, v in doc.items()}
        if len(set(lengths.values())) != 1:
            raise DataFileError(f"{source}: object-of-lists columns have different lengths {lengths}")
        keys = list(doc)
        doc = [{k: doc[k][i] for k in keys} for i in range(next(iter(lengths.values())))]
    if not isinstance(doc, list):
        raise DataFileError(
            f"{source}: expected a JSON list of records or an object of lists, got {type(doc).__name__}"
        )
    for index, record in enumerate(doc):
        yield record_row(source, index, record, limit)


def _csv_row(source: str, index: int, record: dict, limit: int) -> dict[str, Any]:
    extra = record.pop(None, None)  # cells beyond the header
    row = record_row(source, index, record if extra is None else {**record, "__extra_cells__": extra}, limit)
    if row["error"]:
        return row
    try:
        row["raw"].encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes, carried as surrogates by surrogateescape
        fixed = row["raw"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return _row(source, index, fixed[:PREFIX_CHARS], f"invalid_utf8:character {exc.start}")
    return row if extra is None else {**row, "error": "bad_csv:more cells than header columns"}


def _csv_rows(data: bytes, source: str, limit: int) -> Iterator[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    index = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a cell over the csv module's field limit: this record only
            yield _row(source, index, "", f"bad_csv:{_short(exc)}")
        else:
            yield _csv_row(source, index, record, limit)
        index += 1


def _parquet_rows(data: bytes, source: str, limit: int) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(f"{source}: not a readable Parquet file ({exc})") from None
    for index, record in enumerate(table.to_pylist()):
        yield record_row(source, index, record, limit)


READERS = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}


def iter_raw_rows(
    path: str | Path, source: str | None = None, *, max_row_bytes: int = MAX_ROW_BYTES
) -> Iterator[dict[str, Any]]:
    """Every record of one file as a raw row (a bad record becomes an error row, never an exception); raises
    :class:`DataFileError` for an unreadable file. JSONL is streamed line by line."""
    kind, _ = file_kind(path)
    source = source or str(path)
    if kind == "jsonl":
        with _reading(path) as handle:
            yield from _jsonl_rows(handle, source, max_row_bytes)
    else:
        yield from READERS[kind](read_bytes(path), source, max_row_bytes)


def decode_raw(row: dict[str, Any]) -> Any:
    """The record of a raw row whose ``error`` is empty."""
    return json.loads(row["raw"])


def sample_records(path: str | Path, n: int = 64) -> list[Any]:
    """Up to ``n`` decodable records from the start of a file (for format detection)."""
    out = []
    for row in iter_raw_rows(path):
        if not row["error"]:
            out.append(decode_raw(row))
        if len(out) >= n:
            break
    return out
