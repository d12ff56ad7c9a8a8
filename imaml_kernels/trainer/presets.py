"""Named training configurations for ``imaml-train --preset NAME``.

A configuration is a flat dict of plain values (it goes into every checkpoint, and
``--resume`` compares it key by key). The paper presets (``omniglot-5w1s`` ...) follow the
text of Rajeswaran et al. (2019): a proximal GD inner loop with λ = 2, 16 steps (5-way) /
25 steps (20-way), 5 CG iterations, Adam with lr 1e-3, meta-batch 32 (5-way) / 16 (20-way),
K support and K query drawings per class, and the damped CG system of the authors' code
(``cg_damping`` = 1, ``lam_damping`` = 10; see :data:`DEFAULTS`).

The text gives no inner step size. The released command line's 0.1 belongs to its plain-SGD
inner loop, which leaves θ's sharp neighbourhood for a flat minimum; proximal GD stays near θ,
and at 0.1 it cannot settle there: the support loss's Hessian at the adapted φ has largest
eigenvalues of 20-80 on this network, past its stability limit ``lr·(λ + λ_max) < 2``
(λ_max < 18), so the inner loop ends oscillating, the support loss after adaptation climbs as
meta-training sharpens θ and the query loss spikes with it (issue 27; ``python -m bench
spikes``, ``bench/results/spikes/``). The 5-way presets therefore take 0.05 (λ_max < 38): in
the probe φ stayed inside the limit and the support loss after adaptation kept falling. The
20-way presets keep 0.1 (not measured in training; at θ₀ they are past the limit too).

The ``-released`` presets (Omniglot 5w1s, 5w5s) follow the authors' released command line
instead: its inner procedure (16 plain SGD steps on the task loss, then one pull-back step
toward θ: ``inner="sgd-pullback"``, :class:`~imaml_kernels.SGDThenPullBack`), its
initialisation (``init="released"``) and its Adam (``adam_eps`` = 1e-3); fresh tasks drawn on the device replace its pool of
200,000 pre-drawn tasks. The released code gives no 20-way command line.

``omniglot-5w1s-demo`` is the CPU demo (``bash scripts/demo.sh``): the paper's network, GD
inner loop (λ = 2, lr 0.1) and damped implicit gradient, but 5 inner steps instead of 16,
3 CG iterations instead of 5 (the damped system is well conditioned: the logged relative
residual stays around 1e-2), meta-batch 16, Adam lr 3e-3 with a 50-step linear warm-up and
a cosine to 0, and 5 query drawings per class, for 1200 meta-steps on 2 CPU cores with the
fused engine (not the paper's 99%: that takes tens of thousands of meta-steps). The
settings come from the sweep in ``bench/results/cpu_demo_sweep.md``; the measurement is in
``bench/results/cpu_demo.md``.

Example::

    >>> cfg = resolve_config("omniglot-5w1s", {"meta_batch": 8})
    >>> cfg["inner_steps"], cfg["inner_lr"], cfg["meta_batch"], cfg["query"]
    (16, 0.05, 8, 1)
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..engine.precision import GEMM_PRECISIONS

# Every key a configuration has, with the default the presets start from.
DEFAULTS: dict[str, Any] = {
    "dataset": "omniglot",   # omniglot | miniimagenet
    "way": 5,
    "shot": 1,
    "query": None,           # None: = shot (the paper's protocol)
    "meta_batch": 32,        # tasks per meta-step, T
    # gd: proximal GD (the paper's text) | hf: Hessian-Free (Newton-CG on the proximal
    # objective) | sgd-pullback: the authors' released code, inner_steps plain SGD steps on
    # the task loss, then one step φ ← φ − inner_lr λ (φ − θ) (SGDThenPullBack)
    "inner": "gd",
    "inner_steps": 16,       # GD / SGD steps
    "inner_lr": 0.1,         # GD / SGD step size
    "init": "torch",         # torch: PyTorch's default | released: xavier_uniform(gain 1.73), biases U(0, 0.05)
    "hf_steps": 5,           # Newton steps of the Hessian-Free inner solver
    "hf_cg_iters": 5,        # CG iterations per Newton step
    "lam": 2.0,              # λ of the proximal term (the starting value when it is learned)
    # none: λ fixed | scalar | per-layer: λ meta-learned by its implicit hypergradient, as
    # log λ with its own Adam step size, within [lam_min, lam_max] (imaml_kernels/trainer/lam.py)
    "learn_lam": "none",
    "lam_lr": 1e-2,
    "lam_min": 1e-2,
    "lam_max": 1e2,
    # fp32 | bf16: the fused engine's GEMMs on bfloat16 operands with float32 accumulation
    # (imaml_kernels/engine/precision.py); parameters, gradients, CG stay float32
    "gemm_precision": "fp32",
    "cg_iters": 5,           # CG iterations of the implicit meta-gradient
    # The authors' code solves ((1 + cg_damping) I + H/(λ + lam_damping)) x = g, not
    # (I + H/λ) x = g: without the damping H/λ turns indefinite within tens of meta-steps
    # (ReLU nets away from a minimum), CG breaks down and most tasks are dropped. 0 and 0
    # give the textbook system.
    "cg_damping": 1.0,
    "lam_damping": 10.0,
    "outer_lr": 1e-3,        # Adam
    # Adam's ε. The authors' released Learner builds torch.optim.Adam(..., eps=1e-3): with
    # meta-gradient entries of order 1e-4..1e-3 that ε shrinks the steps of the small ones
    # (Adam turns towards SGD with lr/ε), where 1e-8 moves every entry by about outer_lr.
    "adam_eps": 1e-8,
    "outer_schedule": "constant",  # constant | cosine (from outer_lr to 0 over the run's steps)
    "warmup_steps": 0,       # linear warm-up of the outer lr over the first N meta-steps
    "channels": None,        # conv filters; None: the network's default (64 Omniglot, 32 MiniImagenet)
    "steps": 30000,          # meta-steps in total
    "seed": 0,
    "eval_tasks": 600,       # meta-test tasks evaluated at the end of training (0: none)
}

PRESETS: dict[str, dict[str, Any]] = {
    # inner_lr 0.05: proximal GD's stability limit (the module docstring; issue 27).
    "omniglot-5w1s": {"way": 5, "shot": 1, "meta_batch": 32, "inner_steps": 16, "inner_lr": 0.05},
    "omniglot-5w5s": {"way": 5, "shot": 5, "meta_batch": 32, "inner_steps": 16, "inner_lr": 0.05},
    "omniglot-20w1s": {"way": 20, "shot": 1, "meta_batch": 16, "inner_steps": 25},
    "omniglot-20w5s": {"way": 20, "shot": 5, "meta_batch": 16, "inner_steps": 25},
    # The paper reports MiniImagenet with the Hessian-Free inner solver and a weaker
    # regulariser; the meta-batch is the usual 4 for the 84x84 network.
    "miniimagenet-5w1s": {
        "dataset": "miniimagenet", "way": 5, "shot": 1, "query": 15, "meta_batch": 4,
        "inner": "hf", "hf_steps": 10, "lam": 0.5,
    },
    # The authors' released command line (aravindr93/imaml_dev, examples/README):
    # --inner_lr 1e-1 --outer_lr 1e-3 --n_steps 16 --task_mb_size 32 --lam 2.0 --cg_steps 5
    # --cg_damping 1.0 (lam_damping 10 in its matrix evaluator), meta_steps >= 20000, its
    # xavier init. Its pool of 200,000 pre-drawn tasks is replaced by fresh tasks drawn on
    # the device each meta-step. It gives no 20-way command line: the 20-way presets above
    # keep the paper-text settings.
    "omniglot-5w1s-released": {
        "way": 5, "shot": 1, "meta_batch": 32, "inner": "sgd-pullback", "inner_steps": 16, "inner_lr": 0.1,
        "lam": 2.0, "cg_iters": 5, "cg_damping": 1.0, "lam_damping": 10.0, "outer_lr": 1e-3, "adam_eps": 1e-3, "init": "released",
        "steps": 20000,
    },
    "omniglot-5w5s-released": {
        "way": 5, "shot": 5, "meta_batch": 32, "inner": "sgd-pullback", "inner_steps": 16, "inner_lr": 0.1,
        "lam": 2.0, "cg_iters": 5, "cg_damping": 1.0, "lam_damping": 10.0, "outer_lr": 1e-3, "adam_eps": 1e-3, "init": "released",
        "steps": 20000,
    },
    # CPU demo: measured on 2 cores (bench/results/cpu_demo.md).
    "omniglot-5w1s-demo": {
        "way": 5, "shot": 1, "query": 5, "meta_batch": 16, "inner_steps": 5, "inner_lr": 0.1,
        "cg_iters": 3, "outer_lr": 3e-3, "outer_schedule": "cosine", "warmup_steps": 50, "steps": 1200, "eval_tasks": 600,
    },
}

# How each preset differs from the paper's text (imaml-train --help, README).
PRESET_NOTES: dict[str, str] = {
    "omniglot-5w1s": "the paper's text: proximal GD inner loop (λ 2, 16 steps), T 32; the released code's damped CG; "
                     "inner lr 0.05, which the text leaves out (at the released 0.1 proximal GD runs past its stability "
                     "limit lr·(λ + λmax) < 2 and the run spikes; at 0.05, 3,600 steps ran without a spike to 92.57%: "
                     "bench/results/spikes)",
    "omniglot-5w5s": "as omniglot-5w1s with K = 5",
    "omniglot-20w1s": "the paper's text, 25 GD steps, T 16 (the released code gives no 20-way command line); inner lr 0.1, "
                      "past proximal GD's stability limit at θ₀ as in 5-way (not lowered: not measured in training)",
    "omniglot-20w5s": "as omniglot-20w1s with K = 5",
    "miniimagenet-5w1s": "Hessian-Free inner solver (10 Newton steps), λ 0.5, 15 query, T 4",
    "omniglot-5w1s-released": "the authors' released command line: 16 plain SGD steps then one pull-back step "
                              "(sgd-pullback), their xavier init, their Adam (ε 1e-3), 20000 steps; fresh tasks on the "
                              "device, not 200,000 pre-drawn. It learned faster per meta-step than omniglot-5w1s with "
                              "inner lr 0.1 (issue 27); omniglot-5w1s at lr 0.05 learns faster over the first 250 "
                              "meta-steps and is level with it from about 500 (bench/results/trajectory)",
    "omniglot-5w5s-released": "as omniglot-5w1s-released with K = 5",
    "omniglot-5w1s-demo": "the CPU demo: 5 GD steps, 3 CG iterations, T 16, Adam 3e-3 with a 50-step warm-up and a cosine, "
                          "5 query, 1200 steps",
}

INNER_SOLVERS = ("gd", "hf", "sgd-pullback")
INITS = ("torch", "released")

# Keys added after checkpoints were first written, with the value those checkpoints used.
ADDED_KEYS: dict[str, Any] = {"init": "torch", "outer_schedule": "constant", "warmup_steps": 0, "learn_lam": "none",
                              "lam_lr": 1e-2, "lam_min": 1e-2, "lam_max": 1e2, "adam_eps": 1e-8,
                              "gemm_precision": "fp32"}
LEARN_LAM = ("none", "scalar", "per-layer")
SCHEDULES = ("constant", "cosine")

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
    from ..data.download import OMNIGLOT_DRAWINGS

    if cfg["dataset"] not in ("omniglot", "miniimagenet"):
        raise ConfigError(f"dataset must be 'omniglot' or 'miniimagenet', got {cfg['dataset']!r}")
    if cfg["inner"] not in INNER_SOLVERS:
        raise ConfigError(f"inner must be one of {', '.join(map(repr, INNER_SOLVERS))}, got {cfg['inner']!r}")
    if cfg["outer_schedule"] not in SCHEDULES:
        raise ConfigError(f"outer_schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {cfg['outer_schedule']!r}")
    if cfg["init"] not in INITS:
        raise ConfigError(f"init must be one of {', '.join(map(repr, INITS))}, got {cfg['init']!r}")
    for k in ("way", "shot", "meta_batch", "cg_iters", "hf_cg_iters"):
        if int(cfg[k]) < 1:
            raise ConfigError(f"{k} must be >= 1, got {cfg[k]}")
    for k in ("query", "inner_steps", "hf_steps", "steps", "eval_tasks", "warmup_steps"):
        if int(cfg[k]) < 0:
            raise ConfigError(f"{k} must be >= 0, got {cfg[k]}")
    if cfg.get("gemm_precision", "fp32") not in GEMM_PRECISIONS:
        raise ConfigError(f"gemm_precision must be one of {', '.join(map(repr, GEMM_PRECISIONS))}, got {cfg['gemm_precision']!r}")
    if cfg.get("learn_lam", "none") not in LEARN_LAM:
        raise ConfigError(f"learn_lam must be one of {', '.join(map(repr, LEARN_LAM))}, got {cfg['learn_lam']!r}")
    for k in ("lam", "inner_lr", "outer_lr", "lam_lr", "adam_eps"):
        if not 0 < float(cfg[k]) < float("inf"):
            raise ConfigError(f"{k} must be finite and > 0, got {cfg[k]}")
    if not 0 < float(cfg.get("lam_min", 1e-2)) <= float(cfg["lam"]) <= float(cfg.get("lam_max", 1e2)) < float("inf"):
        raise ConfigError(f"need 0 < lam_min <= lam <= lam_max, got {cfg.get('lam_min')}, {cfg['lam']}, {cfg.get('lam_max')}")
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


def outer_lr_at(cfg: Mapping[str, Any], step: int) -> float:
    """The outer (Adam) step size of meta-step ``step`` (0-based): ``outer_lr``, ramped up
    linearly over the first ``warmup_steps`` steps, then constant or, for ``cosine``,
    ``outer_lr · (1 + cos(π s))/2`` with ``s`` from 0 to 1 over the remaining steps of the
    run (``steps``: extending a cosine run stretches what is left of its schedule)."""
    lr, warm, total = float(cfg["outer_lr"]), int(cfg.get("warmup_steps", 0)), int(cfg["steps"])
    if step < warm:
        return lr * (step + 1) / warm
    if cfg.get("outer_schedule", "constant") == "cosine" and total > warm:
        s = min(1.0, (step - warm) / (total - warm))
        return lr * 0.5 * (1.0 + math.cos(math.pi * s))
    return lr


def config_diff(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, requested)}`` over :data:`RUN_KEYS` where the two differ."""
    saved = {**ADDED_KEYS, **saved}
    return {k: (saved.get(k), requested.get(k)) for k in RUN_KEYS if saved.get(k) != requested.get(k)}
