"""The engine's opt-in bf16 GEMM mode (``ik.gemm_precision``): bfloat16 operands, float32
accumulation; float32 everything else; float64 untouched; off by default and restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import imaml_kernels as ik
from imaml_kernels.engine import precision
from imaml_kernels.trainer.presets import ConfigError, resolve_config


def _problem(dtype=torch.float32, conv=False, T=4):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, track_running_stats=False),
                              nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
        shape = (1, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
        shape = (20,)
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(T, 10, *shape, generator=g), torch.randn(T, 10, *shape, generator=g)
    ys = torch.arange(5).repeat(T, 2)
    model = model.to(dtype)
    return model, (xs.to(dtype), ys), (xq.to(dtype), ys.clone())


def _meta_grad(model, support, query):
    theta = dict(model.named_parameters())
    g, _ = ik.implicit_meta_grad(model, theta, support, query, lam=2.0, inner=ik.GD(5, 0.1), solve=ik.CG(5), engine=True)
    return torch.cat([v.flatten().double() for v in g.values()])


def test_the_setting_is_fp32_by_default_restored_after_a_block_and_checked():
    assert ik.get_gemm_precision() == "fp32"
    with ik.gemm_precision("bf16"):
        assert ik.get_gemm_precision() == "bf16"
        with ik.gemm_precision("fp32"):
            assert ik.get_gemm_precision() == "fp32"
        assert ik.get_gemm_precision() == "bf16"
    assert ik.get_gemm_precision() == "fp32"
    with pytest.raises(ValueError, match="gemm precision must be one of"):
        ik.set_gemm_precision("fp16")
    with pytest.raises(RuntimeError), ik.gemm_precision("bf16"):
        raise RuntimeError("inside")
    assert ik.get_gemm_precision() == "fp32"


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv-bn"])
def test_bf16_gemms_round_the_operands_and_nothing_else(conv):
    model, support, query = _problem(conv=conv)
    g32 = _meta_grad(model, support, query)
    with ik.gemm_precision("bf16"):
        g16 = _meta_grad(model, support, query)
    assert torch.equal(_meta_grad(model, support, query), g32)  # nothing of the bf16 call is kept
    m64 = _problem(torch.float64, conv=conv)[0]
    m64.load_state_dict(model.state_dict())
    s64 = (support[0].double(), support[1])
    q64 = (query[0].double(), query[1])
    g64 = _meta_grad(m64, s64, q64)
    with ik.gemm_precision("bf16"):  # float64 GEMMs are not touched
        assert torch.equal(_meta_grad(m64, s64, q64), g64)
    err32 = float((g32 - g64).norm() / g64.norm())
    err16 = float((g16 - g64).norm() / g64.norm())
    assert err32 < 1e-5
    # bf16 has an 8-bit mantissa (unit roundoff 2^-9 = 2e-3): the mode must move the result by
    # about that much, and not by more than the conditioning of the net explains.
    assert 1e-4 < err16 < 0.1, err16
    assert torch.nn.functional.cosine_similarity(g16, g64, dim=0) > 0.99


def test_the_operands_are_rounded_once_per_linearisation():
    """The patches and weights a linearisation keeps are cast once, not once per HVP."""
    model, support, query = _problem(conv=True)
    casts = []
    real = precision.lowp

    def counting(t, cache=None, key=None):
        if cache is not None and key is not None and key not in cache and precision._low(t):
            casts.append(key)
        return real(t, cache, key)

    theta = dict(model.named_parameters())
    T = support[0].shape[0]
    flat = torch.cat([theta[n].detach().flatten() for n in theta]).expand(T, -1).contiguous()
    net = ik.BatchedNet(model, support[0].shape[2:])
    import imaml_kernels.engine.layers as layers

    layers.lowp = counting
    try:
        with ik.gemm_precision("bf16"):
            lin = net.linearize(flat, *support)
            n0 = len(casts)
            for _ in range(3):
                lin.hvp(lin.to_work(torch.randn_like(flat)))
            per_hvp = (len(casts) - n0) / 3
    finally:
        layers.lowp = real
    assert "cols_lp" not in casts[n0:] and "wt_lp" not in casts[n0:]
    assert per_hvp <= 6  # the tangents' own operands only (rwt, rcols, rw, rx per layer)


def test_the_trainer_flag_is_a_configuration_key():
    cfg = resolve_config("omniglot-5w1s-demo", {"gemm_precision": "bf16"})
    assert cfg["gemm_precision"] == "bf16"
    assert resolve_config("omniglot-5w1s-demo")["gemm_precision"] == "fp32"
    with pytest.raises(ConfigError, match="gemm_precision must be one of"):
        resolve_config("omniglot-5w1s-demo", {"gemm_precision": "fp16"})
