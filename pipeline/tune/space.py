"""Search spaces: ``tune.space`` (dotted config key -> distribution spec) parsed, checked, and turned into Tune's.

A spec is a one-key mapping: ``{"uniform": [low, high]}``, ``{"loguniform": [low, high]}`` (low > 0),
``{"choice": [v1, v2, ...]}`` (sampled) or ``{"grid": [v1, v2, ...]}`` (every value, Tune's ``grid_search``).
Parsing is pure (no Ray): every key must exist in the run config, lie in a searchable section (``loss.*``,
``train.*``: the trials share one prepared dataset), and every endpoint / listed value must give a valid config
and stage plan. A value that needs other inputs than the base config's (anchors for gamma > 0, another
reference kind or anchor context, e.g. a search over ``loss.preset``) is served by the trial's own plan: it
builds those inputs itself, cached by fingerprint (:mod:`pipeline.tune.trial`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, RunConfig, flatten, replace, to_dict
from pipeline.plan import plan

KINDS = ("uniform", "loguniform", "choice", "grid")
SEARCHABLE = ("loss.", "train.")
# The mission's default: lambda (attribution vs Gaussian prior) and the Gaussian width divisor.
DEFAULT_SPACE: dict[str, Any] = {"loss.lam": {"uniform": [0.0, 1.0]}, "loss.sigma_div": {"choice": [2, 4, 8]}}


@dataclass(frozen=True)
class Param:
    """One searched key: ``kind`` in :data:`KINDS`; ``values`` is (low, high) for ranges, the options otherwise."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def endpoints(self) -> tuple[Any, ...]:
        """The values whose configs must all validate (range ends, or every option)."""
        return self.values


def _parse_spec(key: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"tune.space.{key}: expected one of {{{'|'.join(KINDS)}: [...]}}, got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"tune.space.{key}: unknown distribution {kind!r}; use one of {list(KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"tune.space.{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"tune.space.{key}.{kind}: expected [low, high] numbers, got {values!r}")
        low, high = float(values[0]), float(values[1])
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise ConfigError(f"tune.space.{key}.{kind}: need finite low < high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"tune.space.{key}.loguniform: low must be > 0, got {low}")
        return Param(key, kind, (low, high))
    return Param(key, kind, tuple(values))


def parse_space(cfg: RunConfig) -> list[Param]:
    """``cfg.tune.space`` (or :data:`DEFAULT_SPACE` when empty) -> checked :class:`Param` list, in key order."""
    space = cfg.tune.space or DEFAULT_SPACE
    known = flatten(to_dict(cfg))
    params = []
    for key, spec in space.items():
        if key not in known:
            raise ConfigError(f"tune.space: unknown config key {key!r}")
        if not key.startswith(SEARCHABLE):
            raise ConfigError(
                f"tune.space: {key!r} cannot be searched; only {', '.join(s + '*' for s in SEARCHABLE)} keys "
                "(the data and the model are shared by all trials)"
            )
        param = _parse_spec(key, spec)
        for value in param.endpoints():
            try:  # the trial's config and its plan must resolve (e.g. a triplet needs an anchor source)
                plan(replace(cfg, {key: value}), "trial", trial_id="check")
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: value {value!r} is invalid: {exc}") from exc
        params.append(param)
    if cfg.tune.search_alg == "optuna" and any(p.kind == "grid" for p in params):
        raise ConfigError("tune.search_alg=optuna cannot take grid entries; use choice (or search_alg=grid)")
    if cfg.tune.search_alg == "grid" and any(p.kind in ("uniform", "loguniform") for p in params):
        bad = [p.key for p in params if p.kind in ("uniform", "loguniform")]
        raise ConfigError(f"tune.search_alg=grid needs grid or choice entries only; ranges: {', '.join(bad)}")
    return params


def num_trials(cfg: RunConfig, params: list[Param]) -> int:
    """Trials the search runs: the grid's size with search_alg=grid (num_samples does not apply), else
    ``num_samples`` times the size of any grid entries (Tune's rule for mixing grid and sampled keys)."""
    grid = math.prod(len(p.values) for p in params if p.kind == "grid" or cfg.tune.search_alg == "grid")
    return grid if cfg.tune.search_alg == "grid" else cfg.tune.num_samples * grid


def tune_space(params: list[Param], search_alg: str) -> dict[str, Any]:
    """:class:`Param` list -> Tune ``param_space`` (flat dotted keys; choice becomes a grid for search_alg=grid)."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "uniform":
            out[p.key] = tune.uniform(*p.values)
        elif p.kind == "loguniform":
            out[p.key] = tune.loguniform(*p.values)
        elif p.kind == "grid" or search_alg == "grid":
            out[p.key] = tune.grid_search(list(p.values))
        else:
            out[p.key] = tune.choice(list(p.values))
    return out
