"""``bench.launches``: kernel launches and host synchronisations per meta-step, counted on
fake CUDA tensors (no compute). All counts come from one counting process (one subprocess
with the stand-in CUDA runtime on a CPU-only torch), shared by the tests of this module."""

import os
import shutil

import pytest
import torch

from bench import launches as L

_CXX = os.environ.get("CXX", "c++")
pytestmark = pytest.mark.skipif(
    not L.cuda_ready() and shutil.which(_CXX) is None,
    reason=f"a CPU-only torch needs a C++ compiler ({_CXX}) for the stand-in CUDA runtime",
)

SMALL = {"meta_batch": 2, "inner_steps": 2, "cg_iters": 2}
TINY3 = {"meta_batch": 3, "inner_steps": 1, "cg_iters": 1}


def syncing_step(cfg):
    """A step that synchronises with the host in every way the counter knows, on CUDA tensors."""
    x = torch.randn(8, 4, device="cuda")
    y = torch.randn(8, device="cuda")

    def step():
        a = (x * 2).sum()
        a.item()  # _local_scalar_dense
        bool((y > 0).any())  # is_nonzero -> _local_scalar_dense
        x.cpu()  # device-to-host copy (_to_copy)
        torch.empty(8, 4).copy_(x)  # device-to-host copy (copy_)
        y.nonzero()  # nonzero
        y[y > 0]  # boolean-mask indexing
        x.masked_select(x > 0)  # masked_select
        torch.cuda.synchronize()  # explicit
        _ = x + 1  # a launch, no sync
        x.view(32)  # a view: no launch

    return step


def quiet_step(cfg):
    """Launches (and views, allocations, host-side CPU work) but no synchronisation."""
    x = torch.randn(8, 4, device="cuda")
    n = torch.tensor(3.0)  # a CPU tensor: host work

    def step():
        y = x.t().contiguous()  # 1 launch (the copy), the transpose is a view
        torch.empty_like(y)  # an allocation: no launch
        z = torch.zeros(4, device="cuda")  # 1 launch (fill)
        (y.sum(1) + z).mul_(2)  # 3 launches
        float(n + 1)  # CPU-tensor ops and read: neither launch nor sync
        y[y > 0] = 0.0  # 2 launches (gt, masked fill): a mask with a scalar needs no nonzero
        _ = y.view(-1)[:5].unsqueeze(0)  # views only

    return step


def _gpu_path(r):
    if r["backends"]["engine"] != "triton":
        pytest.skip(f"the GPU code path does not resolve here (backends {r['backends']}: is triton installed?)")


@pytest.fixture(scope="module")
def counts():
    specs = [
        {"kind": "fused", "shape": "omniglot-5w1s"},
        {"kind": "fused", "shape": "omniglot-5w1s", "overrides": SMALL},
        {"kind": "baseline", "shape": "omniglot-5w1s", "overrides": SMALL, "extrapolate": False},
        {"kind": "custom", "target": "tests.test_launches:syncing_step", "warmup": 0},
        {"kind": "custom", "target": "tests.test_launches:quiet_step", "warmup": 0},
        {"kind": "baseline", "shape": "omniglot-5w1s", "overrides": TINY3, "extrapolate": False},
        {"kind": "baseline", "shape": "omniglot-5w1s", "overrides": TINY3},
    ]
    names = ("fused", "fused_small", "base_small", "syncing", "quiet", "base3_full", "base3_extrapolated")
    return dict(zip(names, L.measure(specs, timeout=900)))


def test_counter_classifies_launches_views_and_host_work(counts):
    q = counts["quiet"]
    assert q["sync_count"] == 0
    assert q["launches"] == 7, q["by_op"]  # clone (contiguous), zeros, sum, add, mul_, gt, masked fill
    assert "aten::empty_like" not in q["by_op"] and "aten::t" not in q["by_op"]
    assert sum(q["host_ops"].values()) >= 2  # the CPU tensor's add and read


def test_counter_finds_every_kind_of_host_sync(counts):
    s = counts["syncing"]
    ops = {x["op"] for x in s["syncs"]}
    assert {"aten::_local_scalar_dense", "aten::_to_copy", "aten::copy_", "aten::nonzero", "aten::masked_select",
            "torch.cuda.synchronize"} <= ops, ops
    assert any(x["op"] in ("aten::index", "aten::nonzero") and "test_launches.py" in x["site"] for x in s["syncs"])
    assert s["sync_count"] >= 8
    # Every sync is traced to its line in this file.
    assert all(x["site"].startswith("tests/test_launches.py:") for x in s["syncs"]), s["syncs"]
    assert s["launches"] >= 1  # x + 1


def test_fused_meta_step_counts(counts):
    r = counts["fused"]
    _gpu_path(r)
    assert r["backends"]["cg"] in ("cuda", "triton")
    assert r["launches"] > 100 and r["config"]["meta_batch"] == 32
    assert any(op.startswith("imaml::") for op in r["by_op"])  # the Triton engine stages and CG kernels ran
    assert "aten::convolution" not in r["by_op"]  # the network runs through the engine, not aten
    # The call sites name the project's code.
    assert any(site.startswith("imaml_kernels/") for sites in r["sites"].values() for site, _, _ in sites)
    assert all(lay for site, n, lay in r["sites"]["aten::clone"])  # what each clone copied
    assert sum(r["phases"].values()) == r["launches"]
    assert any(p.startswith("meta_step:") for p in r["phases"]) and any(p.startswith("[") for p in r["phases"])


def test_per_task_baseline_launches_more_than_fused(counts):
    f, b = counts["fused_small"], counts["base_small"]
    assert b["config"] == f["config"]
    assert b["launches"] > 2 * f["launches"], (b["launches"], f["launches"])
    assert "aten::convolution" in b["by_op"]
    # imaml_dev-style CG reads the residual back once per iteration and task.
    assert b["sync_count"] == SMALL["meta_batch"] * SMALL["cg_iters"]


def test_baseline_extrapolation_is_exact(counts):
    """T = 3 counted in full equals the count extrapolated from T = 1 and 2."""
    full, ext = counts["base3_full"], counts["base3_extrapolated"]
    assert ext["extrapolated_from"] == [1, 2]
    assert (ext["launches"], ext["sync_count"]) == (full["launches"], full["sync_count"])
    assert {k: v[1] for k, v in ext["by_op"].items() if v[1]} == {k: v[1] for k, v in full["by_op"].items()}


def test_no_host_sync_in_the_fused_meta_step(counts):
    """Holds today: a regression guard for the trainer's promise (step.py: "nothing here reads
    a tensor back to the host")."""
    r = counts["fused"]
    _gpu_path(r)
    assert r["sync_count"] == 0, r["syncs"]


# The budget: <= 800 kernel launches and no host sync per 5w1s meta-step on the GPU
# code path (1,814 at the start of this round; 794 on 2026-12-01, bench/results/launches.md).
def test_launch_budget_5w1s(counts):
    r = counts["fused"]
    _gpu_path(r)
    assert r["sync_count"] == 0, r["syncs"]
    assert r["launches"] <= L.BUDGET, f"{r['launches']} launches per 5w1s meta-step (budget {L.BUDGET}, goal {L.GOAL})"


def test_report_renders(counts):
    text = L.report([counts["fused"], counts["base_small"]], header="machine")
    assert text.startswith("# Kernel launches") and "machine" in text
    assert "| fused: trainer `meta_step`" in text and "## Host synchronisations" in text
