"""``python -m bench spikes`` (issue 27): the trainer's step with per-step stability measurements."""

import json

import pytest
import torch

from bench import spikes
from imaml_kernels.data import omniglot_root
from imaml_kernels.nets import OmniglotConv
from test_trajectory import one_thread  # noqa: F401  (a fixture: the training tests on one thread)

needs_omniglot = pytest.mark.skipif(not (omniglot_root() / "characters.json").is_file(),
                                    reason="Omniglot not found in $IMAML_DATA")


def test_overrides_are_typed_after_the_defaults():
    got = spikes.parse_overrides(["meta_batch=8", "outer_lr=3e-3", "outer_schedule=constant", "channels=none"])
    assert got == {"meta_batch": 8, "outer_lr": 3e-3, "outer_schedule": "constant", "channels": None}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        spikes.parse_overrides(["no_such_key=1"])


class _Quadratic:
    """``hvp`` of per-task quadratics with known spectra: ``A_t = Q diag(e_t) Qᵀ``."""

    def __init__(self, spectra, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(spectra.shape[1], spectra.shape[1], generator=g, dtype=torch.float64))
        self.A = torch.stack([q @ torch.diag(e) @ q.T for e in spectra])

    def hvp(self, params, v, x, y):
        return torch.einsum("tij,tj->ti", self.A, v)


def test_power_iteration_finds_the_largest_magnitude_eigenvalue_with_its_sign():
    spectra = torch.tensor([[1.0, 2.0, 3.0, 40.0], [-50.0, 1.0, 2.0, 5.0]], dtype=torch.float64)
    eig = spikes.power_eig(_Quadratic(spectra), torch.zeros(2, 4, dtype=torch.float64), None, None, iters=100)
    assert torch.allclose(eig, torch.tensor([40.0, -50.0], dtype=torch.float64), rtol=1e-6)


def test_the_replayed_inner_loop_is_the_engines():
    torch.manual_seed(0)
    model = OmniglotConv(3, channels=4).double()
    net = model.batched()
    x, y = torch.rand(2, 6, 1, 28, 28, dtype=torch.float64), torch.arange(3).repeat(2).expand(2, -1).contiguous()
    theta = model.flat_params().expand(2, -1).contiguous()
    for inner, kw in (("gd", {}), ("sgd-pullback", {"proximal": False, "pull_back": True})):
        cfg = {"inner": inner, "inner_lr": 0.1, "lam": 2.0, "inner_steps": 3}
        losses, phi = spikes.replay_inner(net, theta, x, y, cfg)
        ref = net.inner_loop(theta, x, y, lam=2.0, steps=3, lr=0.1, **kw)
        assert losses.shape == (4, 2) and torch.allclose(phi, ref, atol=1e-10), inner
        assert torch.allclose(losses[0], net.loss(theta, x, y)) and torch.allclose(losses[-1], net.loss(phi, x, y))


@needs_omniglot
@pytest.mark.usefixtures("one_thread")
def test_train_logs_every_step_and_probes_and_compare_reads_the_logs(tmp_path):
    over = {"meta_batch": 2, "inner_steps": 2, "channels": 4, "query": 1}
    cfg, recs, _ = spikes.train("omniglot-5w1s", over, 3, probe_every=2, probe_tasks=2, power_iters=2,
                             log=str(tmp_path / "steps_a.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 3] and cfg["channels"] == 4
    assert {"loss", "inner_loss", "norm_grad", "max_update_over_lr", "norm_conv_w"} <= set(recs[1])
    assert {"eig_phi_max", "gd_stability", "inner_rise_max", "bn4_min_std"} <= set(recs[2]) - set(recs[1])
    assert [json.loads(line)["step"] for line in (tmp_path / "steps_a.jsonl").read_text().splitlines()] == [1, 2, 3]
    (tmp_path / "steps_b.jsonl").write_text("".join((tmp_path / "steps_a.jsonl").read_text().splitlines(True)[:1]))  # shorter
    text = spikes.compare(tmp_path, ["a", "b"], width=2)
    assert "## lr(λ+λmax H(φ))" in text and (tmp_path / "spikes_compare.png").stat().st_size > 0


@needs_omniglot
@pytest.mark.usefixtures("one_thread")
def test_the_probed_run_is_the_trainers_run(tmp_path):
    """The measurements change nothing: two probed steps end at the trainer's θ, bit for bit."""
    from imaml_kernels.trainer.loop import train
    from imaml_kernels.trainer.presets import resolve_config

    over = {"meta_batch": 2, "inner_steps": 2, "channels": 4, "eval_tasks": 0}
    _, _, model = spikes.train("omniglot-5w1s", over, 2, probe_every=1, probe_tasks=2, power_iters=2)
    train(resolve_config("omniglot-5w1s", {**over, "steps": 2}), tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert all(torch.equal(p, ckpt["model"][k]) for k, p in model.state_dict().items())
