"""The anchor row: the authors' released iMAML learner (aravindr93/imaml_dev), run from an
unpacked checkout the user points at (``--official DIR``), at the bench's shapes and threads,
in fresh worker processes of its own like every other row (:mod:`bench.fresh`); a missing
or broken checkout makes the row "not measured" with the reason.

Nothing of that repository is copied here: this module imports its ``implicit_maml``
package from ``DIR`` at run time and drives it the way its
``examples/omniglot_implicit_maml.py`` drives one meta-step (``Learner``, a Python loop
over tasks, ``learn_task`` SGD steps, the proximal pull-back step, the query gradient,
``utils.cg_solve`` over ``matrix_evaluator`` double-backward HVPs, ``outer_step_with_grad``).
The script's logging (losses and accuracies before and after adaptation) is left out, so
the row is the learner's meta-gradient and outer step alone: a lower bound on its time.

Get the checkout with the search tool's ``fetch`` (or ``git clone``) and unpack it anywhere
outside this repository, e.g. ``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/imaml_dev``.
"""

import importlib
import os
import sys

import torch


class OfficialUnavailable(RuntimeError):
    """``DIR`` is not an unpacked imaml_dev checkout (the row is skipped with this message)."""


def load(root):
    """``(learner_model, utils)`` modules of the checkout at ``root``."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isfile(os.path.join(root, "implicit_maml", "learner_model.py")):
        raise OfficialUnavailable(f"{root} has no implicit_maml/learner_model.py (an unpacked aravindr93/imaml_dev checkout)")
    loaded = sys.modules.get("implicit_maml")
    if loaded is not None and os.path.dirname(os.path.dirname(os.path.abspath(loaded.__file__))) != root:
        for name in [n for n in sys.modules if n == "implicit_maml" or n.startswith("implicit_maml.")]:
            del sys.modules[name]  # another checkout's: import this one's
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        lm = importlib.import_module("implicit_maml.learner_model")
        utils = importlib.import_module("implicit_maml.utils")
    except ImportError as e:  # its modules import matplotlib and scipy
        raise OfficialUnavailable(f"importing implicit_maml from {root} failed: {e}") from e
    mod_dir = os.path.dirname(os.path.abspath(lm.__file__))
    if os.path.dirname(mod_dir) != root:
        raise OfficialUnavailable(f"implicit_maml was imported from {mod_dir}, not from {root}")
    return lm, utils


class OfficialStep:
    """One meta-step of the released learner on ``tasks = (xs, ys, xq, yq)`` (leading T).

    ``model`` (an ``nn.Sequential`` with the released network's structure, e.g.
    :class:`imaml_kernels.nets.OmniglotConv`) gives the starting parameters; the learner's
    own network comes from its ``make_conv_network`` and takes them by ``set_params``.
    """

    def __init__(self, root, model, *, lam, inner_steps, inner_lr, cg_iters, cg_damping=1.0, outer_lr=1e-3):
        self.lm, self.utils = load(root)
        way = model[-1].out_features
        nets = [self.lm.make_conv_network(in_channels=1, out_dim=way) for _ in range(2)]
        loss = torch.nn.CrossEntropyLoss()
        self.meta = self.lm.Learner(model=nets[0], loss_function=loss, inner_lr=inner_lr, outer_lr=outer_lr, GPU=False)
        self.fast = self.lm.Learner(model=nets[1], loss_function=loss, inner_lr=inner_lr, outer_lr=outer_lr, GPU=False)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if flat.numel() != self.meta.get_params().numel():
            raise OfficialUnavailable(f"the released network has {self.meta.get_params().numel()} parameters, the bench's {flat.numel()}")
        self.meta.set_params(flat)
        self.lam = torch.tensor(float(lam))
        self.inner_steps, self.cg_iters, self.cg_damping = inner_steps, cg_iters, cg_damping

    def __call__(self, tasks):
        """The flat meta-gradient (mean over tasks), after the learner's outer step."""
        xs, ys, xq, yq = tasks
        fast, T = self.fast, xs.shape[0]
        w_k = self.meta.get_params()
        meta_grad = 0.0
        for t in range(T):
            task = {"x_train": xs[t], "y_train": ys[t], "x_val": xq[t], "y_val": yq[t]}
            fast.set_params(w_k.clone())
            fast.learn_task(task, num_steps=self.inner_steps)
            fast.inner_opt.zero_grad()  # the pull-back step
            fast.regularization_loss(w_k, self.lam).backward()
            fast.inner_opt.step()
            valid_loss = fast.get_loss(task["x_val"], task["y_val"])
            valid_grad = torch.autograd.grad(valid_loss, fast.model.parameters())
            flat_grad = torch.cat([g.contiguous().view(-1) for g in valid_grad])
            evaluator = fast.matrix_evaluator(task, self.lam, self.cg_damping)
            meta_grad = meta_grad + self.utils.cg_solve(evaluator, flat_grad, self.cg_iters, x_init=None) / T
        self.meta.outer_step_with_grad(meta_grad, flat_grad=True)
        return meta_grad
