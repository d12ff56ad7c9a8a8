"""The fused batched network engine (imaml_kernels.engine, nets' batched methods) against a
float64 torch.func reference: loss, gradient, HVP, the fused inner loop, errors, backends,
tracing, reuse. The ops behind it are tested family by family in ``tests/ops/``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import imaml_kernels as ik
from imaml_kernels import dispatch
from imaml_kernels.engine import BatchedNet, UnsupportedModel, functional_logits
from imaml_kernels.layout import ParamLayout
from imaml_kernels.nets import MLP, MiniImagenetConv, OmniglotConv
from helpers import rel_err as rel


def hvp_theta(lin, v):
    """An engine linearisation's HVP in θ's (the module's) order: its ``hvp`` works in the engine's order."""
    return lin.from_work(lin.hvp(lin.to_work(v)))


def small_conv_no_bn(way=4):
    """A conv net without BatchNorm (stride, padding, max-pool, ReLU, Tanh, two linears)."""
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, stride=2, padding=0), nn.Tanh(),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 7), nn.Tanh(), nn.Linear(7, way),
    )
    net.input_shape = (2, 11, 11)
    return net


def _with_shape(net, shape):
    net.input_shape = shape
    return net


class ResBlock(nn.Module):
    """A residual block as users write it: functional LeakyReLU and ReLU, a 1x1 projection
    shortcut (or the identity), a functional max-pool."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout, track_running_stats=False)
        self.short = None if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = self.bn2(self.conv2(h))
        s = x if self.short is None else self.short(x)
        return F.max_pool2d(self.act(h + s), 2)


class SmallResNet(nn.Module):
    """Two residual blocks (projection, then identity shortcut), a conv with a live bias and
    stride 2 between them, the global average pool as ``mean((2, 3))``, a linear head: the
    engine reads it through its ``torch.fx`` trace."""

    def __init__(self, way=4, pool="mean"):
        super().__init__()
        self.blocks = nn.Sequential(ResBlock(2, 4), nn.Conv2d(4, 5, 3, stride=2, padding=1), ResBlock(5, 5))
        self.pool = pool
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, way)
        self.input_shape = (2, 16, 16)

    def forward(self, x):
        h = self.blocks(x)
        h = h.mean((2, 3)) if self.pool == "mean" else torch.flatten(self.avg(h), 1)
        return self.head(h)


# (id, factory, T, N): support sizes {1, 5, 20, 25, 100}, T in {1, 3, 32}, with and without BN.
NETS = {
    "omniglot": lambda: OmniglotConv(5, channels=8),
    "omniglot20": lambda: OmniglotConv(20, channels=6),
    "mini": lambda: MiniImagenetConv(5, channels=4, image_size=42),
    "mlp": lambda: MLP([6, 16, 16, 3]),
    "conv-nobn": small_conv_no_bn,
    "resnet": SmallResNet,
    "leaky": lambda: _with_shape(nn.Sequential(nn.Conv2d(2, 4, 3), nn.LeakyReLU(-0.3), nn.Conv2d(4, 3, 3, stride=2),
                                               nn.BatchNorm2d(3, track_running_stats=False), nn.LeakyReLU(0.0), nn.Flatten(),
                                               nn.Linear(3 * 3 * 3, 5), nn.LeakyReLU(0.5), nn.Linear(5, 3)), (2, 9, 9)),
    "resnet-avgpool": lambda: SmallResNet(pool="adaptive"),
}
CASES = [
    ("omniglot", 1, 1), ("omniglot", 3, 5), ("omniglot", 32, 5), ("omniglot", 3, 25), ("omniglot", 1, 100),
    ("omniglot20", 3, 20), ("omniglot20", 1, 100), ("mini", 3, 5), ("mini", 1, 25),
    ("mlp", 1, 1), ("mlp", 3, 20), ("mlp", 32, 5), ("mlp", 3, 100),
    ("conv-nobn", 3, 5), ("conv-nobn", 32, 1), ("conv-nobn", 1, 25),
    ("resnet", 3, 5), ("resnet", 1, 2), ("resnet-avgpool", 2, 5), ("leaky", 3, 5),
]


def make_problem(name, T, N, dtype, seed=0):
    torch.manual_seed(seed)
    model = NETS[name]().to(dtype)
    way = list(model.modules())[-1].out_features
    P = sum(p.numel() for p in model.parameters())
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    params = base + 0.1 * torch.randn(T, P, dtype=dtype) * base.abs().mean()
    x = torch.randn(T, N, *model.input_shape, dtype=dtype)
    y = torch.randint(0, way, (T, N))
    v = torch.randn(T, P, dtype=dtype)
    return model, params, x, y, v


def reference(model, params, x, y, v):
    """float64 loss, gradient and HVP by torch.func (vmap of grad, jvp of grad)."""
    m = model.double()
    layout = ik.ParamLayout.from_params(dict(m.named_parameters()), batched=False)

    def f(p, xb, yb):
        d = {k: t[0] for k, t in layout.unflatten(p.unsqueeze(0)).items()}
        return F.cross_entropy(functional_call(m, d, (xb,)), yb)

    p, x, v = params.double(), x.double(), v.double()
    L = vmap(f)(p, x, y)
    G = vmap(grad(f))(p, x, y)
    H = vmap(lambda a, t, xb, yb: jvp(lambda q: grad(f)(q, xb, yb), (a,), (t,))[1])(p, v, x, y)
    return L, G, H


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name,T,N", CASES, ids=[f"{n}-T{t}-N{k}" for n, t, k in CASES])
def test_loss_grad_hvp_match_float64_reference(name, T, N, dtype):
    model, params, x, y, v = make_problem(name, T, N, dtype)
    net = BatchedNet(model, model.input_shape)
    lin = net.linearize(params, x, y)
    hv = hvp_theta(lin, v)
    L, G, H = reference(model, params, x, y, v)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert lin.loss.dtype == dtype and lin.grad.dtype == dtype and hv.dtype == dtype
    assert rel(lin.loss, L) <= tol
    assert rel(lin.grad, G) <= tol
    assert rel(hv, H) <= tol
    # The one-shot entry points agree with the linearisation.
    l2, g2 = net.loss_and_grad(params, x, y)
    assert torch.equal(l2, lin.loss) and torch.equal(g2, lin.grad)
    assert torch.equal(net.hvp(params, v, x, y), hv)


def test_paper_size_omniglot_fp32():
    """The real 113,221-parameter network at the paper's 5-way 1-shot shapes."""
    torch.manual_seed(0)
    model = OmniglotConv(5)
    base = model.flat_params()
    T = 4
    params = base + 0.01 * torch.randn(T, base.numel())
    x, y = torch.rand(T, 5, 1, 28, 28), torch.arange(5).expand(T, -1).contiguous()
    v = torch.randn_like(params)
    lin = model.batched().linearize(params, x, y)
    L, G, H = reference(model, params, x, y, v)
    assert rel(lin.loss, L) <= 1e-5 and rel(lin.grad, G) <= 1e-5 and rel(hvp_theta(lin, v), H) <= 1e-5


@pytest.mark.parametrize("name", ["omniglot", "mlp", "conv-nobn"])
def test_hvp_matches_finite_differences_and_is_symmetric(name):
    model, params, x, y, v = make_problem(name, 3, 5, torch.float64)
    net = BatchedNet(model, model.input_shape)
    u = torch.randn_like(v)
    lin = net.linearize(params, x, y)
    hv, hu = hvp_theta(lin, v), hvp_theta(lin, u)
    eps = 1e-6
    gp = net.loss_and_grad(params + eps * v, x, y)[1]
    gm = net.loss_and_grad(params - eps * v, x, y)[1]
    fd = (gp - gm) / (2 * eps)
    assert rel(fd, hv) < 1e-6
    assert torch.allclose((u * hv).sum(1), (v * hu).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,T,N", [("omniglot", 3, 5), ("mlp", 2, 7)])
def test_fused_inner_loop_equals_reference_loop(name, T, N):
    model, _, x, y, _ = make_problem(name, T, N, torch.float64)
    net = BatchedNet(model, model.input_shape)
    theta = net_params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    lam = torch.tensor([0.5, 2.0, 3.0][:T], dtype=torch.float64)
    steps, lr = 4, 0.1
    phi = net.inner_loop(theta, x, y, lam=lam, steps=steps, lr=lr)
    # Reference: the generic torch.func objective, plain GD on dicts.
    theta_d = {k: p.detach() for k, p in model.named_parameters()}
    obj = ik.ProximalObjective(ik.task_loss_fn(model), theta_d, lam, (x, y))
    ref = ik.GD(steps, lr)(obj, {k: v.unsqueeze(0).expand(T, *v.shape).clone() for k, v in theta_d.items()})
    assert rel(phi, net.layout.flatten(ref)) < 1e-10
    assert net_params.equal(theta)  # θ untouched
    # phi0 other than θ, shared [P] θ and a [T, P] θ give the same answer.
    phi2 = net.inner_loop(theta.expand(T, -1).contiguous(), x, y, lam=lam, steps=steps, lr=lr)
    assert torch.allclose(phi, phi2, rtol=0, atol=1e-14)


def test_model_methods_and_functional_logits():
    torch.manual_seed(1)
    m = OmniglotConv(5, channels=8).double()
    T = 2
    params = m.flat_params().expand(T, -1).contiguous()
    x = torch.randn(T, 5, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(5).expand(T, -1).contiguous()
    L, G, H = reference(m, params, x, y, torch.ones_like(params))
    assert rel(m.loss(params, x, y), L) < 1e-12
    assert rel(m.loss_and_grad(params, x, y)[1], G) < 1e-12
    assert rel(m.hvp(params, torch.ones_like(params), x, y), H) < 1e-10
    # functional_logits is differentiable in a dict of per-task parameters.
    phi = {k: t.clone().requires_grad_() for k, t in m.layout.unflatten(params.clone()).items()}
    logits = functional_logits(m.batched(), phi, x)
    ref_logits = vmap(lambda p, xb: functional_call(m, p, (xb,)))({k: t.detach() for k, t in phi.items()}, x)
    assert rel(logits, ref_logits) < 1e-12
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(T, 5).mean(1).sum().backward()
    got = m.layout.flatten({k: t.grad for k, t in phi.items()})
    assert rel(got, G) < 1e-12


def test_bad_inputs_raise_clear_errors():
    m = OmniglotConv(5, channels=4)
    net = m.batched()
    T = 2
    p = m.flat_params().expand(T, -1).contiguous()
    x = torch.rand(T, 3, 1, 28, 28)
    y = torch.zeros(T, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"flat \[T, {net.numel}\] buffer"):
        net.loss(p[:, :-1], x, y)
    with pytest.raises(ValueError, match="x must have shape"):
        net.loss(p, torch.rand(T, 3, 1, 32, 32), y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        net.loss(p, x, torch.full((T, 3), 5))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        net.loss(p, x, torch.full((T, 3), -1))
    with pytest.raises(ValueError, match="y must have shape"):
        net.loss(p, x, y[:, :2])
    with pytest.raises(TypeError, match="integer class labels"):
        net.loss(p, x, y.float())
    with pytest.raises(ValueError, match="v must have shape"):
        net.linearize(p, x, y).hvp(p[:1])
    with pytest.raises(UnsupportedModel, match="GELU"):
        BatchedNet(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), (3,))
    with pytest.raises(UnsupportedModel, match="Linear expects"):
        BatchedNet(OmniglotConv(5), (1, 32, 32))


def test_implicit_adapt_uses_the_engine_and_agrees_with_generic_path():
    torch.manual_seed(0)
    model = OmniglotConv(5, channels=8)
    theta = dict(model.named_parameters())
    T = 3
    xs, xq = torch.rand(T, 5, 1, 28, 28), torch.rand(T, 10, 1, 28, 28)
    ys, yq = torch.arange(5).expand(T, -1).contiguous(), torch.arange(5).repeat(2).expand(T, -1).contiguous()
    out = {}
    for engine in (True, False):
        g, info = ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=ik.GD(5, 0.1), cg_iters=5, engine=engine)
        out[engine] = (ik.ParamLayout.from_params(g, batched=False).flatten({k: t[None] for k, t in g.items()})[0], info)
    assert rel(out[True][0], out[False][0]) < 1e-4
    assert torch.allclose(out[True][1]["outer_loss"], out[False][1]["outer_loss"], rtol=1e-5)
    assert ik.select_engine(model, theta, xs) is not None
    assert ik.select_engine(model, theta, xs, engine=False) is None
    with pytest.raises(ValueError, match="engine=True but"):
        ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(1, 0.1), loss=F.cross_entropy, engine=True)


def test_newton_cg_with_engine_matches_generic():
    torch.manual_seed(0)
    model = MLP([5, 12, 3]).double()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    T = 3
    x, y = torch.randn(T, 9, 5, dtype=torch.float64), torch.randint(0, 3, (T, 9))
    lam = torch.full((T,), 1.5, dtype=torch.float64)
    f = ik.task_loss_fn(model)
    phi0 = {k: v.unsqueeze(0).expand(T, *v.shape).clone() for k, v in theta.items()}
    a = ik.NewtonCG(3, cg_iters=4)(ik.ProximalObjective(f, theta, lam, (x, y), engine=BatchedNet(model, (5,))), phi0)
    b = ik.NewtonCG(3, cg_iters=4)(ik.ProximalObjective(f, theta, lam, (x, y)), phi0)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_backends_agree(backend):
    if backend == "cpu" and not dispatch._engine_kernels_built():
        pytest.skip("the native extension was built without the engine kernels")
    model, params, x, y, v = make_problem("omniglot", 3, 5, torch.float64)
    net = BatchedNet(model, model.input_shape, backend=backend)
    lin = net.linearize(params, x, y)
    L, G, H = reference(model, params, x, y, v)
    assert rel(lin.loss, L) < 1e-12 and rel(lin.grad, G) < 1e-10 and rel(hvp_theta(lin, v), H) < 1e-10


def test_triton_backend_end_to_end_through_interpreter():
    """The Triton kernels behind a whole engine pass (tiny: the interpreter is slow)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    T, N = 1, 3
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    params = (base + 0.1 * torch.randn(T, base.numel(), dtype=torch.float64)).contiguous()
    x, y = torch.randn(T, N, 1, 6, 6, dtype=torch.float64), torch.tensor([[0, 3, 1]])
    v = torch.randn_like(params)
    net = BatchedNet(model, (1, 6, 6), backend="triton")
    lin = net.linearize(params, x, y)
    L, G, H = reference(model, params, x, y, v)
    assert rel(lin.loss, L) < 1e-12 and rel(lin.grad, G) < 1e-10 and rel(hvp_theta(lin, v), H) < 1e-10
    phi = net.inner_loop(base, x, y, lam=2.0, steps=2, lr=0.1)
    ref_phi = BatchedNet(model, (1, 6, 6), backend="reference").inner_loop(base, x, y, lam=2.0, steps=2, lr=0.1)
    assert rel(phi, ref_phi) < 1e-12


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_parameters_give_a_non_finite_loss_for_that_task_only(backend):
    """A diverged task must show up as a non-finite loss (implicit_adapt drops it): the
    fused BatchNorm+ReLU keeps NaN like torch.relu instead of clamping it to 0."""
    model, params, x, y, _ = make_problem("omniglot", 3, 5, torch.float32)
    net = BatchedNet(model, model.input_shape, backend=backend)
    params[1, 5] = float("nan")  # a first-layer weight of task 1
    loss = net.loss(params, x, y)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


# --------------------------------------------------------------------------- tracing and selfcheck


def test_engine_loss_and_grad_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the engine through the ops' fake implementations."""
    model, params, x, y, _ = make_problem("omniglot", 2, 3, torch.float32)
    net = BatchedNet(model, model.input_shape)
    eager = net.loss_and_grad(params, x, y)
    compiled = torch.compile(lambda p, a, b: net.loss_and_grad(p, a, b), fullgraph=True, backend="eager")(params, x, y)
    # Relative to the norm: compiled and eager GEMMs may take different BLAS paths (float32 rounding).
    assert rel(compiled[0], eager[0]) < 1e-6 and rel(compiled[1], eager[1]) < 1e-5


def test_selfcheck_engine_rows_are_ok():
    from imaml_kernels import selfcheck

    rows = selfcheck.run_engine(T=1, N=3)
    ran = [r for r in rows if not r[-1].startswith("skipped")]
    assert {r[0] for r in ran} >= {"cpu", "reference"}
    assert all(r[-1] == "ok" for r in ran), rows


# --------------------------------------------------------------------------- dispatch and reuse


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_implicit_meta_grad_backend_steers_every_stage(backend):
    """``backend=`` reaches the engine's stages as well as CG: "reference" runs no imaml:: op."""
    if backend == "cpu" and not dispatch._engine_kernels_built():
        pytest.skip("extension without engine kernels")
    torch.manual_seed(0)
    model = OmniglotConv(5, channels=4)
    theta = dict(model.named_parameters())
    T = 2
    xs, xq = torch.randn(T, 5, 1, 28, 28), torch.randn(T, 5, 1, 28, 28)
    ys = yq = torch.arange(5).expand(T, -1).contiguous()
    with _OpNames() as seen:
        g, _ = ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=ik.GD(2, 0.1), cg_iters=2,
                                     backend=backend, engine=True)
    ours = {n.split("::")[1] for n in seen.names if n.startswith("imaml::")}
    if backend == "reference":
        assert ours == set(), ours
    else:
        assert {"bn_fwd", "bn_tbwd", "im2col", "col2im", "softmax_ce_bias", "prox_step", "cg_dots", "cg_update"} <= ours, ours
    ref, _ = ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=ik.GD(2, 0.1), cg_iters=2, engine=False)
    for k in g:
        assert torch.allclose(g[k], ref[k], rtol=1e-3, atol=1e-5), k


def test_linearization_is_reentrant():
    """HVPs keep their scratch out of the primal caches: interleaved and nested products give
    the same results as sequential ones, and the caches are unchanged by a product."""
    model, params, x, y, v = make_problem("omniglot", 3, 5, torch.float64)
    lin = BatchedNet(model, model.input_shape).linearize(params, x, y)
    keys = [dict((k, id(t)) for k, t in c.items()) for c in lin.caches]
    w = torch.randn_like(v)
    hv, hw = lin.hvp(v), lin.hvp(w)
    assert [dict((k, id(t)) for k, t in c.items()) for c in lin.caches] == keys
    nested = lin.hvp(v + lin.hvp(w))  # a product inside another product's argument
    assert torch.allclose(nested, hv + lin.hvp(hw), rtol=1e-10, atol=1e-12)
    assert torch.equal(lin.hvp(v), hv)


def test_one_parsed_net_per_model_is_reused():
    from imaml_kernels.engine import batched_net
    from imaml_kernels.engine import select_engine

    model = OmniglotConv(5, channels=4)
    theta = dict(model.named_parameters())
    x = torch.randn(2, 5, 1, 28, 28)
    a = select_engine(model, theta, x)
    assert select_engine(model, theta, x) is a and model.batched() is batched_net(model, (1, 28, 28))
    assert select_engine(model, theta, x, backend="reference") is not a  # another backend, another net
    model.eval()  # its BatchNorm keeps no running statistics: eval mode is still batch statistics
    b = select_engine(model, theta, x)
    assert b is not None and b is not a
    model.train()
    assert select_engine(model, theta, x) is a
    # A BatchNorm with running statistics in eval mode: the engine does not apply (no stale net).
    tracked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 5))
    th = dict(tracked.named_parameters())
    assert select_engine(tracked, th, x) is not None
    tracked.eval()
    assert select_engine(tracked, th, x) is None


def test_conv_bias_before_batchnorm_is_exactly_dead():
    """A conv bias feeding a batch-statistics BatchNorm changes nothing: the engine skips it, so
    its gradient and HVP entries are exactly 0 (the float64 reference gets rounding noise), and
    loss, gradient and HVP still match the reference with large biases."""
    model, params, x, y, v = make_problem("omniglot", 3, 5, torch.float64)
    net = BatchedNet(model, model.input_shape)
    lay = net.layout
    dead = [k for k in lay.names if k.endswith(".bias") and k.split(".")[0] in ("0", "3", "7", "10")]
    assert len(dead) == 4
    for k in dead:
        params[:, lay.offsets[k]:lay.offsets[k] + lay.numels[k]] = 5.0 * torch.randn(3, lay.numels[k], dtype=torch.float64)
    lin = net.linearize(params, x, y)
    L, G, H = reference(model, params, x, y, v)
    hv = hvp_theta(lin, v)
    assert rel(lin.loss, L) < 1e-12 and rel(lin.grad, G) < 1e-10 and rel(hv, H) < 1e-10
    for k in dead:
        span = slice(lay.offsets[k], lay.offsets[k] + lay.numels[k])
        assert torch.equal(lin.grad[:, span], torch.zeros_like(lin.grad[:, span])) and (hv[:, span] == 0).all()
        assert G[:, span].abs().max() < 1e-12 * G.abs().max() and H[:, span].abs().max() < 1e-10 * H.abs().max()
    # A bias that does not feed a BatchNorm is live: the no-BatchNorm net's biases get gradients.
    m2, p2, x2, y2, _ = make_problem("conv-nobn", 2, 5, torch.float64)
    g2 = BatchedNet(m2, m2.input_shape).linearize(p2, x2, y2).grad
    lay2 = ParamLayout.from_params(dict(m2.named_parameters()), batched=False)
    assert g2[:, lay2.offsets["0.bias"]:lay2.offsets["0.bias"] + 6].abs().min() > 0


def test_inner_loop_on_triton_equals_reference():
    """The fused inner loop (the gathering BatchNorm backward included) through the Triton
    interpreter equals the reference backend."""
    torch.manual_seed(3)
    model = OmniglotConv(5, channels=4).double()
    T = 2
    theta = model.flat_params()
    x, y = torch.randn(T, 5, 1, 28, 28, dtype=torch.float64), torch.arange(5).expand(T, -1).contiguous()
    a = model.batched("triton").inner_loop(theta, x, y, lam=2.0, steps=2, lr=0.1)
    b = model.batched("reference").inner_loop(theta, x, y, lam=2.0, steps=2, lr=0.1)
    assert rel(a, b) < 1e-12


def test_mlp_engine_shares_no_buffer_the_caller_can_see():
    """Where the engine's order is the module's (an MLP), its conversions skip their copies for
    read-only uses: the inner loop's φ is still its own buffer (θ is untouched by a write to
    it), and ``functional_logits`` on the caller's buffer refuses a backward after that buffer
    was modified in place, as autograd refuses a modified saved tensor."""
    torch.manual_seed(0)
    m = MLP([6, 16, 3]).double()
    net = m.batched()
    assert not net._native
    T = 2
    theta = m.flat_params().detach().clone()
    x = torch.randn(T, 5, 6, dtype=torch.float64)
    y = torch.arange(5).remainder(3).expand(T, -1).contiguous()
    phi = net.inner_loop(theta, x, y, lam=2.0, steps=2, lr=0.1)
    before = theta.clone()
    phi.add_(1.0)
    assert torch.equal(theta, before)
    params = net.layout.unflatten(phi.clone())
    logits = functional_logits(net, params, x)
    expect = vmap(lambda p, xb: functional_call(m, p, (xb,)))({k: t.detach() for k, t in params.items()}, x)
    assert rel(logits, expect) < 1e-12
    # the same through a buffer of the caller's that is modified before the backward
    buf = phi.detach().clone()
    leaves = {k: v.requires_grad_() for k, v in net.layout.unflatten(buf).items()}
    out = functional_logits(net, leaves, x)
    with torch.no_grad():
        buf.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        torch.autograd.grad(F.cross_entropy(out.flatten(0, 1), y.flatten()), list(leaves.values()))


@pytest.mark.parametrize("name", ["resnet", "mini", "conv-nobn", "omniglot"])
def test_direct_convolution_matches_the_reference(name, monkeypatch):
    """With every eligible convolution direct (oneDNN's, per task, on channels-last views; the
    threshold at 0 bytes), loss, gradient, HVP and the fused inner loop still equal the float64
    reference: strides, live and dead biases, the identity and projection shortcuts. Convolutions
    with a padding the engine absorbed (Omniglot's ZeroPad2d), 1x1 ones and the first layer
    (patches made once) stay on the GEMMs."""
    from imaml_kernels.engine import layers

    monkeypatch.setattr(layers.Conv, "DIRECT_BYTES", 0)
    model, params, x, y, v = make_problem(name, 3, 5, torch.float64)
    net = BatchedNet(model, model.input_shape)
    lin = net.linearize(params, x, y)
    L, G, H = reference(model, params, x, y, v)
    assert rel(lin.loss, L) < 1e-12 and rel(lin.grad, G) < 1e-10 and rel(hvp_theta(lin, v), H) < 1e-10

    def caches(layer_list, cache_list):
        for layer, c in zip(layer_list, cache_list):
            if isinstance(layer, layers.Residual):
                for chain, key in zip(layer.chains, "ab"):
                    yield from caches(chain, c[key])
            elif isinstance(layer, layers.Conv):
                yield layer, c

    convs = list(caches(net.layers, lin.caches))
    direct = [bool(c.get("direct")) for _, c in convs]
    assert any(direct) and not direct[0]  # the first layer's patches are made once
    assert not any(d for (layer, _), d in zip(convs, direct) if layer.pointwise or (layer.ph, layer.pw) != (layer.pb, layer.pr))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    phi = net.inner_loop(theta, x, y, lam=2.0, steps=3, lr=0.1)
    monkeypatch.setattr(layers.Conv, "DIRECT_BYTES", 1 << 62)
    assert rel(phi, net.inner_loop(theta, x, y, lam=2.0, steps=3, lr=0.1)) < 1e-12
    # No convolution is direct by size now; a lean linearisation makes every eligible one direct.
    lean = net.linearize(params, x, y, lean=True)
    assert [bool(c.get("direct")) for _, c in caches(net.layers, lean.caches)] == direct
    assert not any(c.get("direct") for _, c in caches(net.layers, net.linearize(params, x, y).caches))
    assert rel(lean.grad, G) < 1e-10 and rel(hvp_theta(lean, v), H) < 1e-10


def test_direct_convolution_only_where_patches_are_large():
    """The default threshold: the ResNet-12's first block (3x3, 16 channels at 32x32, 5 images:
    2.9 MB of patches a task) convolves directly, a 64-channel layer at 8x8 keeps its GEMMs,
    and nothing is direct in bf16 mode or off the CPU's full precision."""
    from imaml_kernels.engine import layers

    conv = layers.Conv(nn.Conv2d(16, 16, 3, padding=1, bias=False), "c.")
    assert conv._use_direct(torch.empty(4, 5, 32, 32, 16))
    assert not conv._use_direct(torch.empty(4, 5, 8, 8, 16))
    with ik.gemm_precision("bf16"):
        assert not conv._use_direct(torch.empty(4, 5, 32, 32, 16))
    assert not layers.Conv(nn.Conv2d(64, 64, 3, padding=1), "c.")._use_direct(torch.empty(4, 5, 8, 8, 64))


def test_traced_models_and_what_the_engine_refuses():
    """A module that is not an nn.Sequential goes through its torch.fx trace: residual blocks,
    functional activations and pools are engine layers; what the engine cannot run is refused
    with the node that stops it (the generic path runs it), once per model: the refusal is
    remembered, so the trace does not run again on every call."""
    from imaml_kernels.engine import batched_net, select_engine
    from imaml_kernels.engine import trace as tr

    net = BatchedNet(SmallResNet(), (2, 16, 16))
    names = [type(layer).__name__ for layer in net.layers]
    assert names == ["Residual", "LeakyReLU", "MaxPool", "Conv", "Residual", "LeakyReLU", "MaxPool", "GlobalAvgPool", "Linear"]

    class Shared(nn.Module):  # one module called twice
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(torch.relu(self.fc(x))))

    class ShapeRead(nn.Module):  # x.view(x.size(0), -1): a shape read
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(h.view(h.size(0), -1))

    class Nested(nn.Module):  # a fork inside a residual branch
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.fc(x + (h + self.b(h)))

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.gelu(self.a(x)))

    for model, shape, why in [(Shared(), (4,), "called twice"), (ShapeRead(), (1, 6, 6), "uses of conv \\(size, view\\) do not meet"),
                              (Nested(), (4,), "used 2 times|meet in one sum|does not close"), (Gelu(), (4,), "gelu")]:
        with pytest.raises(UnsupportedModel, match=why):
            BatchedNet(model, shape)
    calls = []
    real = tr.fx.symbolic_trace

    def counting(m):
        calls.append(m)
        return real(m)

    model = Gelu()
    theta, x = dict(model.named_parameters()), torch.randn(2, 3, 4)
    try:
        tr.fx.symbolic_trace = counting
        assert select_engine(model, theta, x) is None and select_engine(model, theta, x) is None
        with pytest.raises(UnsupportedModel, match="gelu"):
            batched_net(model, (4,))
    finally:
        tr.fx.symbolic_trace = real
    assert len(calls) == 1


def test_implicit_meta_grad_runs_a_resnet_on_the_engine():
    """The drop-in op on a residual network: the fused engine is chosen by itself and its
    meta-gradient equals the generic torch.func path's in float64."""
    torch.manual_seed(0)
    model = SmallResNet().double()
    theta = dict(model.named_parameters())
    T = 3
    xs, xq = torch.randn(T, 4, 2, 16, 16, dtype=torch.float64), torch.randn(T, 6, 2, 16, 16, dtype=torch.float64)
    ys, yq = torch.randint(0, 4, (T, 4)), torch.randint(0, 4, (T, 6))
    out = {}
    for engine in (None, False):
        g, info = ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=2.0, inner=ik.GD(3, 0.1), cg_iters=4, engine=engine)
        out[engine] = (g, info)
    assert out[None][1]["plan"].path == "engine" and out[False][1]["plan"].path == "generic"
    flat = [torch.cat([g[k].reshape(-1) for k in theta]) for g in (out[None][0], out[False][0])]
    assert rel(*flat) < 1e-9  # per tensor too, but for the dead conv bias: exactly 0 against rounding noise


def test_a_linearisation_keeps_no_patches_of_activations():
    """After the primal pass a linearisation drops the im2col patches of every convolution fed
    by an activation (the tangent passes remake them from the kept input, which is k·k times
    smaller) and keeps the data's (made once per inner loop); its products are unchanged."""
    from imaml_kernels.engine import layers

    model, params, x, y, v = make_problem("mini", 2, 5, torch.float64)
    net = BatchedNet(model, model.input_shape)
    lin = net.linearize(params, x, y)
    convs = [(layer, c) for layer, c in zip(net.layers, lin.caches) if isinstance(layer, layers.Conv)]
    assert "cols" in convs[0][1] and all("cols" not in c and "x" in c for _, c in convs[1:])
    full = net.linearize(params, x, y)
    for layer, c in zip(net.layers, full.caches):  # the same linearisation with every patch kept
        if isinstance(layer, layers.Conv) and "cols" not in c:
            c["cols"] = layer._patches_of(full.kernels, c)
    w = lin.to_work(v)
    assert torch.equal(lin.hvp(w), full.hvp(w))


def test_hvp_into_a_used_buffer_zeroes_what_no_layer_writes():
    """``hvp(v, out=buf)`` with ``buf`` holding anything (CG's matvec leaves ``v + Hv/λ`` there)
    equals a fresh product: the dead conv biases' spans, which no layer writes, are zeroed."""
    model, params, x, y, v = make_problem("omniglot", 2, 5, torch.float64)
    net = BatchedNet(model, model.input_shape)
    assert net._unwritten
    lin = net.linearize(params, x, y)
    w = lin.to_work(v)
    buf = torch.randn_like(w)
    assert torch.equal(lin.hvp(w, out=buf), lin.hvp(w))
