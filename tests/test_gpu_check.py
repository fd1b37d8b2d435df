"""benchmarks/gpu_check.py runs at tiny size on CPU, so the script prepared for a GPU cannot rot."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_every_layout_and_the_scheduler_check_at_tiny_size(capsys):
    gpu_check = load_benchmark("gpu_check")
    rows = gpu_check.main(["--tiny", "--iterations", "1"])
    table = capsys.readouterr().out
    runs = [row for row in rows if "layout" in row]
    assert {(r["model"], r["layout"]) for r in runs} == {(m, x) for m in ("sd15", "sdxl") for x in ("lora", "full")}
    assert all(math.isfinite(r["s_per_iteration"]) and r["s_per_iteration"] > 0 for r in runs)
    schedulers = [row for row in rows if "scheduler" in row]
    assert len(schedulers) == 4 and all(r["sync"] == "not checkable on CPU" for r in schedulers)
    assert table.count("| DMD2 iteration |") == 4 and table.count("| scheduler host-sync check |") == 4


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
