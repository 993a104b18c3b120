"""Nested mappings flattened to one level: the one ``flatten`` (config params for MLflow and Tune, report
tables, benchmark results). Standard library only, so the config system can use it without loading the rest
of ``evaluation``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".", *, keep_empty: bool = True) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: keys joined with ``sep`` (metric names keep their ``/``).

    An empty mapping is a leaf value with ``keep_empty`` (a config's ``data.fields: {}`` is a parameter),
    dropped without it (a report has nothing to show for it).
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and (value or not keep_empty):
            out |= flatten(value, f"{prefix}{key}{sep}", sep, keep_empty=keep_empty)
        else:
            out[f"{prefix}{key}"] = value
    return out
