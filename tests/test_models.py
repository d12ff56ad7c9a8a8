"""The drop-in op on the models users bring: a DistributedDataParallel model (2 real gloo
processes), dropout in training mode, BatchNorm with running buffers, an eval-mode transformer
layer, bfloat16/float16 models, the one-line refusals, and torch.compile of the query forward."""

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imaml_kernels as ik

from helpers import rel_err

DT = torch.float64


# ------------------------------------------------------------------ DistributedDataParallel


def _ddp_case(kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 6, 4, generator=g, dtype=DT), torch.randint(0, 3, (4, 6), generator=g),
            torch.randn(4, 6, 4, generator=g, dtype=DT), torch.randint(0, 3, (4, 6), generator=g)]
    return net, data


def _meta_steps(model, kind, data, steps=2):
    """``steps`` meta-steps (SGD) on the tasks ``data``; the parameters after them."""
    named = dict(model.named_parameters())
    theta = named if kind == "all" else {k: v for k, v in named.items() if k.endswith("2.weight") or k.endswith("2.bias")}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    xs, ys, xq, yq = data
    for _ in range(steps):
        phi = ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(3, 0.1), solve=ik.CG(5))
        loss = F.cross_entropy(ik.query_logits(model, phi, xq).flatten(0, 1), yq.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k.removeprefix("module."): v.detach().clone() for k, v in model.named_parameters()}


def _rank(rank, world, port, kind, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net, data = _ddp_case(kind)
        half = [t[2 * rank:2 * rank + 2] for t in data]
        torch.save(_meta_steps(DDP(net), kind, half), out.format(rank))
    finally:
        dist.destroy_process_group()
    # The rank's work is saved: it leaves without the interpreter's teardown, in which, on a Zen 5
    # VM, a thread of torch's process-group machinery aborted the process after both ranks had
    # saved and destroyed the group ("terminate called without an active exception", SIGABRT, in
    # 2-4 runs of 8 of this file's DDP tests; the same with a file store; this package starts no
    # C++ threads of its own).
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["all", "head"], ids=["theta-all-engine", "theta-head-generic-with-psi"])
def test_ddp_model_meta_gradients_are_averaged_like_ddp(tmp_path, kind):
    """Two gloo ranks, each with 2 of 4 tasks, a DDP-wrapped model as the op's model: after two
    meta-steps both ranks hold the same parameters, equal to one process over all 4 tasks (the
    mean over tasks: what DDP's averaging of ordinary gradients gives), ψ's direct and cross
    terms included."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank{}.pt")
    mp.start_processes(_rank, args=(2, _free_port(), kind, out), nprocs=2, join=True, start_method="spawn")
    net, data = _ddp_case(kind)
    want = _meta_steps(net, kind, data)
    got = [torch.load(out.format(r)) for r in range(2)]
    for k in want:
        assert torch.equal(got[0][k], got[1][k]), k
        assert rel_err(got[0][k], want[k]) < 1e-10, k
    assert any(not torch.equal(want[k], v.detach()) for k, v in _ddp_case(kind)[0].named_parameters())  # it moved


# ------------------------------------------------------------------ dropout


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(DT)


def test_dropout_needs_a_randomness_choice_in_one_line():
    model = _dropout_model()
    x, y = torch.randn(3, 6, 4, dtype=DT), torch.randint(0, 3, (3, 6))
    with pytest.raises(ValueError, match="randomness='different'") as e:
        ik.implicit_adapt(model, dict(model.named_parameters()), (x, y), lam=2.0, inner=ik.GD(2, 0.1))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="randomness must be"):
        ik.implicit_adapt(model, dict(model.named_parameters()), (x, y), lam=2.0, inner=ik.GD(2, 0.1), randomness="per-task")


@pytest.mark.parametrize("hvp_mode", ["revrev", "fwdrev"])
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_in_training_mode_keeps_the_solve_symmetric(randomness, hvp_mode):
    """Every product of one backward solve sees the same dropout masks (revrev: one kept graph;
    fwdrev: the generator replayed), so the operator a solve receives is symmetric and the
    meta-gradient is the dense solve of it."""
    model = _dropout_model()
    x, y = torch.randn(3, 6, 4, dtype=DT), torch.randint(0, 3, (3, 6))
    xq, yq = torch.randn(3, 6, 4, dtype=DT), torch.randint(0, 3, (3, 6))
    theta = dict(model.named_parameters())
    seen = {}

    def dense(matvec, b):
        eye = torch.eye(b.shape[1], dtype=b.dtype)
        A = torch.stack([matvec(eye[i].expand_as(b).contiguous()) for i in range(b.shape[1])], -1)
        seen["A"], seen["b"] = A, b
        return torch.linalg.solve(A, b), None

    phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(3, 0.1), solve=dense, randomness=randomness,
                            hvp_mode=hvp_mode, chunk=3)
    assert phi.plan.hvp == hvp_mode
    F.cross_entropy(ik.query_logits(model, phi, xq, randomness=randomness).flatten(0, 1), yq.flatten()).backward()
    A = seen["A"]
    torch.testing.assert_close(A, A.transpose(1, 2), rtol=1e-10, atol=1e-12)
    got = torch.cat([p.grad.reshape(-1) for p in theta.values()])
    torch.testing.assert_close(got, torch.linalg.solve(A, seen["b"]).sum(0), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ BatchNorm buffers, eval-mode attention


def test_batchnorm_running_buffers_are_left_untouched_and_the_query_forward_works():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).to(DT)
    assert net[1].track_running_stats and net.training
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    x, y = torch.randn(2, 5, 1, 6, 6, dtype=DT), torch.randint(0, 3, (2, 5))
    for engine in (False, None):  # the generic path, and the engine (it uses batch statistics)
        phi = ik.implicit_adapt(net, dict(net.named_parameters()), (x, y), lam=2.0, inner=ik.GD(2, 0.05), engine=engine)
        F.cross_entropy(ik.query_logits(net, phi, x, engine=engine).flatten(0, 1), y.flatten()).backward()
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if n != "0.bias")


def test_an_eval_mode_transformer_layer_adapts_and_backpropagates():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True).to(DT).eval()
    x, yt = torch.randn(2, 3, 5, 8, dtype=DT), torch.randn(2, 3, 5, 8, dtype=DT)
    theta = dict(layer.named_parameters())
    phi = ik.implicit_adapt(layer, theta, (x, yt), lam=2.0, inner=ik.GD(2, 0.05), loss=F.mse_loss)
    F.mse_loss(ik.query_logits(layer, phi, x), yt).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in theta.values())
    assert torch.backends.mha.get_fastpath_enabled()  # restored


# ------------------------------------------------------------------ low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_models_run_with_a_float32_solve(dtype):
    """A bfloat16/float16 model: inner loop and HVPs in its dtype, the solve and its reductions in
    float32; the meta-gradient is close to the float32 model's (to the dtype's precision)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    low = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    low.load_state_dict(ref.state_dict())
    low = low.to(dtype)
    x, y = torch.randn(3, 6, 4), torch.randint(0, 3, (3, 6))
    kw = dict(lam=2.0, inner=ik.GD(3, 0.1), cg_iters=5)
    want, _ = ik.implicit_meta_grad(ref, dict(ref.named_parameters()), (x, y), (x, y), **kw)
    got, info = ik.implicit_meta_grad(low, dict(low.named_parameters()), (x.to(dtype), y), (x.to(dtype), y), **kw)
    assert all(g.dtype == dtype for g in got.values()) and info["plan"].path == "generic"
    flat = lambda d: torch.cat([d[k].float().reshape(-1) for k in want])  # noqa: E731
    assert rel_err(flat(got), flat(want)) < (5e-2 if dtype == torch.bfloat16 else 1e-2)


# ------------------------------------------------------------------ one-line refusals, compile


def test_an_empty_query_set_is_refused_naming_the_query():
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))
    with pytest.raises(ValueError, match="the query set is empty"):
        ik.implicit_meta_grad(model, dict(model.named_parameters()), (x, y), (x[:, :0], y[:, :0]), lam=2.0, inner=ik.GD(1, 0.1))
    with pytest.raises(ValueError, match="the support set is empty"):
        ik.implicit_adapt(model, dict(model.named_parameters()), (x[:, :0], y[:, :0]), lam=2.0, inner=ik.GD(1, 0.1))
    phi = ik.implicit_adapt(model, dict(model.named_parameters()), (x, y), lam=2.0, inner=ik.GD(1, 0.1))
    with pytest.raises(ValueError, match="the query set x_q must be"):
        ik.query_logits(model, phi, x[:, :0])


def test_compile_fullgraph_traces_the_engine_query_forward():
    """``torch.compile(fullgraph=True)`` of a meta-step's loss (adapt, engine query forward)
    equals eager, the first call being the compiled one."""
    from imaml_kernels.nets import MLP

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP([5, 7, 3])
    theta = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, 5, generator=g), torch.randint(0, 3, (4, 6), generator=g)

    def f(x, y):
        phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(3, 0.1))
        return F.cross_entropy(ik.query_logits(model, phi, x).flatten(0, 1), y.flatten())

    loss = torch.compile(f, fullgraph=True)(x, y)
    loss.backward()
    compiled = {k: v.grad.clone() for k, v in theta.items()}
    for v in theta.values():
        v.grad = None
    eager = f(x, y)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for k, v in theta.items():
        torch.testing.assert_close(compiled[k], v.grad, rtol=1e-5, atol=1e-7)
