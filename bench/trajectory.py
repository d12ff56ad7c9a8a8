"""``python -m bench trajectory --official DIR``: a whole training run of the authors' released
code (aravindr93/imaml_dev) beside this package's trainer step, on the same task stream from the
same θ₀ (issue 27).

Rows (each a run of ``--steps`` meta-steps):

- ``official``: the released training loop of ``examples/omniglot_implicit_maml.py``, imported
  from the unpacked checkout ``DIR`` at run time (:func:`bench.official.load`; nothing of it is
  in this repository): two ``Learner`` s on ``make_conv_network``, per task ``learn_task`` then
  the pull-back step (for an ``inner="gd"`` preset: ``learn_task(add_regularization=True)``, the
  proximal GD its ``Learner`` offers, and no pull-back), the query gradient, ``utils.cg_solve``
  over ``matrix_evaluator`` (``regu_coef`` = ``cg_damping``, its ``lam_damping`` = 10), the mean
  over tasks, ``outer_step_with_grad`` (the Adam its ``Learner`` builds: lr ``outer_lr``, ε 1e-3);
- ``ours``: :func:`imaml_kernels.step.meta_step` with the preset's model, initialisation, inner
  solver, backward solve and optimizer (:mod:`imaml_kernels.trainer.builders`, the step size of
  :func:`~imaml_kernels.trainer.presets.outer_lr_at`): what ``imaml-train`` runs per step;
- ``twin`` (``--twin``): ``ours`` from θ₀ with every entry moved by one float32 rounding
  (relative 2⁻²⁴, random sign): how far two runs part on rounding alone (the noise floor);
- ``also`` (``--also PRESET``): ``ours`` with another preset (the paper-text one) on the stream.

The stream is the trainer's (:class:`TaskStream`: ``build_samplers(cfg)``, seeded
``cfg["seed"]``; the released data pipeline, with its PIL resizing, paper = 1 and pool of
pre-drawn tasks, is not part of the comparison), θ₀ the trainer's (``torch.manual_seed(seed)``, ``build_model``), copied into the
released network after :func:`layer_map` checked the two layouts layer by layer. Every worker
fingerprints the indices (classes, drawings, rotations) of each meta-batch; the report checks
the rows saw the same tasks. Every ``--eval-every`` steps (step 0 included) each row is scored on
the same ``--eval-tasks`` meta-test tasks (seed 0) with the released evaluation,
``measure_accuracy.py --n_steps 16 --lam 0.0 --inner_lr 0.1`` (plain SGD on the support set, no
proximal term): for ``ours`` :func:`imaml_kernels.trainer.evaluate.evaluate` with
``SGDThenPullBack(16, 0.1, pull_back=False)`` (``imaml-eval --protocol released``), for
``official`` that script's loop. Mean and 95% interval ``1.96·std/√n`` of the per-task accuracies.

Each row runs in a fresh worker process of its own (:func:`bench.fresh.spawn`), one after the
other, with ``--threads`` threads: one process's allocator and thread pools never skew the
other's time. Seconds per step time the meta-step alone (not the sampling, the read-back of the
step's statistics is included), with ``time.perf_counter``. Each worker also writes its rows to
``<out>/steps_<row>.jsonl`` as it goes (``tail -f`` to follow a long run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from . import fresh
from .common import machine_header, markdown_table, write_csv

LABELS = {
    "official": "authors' released code (imaml_dev Learner)",
    "ours": "imaml_kernels trainer step",
    "twin": "imaml_kernels, θ₀ + one float32 rounding",
    "also": "imaml_kernels trainer step",
}
SNAPSHOT_STEPS = (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500, 1000)
RELEASED_EVAL = {"steps": 16, "lr": 0.1}  # measure_accuracy.py --n_steps 16 --inner_lr 0.1 --lam 0.0


class LayoutMismatch(RuntimeError):
    """The released network and this package's differ in a layer or a parameter."""


# ------------------------------------------------------------------ the shared pieces


def task_fingerprint(idx) -> str:
    """A short hash of a meta-batch's :class:`~imaml_kernels.data.TaskIndices` (classes,
    drawings, rotations): equal fingerprints, equal tasks."""
    h = hashlib.sha1()
    for t in idx:
        h.update(t.to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TaskStream:
    """The trainer's task stream for ``cfg``: ``build_samplers(cfg)``'s meta-training sampler
    (seeded ``cfg["seed"]``), ``meta_batch`` tasks a step (``sample(T)`` is ``build(draw(T))``);
    ``next(stream)`` -> ``(tasks, fingerprint)``. ``test`` is the meta-test sampler."""

    def __init__(self, cfg, device="cpu", data_root=None, dtype=torch.float32):
        from imaml_kernels.trainer.builders import build_samplers

        self.train, self.test = build_samplers(cfg, device, data_root)
        self.T, self.dtype = int(cfg["meta_batch"]), dtype

    def __iter__(self):
        return self

    def __next__(self):
        idx = self.train.draw(self.T)
        return cast(self.train.build(idx), self.dtype), task_fingerprint(idx)

    def eval_tasks(self, n, seed=0, batch=50):
        return (cast(b, self.dtype) for b in self.test.eval_tasks(n, batch, seed=seed))


def cast(tasks, dtype):
    xs, ys, xq, yq = tasks
    return xs.to(dtype), ys, xq.to(dtype), yq


def initial_model(cfg, dtype=torch.float32):
    """θ₀ as the trainer draws it: ``torch.manual_seed(seed)``, then ``build_model(cfg)``."""
    from imaml_kernels.trainer.builders import build_model

    torch.manual_seed(cfg["seed"])
    return build_model(cfg).to(dtype)


def _layer(m):
    """What a layer computes, as a comparable tuple (the released ``Flatten`` is ``nn.Flatten``)."""
    if isinstance(m, nn.Conv2d):
        return ("Conv2d", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return ("BatchNorm2d", m.num_features, m.eps, m.affine, m.track_running_stats)
    if isinstance(m, nn.Linear):
        return ("Linear", m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, nn.ZeroPad2d):
        return ("ZeroPad2d", tuple(m.padding))
    if type(m).__name__ == "Flatten":
        return ("Flatten",)
    if isinstance(m, nn.ReLU):
        return ("ReLU",)
    return (type(m).__name__, "unknown: not compared")


def layer_map(ours: nn.Module, theirs: nn.Module) -> list[tuple[str, str]]:
    """``[(our parameter name, theirs)]`` in order, after checking that the two ``nn.Sequential``
    have the same layers with the same settings and the parameters the same shapes.

    Raises:
        LayoutMismatch: naming the first layer or parameter that differs.
    """
    a, b = [_layer(m) for m in ours.children()], [_layer(m) for m in theirs.children()]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y or "unknown: not compared" in x:
            raise LayoutMismatch(f"layer {i}: this package's {x} against the released {y}")
    if len(a) != len(b):
        raise LayoutMismatch(f"{len(a)} layers here against {len(b)} in the released network")
    pa, pb = list(ours.named_parameters()), list(theirs.named_parameters())
    if len(pa) != len(pb):
        raise LayoutMismatch(f"{len(pa)} parameters here against {len(pb)} in the released network")
    for (n, p), (m, q) in zip(pa, pb):
        if p.shape != q.shape:
            raise LayoutMismatch(f"parameter {n} {tuple(p.shape)} against the released {m} {tuple(q.shape)}")
    return [(n, m) for (n, _), (m, _) in zip(pa, pb)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def parse_overrides(pairs):
    """``["outer_schedule=constant", "meta_batch=8"]`` -> a dict typed after the configuration's defaults."""
    from imaml_kernels.trainer.presets import DEFAULTS

    out = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or key not in DEFAULTS:
            raise SystemExit(f"--set takes KEY=VALUE with KEY one of {', '.join(DEFAULTS)}; got {pair!r}")
        default = DEFAULTS[key]
        if isinstance(default, str):
            out[key] = text
        elif text.lower() == "none":
            out[key] = None
        else:
            out[key] = float(text) if isinstance(default, float) else int(text)
    return out


# ------------------------------------------------------------------ the two loops


class OursLoop:
    """This package's trainer step: :func:`imaml_kernels.step.meta_step` with the run's builders."""

    def __init__(self, cfg, model):
        from imaml_kernels.trainer.builders import build_backward_solve, build_optimizer, build_solver

        self.cfg, self.model = cfg, model
        self.theta = dict(model.named_parameters())
        self.optimizer = build_optimizer(cfg, model.parameters())
        self.inner, self.solve = build_solver(cfg), build_backward_solve(cfg)

    def step(self, tasks, step):
        from imaml_kernels.step import STATS, meta_step
        from imaml_kernels.trainer.presets import outer_lr_at

        for group in self.optimizer.param_groups:
            group["lr"] = outer_lr_at(self.cfg, step)
        stats = meta_step(self.model, self.theta, self.optimizer, tasks, lam=self.cfg["lam"], inner=self.inner,
                          solve=self.solve)
        return dict(zip(STATS, stats.tolist()))

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def params(self):
        return flat(self.model.parameters())

    def grad(self):
        return flat(p.grad for p in self.model.parameters())

    def evaluate(self, stream, n, seed):
        from imaml_kernels import SGDThenPullBack
        from imaml_kernels.trainer.evaluate import evaluate

        solver = SGDThenPullBack(RELEASED_EVAL["steps"], RELEASED_EVAL["lr"], pull_back=False)
        cfg = dict(self.cfg)
        sampler = stream.test
        if stream.dtype != torch.float32:  # evaluate() reads the sampler's float32 tasks: cast them
            sampler = _CastSampler(stream)
        return evaluate(self.model, sampler, cfg, tasks=n, seed=seed, solver=solver)["per_task"]


class _CastSampler:
    """A meta-test sampler whose ``eval_tasks`` come in the stream's dtype."""

    def __init__(self, stream):
        self.stream = stream

    def eval_tasks(self, n, batch=50, *, seed=0):
        return self.stream.eval_tasks(n, seed, batch)


class OfficialLoop:
    """The released training loop (``examples/omniglot_implicit_maml.py``), driven with our tasks.

    Its per-step logging forwards (the support and query losses before adaptation, the support
    accuracy, a second query forward for ``vl_after``) are left out: the query loss and accuracy
    come from the forward that gives the query gradient and from ``utils.measure_accuracy``.
    """

    def __init__(self, root, cfg, model):
        from .official import OfficialUnavailable, load

        if cfg["dataset"] != "omniglot" or cfg["inner"] not in ("gd", "sgd-pullback") or float(cfg["lam_damping"]) != 10.0:
            raise OfficialUnavailable("the released loop runs Omniglot with inner gd or sgd-pullback and lam_damping 10 "
                                      f"(its matrix_evaluator's); got {cfg['dataset']}, {cfg['inner']}, {cfg['lam_damping']}")
        self.lm, self.utils = load(root)
        self.cfg = cfg
        nets = [self.lm.make_conv_network(in_channels=1, out_dim=int(cfg["way"])).to(flat(model.parameters()).dtype)
                for _ in range(2)]
        self.names = layer_map(model, nets[0])
        loss = nn.CrossEntropyLoss()
        kw = dict(loss_function=loss, inner_lr=cfg["inner_lr"], outer_lr=cfg["outer_lr"], GPU=False)
        self.meta, self.fast = self.lm.Learner(model=nets[0], **kw), self.lm.Learner(model=nets[1], **kw)
        theirs = dict(nets[0].named_parameters())
        with torch.no_grad():
            for ours_name, their_name in self.names:
                theirs[their_name].copy_(dict(model.named_parameters())[ours_name])
        self.lam = torch.tensor(float(cfg["lam"]))
        self.last_grad = None

    def _adapt(self, task, w_k):
        """Their inner procedure on one task, from ``w_k``."""
        fast, n = self.fast, int(self.cfg["inner_steps"])
        fast.set_params(w_k.clone())  # sync weights
        if self.cfg["inner"] == "gd":  # the paper's text, with the Learner's own proximal term
            fast.learn_task(task, num_steps=n, add_regularization=True, w_0=w_k, lam=self.lam)
            return
        fast.learn_task(task, num_steps=n)
        fast.inner_opt.zero_grad()  # pull back for regularization
        fast.regularization_loss(w_k, self.lam).backward()
        fast.inner_opt.step()

    def step(self, tasks, step):
        from imaml_kernels.trainer.presets import outer_lr_at

        xs, ys, xq, yq = tasks
        T, fast, cg_steps = xs.shape[0], self.fast, int(self.cfg["cg_iters"])
        self.meta.set_outer_lr(outer_lr_at(self.cfg, step))
        w_k = self.meta.get_params()
        meta_grad, losses, accs = 0.0, [], []
        for t in range(T):
            task = {"x_train": xs[t], "y_train": ys[t], "x_val": xq[t], "y_val": yq[t]}
            self._adapt(task, w_k)
            accs.append(self.utils.measure_accuracy(task, fast, train=False) / 100.0)
            valid_loss = fast.get_loss(task["x_val"], task["y_val"])
            losses.append(valid_loss.item())
            valid_grad = torch.autograd.grad(valid_loss, fast.model.parameters())
            flat_grad = torch.cat([g.contiguous().view(-1) for g in valid_grad])
            if cg_steps <= 1:
                task_outer_grad = flat_grad
            else:
                evaluator = fast.matrix_evaluator(task, self.lam, float(self.cfg["cg_damping"]))
                task_outer_grad = self.utils.cg_solve(evaluator, flat_grad, cg_steps, x_init=None)
            meta_grad = meta_grad + task_outer_grad / T
        self.meta.outer_step_with_grad(meta_grad, flat_grad=True)
        self.last_grad = meta_grad
        return {"loss": sum(losses) / T, "acc": sum(accs) / T}

    def state(self):
        """What the next step reads: the meta-model and its Adam (the fast learner is reset from
        the meta-parameters every task; its SGD has no state)."""
        return {"model": self.meta.model.state_dict(), "outer_opt": self.meta.outer_opt.state_dict(),
                "last_grad": self.last_grad}

    def load_state(self, state):
        self.meta.model.load_state_dict(state["model"])
        self.meta.outer_opt.load_state_dict(state["outer_opt"])
        self.last_grad = state["last_grad"]

    def params(self):
        return self.meta.get_params()

    def grad(self):
        return self.last_grad.detach().clone()

    def evaluate(self, stream, n, seed):
        """``measure_accuracy.py``'s loop on the tasks of ``stream.eval_tasks(n, seed)``."""
        fast, meta_params = self.fast, self.meta.get_params().clone()
        fast.set_inner_lr(RELEASED_EVAL["lr"])
        accs = []
        for xs, ys, xq, yq in stream.eval_tasks(n, seed):
            for t in range(xs.shape[0]):
                task = {"x_train": xs[t], "y_train": ys[t], "x_val": xq[t], "y_val": yq[t]}
                fast.set_params(meta_params)
                fast.learn_task(task, num_steps=RELEASED_EVAL["steps"], add_regularization=False)
                fast.inner_opt.zero_grad()
                fast.regularization_loss(meta_params, 0.0).backward()  # --lam 0.0: a zero step
                fast.inner_opt.step()
                accs.append(self.utils.measure_accuracy(task, fast, train=False) / 100.0)
        fast.set_inner_lr(self.cfg["inner_lr"])
        return accs


# ------------------------------------------------------------------ one row, in its worker


def nudge(model, seed=1):
    """Move every entry of θ by one unit in the last place, up or down at random (seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.rand(p.shape, generator=g) < 0.5
            p.copy_(torch.nextafter(p, torch.where(up, math.inf, -math.inf).to(p.dtype)))
    return model


def make_loop(code, cfg, model, official=None):
    if code == "official":
        if official is None:
            raise ValueError("the official row needs --official DIR (an unpacked aravindr93/imaml_dev checkout)")
        return OfficialLoop(official, cfg, model)
    return OursLoop(cfg, model)


def trajectory(code, preset, steps, eval_every=0, eval_tasks=0, *, seed=0, official=None, overrides=None,
               dtype="float32", twin=False, snapshot=None, log=None, data_root=None, eval_seed=0, state=None,
               stop_at=None, state_every=50):
    """One row: ``steps`` meta-steps of ``code`` ("official" or "ours") with ``preset`` on the
    trainer's stream; the meta-test evaluation every ``eval_every`` steps (step 0 and the last
    included) on ``eval_tasks`` tasks. Returns ``{"config", "records": [per step], "evals": [...],
    "paused_at"}``; with ``snapshot`` (a path) θ and the meta-gradient at :data:`SNAPSHOT_STEPS`
    go there (``torch.save``); with ``log`` (a path) each step's record is appended to it as JSON.

    A long run in parts: with ``state`` (a path) the row saves what its next step needs (the
    loop's parameters and optimizer, the sampler's generator, the records and evaluations so far)
    every ``state_every`` steps and where it stops, and a row whose ``state`` file exists goes on
    from it (same configuration, or ``ValueError``); ``stop_at``: stop after that step (evaluating
    there when it is a multiple of ``eval_every``), ``paused_at`` says where. The resumed steps are
    the uninterrupted run's: the same tasks, the same arithmetic."""
    from imaml_kernels.trainer.presets import resolve_config

    cfg = resolve_config(preset, {"seed": seed, "steps": steps, **(overrides or {})})
    dt = getattr(torch, dtype)
    model = initial_model(cfg, dt)  # the samplers draw from their own generators: θ₀ is the trainer's
    if twin:
        nudge(model)
    loop = make_loop(code, cfg, model, official)  # a missing checkout fails here, before the data loads
    stream = TaskStream(cfg, "cpu", data_root, dt)
    records, evals, snaps, start = [], [], {0: (loop.params(), None)}, 0
    identity = {"code": code, "config": cfg, "dtype": dtype, "twin": bool(twin)}
    if state and Path(state).exists():
        saved = torch.load(state, weights_only=False)
        if saved["identity"] != identity:
            raise ValueError(f"{state} holds another run ({saved['identity']}), not {identity}")
        loop.load_state(saved["loop"])
        stream.train.load_state_dict(saved["sampler"])
        records, evals, start = saved["records"], saved["evals"], saved["step"]
        snaps = {}
    stop = min(steps, stop_at) if stop_at else steps

    def save():
        if state:
            tmp = Path(str(state) + ".tmp")
            torch.save({"identity": identity, "step": len(records), "records": records, "evals": evals,
                        "loop": loop.state(), "sampler": stream.train.state_dict()}, tmp)
            tmp.replace(state)

    def checkpoint(step):
        if any(e["step"] == step for e in evals):
            return
        t0 = time.perf_counter()
        accs = loop.evaluate(stream, eval_tasks, eval_seed)
        evals.append({"step": step, **mean_ci95(accs), "seconds": time.perf_counter() - t0})

    with open(log, "w") if log else contextlib.nullcontext() as sink:
        for rec in records if sink else ():
            sink.write(json.dumps(rec) + "\n")
        for step in range(start, stop):
            if eval_tasks and eval_every and step % eval_every == 0:
                checkpoint(step)
            tasks, fingerprint = next(stream)
            t0 = time.perf_counter()
            stats = loop.step(tasks, step)
            rec = {"step": step + 1, "seconds": time.perf_counter() - t0, "tasks": fingerprint, **stats}
            records.append(rec)
            if step + 1 in SNAPSHOT_STEPS or step + 1 == stop:
                snaps[step + 1] = (loop.params(), loop.grad())
            if sink:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
            if state_every and (step + 1) % state_every == 0:
                save()
        if eval_tasks and (stop == steps or (eval_every and stop % eval_every == 0)):
            checkpoint(stop)
    save()
    if snapshot:
        torch.save(snaps, snapshot)
    return {"code": code, "config": cfg, "records": records, "evals": evals,
            "paused_at": stop if stop < steps else None}


def mean_ci95(accs):
    """``{"acc", "ci95", "tasks"}`` of per-task accuracies (fractions): the mean and
    ``1.96·std/√n`` with the sample std (:func:`imaml_kernels.trainer.evaluate.mean_ci95`;
    ``measure_accuracy.py`` prints numpy's population std, smaller by √((n−1)/n): 0.08% at 600)."""
    from imaml_kernels.trainer.evaluate import mean_ci95 as m

    acc, ci = m(torch.tensor(accs, dtype=torch.float64))
    return {"acc": acc, "ci95": ci, "tasks": len(accs)}


# ------------------------------------------------------------------ the rows, one process each


def make_rows(*, preset, also=None, official=None, twin=False, steps, eval_every, eval_tasks, seed=0, dtype="float32",
              overrides=None, log_dir=None, snap_dir=None, data_root=None, state_dir=None, stop_at=None):
    """The :class:`~bench.fresh.Row` s of a run: official (with ``official``), ours, twin, also;
    ``overrides`` (configuration keys) apply to every row."""
    common = dict(steps=steps, eval_every=eval_every, eval_tasks=eval_tasks, seed=seed, dtype=dtype, data_root=data_root,
                  overrides=dict(overrides or {}))
    plan = ([("official", "official", preset, {})] if official else []) + [("ours", "ours", preset, {})]
    plan += [("twin", "ours", preset, {"twin": True})] if twin else []
    plan += [("also", "ours", also, {})] if also else []
    rows = []
    for key, code, p, extra in plan:
        kw = dict(code=code, preset=p, official=official if code == "official" else None, **common, **extra)
        if log_dir:
            kw["log"] = str(Path(log_dir) / f"steps_{key}.jsonl")
        if snap_dir:
            kw["snapshot"] = str(Path(snap_dir) / f"{key}.pt")
        if state_dir:
            kw["state"] = str(Path(state_dir) / f"{key}.pt")
        if stop_at:
            kw["stop_at"] = int(stop_at)
        rows.append(fresh.Row(key, f"{LABELS[key]}, {p}", "bench.trajectory:trajectory", kw))
    return rows


def lanes_of(rows, lanes):
    """Rows per lane: with one lane all rows in order; with more, the official row (the slowest,
    about three of ours) alone in the first lane and the others dealt to the remaining lanes in
    order, each lane's rows one after the other."""
    if lanes <= 1 or len(rows) <= 1:
        return [list(rows)]
    first = [r for r in rows if r.key == "official"]
    rest = [r for r in rows if r.key != "official"]
    if not first:
        first, rest = rest[:1], rest[1:]
    n = max(1, min(lanes - 1, len(rest)))
    return [first] + [rest[i::n] for i in range(n)]


def run(*, preset="omniglot-5w1s-released", also=None, official=None, twin=False, steps=1000, eval_every=250,
        eval_tasks=600, seed=0, dtype="float32", overrides=None, threads=1, lanes=1, out=None, data_root=None, log=None,
        state_dir=None, stop_at=None):
    """Every row in its own worker process; returns ``(results, snapshots, rows)``: ``{key: the
    row's result or {"error": reason}}`` and ``{key: {step: (θ, g)}}``. With ``lanes`` > 1 the
    rows run in that many concurrent lanes (:func:`lanes_of`), each lane's workers pinned to
    ``threads`` CPUs of their own: the curves are unchanged (each row is deterministic), the
    seconds per step are taken beside the other lanes."""
    import os
    import threading

    results, snaps = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-trajectory-") as tmp:
        rows = make_rows(preset=preset, also=also, official=official, twin=twin, steps=steps, eval_every=eval_every,
                         eval_tasks=eval_tasks, seed=seed, dtype=dtype, overrides=overrides, log_dir=out, snap_dir=tmp,
                         data_root=data_root, state_dir=state_dir, stop_at=stop_at)
        if state_dir:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
        plan = lanes_of(rows, lanes)
        cpus = sorted(os.sched_getaffinity(0))
        if len(plan) > 1 and len(cpus) < len(plan) * threads:
            raise ValueError(f"{len(plan)} lanes of {threads} thread(s) need {len(plan) * threads} CPUs, "
                             f"this process may use {len(cpus)}")

        def lane(i, lane_rows):
            pin = cpus[i * threads:(i + 1) * threads] if len(plan) > 1 else None
            for row in lane_rows:
                if log:
                    log(f"{row.label}: {steps} meta-steps in a fresh process"
                        + (f" (lane {i + 1}, CPUs {pin})" if pin else "") + " ...")
                t0 = time.perf_counter()
                res = fresh.spawn(row, threads=threads, cpus=pin)
                results[row.key] = dict(res.get("custom") or {"error": res.get("error", "no result")},
                                        wall=time.perf_counter() - t0, lane=i + 1)
                path = Path(tmp) / f"{row.key}.pt"
                if path.exists():
                    snaps[row.key] = torch.load(path)
                if log:
                    log(f"  {row.key}: {'not measured: ' + results[row.key]['error'] if 'error' in results[row.key] else 'done'}"
                        f" ({results[row.key]['wall']:.0f} s)")

        workers = [threading.Thread(target=lane, args=(i, lr)) for i, lr in enumerate(plan)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    return {r.key: results[r.key] for r in rows}, snaps, rows


# ------------------------------------------------------------------ the comparison


def measured(results):
    return {k: r for k, r in results.items() if "error" not in r}


def step_seconds(res):
    """``(median, mean)`` seconds per meta-step of a row."""
    s = [r["seconds"] for r in res["records"]]
    return statistics.median(s), sum(s) / len(s)


def stream_check(results):
    """One line per row after the first: are its meta-batches the first row's?"""
    ok = measured(results)
    if len(ok) < 2:
        return []
    (ref_key, ref), lines = next(iter(ok.items())), []
    for key, res in list(ok.items())[1:]:
        a, b = [r["tasks"] for r in ref["records"]], [r["tasks"] for r in res["records"]]
        first = next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        same = first is None and len(a) == len(b)
        lines.append(f"- task stream of `{key}` against `{ref_key}`: "
                     + (f"the same tasks (classes, drawings, rotations) at all {len(a)} meta-steps" if same else
                        f"DIFFERENT from meta-step {first or min(len(a), len(b)) + 1}"))
    return lines


def _rel(a, b):
    d = (a.double() - b.double()).norm().item()
    n = b.double().norm().item()
    return d / n if n else float("nan")


def agreement(results, snaps, a="ours", b="official"):
    """Rows ``(step, loss a, loss b, |Δ loss|, max |θa − θb|, ‖Δθ‖/‖θb‖, ‖Δg‖/‖gb‖)`` at the
    snapshot steps both rows have (step 0: θ₀ alone)."""
    if a not in snaps or b not in snaps or a not in measured(results) or b not in measured(results):
        return []
    ra, rb = results[a]["records"], results[b]["records"]
    rows = []
    for step in sorted(set(snaps[a]) & set(snaps[b])):
        (ta, ga), (tb, gb) = snaps[a][step], snaps[b][step]
        la, lb = (ra[step - 1]["loss"], rb[step - 1]["loss"]) if step else (None, None)
        rows.append((step, _num(la, ".6f"), _num(lb, ".6f"), _num(None if la is None else abs(la - lb), ".2e"),
                     f"{(ta.double() - tb.double()).abs().max().item():.2e}", f"{_rel(ta, tb):.2e}",
                     "-" if ga is None else f"{_rel(ga, gb):.2e}"))
    return rows


def _num(v, fmt):
    return "-" if v is None else f"{v:{fmt}}"


def window_rows(results, width):
    """Per window of ``width`` meta-steps: each row's mean query accuracy and loss, and for the
    rows after the first, the difference to the first row's accuracy with two standard errors
    of that difference (from the per-step spread of both)."""
    ok = measured(results)
    keys = list(ok)
    n = min(len(r["records"]) for r in ok.values()) if ok else 0
    rows = []
    for lo in range(0, n, width):
        hi = min(n, lo + width)
        row = [f"{lo + 1}-{hi}"]
        acc = {k: [r["acc"] for r in ok[k]["records"][lo:hi]] for k in keys}
        for k in keys:
            loss = [r["loss"] for r in ok[k]["records"][lo:hi]]
            row.append(f"{100 * _mean(acc[k]):.2f} / {_mean(loss):.3f}")
        for k in keys[1:]:
            d = _mean(acc[k]) - _mean(acc[keys[0]])
            se = math.sqrt(_var(acc[k]) / len(acc[k]) + _var(acc[keys[0]]) / len(acc[k]))
            row.append(f"{100 * d:+.2f} ± {200 * se:.2f}")
        rows.append(tuple(row))
    header = ("meta-steps", *(f"{k}: acc % / loss" for k in keys), *(f"{k} − {keys[0]} acc (± 2 s.e.)" for k in keys[1:]))
    return header, rows


def _mean(v):
    return sum(v) / len(v)


def _var(v):
    m = _mean(v)
    return sum((x - m) ** 2 for x in v) / max(1, len(v) - 1)


def eval_rows(results):
    """Per evaluation step: each row's meta-test accuracy ± 95% interval and, for the rows after
    the first, whether its interval overlaps the first row's."""
    ok = {k: r for k, r in measured(results).items() if r["evals"]}
    if not ok:
        return None, []
    keys = list(ok)
    steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in ok.values())))
    rows = []
    for s in steps:
        ev = {k: next(e for e in ok[k]["evals"] if e["step"] == s) for k in keys}
        first = ev[keys[0]]
        overlap = ["yes" if abs(ev[k]["acc"] - first["acc"]) <= ev[k]["ci95"] + first["ci95"] else "no" for k in keys[1:]]
        rows.append((s, *(f"{100 * ev[k]['acc']:.2f} ± {100 * ev[k]['ci95']:.2f}" for k in keys), *overlap))
    return ("step", *(f"{k}: meta-test acc %" for k in keys), *(f"{k} overlaps {keys[0]}" for k in keys[1:])), rows


# ------------------------------------------------------------------ report, CSV, plot


def row_table(results, rows):
    header = ("row", "preset", "inner", "init", "Adam ε", "outer lr", "meta-steps", "s / meta-step: median (mean)",
              "evaluations: s each")
    out = []
    for row in rows:
        res = results[row.key]
        if "error" in res:
            out.append((row.label, row.kwargs["preset"], f"not measured: {res['error']}", *("",) * 6))
            continue
        c, (med, mean) = res["config"], step_seconds(res)
        adam_eps = 1e-3 if row.key == "official" else c.get("adam_eps", 1e-8)  # the released Learner's, fixed
        ev = [e["seconds"] for e in res["evals"]]
        out.append((row.label, c["preset"], c["inner"], c["init"], f"{adam_eps:g}", _schedule(c), len(res["records"]),
                    f"{med:.3f} ({mean:.3f})", f"{_mean(ev):.1f}" if ev else "-"))
    return header, out


def eps_note(results):
    """A line where a row of this package runs another Adam ε than the released Learner's 1e-3."""
    ok = measured(results)
    if "official" not in ok:
        return []
    preset = ok["official"]["config"]["preset"]
    other = [k for k, r in ok.items() if k != "official" and r["config"]["preset"] == preset
             and r["config"].get("adam_eps", 1e-8) != 1e-3]
    if not other:
        return []
    names = ", ".join(f"`{k}`" for k in other)
    note = f"- Adam ε of {names} is not the released Learner's 1e-3: by design, they part from it at step 1"
    return [note]


def _schedule(c):
    text = f"{c['outer_lr']:g}"
    if c.get("warmup_steps"):
        text += f", {c['warmup_steps']}-step warm-up"
    return text + (", cosine" if c.get("outer_schedule") == "cosine" else "")


def agreements(results, snaps, earlier=None):
    """``{"ours-official": rows, "twin-ours": rows}`` (:func:`agreement`), with the rows of an
    earlier part of the run (``earlier``, the same form, e.g. read back from JSON) at the steps
    this part has no snapshot of: a resumed row has only its own part's."""
    out = {}
    for a, b in (("ours", "official"), ("twin", "ours")):
        rows = {int(r[0]): tuple(r) for r in (earlier or {}).get(f"{a}-{b}", [])}
        rows.update({r[0]: r for r in agreement(results, snaps, a, b)})
        if rows:
            out[f"{a}-{b}"] = [rows[k] for k in sorted(rows)]
    return out


def report(results, snaps, rows, command, width, threads=1, lanes=1, earlier=None):
    """The markdown report (``earlier``: :func:`agreements` of the run's earlier parts)."""
    lines = ["# Training trajectories: the authors' released code and this package on the same tasks", "",
             machine_header(), "", f"`{command}`", "",
             (f"Each row ran in a fresh worker process of its own with {threads} torch thread{'s' * (threads > 1)}, "
              + ("one after the other (bench/fresh.py)" if lanes <= 1 else
                 f"in {lanes} concurrent lanes, each pinned to CPUs of its own (the official row alone in one lane, "
                 "the others one after the other in the other; bench/fresh.py), so the seconds per step were taken "
                 "beside another busy core (shared caches and memory bandwidth: compare them with care)")
              + ", from the same θ₀ (the trainer's, copied into the released network layer "
              "by layer) on the trainer's task stream. Seconds per meta-step: the step alone (time.perf_counter; not the "
              "sampling, not the evaluations). Meta-test: the released evaluation "
              f"({RELEASED_EVAL['steps']} plain SGD steps, lr {RELEASED_EVAL['lr']}, no proximal term) on the same tasks "
              "(seed 0) for every row, mean ± 1.96·std/√n."), ""]
    lines += [markdown_table(*row_table(results, rows)), "", *stream_check(results), *eps_note(results), ""]
    paused = sorted({r["paused_at"] for r in measured(results).values() if r.get("paused_at")})
    if paused:
        steps = max(r["config"]["steps"] for r in measured(results).values())
        lines += [f"**Paused at meta-step {', '.join(map(str, paused))} of {steps}** (`--stop-at`): the same command "
                  "with a larger `--stop-at` (or none) goes on from the rows' saved states (`--state`).", ""]
    agree = agreements(results, snaps, earlier)
    for other in ("ours", "twin"):
        ref = "official" if other == "ours" else "ours"
        a = agree.get(f"{other}-{ref}")
        if a:
            lines += [f"## `{other}` against `{ref}`: query loss, θ and the meta-gradient at the first steps", "",
                      markdown_table(("meta-step", f"{other} loss", f"{ref} loss", "abs. diff.", "θ: max abs. diff.",
                                      "‖Δθ‖ / ‖θ‖", "‖Δg‖ / ‖g‖"), a), ""]
    header, win = window_rows(results, width)
    if win:
        lines += [f"## Query accuracy and loss, means over {width} meta-steps", "", markdown_table(header, win), ""]
    header, ev = eval_rows(results)
    if ev:
        lines += ["## Meta-test accuracy (released evaluation), mean ± 95% interval", "", markdown_table(header, ev), ""]
    lines += ["![trajectories](trajectory.png)", ""]
    return "\n".join(lines)


def write_csv_file(path, results):
    ok = measured(results)
    n = max((len(r["records"]) for r in ok.values()), default=0)
    fields = [(k, f) for k, r in ok.items() for f in ("loss", "acc", "inner_loss", "seconds")
              if r["records"] and f in r["records"][0]]
    header = ["step", *(f"{k}_{f}" for k, f in fields), *(f"{k}_{f}" for k in ok for f in ("eval_acc", "eval_ci95"))]
    rows = []
    for step in range(n + 1):
        rec = {k: r["records"][step - 1] if 0 < step <= len(r["records"]) else {} for k, r in ok.items()}
        ev = {k: next((e for e in r["evals"] if e["step"] == step), {}) for k, r in ok.items()}
        rows.append([step, *(rec[k].get(f, "") for k, f in fields),
                     *(v for k in ok for v in (ev[k].get("acc", ""), ev[k].get("ci95", "")))])
    write_csv(path, header, rows)


def _smooth(v, w):
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x - (v[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def plot(path, results, rows, width=25):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for i, row in enumerate(r for r in rows if "error" not in results[r.key]):
        res, color = results[row.key], f"C{i}"
        steps = [r["step"] for r in res["records"]]
        axes[0].plot(steps, [100 * a for a in _smooth([r["acc"] for r in res["records"]], width)], color=color, lw=1.2,
                     label=f"{row.label} ({step_seconds(res)[0]:.2f} s/step)")
        axes[1].plot(steps, _smooth([r["loss"] for r in res["records"]], width), color=color, lw=1.2)
        if res["evals"]:
            axes[0].errorbar([e["step"] for e in res["evals"]], [100 * e["acc"] for e in res["evals"]],
                             yerr=[100 * e["ci95"] for e in res["evals"]], fmt="o", ms=4, capsize=3, color=color)
    axes[0].set_ylabel("query accuracy %")
    axes[0].set_title(f"training query accuracy (moving mean of {width}); dots: meta-test ± 95%", fontsize=9)
    axes[1].set_ylabel("query loss")
    axes[1].set_title(f"training query loss (moving mean of {width})", fontsize=9)
    for ax in axes:
        ax.set_xlabel("meta-step")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle("iMAML training on the same Omniglot task stream from the same θ₀", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(sys.argv[1:]) if sys.argv[1:] else "python -m bench trajectory"
    if args.official is None:
        print("the authors' released code: not run (give --official DIR, an unpacked aravindr93/imaml_dev checkout)")
    results, snaps, rows = run(preset=args.preset, also=args.also, official=args.official, twin=args.twin,
                               steps=args.steps, eval_every=args.eval_every, eval_tasks=args.eval_tasks, seed=args.seed,
                               dtype=args.dtype, overrides=parse_overrides(args.set), threads=args.threads, lanes=args.lanes,
                               out=str(out), log=lambda m: print(m, file=sys.stderr, flush=True), state_dir=args.state,
                               stop_at=args.stop_at)
    width = args.window or max(1, min(50, args.steps // 10 or 1))
    kept = out / "agreement.json"  # the first steps' agreement, for the report of a resumed run
    earlier = json.loads(kept.read_text()) if args.state and kept.exists() else None
    agree = agreements(results, snaps, earlier)
    if args.state and agree:
        kept.write_text(json.dumps(agree, indent=1) + "\n")
    text = report(results, snaps, rows, command, width, args.threads, len(lanes_of(rows, args.lanes)), earlier)
    (out / "trajectory.md").write_text(text + "\n")
    write_csv_file(out / "trajectory.csv", results)
    plot(out / "trajectory.png", results, rows, width=min(25, width))
    print("\n" + text)
    print(f"wrote {out}/trajectory.md, trajectory.csv, trajectory.png and steps_<row>.jsonl")
    return results
