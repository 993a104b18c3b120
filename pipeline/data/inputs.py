"""What ``data.path`` names, resolved on the driver: local files, ``hf:NAME``, or ``synthetic``.

:func:`resolve_inputs` hashes each input (a truncated gzip fails here, naming the file, before any Ray work),
detects or checks each source's layout (the choice is logged and written to the manifest), and returns an
:class:`Inputs` whose :meth:`Inputs.read_dataset` is the read step of the Ray Data pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, DataConfig
from pipeline.data import sources
from pipeline.data.formats import FORMATS, detect_format

SYNTHETIC = "synthetic"
HF_PREFIX = "hf:"


@dataclass
class Inputs:
    """Resolved inputs: ordered sources, their layouts, what fingerprints them, and how to read them."""

    kind: str  # "files" | "hf" | "synthetic"
    formats: dict[str, str]  # source -> layout, in read order
    format_origin: str  # "declared" (data.format) or "detected" (data.format=auto)
    fingerprint: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    blank_lines: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)  # synthetic raw rows
    hf_dataset: Any = None
    max_row_bytes: int = sources.MAX_ROW_BYTES  # data.max_row_bytes

    def read_dataset(self) -> Any:
        """The raw rows (``source``, ``index``, ``raw``, ``error``) as a Ray Dataset."""
        import ray.data

        if self.kind == "files":
            items = [
                {"path": str(p), "source": s, "limit": self.max_row_bytes} for p, s in zip(self.files, self.formats)
            ]
            return ray.data.from_items(items).flat_map(_file_rows)
        if self.kind == "synthetic":
            return ray.data.from_items(self.items)
        source = next(iter(self.formats))
        indexed = self.hf_dataset.add_column("__index__", list(range(len(self.hf_dataset))))
        return ray.data.from_huggingface(indexed).map_batches(
            _hf_rows, fn_kwargs={"source": source, "limit": self.max_row_bytes}, batch_format="pyarrow"
        )

    def sort_key(self, column: Any) -> Any:
        """pandas ``sort_values`` key: sources in read order, then row index."""
        order = {s: i for i, s in enumerate(self.formats)}
        return column.map(order) if column.name == "source" else column

    def describe(self) -> str:
        return ", ".join(self.formats)

    def describe_all(self, rows_by_source: Counter) -> list[dict[str, Any]]:
        return [
            {**fp, "format": self.formats[fp["source"]], "rows": rows_by_source.get(fp["source"], 0)}
            for fp in self.fingerprint
        ]

    def format_summary(self) -> str:
        """The one layout of every source, or ``mixed`` (per-source layouts are under ``inputs``)."""
        found = set(self.formats.values())
        return found.pop() if len(found) == 1 else "mixed"


def _file_rows(item: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray ``flat_map``: every raw row of one file; an unreadable file becomes one ``file_error`` row."""
    try:
        return list(sources.iter_raw_rows(item["path"], item["source"], max_row_bytes=item["limit"]))
    except sources.DataFileError as exc:
        return [{"source": item["source"], "index": -1, "raw": "", "error": f"file_error:{exc}"}]


def _hf_rows(batch: Any, *, source: str, limit: int) -> Any:
    import pyarrow as pa

    rows = batch.to_pylist()
    out = [sources.record_row(source, int(r.pop("__index__")), r, limit) for r in rows]
    return pa.Table.from_pylist(out)


def _layout(cfg: DataConfig, sample: Callable[[], list[Any]], source: str) -> str:
    if cfg.format != "auto":
        if cfg.format not in FORMATS:
            raise ConfigError(f"data.format: {cfg.format!r} is not auto or one of {list(FORMATS)}")
        return cfg.format
    try:
        return detect_format(sample(), cfg.fields, source=source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _synthetic(cfg: DataConfig) -> Inputs:
    from evaluation.synthetic import generate_pairs

    source = f"{SYNTHETIC}:{cfg.synthetic_task}"
    try:
        pairs = generate_pairs(cfg.synthetic_task, cfg.synthetic_num_pairs, cfg.synthetic_seed)
    except ValueError as exc:
        raise ConfigError(f"data.synthetic_task: {exc}") from None
    items = [{"source": source, "index": i, "raw": json.dumps(p), "error": ""} for i, p in enumerate(pairs)]
    fp = [{"source": source, "task": cfg.synthetic_task, "n": cfg.synthetic_num_pairs, "seed": cfg.synthetic_seed}]
    return Inputs(
        kind="synthetic", formats={source: "standard"}, format_origin="synthetic", fingerprint=fp, items=items
    )


def _huggingface(cfg: DataConfig) -> Inputs:
    import datasets

    name = cfg.path[len(HF_PREFIX) :]
    source = f"{cfg.path}/{cfg.split}"
    try:
        ds = datasets.load_dataset(name, split=cfg.split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise ConfigError(f"data.path={cfg.path}: cannot load split {cfg.split!r}: {exc}") from None
    fmt = _layout(cfg, lambda: ds.select(range(min(64, len(ds)))).to_list(), source)
    fp = [{"source": source, "hf_fingerprint": ds._fingerprint, "rows": len(ds)}]
    return Inputs(
        kind="hf",
        formats={source: fmt},
        format_origin="declared" if cfg.format != "auto" else "detected",
        fingerprint=fp,
        hf_dataset=ds,
    )


def resolve_inputs(cfg: DataConfig) -> Inputs:
    """Inputs of ``data.path``; raises ConfigError / FileNotFoundError naming the path or file at fault."""
    if cfg.path == SYNTHETIC:
        return dataclasses.replace(_synthetic(cfg), max_row_bytes=cfg.max_row_bytes)
    if cfg.path.startswith(HF_PREFIX):
        return dataclasses.replace(_huggingface(cfg), max_row_bytes=cfg.max_row_bytes)
    files = sources.resolve_files(cfg.path)
    formats: dict[str, str] = {}
    fps = []
    blank = 0
    for path in files:
        source = str(path)
        sha, n_blank = sources.file_stats(path)
        fps.append({"source": source, "sha256": sha})
        blank += n_blank
        formats[source] = _layout(cfg, lambda p=path: sources.sample_records(p), source)
    origin = "declared" if cfg.format != "auto" else "detected"
    return Inputs(kind="files", formats=formats, format_origin=origin, fingerprint=fps, files=files, blank_lines=blank,
                  max_row_bytes=cfg.max_row_bytes)  # fmt: skip
