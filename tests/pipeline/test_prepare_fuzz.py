"""Every input file is used or quarantined, never a crash: one test per hostile input, a property test over
generated files (arbitrary bytes and arbitrary JSON values, >= 2,000 examples) and end-to-end ``prepare`` runs.

The property runs the reader and row layer directly (``sources.iter_raw_rows`` -> ``rows.process_rows`` ->
the Arrow batch -> ``manifest.write_quarantine``): exactly what each Ray task does, without a Ray stage per
example. For every generated file: no exception (a whole-file container that cannot be parsed is a one-line
:class:`DataFileError` naming the file), kept + quarantined = read, read + blank lines = the file's lines
(JSONL), the batch converts to Arrow, and the quarantine file is strict JSONL in valid UTF-8.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data import manifest, sources
from pipeline.data.formats import FORMATS
from pipeline.data.rows import ROW_SCHEMA, process_rows
from pipeline.models import byte_tokenizer

KW = {"fields": {}, "max_length": 64, "max_prompt_length": 32}
LIMIT = 512  # max_row_bytes for the property: oversized rows are cheap to generate


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _strict(line: str):
    def reject(name):
        raise ValueError(f"{name} in the quarantine file")

    return json.loads(line, parse_constant=reject)


def _check_rows(path: Path, tok, fmt: str = "standard", limit: int = sources.MAX_ROW_BYTES) -> tuple[list, list]:
    """Read, process, convert to Arrow, write and re-read the quarantine: the invariants of one file."""
    rows = list(sources.iter_raw_rows(path, max_row_bytes=limit))
    out = process_rows(rows, formats={str(path): fmt}, tokenizer=tok, **KW)
    assert len(out) == len(rows)  # kept + quarantined = read
    assert all(isinstance(o["reason"], str) for o in out)
    pa.Table.from_pylist(out, schema=ROW_SCHEMA)  # what each Ray task returns
    bad = [o for o in out if o["reason"]]
    quarantine = path.with_name(path.name + ".quarantine.jsonl")
    assert manifest.write_quarantine(quarantine, bad) == len(bad)
    lines = quarantine.read_bytes().decode("utf-8").splitlines()
    assert [(q["index"], q["reason"]) for q in map(_strict, lines)] == [(o["index"], o["reason"]) for o in bad]
    return rows, out


# ----------------------------------------------------------------------------------------------------------
# One test per hostile input of the red-team pass.


def test_a_lone_surrogate_is_quarantined_and_the_quarantine_file_is_written(tmp_path, tok):
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"prompt": "a", "chosen": "\\ud800", "rejected": "b"}\n')
    _, out = _check_rows(path, tok)
    assert out[0]["reason"] == "invalid_utf8"
    listed = tmp_path / "surrogate.json"  # a JSON list: the record itself carries the surrogate
    listed.write_text('[{"prompt": "\\udfff", "chosen": "a", "rejected": "b"}]')
    assert _check_rows(listed, tok)[1][0]["reason"] == "invalid_utf8"


def test_deep_nesting_and_huge_integers_are_quarantined(tmp_path, tok):
    path = tmp_path / "deep.jsonl"
    deep_but_parsable = b'{"a": ' * 900 + b"1" + b"}" * 900
    path.write_bytes(b"[" * 100_000 + b"\n" + b'{"prompt": ' + b"1" * 5000 + b"}\n" + deep_but_parsable)
    _, out = _check_rows(path, tok)
    assert [o["reason"] for o in out] == ["too_deep", "bad_number", "missing_field"]


def test_a_huge_json_list_record_or_file_is_a_row_error_or_a_one_line_file_error(tmp_path, tok):
    path = tmp_path / "deep.json"
    path.write_bytes(b"[" * 100_000)
    with pytest.raises(sources.DataFileError, match=r"deep\.json: not valid JSON \(nested too deeply\)"):
        list(sources.iter_raw_rows(path))
    path.write_bytes(b"[" + b"1" * 5000 + b"]")
    with pytest.raises(sources.DataFileError, match="deep.json: not valid JSON .*4300 digits"):
        list(sources.iter_raw_rows(path))


def test_a_row_over_max_row_bytes_is_quarantined_without_being_held(tmp_path, tok):
    """A 50 MB line took a tokenizer worker to 12 GB; now it is skipped through in 1 MiB reads."""
    path = tmp_path / "long.jsonl"
    good = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    with path.open("wb") as handle:
        handle.write(good + b'{"prompt": "' + b"x" * (50 << 20) + b'"}\n' + good)
    tracemalloc.start()
    try:
        rows = list(sources.iter_raw_rows(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["error"].split(":")[0] for r in rows] == ["", "row_too_large", ""]
    assert rows[1]["error"].startswith(f"row_too_large:{(50 << 20) + 14} bytes") and len(rows[1]["raw"]) <= 500
    assert peak < 8 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_a_gzip_bomb_is_streamed_and_a_whole_document_one_is_refused(tmp_path):
    """0.2 MB of gzip that expands to 200 MB used 830 MB in file_stats; now memory stays flat."""
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as handle:
        for _ in range(32):  # 32 MiB of whitespace lines
            handle.write(b" " * ((1 << 20) - 1) + b"\n")
    tracemalloc.start()
    try:
        sha, blank = sources.file_stats(bomb)
        rows = list(sources.iter_raw_rows(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bomb.stat().st_size < 200_000 and blank == 32 and rows == [] and peak < 8 << 20, f"{peak / 2**20:.0f} MiB"
    doc = tmp_path / "bomb.json.gz"
    doc.write_bytes(gzip.compress(b" " * (4 << 20)))
    with pytest.raises(sources.DataFileError, match=r"bomb\.json\.gz: decompresses to more than 1048576 bytes"):
        sources.read_bytes(doc, limit=1 << 20)


def test_nul_bytes_and_any_bytes_are_rows(tmp_path, tok):
    path = tmp_path / "nul.jsonl"
    path.write_bytes(b'{"prompt": "a\x00", "chosen": "b", "rejected": "c"}\n\x00\x00\n\xff\n{"prompt": "\\u0000"}\n')
    _, out = _check_rows(path, tok)
    assert [o["reason"] for o in out] == ["bad_json", "bad_json", "invalid_utf8", "missing_field"]
    csv_path = tmp_path / "nul.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\na\x00,b,c\n\xff,b,c\n" + b'"' + b"y" * 200_000 + b'",b,c\n')
    _, out = _check_rows(csv_path, tok)
    assert [o["reason"] for o in out] == ["", "invalid_utf8", "bad_csv"]


def test_nan_in_a_record_keeps_the_quarantine_strict_json(tmp_path, tok):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"prompt": NaN, "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": Infinity}\n')
    _, out = _check_rows(path, tok)
    assert [o["reason"] for o in out] == ["wrong_type", "missing_field"]


# ----------------------------------------------------------------------------------------------------------
# The property.

KEYS = ("prompt", "chosen", "rejected", "conversations", "question", "response_j", "response_k", "role", "content")
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates included
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=4),
    max_leaves=12,
)
RECORDS = st.fixed_dictionaries(
    {k: JSON_VALUES | TEXT for k in ("prompt", "chosen", "rejected")}, optional={"extra": JSON_VALUES}
)


@st.composite
def json_lines(draw) -> bytes:
    value = draw(RECORDS | JSON_VALUES)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # a raw surrogate is invalid UTF-8: hostile bytes too


LINES = (
    json_lines()
    | st.binary(max_size=64)
    | st.builds(lambda n: b"[" * n, st.integers(900, 3000))
    | st.builds(lambda n: b"9" * n, st.integers(4200, 4400))
    | st.builds(lambda n: b'{"prompt": "' + b"z" * n + b'"}', st.integers(LIMIT - 20, LIMIT + 20))
    | st.builds(lambda n: b" " * n, st.integers(LIMIT - 2, LIMIT + 2))
)


@st.composite
def files(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["jsonl", "jsonl", "jsonl", "json", "csv", "jsonl.gz"]))
    if kind == "json":
        body = json.dumps(draw(st.lists(RECORDS | JSON_VALUES, max_size=6))).encode("utf-8", "surrogatepass")
        body = draw(st.sampled_from([body, body[: max(1, len(body) // 2)]]))  # sometimes cut short
    elif kind == "csv":
        cell = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))
        cells = st.lists(cell, min_size=3, max_size=4)
        body = b"prompt,chosen,rejected\n" + b"\n".join(b",".join(r) for r in draw(st.lists(cells, max_size=6)))
    else:
        body = draw(st.sampled_from([b"\n", b"\r\n"])).join(draw(st.lists(LINES | st.just(b""), max_size=8)))
        body += draw(st.sampled_from([b"", b"\n"]))
        if kind == "jsonl.gz":
            body = gzip.compress(body)
            body = draw(st.sampled_from([body, body[:-4]]))  # a truncated gzip is a file error
    return kind, body


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files(), st.sampled_from(FORMATS))
def test_any_file_is_kept_or_quarantined_never_a_crash(tmp_path_factory, tok, file, fmt):
    kind, body = file
    path = tmp_path_factory.mktemp("fuzz") / f"input.{kind}"
    path.write_bytes(body)
    try:
        _, blank = sources.file_stats(path)
        rows, _ = _check_rows(path, tok, fmt, limit=LIMIT)
    except sources.DataFileError as exc:  # a container that cannot be parsed at all: refused, naming it
        assert kind in ("json", "jsonl.gz") and "\n" not in str(exc) and str(path) in str(exc)
        return
    if kind == "jsonl":
        lines = body.split(b"\n")
        assert len(rows) + blank == len(lines) - (lines[-1] == b"")  # every line is a row or a blank line


# ----------------------------------------------------------------------------------------------------------
# End to end on Ray.


@pytest.mark.ray
def test_prepare_on_a_hostile_file_accounts_for_every_row(ray_cluster, tmp_path):
    from pipeline.config import load_config
    from pipeline.data.prepare import data_dir, prepare

    good = [json.dumps({"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}).encode() for i in range(6)]
    hostile = [
        b'{"prompt": "a", "chosen": "\\ud800", "rejected": "b"}',
        b"[" * 100_000,
        b'{"prompt": ' + b"1" * 5000 + b"}",
        b'{"prompt": "' + b"x" * (2 << 20) + b'", "chosen": "a", "rejected": "b"}',
        b'{"prompt": NaN, "chosen": "a", "rejected": "b"}',
        b'{"prompt": "' + b"y" * 300_000 + b'", "chosen": "a", "rejected": "b"}',  # valid, over data.max_row_bytes
        b"\x00\xff\xfe",
        b"",
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(good[:3] + hostile + good[3:]) + b"\n")
    overrides = [f"output_dir={tmp_path / 'out'}", f"data.path={path}", "data.max_bad_fraction=1.0",
                 "data.max_row_bytes=200000"]  # fmt: skip
    cfg = load_config(None, [*overrides, "data.format=standard"])
    m = prepare(cfg)
    assert (m["read"], m["kept"], m["quarantined"]) == (13, 6, 7) and m["blank_lines_skipped"] == 1
    assert m["reasons"] == {
        "invalid_utf8": 2, "too_deep": 1, "bad_number": 1, "row_too_large": 2, "wrong_type": 1
    }  # fmt: skip
    lines = (data_dir(tmp_path / "out") / "quarantine.jsonl").read_bytes().decode("utf-8").splitlines()
    assert len(lines) == 7 and all(_strict(line)["source"] == str(path) for line in lines)
