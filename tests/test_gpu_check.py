"""benchmarks/gpu_check.py runs at tiny size on CPU, so the script prepared for a GPU cannot rot."""

import importlib.util
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_every_layout_and_the_scheduler_check_at_tiny_size():
    """Run as a user runs it (a fresh process: accelerate's state is per process) and read its table."""
    command = [sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--tiny", "--iterations", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines() if line.startswith("| ")
    ]
    runs = [row for row in rows if row[0] == "DMD2 iteration"]
    expected = {(f"{m}-tiny", x) for m in ("sd15", "sdxl") for x in ("lora", "full")}
    assert {(row[1], row[3]) for row in runs} == expected
    assert all(math.isfinite(float(row[4])) and float(row[4]) > 0 for row in runs)
    schedulers = [row for row in rows if row[0] == "scheduler host-sync check"]
    assert len(schedulers) == 4 and all(row[6] == "not checkable on CPU" for row in schedulers)


def test_gpu_check_configs_are_the_real_unet_sizes():
    """The inline configs build the real SD 1.5 (~860M parameters) and SDXL (~2.57B) UNets (on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    gpu_check = load_benchmark("gpu_check")
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**gpu_check.SD15_UNET)
        sdxl = UNet2DConditionModel(**gpu_check.SDXL_UNET)
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
