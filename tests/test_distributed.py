"""Tests of data-parallel training (imaml_kernels.distributed, imaml-train --world-size).

Two CPU ranks (gloo, spawned by ``--world-size 2`` on 127.0.0.1 and a free port) against one
process, on real Omniglot ($IMAML_DATA; skipped when absent) with a tiny configuration:
5-way 1-shot, meta-batch 4, 2 inner steps, 8 filters, one thread per rank. Each 2-rank run
costs a few seconds of process start (importing torch in each rank).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from imaml_kernels import distributed
from imaml_kernels.checkpoint import load_checkpoint
from imaml_kernels.data import omniglot_root
from imaml_kernels.distributed import DistContext, shard, spawn
from imaml_kernels.train import main

HAVE_OMNIGLOT = (omniglot_root() / "characters.json").is_file()
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")

TINY = [
    "--preset", "omniglot-5w1s", "--meta-batch", "4", "--inner-steps", "2", "--channels", "8",
    "--threads", "1", "--no-progress", "--eval-tasks", "0", "--dist-timeout", "60",
]


def _run(out: Path, *extra: str) -> int:
    return main([*TINY, "--out", str(out), *extra])


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _bias_before_batchnorm(model_state) -> set[str]:
    """Conv biases followed by a batch-statistics BatchNorm: they do not change the network's
    output, so their gradient is rounding noise and Adam (which divides by √v) turns noise of
    either sign into steps of ±lr. Their values depend on the summation order, not the tasks."""
    keys = list(model_state)
    return {k for i, k in enumerate(keys) if k.endswith(".bias") and model_state[k].dim() == 1
            and i > 0 and keys[i - 1].endswith(".weight") and model_state[keys[i - 1]].dim() == 4}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """4 meta-steps on 2 ranks, a checkpoint every 2 steps."""
    if not HAVE_OMNIGLOT:
        pytest.skip("Omniglot not found in $IMAML_DATA")
    out = tmp_path_factory.mktemp("dp2")
    assert _run(out, "--steps", "4", "--log-every", "3", "--ckpt-every", "2", "--world-size", "2") == 0
    return out


@needs_omniglot
def test_two_ranks_match_one_process(two_rank_run, tmp_path):
    assert _run(tmp_path, "--steps", "4", "--log-every", "3", "--ckpt-every", "2") == 0
    one, two = load_checkpoint(tmp_path / "ckpt.pt"), load_checkpoint(two_rank_run / "ckpt.pt")
    assert two["step"] == one["step"] == 4
    # The same task stream: every rank draws the whole meta-batch.
    assert two["sampler"]["tasks_drawn"] == one["sampler"]["tasks_drawn"] == 16
    assert torch.equal(two["sampler"]["generator"], one["sampler"]["generator"])
    noise = _bias_before_batchnorm(one["model"])
    assert noise and len(noise) == 4  # the four conv blocks
    for k, v in one["model"].items():
        if k not in noise:
            torch.testing.assert_close(two["model"][k], v, rtol=0, atol=1e-6, msg=k)
    # The network these parameters define (bias before BN included) is the same function.
    from imaml_kernels.builders import build_model

    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    nets = []
    for ckpt in (one, two):
        net = build_model(ckpt["config"])
        net.load_state_dict(ckpt["model"])
        nets.append(net(x))
    torch.testing.assert_close(nets[1], nets[0], rtol=0, atol=1e-5)
    # Logged metrics are reduced over the ranks: the global means of the 1-process run.
    r1, r2 = _rows(tmp_path), _rows(two_rank_run)
    assert [r["step"] for r in r2] == [1, 2, 3, 4]
    for a, b in zip(r1, r2):
        for k in ("loss", "acc", "inner_loss", "dropped"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k


@needs_omniglot
def test_two_rank_resume_continues_identically(two_rank_run, tmp_path):
    assert _run(tmp_path, "--steps", "2", "--ckpt-every", "2", "--world-size", "2") == 0
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    assert main(["--out", str(tmp_path), "--resume", "--steps", "4", "--threads", "1", "--no-progress",
                 "--world-size", "2"]) == 0
    resumed, straight = load_checkpoint(tmp_path / "ckpt.pt"), load_checkpoint(two_rank_run / "ckpt.pt")
    assert resumed["step"] == 4
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert torch.equal(resumed["sampler"]["generator"], straight["sampler"]["generator"])
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


@needs_omniglot
def test_world_size_must_divide_meta_batch(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "1", "--world-size", "3") == 2
    err = capsys.readouterr().err
    assert "meta-batch 4 is not divisible by the world size 3" in err
    assert not (tmp_path / "ckpt.pt").exists()


def test_world_size_flag_validation(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--world-size", "0"]) == 2
    assert "--world-size must be >= 1" in capsys.readouterr().err


def test_shard_splits_the_meta_batch_in_order():
    from imaml_kernels.data.sampler import TaskIndices

    idx = TaskIndices(torch.arange(12).view(6, 2), torch.arange(36).view(6, 2, 3), torch.zeros(6, 2, dtype=torch.long))
    parts = [shard(idx, r, 3) for r in range(3)]
    for field in range(3):
        assert torch.equal(torch.cat([p[field] for p in parts]), idx[field])
    assert parts[1].classes.shape == (2, 2)


def test_single_rank_context_is_a_no_op():
    ctx = DistContext()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.average_gradients([p])
    block = torch.rand(2, 5)
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and ctx.reduce_stats(block) is block
    ctx.barrier()
    ctx.close()


def _rank_entry(argv: list[str]) -> int:
    """A spawn entry point without the trainer: rank 1 exits with status ``argv[0]``."""
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"]
    return int(argv[0]) if os.environ["RANK"] == "1" else 0


def test_spawn_runs_the_given_entry_point():
    assert spawn(_rank_entry, ["0"], 2) == 0
    assert spawn(_rank_entry, ["3"], 2) == 3


def test_distributed_does_not_import_the_trainer():
    tree = ast.parse(Path(distributed.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.split(".")[-1] in ("train", "evaluate")}, imported
