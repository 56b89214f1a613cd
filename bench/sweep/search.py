"""A method's own search space: the `search:` block of its YAML (conf/method/<name>.yaml), which
`python -m bench.compare` tunes (README: Tuned comparison). No run reads it (bench/core/methods: HARNESS_KEYS; not
in the run key, not logged as params), so adding a method stays one YAML file, its search space included.

    search:
      space:                      # name -> an Optuna distribution, as a sweep file's search_space
        train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}   # required: the learning rate, log-uniform
        method.r: {type: categorical, choices: [4, 8, 16, 32]}
        alpha_per_rank: {type: categorical, choices: [1, 2, 4]}          # not a config key: feeds derived
      derived:                    # config key -> a product of searched names and numbers
        method.alpha: method.r * alpha_per_rank

`check(choice, cfg)` reads and checks the block of the composed config `cfg` (a run of `method=<choice>`): every
problem is one line naming the method file and the key (`conf/method/lora.yaml: search.space.method.r: ...`).
"""
from __future__ import annotations

from dataclasses import dataclass

import optuna
from omegaconf import OmegaConf

from bench.core.methods import SEARCH_KEY
from bench.errors import BenchError
from bench.sweep import spec

KEYS = ("space", "derived")
LR = "train.lr"
LR_EXAMPLE = "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"


@dataclass(frozen=True)
class Search:
    method: str
    space: dict          # name -> the distribution's spec, as written (a sweep file's search_space)
    derived: dict        # config key -> its product, as written (a sweep file's derived)
    keys: list           # the config keys a trial sets: searched config keys, then derived ones (no helpers)


def method_file(choice: str) -> str:
    return f"conf/method/{choice}.yaml"


def check(choice: str, cfg) -> Search:
    """The `search:` block of method `choice` in the composed config `cfg`, checked (module doc)."""
    where = method_file(choice)
    block = cfg.method.get(SEARCH_KEY)
    if block is None:
        raise BenchError(f"{where}: search: missing; python -m bench.compare tunes each method over its own search "
                         f"space, e.g. search: {{space: {{{LR_EXAMPLE}}}}}")
    doc = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else block
    if not isinstance(doc, dict):
        raise BenchError(f"{where}: search: must be a mapping with keys {', '.join(KEYS)}, got {doc!r}")
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        raise BenchError(f"{where}: search: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(KEYS)}")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise BenchError(f"{where}: search.space: must map at least the learning rate to a distribution, "
                         f"e.g. {LR_EXAMPLE}")
    dists = {name: spec._distribution(f"{where}: search.space.{name}", s) for name, s in space.items()}
    lr = dists.get(LR)
    if lr is None:
        raise BenchError(f"{where}: search.space.{LR}: missing; the learning rate is always tuned, log-uniform over "
                         f"the method's range, e.g. {LR_EXAMPLE}")
    if not isinstance(lr, optuna.distributions.FloatDistribution) or not lr.log:
        raise BenchError(f"{where}: search.space.{LR}: must be log-uniform, {{type: float, low: L, high: H, log: "
                         f"true}}; got {space[LR]!r}")
    derived = doc.get("derived") or {}
    if not isinstance(derived, dict):
        raise BenchError(f"{where}: search.derived: must map config keys to products like 'method.r * alpha_per_rank'")
    factors = {key: spec._factors(f"{where}: search.derived.{key}", expr, dists) for key, expr in derived.items()}
    keys = _check_names(where, cfg, dists, factors)
    return Search(choice, space, derived, keys)


def _check_names(where: str, cfg, dists: dict, factors: dict) -> list[str]:
    """Searched names are config keys of the run or feed `derived`; derived targets are config keys. Returns the
    config keys a trial sets."""
    helpers = spec.check_names(where, "search.space.", "search.derived.", list(dists), factors, cfg,
                               f"a method.* or train.* key of this method (e.g. {LR})")
    return [name for name in dists if name not in helpers] + list(factors)
