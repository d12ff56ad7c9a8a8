"""Pure-PyTorch twin of the proximal step (:mod:`imaml_kernels.ops.prox`).
"""



def prox_step(phi, grad, theta, lam, lr: float):
    """In place: ``φ ← φ − lr (g + λ (φ − θ))``; ``phi, grad, theta [T,P]``, ``lam [T,1]``
    (per task) or ``[1,P]`` / ``[T,P]`` (per coordinate)."""
    phi.sub_(lr * (grad + lam * (phi - theta)))
    return phi
