"""Meta-learned λ in the trainer (``--learn-lam scalar|per-layer``).

λ is log-parameterised (``λ = exp(ρ)``: it stays positive) and learned by its exact implicit
hypergradient (:mod:`imaml_kernels.lam`), with its own Adam parameter group (step size
``lam_lr``) in the run's optimizer, clamped to ``[lam_min, lam_max]`` after every step (one
launch, no host sync). ``scalar``: one λ; ``per-layer``: one per module that owns parameters
(``"0"`` for ``"0.weight"`` and ``"0.bias"``). ``none``: the configuration's fixed λ.

Example::

    >>> lam = LearnedLam(cfg, model, device)
    >>> optimizer.add_param_group(lam.param_group())
    >>> meta_step(model, theta, optimizer, batch, lam=lam.value(), inner=..., solve=...)
    >>> lam.clamp_()
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

MODES = ("none", "scalar", "per-layer")
GROUP = "lam"  # the optimizer's parameter group of ρ (the outer schedule leaves it alone)


def layer_of(name: str) -> str:
    """The module that owns parameter ``name`` (``"3.weight"`` -> ``"3"``; ``"w"`` -> ``""``)."""
    return name.rpartition(".")[0]


class LearnedLam:
    """ρ = log λ of a run: ``{group: scalar tensor}`` (empty with ``learn_lam`` none)."""

    def __init__(self, cfg: Mapping[str, Any], model: torch.nn.Module, device):
        self.mode, self.fixed = cfg.get("learn_lam", "none"), float(cfg["lam"])
        self.bounds = (math.log(float(cfg.get("lam_min", 1e-2))), math.log(float(cfg.get("lam_max", 1e2))))
        self.lr = float(cfg.get("lam_lr", 1e-2))
        if self.mode == "none":
            groups = []
        elif self.mode == "scalar":
            groups = [""]
        else:
            groups = list(dict.fromkeys(layer_of(n) for n, _ in model.named_parameters()))
        self.rho = {g: torch.tensor(math.log(self.fixed), device=device, requires_grad=True) for g in groups}

    @property
    def learned(self) -> bool:
        return bool(self.rho)

    def param_group(self) -> dict:
        """The optimizer's parameter group of ρ (marked :data:`GROUP`)."""
        return {"params": list(self.rho.values()), "lr": self.lr, "eps": 1e-8, "name": GROUP}

    def value(self):
        """λ for this meta-step: the fixed number, ``exp(ρ)`` (scalar), or ``{layer: exp(ρ)}``
        (per layer): tensors that carry the hypergradient back to ρ."""
        if not self.rho:
            return self.fixed
        if self.mode == "scalar":
            return self.rho[""].exp()
        return {g: r.exp() for g, r in self.rho.items()}

    @torch.no_grad()
    def clamp_(self) -> None:
        for r in self.rho.values():
            r.clamp_(*self.bounds)

    def row(self) -> dict[str, float]:
        """The current λ for a metrics row (a read-back: at log steps only)."""
        if not self.rho:
            return {}
        values = torch.stack(list(self.rho.values())).exp().tolist()
        if self.mode == "scalar":
            return {"lam": values[0]}
        return {f"lam/{g}": v for g, v in zip(self.rho, values)}

    @torch.no_grad()
    def current(self):
        """λ as evaluation uses it: :meth:`value` detached (no hypergradient)."""
        v = self.value()
        if isinstance(v, dict):
            return {g: r.detach() for g, r in v.items()}
        return v.detach() if torch.is_tensor(v) else v

    def state(self) -> dict[str, float]:
        """ρ for a checkpoint (its Adam state is in the optimizer's)."""
        return {g: float(r.detach()) for g, r in self.rho.items()}

    @torch.no_grad()
    def load(self, state: Mapping[str, float] | None, where) -> None:
        if not self.rho:
            return
        if not state or set(state) != set(self.rho):
            from .checkpoint import CheckpointError

            raise CheckpointError(f"{where}: holds no learned λ for the groups {sorted(self.rho)} (--learn-lam {self.mode})")
        for g, r in self.rho.items():
            r.fill_(float(state[g]))
