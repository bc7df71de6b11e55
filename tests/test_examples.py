"""The examples run as a user would run them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_minimal_sweep_runs_tpe_and_asha_on_ray(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "examples" / "minimal_sweep.py"), "--samples", "3",
                           "--epochs", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^3 trials; best d=(32|64|96) lr=\S+: val W-F1 \d+\.\d\d at epoch [12]$", done.stdout, re.M), \
        done.stdout
    # three real Ray trials (their folders; the result files depend on which loggers Tune has on)
    assert len([p for p in (tmp_path / "ray").glob("*/CMATHTrial_*") if p.is_dir()]) == 3
