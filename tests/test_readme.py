"""README.md runs as written: every fenced code block is executed here, in order, in a fresh
folder (so ``tiny-grit`` is the checkpoint its first block makes).

The two set-up commands at the top create a virtual environment and install the project, so
they are not re-run inside the test run: the test command is what ``.ci/run`` executes
(checked here to the letter), and the main-job command's own part, ``python -m bench``, is
run with ``--suite mean_pool`` (the whole job is run by CI's users, not by the tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", README, re.S)]
SETUP = [code for lang, code in BLOCKS if lang == "bash" and "python3 -m venv" in code]


def test_readme_opens_with_the_two_setup_commands():
    assert [lang for lang, _ in BLOCKS[:2]] == ["bash", "bash"]
    assert SETUP == [BLOCKS[0][1], BLOCKS[1][1]]
    assert BLOCKS[0][1].strip().endswith("python -m bench")
    assert BLOCKS[1][1].strip().endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert BLOCKS[1][1].strip() in ci, ".ci/run must run README's test command unchanged"


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def _run_bash(code: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("GRIT_BACKEND", None)
    for line in code.strip().splitlines():
        cmd = line.replace("python ", f"{sys.executable} ", 1) if line.startswith("python ") else line
        res = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"README command failed: {line}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def test_readme_blocks_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")  # the tiny checkpoint is written by transformers
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRIT_BACKEND", raising=False)
    namespace: dict = {}
    ran = {"bash": 0, "python": 0}
    for lang, code in BLOCKS:
        if code in SETUP:
            continue
        if lang == "bash":
            _run_bash(code, tmp_path)
        elif lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)
        else:
            raise AssertionError(f"README has a {lang!r} block this test does not know how to run")
        ran[lang] += 1
    assert ran["bash"] >= 3 and ran["python"] >= 3, ran
    assert (tmp_path / "tiny-run" / "latest").is_file()  # the training command wrote a checkpoint
    out = capsys.readouterr().out
    assert "grit-kernels environment" not in out  # printed by the subprocess, not here


def test_main_job_command_runs(tmp_path):
    """The main job's own command, on one suite: it prints a table and writes its JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRIT_BACKEND", None)
    res = subprocess.run([sys.executable, "-m", "bench", "--suite", "mean_pool", "--out", str(tmp_path),
                          "--budget", "0.05"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "mean_pool fwd" in res.stdout and (tmp_path / "results.json").is_file()
