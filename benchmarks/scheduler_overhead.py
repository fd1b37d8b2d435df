"""Per-step cost of our momentum schedulers vs diffusers' DPMSolverMultistepScheduler at an SDXL-sized latent.

Times only ``scheduler.step`` (the model output is a fixed random tensor) over a full ``num_inference_steps`` loop, on
CUDA when available else CPU, and checks for host-device synchronisations with
``torch.cuda.set_sync_debug_mode("error")`` (on CPU there is no device to sync with, so it is not checkable).

    OMP_NUM_THREADS=1 python benchmarks/scheduler_overhead.py [--steps 25] [--repeats 5] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_distill.gaussian_mixture import default_base_config


def schedulers(config: dict) -> dict:
    from diffusers import DPMSolverMultistepScheduler

    from diffusers_distill import DPMSolverHeavyBallScheduler, GHVBScheduler, PLMSHeavyBallScheduler

    return {
        "DPMSolverMultistep 2M (diffusers)": lambda: DPMSolverMultistepScheduler.from_config(config),
        "GHVB order 4, beta 0.8": lambda: GHVBScheduler.from_config(config, multistep_order=4, momentum_beta=0.8),
        "PLMS4 + HB 0.8": lambda: PLMSHeavyBallScheduler.from_config(config, multistep_order=4, momentum_beta=0.8),
        "DPM++2M + HB 0.8": lambda: DPMSolverHeavyBallScheduler.from_config(config, solver_order=2, momentum_beta=0.8),
    }


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(make_scheduler, sample, model_output, steps: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds per ``step`` call over a full sampling loop."""
    best = float("inf")
    for _ in range(repeats + 1):  # first pass warms up kernels and caches
        scheduler = make_scheduler()
        scheduler.set_timesteps(steps, device=sample.device)
        x = sample.clone()
        _synchronize(sample.device)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            x = scheduler.step(model_output, t, x).prev_sample
        _synchronize(sample.device)
        best = min(best, (time.perf_counter() - start) / len(scheduler.timesteps))
    return best


def _first_sync(make_scheduler, sample, model_output, steps: int, check_first_step: bool):
    """``None`` if a loop runs under sync debug mode "error", else ``(step index, message)``."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps, device=sample.device)
    x = sample.clone()
    try:
        for index, t in enumerate(scheduler.timesteps):
            torch.cuda.set_sync_debug_mode("error" if index > 0 or check_first_step else 0)
            x = scheduler.step(model_output, t, x).prev_sample
    except RuntimeError as error:
        return index, str(error).splitlines()[0][:70]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return None


def sync_check(make_scheduler, sample, model_output, steps: int) -> str:
    """Whether a sampling loop forces host-device synchronisations; step 0 is also checked separately because
    diffusers' step-index lookup (``index_for_timestep``) uses ``nonzero``, which syncs once per loop."""
    if sample.device.type != "cuda":
        return "not checkable on CPU"
    full = _first_sync(make_scheduler, sample, model_output, steps, check_first_step=True)
    if full is None:
        return "none"
    after_first = _first_sync(make_scheduler, sample, model_output, steps, check_first_step=False)
    if after_first is None:
        return f"only at step 0 ({full[1]})"
    return f"at step {after_first[0]} ({after_first[1]})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        raise ValueError(f"`--steps` and `--repeats` must be positive, got {args.steps} and {args.repeats}")
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(1, 4, 128, 128, generator=generator, device=device, dtype=dtype)
    model_output = torch.randn(1, 4, 128, 128, generator=generator, device=device, dtype=dtype)
    config = dict(default_base_config(), timestep_spacing="trailing")

    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (1 thread)"
    print(f"step() cost, latent 1x4x128x128 {args.dtype}, {args.steps} steps, {name_of_device}\n")
    print("| scheduler | ms / step | ratio vs DPMSolverMultistep | host-device sync |")
    print("|---|---|---|---|")
    baseline = None
    for name, make_scheduler in schedulers(config).items():
        seconds = time_loop(make_scheduler, sample, model_output, args.steps, args.repeats)
        baseline = baseline or seconds
        sync = sync_check(make_scheduler, sample, model_output, args.steps)
        print(f"| {name} | {seconds * 1e3:.3f} | {seconds / baseline:.2f} | {sync} |", flush=True)


if __name__ == "__main__":
    main()
