"""The README's complete examples run as written (each block starts with ``# Example: ...``)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples():
    blocks = re.findall(r"```python\n(# Example: ([^\n]+)\n.*?)```", README.read_text(), flags=re.S)
    return {name.strip(): code for code, name in blocks}


def test_readme_has_the_examples():
    assert {"sinusoid regression", "ANIL"} <= set(_examples())


def _run(name):
    ns = {"__name__": "readme_example"}
    exec(compile(_examples()[name], f"README.md: {name}", "exec"), ns)  # noqa: S102
    return ns


def test_sinusoid_regression_example_learns(capsys):
    ns = _run("sinusoid regression")
    mse = ns["query_mse"]
    first, last = sum(mse[:10]) / 10, sum(mse[-10:]) / 10
    assert last < 0.6 * first, (first, last)  # meta-learning lowers the adapted query error
    assert "query MSE after adaptation" in capsys.readouterr().out


def test_anil_example_meta_learns_body_and_head():
    ns = _run("ANIL")
    model, head, phi = ns["model"], ns["head"], ns["phi"]
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, k
    assert set(phi) == set(head) and not phi.info["dropped"].any()
