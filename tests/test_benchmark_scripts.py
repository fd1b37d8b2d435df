"""Benchmark scripts run against the current library at tiny size, so that they cannot fall behind it unnoticed
(the cost benchmark once stopped at FlowMapParts' new field). Their numbers are not checked: benchmarks measure,
tests do not."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_flow_map_cost_runs_every_loss_and_dmd2_at_tiny_size(tmp_path):
    command = [sys.executable, os.path.join(REPO, "benchmarks", "flow_map_cost.py"), "--tiny", "--latent-size", "8"]
    command += ["--output-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TINY test UNet (not a measurement)" in result.stdout
    rows = json.loads((tmp_path / "flow_map_cost.json").read_text())["rows"]
    assert list(rows) == ["dmd2", "itvm", "lfmd", "meanflow", "progressive"]
    for name, row in rows.items():
        assert row["seconds"] > 0 and row["peak_bytes"] > 0, name
    assert (tmp_path / "flow_map_cost.png").is_file()
