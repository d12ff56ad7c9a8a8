"""``python -m bench lam-study``: three runs in their own processes, tabulated from their folders."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main as bench_main
from imaml_kernels.data import omniglot_root

needs_omniglot = pytest.mark.skipif(not (omniglot_root() / "characters.json").is_file(), reason="Omniglot not found in $IMAML_DATA")


@needs_omniglot
def test_lam_study_runs_three_processes_and_tabulates_the_learned_lam(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    tiny = ["--steps", "3", "--meta-batch", "2", "--inner-steps", "2", "--channels", "8", "--eval-tasks", "4",
            "--warmup-steps", "0", "--lam-lr", "0.1"]
    bench_main(["lam-study", "--runs", str(runs), "--out", str(out), "--threads", "1", "--", *tiny])
    text = (out / "lam_study.md").read_text()
    assert (out / "lam_study.png").stat().st_size > 0
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| λ")]
    assert [r.split("|")[1].strip() for r in rows] == ["fixed", "scalar", "per-layer"]
    # each run wrote its own folder; the learned λ moved and is what the table reports
    final = {}
    for mode in ("scalar", "per-layer"):
        train = [json.loads(x) for x in (runs / mode / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in train if r["kind"] == "train"]
        final[mode] = {k: v for k, v in train[-1].items() if k == "lam" or k.startswith("lam/")}
        assert final[mode] and all(abs(v - 2.0) > 1e-3 for v in final[mode].values())
    assert f"{final['scalar']['lam']:.3f}" in rows[1]
    assert "2.0 (fixed)" in rows[0]
    assert len(final["per-layer"]) == rows[2].count(":")
    # tabulating again from the folders alone gives the same table
    bench_main(["lam-study", "--runs", str(runs), "--out", str(out), "--tabulate-only"])
    assert (out / "lam_study.md").read_text().split("`python -m bench")[0] == text.split("`python -m bench")[0]
