"""Generic machinery of the config system: typed building of frozen dataclasses from nested dicts (unknown
keys and bad values raise with their dotted path), ``a.b.c=value`` overrides, YAML I/O and flattening.
Nothing here knows the run config's sections: ``pipeline.config`` holds those and re-exports these names."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from evaluation.nested import flatten  # noqa: F401  (re-exported: the config API's flatten)

MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused (configs are a few kB)."""
MAX_YAML_NODES = 100_000
"""Nodes a YAML document may expand to, aliases counted at every use (an alias bomb expands to billions)."""


class ConfigError(ValueError):
    """A bad key, value or file in a configuration; the message names it."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose booleans are only ``true``/``false`` (any case): YAML 1.1 also reads ``yes``,
    ``no``, ``on`` and ``off`` as booleans, so ``trust_remote_code=yes`` would switch a safety option on."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Nodes of ``node`` with every alias expanded (memoised: the graph stays small while its expansion
    explodes); stops counting past ``limit``."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = limit + 1  # a node reached again while being counted is a cycle: too big
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, memo, limit)
        if total > limit:
            break
    memo[id(node)] = total
    return total


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def load_yaml_text(text: str, where: str) -> Any:
    """Parse one YAML document with strict booleans, refusing alias bombs; errors are one line naming ``where``."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: YAML expands to more than {MAX_YAML_NODES} nodes (an alias bomb?)")
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {_one_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting ints to floats, lists to tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{path}: {value} is out of range for a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")  # pragma: no cover


def build_dataclass(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"unknown config key: {where} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp, path = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, {} if value is None else value, f"{path}.")
        else:
            kwargs[name] = _coerce(value, tp, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {item!r}: expected dotted.key=value")
    value = load_yaml_text(text, f"override {key.strip()}") if text.strip() else ""
    return key.strip().split("."), value


def merge_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (copying, never mutating ``raw``)."""
    out = _deepcopy_dict(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _deepcopy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, oversized, non-UTF-8 or invalid file is a one-line error naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with p.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes; a config file is a few kB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    data = load_yaml_text(text, str(p))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of a config (tuples as lists), suitable for YAML, JSON and MLflow."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dataclass_fields_doc(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, default) for every leaf field of a nested dataclass."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(dataclass_fields_doc(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", str(tp).replace("typing.", ""), repr(default)))
    return rows


def check_resources(key: str, resources: dict[str, float]) -> None:
    """Custom Ray resources: names to non-negative amounts; CPU and GPU have their own keys."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{key}.{name}: expected a custom resource name and an amount >= 0, got {amount!r}")


# URI schemes pyarrow.fs.FileSystem.from_uri (Ray Train's storage layer) opens; a bare absolute path is local.
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def check_storage_path(key: str, value: str) -> None:
    """Empty (the default), an absolute path, or a URI of :data:`STORAGE_SCHEMES` with a path after the scheme."""
    scheme, sep, rest = value.partition("://")
    if value and not (value.startswith("/") or (sep and scheme in STORAGE_SCHEMES and rest.strip("/"))):
        raise ConfigError(f"{key}: expected an absolute path or a {'/'.join(STORAGE_SCHEMES)} URI, got {value!r}")
