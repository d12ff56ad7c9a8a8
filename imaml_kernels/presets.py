"""Named training configurations for ``imaml-train --preset NAME``.

A configuration is a flat dict of plain values (it goes into every checkpoint, and
``--resume`` compares it key by key). The paper presets follow Rajeswaran et al. (2019) and
their released code: GD inner loop with λ = 2, lr 0.1, 16 steps (5-way) / 25 steps
(20-way), 5 CG iterations, Adam with lr 1e-3, meta-batch 32 (5-way) / 16 (20-way),
K support and K query drawings per class, and the damped CG system of their code
(``cg_damping`` = 1, ``lam_damping`` = 10; see :data:`DEFAULTS`).

``omniglot-5w1s-demo`` is the CPU demo (``bash scripts/demo.sh``): the paper's network, GD
inner loop (λ = 2, lr 0.1) and damped implicit gradient, but 5 inner steps instead of 16,
3 CG iterations instead of 5 (the damped system is well conditioned: the logged relative
residual stays around 1e-2), meta-batch 8, Adam lr 3e-3 and 5 query drawings per class, for
1200 meta-steps: about 9 minutes of training on 2 CPU cores with the fused engine. It reaches
about 88% meta-test accuracy (not the paper's 99%: that takes tens of thousands of
meta-steps). The measurement is in ``bench/results/cpu_demo.md``.

Example::

    >>> cfg = resolve_config("omniglot-5w1s", {"meta_batch": 8})
    >>> cfg["inner_steps"], cfg["meta_batch"], cfg["query"]
    (16, 8, 1)
"""

from __future__ import annotations

from typing import Any, Mapping

# Every key a configuration has, with the default the presets start from.
DEFAULTS: dict[str, Any] = {
    "dataset": "omniglot",   # omniglot | miniimagenet
    "way": 5,
    "shot": 1,
    "query": None,           # None: = shot (the paper's protocol)
    "meta_batch": 32,        # tasks per meta-step, T
    "inner": "gd",           # gd | hf (Hessian-Free: Newton-CG on the proximal objective)
    "inner_steps": 16,       # GD steps
    "inner_lr": 0.1,         # GD step size
    "hf_steps": 5,           # Newton steps of the Hessian-Free inner solver
    "hf_cg_iters": 5,        # CG iterations per Newton step
    "lam": 2.0,              # λ of the proximal term
    "cg_iters": 5,           # CG iterations of the implicit meta-gradient
    # The authors' code solves ((1 + cg_damping) I + H/(λ + lam_damping)) x = g, not
    # (I + H/λ) x = g: without the damping H/λ turns indefinite within tens of meta-steps
    # (ReLU nets away from a minimum), CG breaks down and most tasks are dropped. 0 and 0
    # give the textbook system.
    "cg_damping": 1.0,
    "lam_damping": 10.0,
    "outer_lr": 1e-3,        # Adam
    "channels": None,        # conv filters; None: the network's default (64 Omniglot, 32 MiniImagenet)
    "steps": 30000,          # meta-steps in total
    "seed": 0,
    "eval_tasks": 600,       # meta-test tasks evaluated at the end of training (0: none)
}

PRESETS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": {"way": 5, "shot": 1, "meta_batch": 32, "inner_steps": 16},
    "omniglot-5w5s": {"way": 5, "shot": 5, "meta_batch": 32, "inner_steps": 16},
    "omniglot-20w1s": {"way": 20, "shot": 1, "meta_batch": 16, "inner_steps": 25},
    "omniglot-20w5s": {"way": 20, "shot": 5, "meta_batch": 16, "inner_steps": 25},
    # The paper reports MiniImagenet with the Hessian-Free inner solver and a weaker
    # regulariser; the meta-batch is the usual 4 for the 84x84 network.
    "miniimagenet-5w1s": {
        "dataset": "miniimagenet", "way": 5, "shot": 1, "query": 15, "meta_batch": 4,
        "inner": "hf", "hf_steps": 10, "lam": 0.5,
    },
    # CPU demo: measured on 2 cores (bench/results/cpu_demo.md).
    "omniglot-5w1s-demo": {
        "way": 5, "shot": 1, "query": 5, "meta_batch": 8, "inner_steps": 5, "inner_lr": 0.1,
        "cg_iters": 3, "outer_lr": 3e-3, "steps": 1200, "eval_tasks": 600,
    },
}

# Keys that change what a run computes; --resume refuses a checkpoint that differs in any
# of them (steps and eval_tasks may change: a run can be extended or evaluated differently).
RUN_KEYS = tuple(k for k in DEFAULTS if k not in ("steps", "eval_tasks"))


class ConfigError(ValueError):
    """A configuration that cannot run (unknown preset, K too large, bad value)."""


def preset_names() -> list[str]:
    return list(PRESETS)


def resolve_config(preset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULTS`` <- ``PRESETS[preset]`` <- ``overrides`` (None values are ignored), checked.

    Raises:
        ConfigError: unknown preset (the message lists the valid ones) or a bad value.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    cfg = dict(DEFAULTS)
    cfg.update(PRESETS[preset])
    cfg["preset"] = preset
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with the non-None ``overrides``, validated."""
    out = dict(cfg)
    for k, v in overrides.items():
        if k not in DEFAULTS:
            raise ConfigError(f"unknown configuration key {k!r}")
        if v is not None:
            out[k] = v
    if out["query"] is None:
        out["query"] = out["shot"]
    check_config(out)
    return out


def check_config(cfg: Mapping[str, Any]) -> None:
    """Fail early, before any data is loaded, on values that cannot run."""
    from .data.download import OMNIGLOT_DRAWINGS

    if cfg["dataset"] not in ("omniglot", "miniimagenet"):
        raise ConfigError(f"dataset must be 'omniglot' or 'miniimagenet', got {cfg['dataset']!r}")
    if cfg["inner"] not in ("gd", "hf"):
        raise ConfigError(f"inner must be 'gd' or 'hf', got {cfg['inner']!r}")
    for k in ("way", "shot", "meta_batch", "cg_iters", "hf_cg_iters"):
        if int(cfg[k]) < 1:
            raise ConfigError(f"{k} must be >= 1, got {cfg[k]}")
    for k in ("query", "inner_steps", "hf_steps", "steps", "eval_tasks"):
        if int(cfg[k]) < 0:
            raise ConfigError(f"{k} must be >= 0, got {cfg[k]}")
    for k in ("lam", "inner_lr", "outer_lr"):
        if not 0 < float(cfg[k]) < float("inf"):
            raise ConfigError(f"{k} must be finite and > 0, got {cfg[k]}")
    for k in ("cg_damping", "lam_damping"):
        if not 0 <= float(cfg[k]) < float("inf"):
            raise ConfigError(f"{k} must be finite and >= 0, got {cfg[k]}")
    if cfg["query"] < 1:
        # The outer loss is the query loss: without query drawings there is no meta-gradient.
        raise ConfigError("query must be >= 1 (the meta-gradient is the query-set loss)")
    if cfg["dataset"] == "omniglot" and cfg["shot"] + cfg["query"] > OMNIGLOT_DRAWINGS:
        raise ConfigError(
            f"K too large: shot + query = {cfg['shot']} + {cfg['query']} = {cfg['shot'] + cfg['query']} "
            f"exceeds the {OMNIGLOT_DRAWINGS} drawings of each Omniglot class "
            f"(support and query are drawn without replacement; lower --shot or --query)"
        )
    if cfg["channels"] is not None and int(cfg["channels"]) < 1:
        raise ConfigError(f"channels must be >= 1, got {cfg['channels']}")


def config_diff(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, requested)}`` over :data:`RUN_KEYS` where the two differ."""
    return {k: (saved.get(k), requested.get(k)) for k in RUN_KEYS if saved.get(k) != requested.get(k)}
