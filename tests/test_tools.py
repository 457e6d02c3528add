"""The command-line tools a newcomer meets first: the environment report, the benchmark
runner's failure modes, the trainer's help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRIT_BACKEND", None)
    return env


def test_environment_report():
    from grit_kernels.__main__ import OPS, report

    r = report()
    assert r["torch"] == torch.__version__
    from grit_kernels import _backend

    if _backend.has_C():  # the module says what it was built for
        assert r["build"]["C_extension"] == "built" and r["build"]["cuda_archs"] not in ("", "unknown")
    else:
        assert r["build"]["C_extension"] == "not built" and r["build"]["reason"]
    assert set(r["backends"]) == set(OPS)
    for row in r["backends"].values():
        assert row["cpu"]["backend"] == "cpu" and row["cuda"]["backend"] in row["has"]
    res = subprocess.run([sys.executable, "-m", "grit_kernels"], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for needle in ("torch", "triton", "_C", "attention_with_kvcache", "cuda  ->", "cpu   ->"):
        assert needle in res.stdout
    as_json = subprocess.run([sys.executable, "-m", "grit_kernels", "--json"], env=_env(), capture_output=True,
                             text=True, timeout=120)
    assert json.loads(as_json.stdout)["python"]


def test_environment_report_names_a_bad_forced_backend():
    env = {**_env(), "GRIT_BACKEND": "tpu"}
    res = subprocess.run([sys.executable, "-m", "grit_kernels"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "GRIT_BACKEND='tpu': expected one of" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_bench_on_a_missing_gpu_is_a_clear_error():
    res = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--device cuda: no CUDA device is available here" in res.stderr


def test_bench_interrupted_still_writes(tmp_path):
    """SIGTERM (a time limit) mid-run: the table and the JSON of what finished are written."""
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--suite", "mean_pool", "--suite", "attention",
                             "--suite", "model", "--out", str(tmp_path), "--budget", "0.05"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    results = tmp_path / "results.json"
    while time.time() < deadline and not (results.is_file() and json.loads(results.read_text())["results"]):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    payload = json.loads(results.read_text())
    assert payload["meta"]["interrupted"] and payload["results"]
    assert "interrupted: writing what finished" in err
    assert "median ms" in out  # the table
    first = payload["results"][0]
    assert first["reps"] >= 25 and first["q1_ms"] <= first["median_ms"] <= first["q3_ms"]
    assert first["threads"] == 1


def test_bench_slow_cases_take_fewer_rounds():
    """measure(): a case whose rounds are long next to the budget stops after 5 rounds once
    the budget is spent; a fast one still takes min_reps."""
    sys.path.insert(0, str(ROOT))
    from bench.common import measure

    cpu = torch.device("cpu")
    slow, base, _ = measure(lambda: time.sleep(0.03), cpu, baseline=lambda: time.sleep(0.03), budget_s=0.05)
    assert slow.reps == base.reps == 5
    fast, _, _ = measure(lambda: None, cpu, budget_s=0.01, rel=1.0)  # settled at once: stops at min_reps
    assert fast.reps == 25


def test_train_help_is_fast_and_shows_defaults():
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", "import sys, grit_models.train as t; "
                          "t.build_parser().print_help(); print('torch' in sys.modules)"],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("False"), "--help imported torch"
    assert "(default: 100)" in res.stdout and "(default: 2e-05)" in res.stdout
    assert res.stdout.count("default") >= 30
    assert "config.json's (default: None)" not in res.stdout  # one default per option
    assert time.perf_counter() - t0 < 60
