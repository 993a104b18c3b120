"""Fingerprints: what decides that a cached stage output is still valid (the one definition of each).

- :func:`digest`: structured settings (a config section, a list of inputs) -> 16 hex digits.
- :func:`folder_fingerprint`: the CONTENT of a folder's files (sha256 of every byte), e.g. prepared Parquet
  splits or anchors. Copying a folder keeps its fingerprint; rewriting a file with the same size does not.
- :func:`model_fingerprint`: a model as the stages load it: a folder's content (weights, config, tokenizer),
  ``tiny``'s architecture fields and seed, or a hub name (pin a revision in the name).

Content hashing reads every byte once per process (an lru cache keyed by path, size and mtime skips repeats):
about 1 s per GB here, small next to loading the same weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def digest(obj: Any) -> str:
    """16 hex digits of sha256 over a JSON rendering with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def folder_files(folder: str | Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Regular files under ``folder`` (recursive, sorted), optionally only those ending in ``suffixes``; hidden
    and ``_``-prefixed names (temporary files, ``_DONE.json`` markers) are not content."""
    root = Path(folder)
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
        and (suffixes is None or p.name.endswith(suffixes))
    )


def folder_fingerprint(folder: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Hash of (relative name, sha256) of every file of :func:`folder_files`; raises if there is none."""
    root = Path(folder)
    files = folder_files(root, suffixes)
    if not files:
        raise FileNotFoundError(
            f"nothing to fingerprint under {root}" + (f" (files ending {suffixes})" if suffixes else "")
        )
    return digest([[str(f.relative_to(root)), file_sha256(f)] for f in files])


def model_fingerprint(name: str, model_cfg: Any, seed: int) -> str:
    """A model as the stages load it (``model_cfg``: the run's ``ModelConfig``; ``seed``: ``tiny``'s weights)."""
    load = {"torch_dtype": model_cfg.torch_dtype, "tokenizer": model_cfg.tokenizer}
    if name == "tiny":
        arch = {k: getattr(model_cfg, k) for k in ("tiny_hidden_size", "tiny_layers", "tiny_heads")}
        return digest({"tiny": arch, "seed": seed, **load})
    if Path(name).is_dir():
        return digest({"folder": folder_fingerprint(name), **load})
    return digest({"name": name, **load})
