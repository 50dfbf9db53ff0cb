"""benchmarks/gpu_session.sh: the prepared GPU run's stage handling, checked without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"


def _run(tmp_path, *stages, **env):
    out = tmp_path / "out"
    environ = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    result = subprocess.run(
        ["bash", str(SCRIPT), *stages],
        cwd=SCRIPT.parents[1],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, out


def test_unknown_stage_is_refused_before_anything_runs(tmp_path):
    result, out = _run(tmp_path, "env", "kernel")
    assert result.returncode == 2
    assert "unknown stage 'kernel'" in result.stderr and "decode-8b" in result.stderr
    assert not out.exists()


def test_stage_writes_its_log_and_reports_its_exit_and_time_limit(tmp_path):
    result, out = _run(tmp_path, "env")
    assert result.returncode == 0, result.stderr
    log = (out / "env.log").read_text()
    assert f"torch {__import__('torch').__version__}" in log and "CUDA available" in log
    assert "=== env: exit 0" in result.stdout
    # a stage past its limit is cut off and says so; the script goes on
    result, out = _run(tmp_path, "env", LIMIT_ENV="0.01")
    assert "=== env: exit 124" in result.stdout and "(time limit)" in result.stdout


def test_splits_stage_needs_a_gpu_and_says_so_in_its_log(tmp_path):
    result, out = _run(tmp_path, "splits")
    assert "=== splits: exit 2" in result.stdout
    assert "needs a CUDA GPU" in (out / "splits.log").read_text()
