"""The config system: defaults, YAML overrides, dotted-path errors, presets, CLI behaviour."""

from pathlib import Path

import pytest

from pipeline.cli import main, split_config_args
from pipeline.config import (
    ConfigError,
    RunConfig,
    field_docs,
    flatten,
    from_dict,
    load_config,
    replace,
    to_dict,
    to_yaml,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_defaults_and_round_trip():
    cfg = load_config()
    assert cfg == RunConfig()
    assert from_dict(to_dict(cfg)) == cfg


def test_yaml_overrides_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\nloss:\n  preset: official\n  gamma: 0.0\n")
    cfg = load_config(path, ["train.max_steps=9", "data.path=/x/y.jsonl", "model.lora_target_modules=[a,b]"])
    assert cfg.train.max_steps == 9 and cfg.data.path == "/x/y.jsonl"
    assert cfg.model.lora_target_modules == ("a", "b")
    # the preset fills every loss key the file leaves out; explicit keys win
    assert (cfg.loss.preset, cfg.loss.base_loss, cfg.loss.lam, cfg.loss.gamma) == ("official", "tdpo", 0.2, 0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_stepz=3"], "unknown config key: train.max_stepz"),
        (["nope.a=1"], "unknown config key: nope"),
        (["train.max_steps=abc"], "train.max_steps: expected an integer"),
        (["loss.lam=1.5"], "loss.lam must be in [0, 1]"),
        (["loss.preset=mine"], "loss.preset: unknown preset 'mine'"),
        (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3"),
        (["generation.engine=tgi"], "generation.engine: 'tgi' is not one of"),
        (["train.max_steps"], "expected dotted.key=value"),
        (["train=3"], "train: expected a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config(bad)


def test_ints_become_floats_and_bools_stay_strict():
    cfg = load_config(None, ["loss.beta=1", "train.use_gpu=true", "train.bf16=true", "train.lr=2e-3"])
    assert isinstance(cfg.loss.beta, float) and cfg.train.bf16
    assert cfg.train.lr == 0.002  # YAML 1.1 reads 2e-3 as a string; floats accept it
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.use_gpu: expected true/false"):
        load_config(None, ["train.use_gpu=1"])
    assert load_config(None, ["train.report_interval_s=0"]).train.report_interval_s == 0.0
    with pytest.raises(ConfigError, match="train.report_interval_s must be >= 0, got -1.0"):
        load_config(None, ["train.report_interval_s=-1"])


def test_replace_and_flatten():
    cfg = replace(RunConfig(), {"loss.lam": 0.3, "train.max_steps": 5})
    assert cfg.loss.lam == 0.3 and cfg.train.max_steps == 5
    with pytest.raises(ConfigError, match="unknown config key: loss.lamb"):
        replace(cfg, {"loss.lamb": 1})
    flat = flatten(to_dict(cfg))
    assert flat["loss.lam"] == 0.3 and flat["train.max_steps"] == 5
    keys = {k for k, _, _ in field_docs()}
    assert {
        "output_dir",
        "data.path",
        "data.format",
        "model.name",
        "model.tokenizer",
        "loss.preset",
        "train.num_workers",
        "train.zero_stage",
        "train.max_steps",
    } <= keys


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "tidpo" in first, f"{path} must begin with the command that runs it"
    load_config(path)


def test_tiny_yaml_is_the_embedded_default():
    tiny = [p for p in CONFIGS if p.name == "tiny.yaml"][0]
    assert load_config(tiny) == RunConfig()


def test_cli_errors_are_one_line(capsys):
    assert main(["config", "show", "train.max_stepz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.max_stepz" in err
    assert main(["config", "show", "/no/such.yaml"]) == 2
    assert "/no/such.yaml" in capsys.readouterr().err


def test_cli_config_show_prints_resolved_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    assert main(["config", "show", "loss.preset=official", "data.path=pairs.jsonl", "model.name=gpt2"]) == 0
    out = capsys.readouterr().out
    expected = load_config(
        None,
        [
            "loss.preset=official",
            f"data.path={tmp_path / 'pairs.jsonl'}",
            "model.name=gpt2",
            f"output_dir={tmp_path / 'outputs' / 'tiny'}",
        ],
    )
    assert out == to_yaml(expected)  # local paths absolute (Ray workers run elsewhere), hub names untouched
    assert "base_loss: tdpo" in out


def test_split_config_args():
    assert split_config_args(["a.yaml", "x.y=1"]) == ("a.yaml", ["x.y=1"])
    with pytest.raises(ConfigError, match="only one CONFIG"):
        split_config_args(["a.yaml", "b.yaml"])


def test_help_everywhere(capsys):
    for cmd in (["--help"], ["train", "--help"], ["run", "--help"], ["tune", "--help"], ["config", "show", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(cmd)
        assert exit_.value.code == 0
    assert "dotted.key=value" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", ".inf", "1e999", "-.INF"])
def test_non_finite_floats_are_rejected(value):
    with pytest.raises(ConfigError, match=r"loss\.beta: expected a finite number"):
        load_config(None, [f"loss.beta={value}"])


def test_an_integer_beyond_the_float_range_is_rejected():
    with pytest.raises(ConfigError, match=r"loss\.beta: .* out of range"):
        load_config(None, ["loss.beta=" + "9" * 400])


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "y", "Yes", "ON", "1", "0"])
def test_booleans_are_only_true_or_false(value, tmp_path):
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected true/false"):
        load_config(None, [f"model.trust_remote_code={value}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  trust_remote_code: {value}\n")
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected true/false"):
        load_config(path)
    for text in ("true", "True", "FALSE"):
        assert load_config(None, [f"model.trust_remote_code={text}"]).model.trust_remote_code is (text[0] in "tT")
    # a string key may hold a word that YAML 1.1 would have made a boolean
    assert load_config(None, ["tracking.run_name=on"]).tracking.run_name == "on"


def _one_line_error(path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  run: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 at offset 17)" in _one_line_error(path)


def test_a_file_too_large_is_one_line(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    assert "larger than 1048576 bytes" in _one_line_error(path)


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    assert "expands to more than 100000 nodes" in _one_line_error(path)
    assert time.perf_counter() - start < 2.0
    # anchors and merge keys of ordinary size still work
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {max_steps: 3}\ntrain:\n  <<: *b\n")
    with pytest.raises(ConfigError, match="unknown config key: base"):
        load_config(ok)


@pytest.mark.parametrize(
    "text", ["train: [1, 2\n", "train:\n  a: 1\n b: 2\n", "[" * 20000 + "\n"], ids=["unclosed", "indent", "deep"]
)
def test_invalid_yaml_is_one_line(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert "bad.yaml" in _one_line_error(path)


def test_cli_shows_hostile_files_as_one_line(capsys, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"loss:\n  beta: \xff\n")
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not UTF-8" in err


def test_autocast_and_bf16_weights_are_exclusive():
    from pipeline.config import ConfigError, TrainConfig

    assert TrainConfig(autocast="bf16").autocast == "bf16"
    with pytest.raises(ConfigError, match="exclusive"):
        TrainConfig(autocast="bf16", bf16=True, use_gpu=True)
