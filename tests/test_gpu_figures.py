"""The one-call GPU script runs its three parts (CPU smoke mode here) and leaves at most 8 files, flat, under OUT."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "src" / "sparseft" / "bench" / "gpu_figures.sh"


@pytest.mark.slow
def test_smoke_run_writes_the_summary_and_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "SMOKE": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["gpu_figures.md", "gpu_fit.json", "gpu_fit.md", "gpu_sddmm.json", "gpu_sddmm.md",
                     "gpu_step.json", "gpu_step.md", "log.txt"]  # the device tool returns at most 8 files
    log = (tmp_path / "log.txt").read_text()
    assert all(f"== {part} exit 0" in log for part in ("sddmm_gpu", "gpu_step", "gpu_fit")), log
    summary = (tmp_path / "gpu_figures.md").read_text()
    assert summary.startswith("# GPU figures: ") and "torch " in summary and "triton " in summary
    assert "Did not finish" not in summary and "Largest that fits" in summary and "| tiny | sparse_new |" in summary
