"""``bench/gpu_check.sh --dry-run``: the GPU window's control flow rehearsed on the CPU, every
stage's command replaced by a stand-in that passes, fails or hangs (``GPU_CHECK_DRY_PLAN``).

The report must list every stage in order with the headline first after env and build; every
stage must run past a failing or hanging one (only a failed build stops the run); the report is
written before and after each stage and copied to ``$OUT``, so an interrupted run keeps what it
measured; the stage limits add up to no more than the budget. The real commands are checked
for what the issue asked of them (no compile table, the headline's test selection not empty),
and ``python -m bench.headline`` runs on the CPU.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["env", "build", "headline", "bench cg", "bench hvp", "bench meta-step 20w1s", "bench models",
          "bench launches", "GPU tests"]


def dry_run(tmp_path, plan="", limit=2, **env):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "GPU_CHECK_RESULTS": str(tmp_path / "results"), "GPU_CHECK_DRY_PLAN": plan,
             "GPU_CHECK_DRY_LIMIT_S": str(limit), "OUT": str(out), **env},
    )
    return res, (tmp_path / "results" / "gpu_check.md").read_text()


def table(report):
    """The stage table: ``[(stage, status, limit)]`` in order."""
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \| [^|]+ \| (\d+) \|", report, re.M)
    return [(name.strip(), status.strip(), int(limit)) for _, name, status, limit in rows]


def test_dry_run_every_stage_in_order_headline_first(tmp_path):
    res, report = dry_run(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = table(report)
    assert [r[0] for r in rows] == STAGES
    assert [r[0] for r in rows][:3] == ["env", "build", "headline"], "the headline is the first measurement"
    assert all(status == "ok" for _, status, _ in rows)
    assert "**Result: 9 of 9 stages passed.**" in report
    assert "one CUDA graph: **9.50 ms** (target <= 10 ms: met)" in report
    budget = int(re.search(r"of the (\d+) s budget", report).group(1))
    assert sum(limit for *_, limit in rows) <= budget
    assert (tmp_path / "out" / "gpu_check.md").read_text() == report


def test_dry_run_stages_after_a_failure_run(tmp_path):
    plan = "headline=fail bench-hvp=hang bench-models=probe GPU-tests=fail"
    res, report = dry_run(tmp_path, plan)
    assert res.returncode == 1, res.stdout + res.stderr
    status = {name: s for name, s, _ in table(report)}
    assert status["headline"] == "FAILED (exit 3)"
    assert status["bench hvp"].startswith("TIMED OUT after 2s")
    assert status["GPU tests"] == "FAILED (exit 3)"
    for name in ("bench cg", "bench meta-step 20w1s", "bench models", "bench launches"):
        assert status[name] == "ok", name
    assert "not passed: headline, bench hvp, GPU tests" in report
    for i, name in enumerate(STAGES):
        assert f"## {i}. {name}: " in report  # every stage's section, with its log tail
    # The report as it stood while "bench models" ran: the earlier stages' results are in it.
    probe = {name: s for name, s, _ in table((tmp_path / "results" / "probe-bench-models.md").read_text())}
    assert probe["bench hvp"].startswith("TIMED OUT") and probe["bench models"].startswith("running")
    assert probe["GPU tests"] == "not reached"
    logs = sorted(p.name for p in (tmp_path / "out" / "gpu_check_logs").iterdir())
    assert len(logs) == len(STAGES) and logs[2] == "02-headline.log"


def test_dry_run_a_failed_build_stops_the_run(tmp_path):
    res, report = dry_run(tmp_path, "build=fail")
    assert res.returncode == 3
    rows = table(report)
    assert rows[1][1] == "FAILED (exit 3)" and all(s == "not reached" for _, s, _ in rows[2:])
    assert "stopped after the failed build" in report


def test_dry_run_interrupted_keeps_the_report(tmp_path):
    """A TERM while a stage hangs: that stage is marked, the report saved and copied."""
    env = {**os.environ, "GPU_CHECK_RESULTS": str(tmp_path / "results"), "GPU_CHECK_DRY_PLAN": "bench-cg=hang",
           "GPU_CHECK_DRY_LIMIT_S": "60", "OUT": str(tmp_path / "out")}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    report = tmp_path / "results" / "gpu_check.md"
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (report.exists() and "| bench cg | running" in report.read_text()):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    status = {name: s for name, s, _ in table((tmp_path / "out" / "gpu_check.md").read_text())}
    assert status["headline"] == "ok" and status["bench cg"] == "INTERRUPTED (signal TERM)"
    assert status["bench hvp"] == "not reached"


def test_dry_run_refuses_an_unknown_behaviour(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPU_CHECK_RESULTS": str(tmp_path), "GPU_CHECK_DRY_PLAN": "headline=explode"})
    assert res.returncode == 2 and "unknown dry-run behaviour" in res.stderr


def test_real_commands():
    """No compile table on the GPU (CI has it); ninja's absence fails the env stage; the GPU
    tests do not repeat tests/test_compile.py."""
    text = SCRIPT.read_text()
    plans = text[text.index('plan "env"'):text.index("LIMITS_SUM=0")]
    assert "bench compile" not in plans and "test_compile" not in plans
    assert "v=$(ninja --version)" in plans
    assert "python3 -m bench.headline" in plans


def test_headline_test_selection_is_not_empty():
    """The headline's op-family check selects the CG accuracy tests of tests/test_gpu.py."""
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_gpu.py", "-k", "float64_reference and cg_"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [ln for ln in res.stdout.splitlines() if "::test_op_matches_float64_reference[" in ln]
    assert len(ids) == 8, res.stdout[-2000:]  # cg_dots, cg_update x triton, cuda x fp32, fp64


def test_headline_runs_on_the_cpu():
    res = subprocess.run([sys.executable, "-m", "bench.headline", "--device", "cpu", "--tasks", "2", "--inner-steps", "1",
                          "--cg-iters", "1", "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "## Headline" in res.stdout and re.search(r"fused engine: [0-9.]+ s / meta-step", res.stdout)
