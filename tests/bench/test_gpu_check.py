"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without CUDA: one message, exit status 0, nothing
written (the check itself needs a GPU; CUDA_VISIBLE_DEVICES="" hides one where there is)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device on this machine" in done.stdout and "nothing to check" in done.stdout
    assert not (tmp_path / "out").exists()
