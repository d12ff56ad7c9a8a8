"""Batched Hessian-vector products for any model (:func:`imaml_kernels.hvp.batched_hvp`) in
float64: both modes against ``torch.autograd.functional`` task by task, ``chunk=``, dict and
flat parameters (``layout=``), and the errors for bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import imaml_kernels as ik
from imaml_kernels.hvp import HVP_MODES, batched_hvp
from imaml_kernels.nets import MLP, OmniglotConv

DT = torch.float64


def _tasks(model, T, n, in_shape, seed, regression=False, way=3):
    """Per-task parameters near ``model``'s, a tangent ``v`` and a support batch (float64)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: p.detach() for k, p in model.named_parameters()}
    params = {k: p.expand(T, *p.shape) + 0.1 * torch.randn(T, *p.shape, generator=g, dtype=DT) for k, p in base.items()}
    v = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in params.items()}
    x = torch.randn(T, n, *in_shape, generator=g, dtype=DT)
    y = torch.randn(T, n, way, generator=g, dtype=DT) if regression else torch.randint(0, way, (T, n), generator=g)
    return params, v, x, y


def _autograd_hvp(loss_fn, params, v, *batch):
    """``torch.autograd.functional.hvp`` task by task (reverse-over-reverse with create_graph)."""
    keys, T = list(params), next(iter(params.values())).shape[0]
    out = []
    for t in range(T):
        f = lambda *ps: loss_fn(dict(zip(keys, ps)), *(b[t] for b in batch))  # noqa: E731
        _, hv = torch.autograd.functional.hvp(f, tuple(params[k][t] for k in keys), tuple(v[k][t] for k in keys))
        out.append(hv)
    return {k: torch.stack([o[i] for o in out]) for i, k in enumerate(keys)}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP([4, 6, 3]).to(DT)


LOSSES = {"cross_entropy": (F.cross_entropy, False), "mse_loss": (F.mse_loss, True)}


@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_modes_agree_with_autograd_functional_hvp(loss, mode):
    model = _mlp()
    loss_fn, regression = LOSSES[loss]
    f = ik.task_loss_fn(model, loss_fn)
    params, v, x, y = _tasks(model, 3, 7, (4,), seed=1, regression=regression)
    want = _autograd_hvp(f, params, v, x, y)
    if loss == "mse_loss" and mode == "fwdrev":
        # F.mse_loss has no forward-mode derivative: the reason for "revrev".
        with pytest.raises((RuntimeError, NotImplementedError)):
            batched_hvp(f, params, v, x, y, mode=mode)
        return
    got = batched_hvp(f, params, v, x, y, mode=mode)
    assert set(got) == set(params)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=f"{loss} {mode} {k}")


@pytest.mark.parametrize("mode", HVP_MODES)
def test_chunk_changes_nothing(mode):
    model = _mlp(1)
    f = ik.task_loss_fn(model)
    params, v, x, y = _tasks(model, 5, 6, (4,), seed=2)
    whole = batched_hvp(f, params, v, x, y, mode=mode)
    for chunk in (1, 2, 3, 5, 8):  # 5 tasks: chunks that divide it, that do not, and more than T
        got = batched_hvp(f, params, v, x, y, chunk=chunk, mode=mode)
        for k in params:
            torch.testing.assert_close(got[k], whole[k], rtol=1e-12, atol=1e-14, msg=f"chunk={chunk} {k}")


def test_dict_and_flat_forms_with_and_without_layout():
    model = _mlp(2)
    f = ik.task_loss_fn(model)
    params, v, x, y = _tasks(model, 3, 5, (4,), seed=3)
    layout = ik.ParamLayout.from_params(params)
    hv = layout.flatten(batched_hvp(f, params, v, x, y))
    flat_p, flat_v = layout.flatten(params), layout.flatten(v)
    # layout=: the loss receives dicts of per-task views of the flat [P] vector.
    with_layout = batched_hvp(f, flat_p, flat_v, x, y, layout=layout)
    assert with_layout.shape == flat_p.shape
    torch.testing.assert_close(with_layout, hv, rtol=1e-12, atol=1e-14)
    # Without it: the flat [P] vector itself.
    sizes, names = [layout.numels[k] for k in layout.names], layout.names

    def flat_loss(p, xb, yb):
        return f({k: t.view(layout.shapes[k]) for k, t in zip(names, p.split(sizes))}, xb, yb)

    torch.testing.assert_close(batched_hvp(flat_loss, flat_p, flat_v, x, y, mode="revrev"), hv, rtol=1e-12, atol=1e-14)


def test_bad_inputs_raise_with_messages():
    model = _mlp()
    f = ik.task_loss_fn(model)
    params, v, x, y = _tasks(model, 3, 5, (4,), seed=4)
    layout = ik.ParamLayout.from_params(params)
    with pytest.raises(ValueError, match=r"mode must be one of \('fwdrev', 'revrev'\), got 'fast'"):
        batched_hvp(f, params, v, x, y, mode="fast")
    with pytest.raises(ValueError, match="v must be a dict with the keys of params"):
        batched_hvp(f, params, {k: t for k, t in v.items() if k != "0.bias"}, x, y)
    with pytest.raises(ValueError, match=r"v must be a dict with the keys of params .* got Tensor"):
        batched_hvp(f, params, layout.flatten(v), x, y)
    with pytest.raises(ValueError, match=r"v\['0.bias'\] must have shape \[3, 6\], got \[3, 5\]"):
        batched_hvp(f, params, {**v, "0.bias": v["0.bias"][:, :5]}, x, y)
    flat = layout.flatten(params)
    with pytest.raises(ValueError, match=rf"v must be a tensor of shape \[3, {layout.numel}\]"):
        batched_hvp(f, flat, layout.flatten(v)[:, 1:], x, y, layout=layout)
    with pytest.raises(ValueError, match="batch.1. has leading size 2, expected T=3"):
        batched_hvp(f, params, v, x, y[:2])
    small = ik.ParamLayout.from_params({k: t for k, t in params.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=rf"layout has P={small.numel}, params has P={layout.numel}"):
        batched_hvp(f, flat, layout.flatten(v), x, y, layout=small)


# --------------------------------------------------------------------------- against dense Hessians


class SmallCNN(nn.Module):
    def __init__(self, way=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3 * 6 * 6, way)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


MODELS = {
    "mlp": (lambda: MLP([5, 7, 3]), (5,)),
    "cnn-bn": (lambda: SmallCNN(), (1, 6, 6)),
    "omniglot-conv-small": (lambda: OmniglotConv(3, channels=4), (1, 28, 28)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("T", [1, 3, 8])
def test_batched_hvp_matches_dense(name, T):
    torch.manual_seed(T)
    make, in_shape = MODELS[name]
    model = make().to(DT)
    n = 6
    x = torch.randn(T, n, *in_shape, dtype=DT)
    y = torch.randint(0, 3, (T, n))
    base = {k: v.detach() for k, v in model.named_parameters()}
    params = {k: v[None].repeat(T, *([1] * v.dim())) + 0.1 * torch.randn(T, *v.shape, dtype=DT) for k, v in base.items()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    hv = ik.batched_hvp(loss_fn, params, v, x, y)
    layout = ik.ParamLayout.from_params(params)
    flat_p, flat_v, flat_hv = layout.flatten(params), layout.flatten(v), layout.flatten(hv)
    for t in range(T):
        f = lambda q: loss_fn({k: q[layout.offsets[k] : layout.offsets[k] + layout.numels[k]].view(layout.shapes[k]) for k in layout.names}, x[t], y[t])  # noqa: E731
        # Classic double backward as the dense reference (torch.func.hessian's batched
        # forward-mode through conv has disagreed with finite differences here).
        H = torch.autograd.functional.hessian(f, flat_p[t])
        assert torch.allclose(flat_hv[t], H @ flat_v[t], atol=1e-10, rtol=1e-9)
    # flat form with a layout gives the same, and chunking changes nothing
    hv_flat = ik.batched_hvp(loss_fn, flat_p, flat_v, x, y, layout=layout, chunk=2)
    assert torch.allclose(hv_flat, flat_hv, atol=1e-12)
