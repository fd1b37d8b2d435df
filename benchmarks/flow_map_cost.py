"""Time and peak memory of one training iteration of each flow-map loss on an SD 1.5-size UNet, against one DMD2
iteration.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/flow_map_cost.py [--latent-size 16] [--iterations 2] \
        [--output-dir outputs/benchmarks] [--tiny]

The UNet is the real SD 1.5 config (``UNet2DConditionModel()`` defaults, ~860M parameters) with random weights
(no Hub), batch 1, 16x16 latents, fp32, LoRA rank 64 students (DMD2's SD setting; the flow-map student also trains
its new jump pathway). Both keep one frozen UNet: DMD2's shared base, and the flow-map LoRA student, which is its
own teacher with the adapters off. Each measurement runs in a fresh subprocess (``ru_maxrss`` is a per-process
high-water mark):

* **flow map**: the library's :func:`diffusers_distill.training.flow_map.flow_map_loss` (teacher CFG 4.5, one
  batched CFG call per teacher velocity) + ``accelerator.backward`` + the core's ``apply_gradients`` + the target
  EMA update, exactly as ``train_step`` runs them (the data step is left out: x_s is random);
* **DMD2**: :func:`diffusers_distill.training.dmd2.train_step` on a generator turn (generator forward, DM loss with
  real/fake scores, generator backward, fake-score forward/backward, two AdamW steps), from its step functions.

Reported per row: seconds per iteration (the fastest of ``--iterations``), the peak RSS of the process, and the
*training* peak = peak RSS minus the RSS after the networks and optimizer were built (activations, JVP tangents,
gradients, AdamW moments, EMA copies). CPU, 1 torch thread; on a shared machine the times are inflated.

``--tiny`` runs the same code on the tiny test UNet (LoRA rank 4), so that the test suite can run the script and it
cannot fall behind the library; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOSSES = ("itvm", "lfmd", "meanflow", "progressive")
GIB = 1024**3
LORA_RANK = 64
TINY_LORA_RANK = 4  # --tiny


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _start_training_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM, Linux >= 4.0) so that building the networks does not count, and
    return the current RSS: the baseline of the training peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _training_peak(baseline: int) -> int:
    return _status_bytes("VmHWM") - baseline


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _time_iterations(run, iterations: int) -> float:
    times = []
    for step in range(iterations):
        start = time.perf_counter()
        run(step)
        times.append(time.perf_counter() - start)
    return min(times)


def _unet(tiny: bool):
    """The SD 1.5 UNet (``UNet2DConditionModel()`` defaults, random weights), or the tiny test UNet; its LoRA rank."""
    from diffusers import UNet2DConditionModel

    from diffusers_distill.testing import tiny_unet

    return (tiny_unet(), TINY_LORA_RANK) if tiny else (UNet2DConditionModel(), LORA_RANK)


def measure_flow_map(loss: str, latent_size: int, iterations: int, tiny: bool = False) -> dict:
    import torch
    from diffusers import DDIMScheduler
    from diffusers.training_utils import EMAModel

    from diffusers_distill.flow_map import FlowMapUNet, build_flow_map_student, vp_sigma_range
    from diffusers_distill.schedulers import TwoTimedFlowMapScheduler
    from diffusers_distill.teacher import PromptEmbeddings
    from diffusers_distill.training import core
    from diffusers_distill.training.flow_map import FlowMapConfig, FlowMapParts, flow_map_loss, sample_times

    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher, rank = _unet(tiny)
    student = build_flow_map_student(teacher.requires_grad_(False), "lora", lora_rank=rank, lora_alpha=rank)
    del teacher  # as train_flow_map: a LoRA student is its own teacher with the adapters off (one UNet)
    alphas = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    params = [p for p in student.parameters() if p.requires_grad]
    config = FlowMapConfig(loss=loss, train_batch_size=1)
    parts = FlowMapParts(
        model=FlowMapUNet(student, alphas),
        teacher_unet=None,
        params=params,
        target=EMAModel(params, decay=config.target_ema_decay) if loss in ("itvm", "progressive") else None,
        prompt_encoder=None,
        embed=None,
        vae=None,
        latent_shape=(1, 4, latent_size, latent_size),
        sigma_max=vp_sigma_range(alphas)[1],
        sampler=TwoTimedFlowMapScheduler(),  # the validation grid: unused by the loss
        prediction_type="epsilon",
        device=torch.device("cpu"),
    )
    accelerator = _accelerator()
    optimizer = core.make_optimizer(params, 1e-5, config)
    generator = torch.Generator().manual_seed(0)
    cond = PromptEmbeddings(torch.randn(1, 77, student.config.cross_attention_dim, generator=generator))
    uncond = PromptEmbeddings(torch.zeros_like(cond.prompt_embeds))
    baseline = _start_training_peak()

    def run(step):
        rng = torch.Generator().manual_seed(step)
        s, t = sample_times(1, parts.sigma_max, 0.0, rng, "cpu")
        x_s = torch.randn(parts.latent_shape, generator=rng)
        value = flow_map_loss(parts, config, x_s, s, t, cond, uncond)
        accelerator.backward(value, inputs=params)
        if core.apply_gradients(accelerator, optimizer, params, config.max_grad_norm) and parts.target is not None:
            parts.target.step(params)

    seconds = _time_iterations(run, iterations)
    return {"seconds": seconds, "peak_bytes": _rss(), "training_bytes": _training_peak(baseline)}


def measure_dmd2(latent_size: int, iterations: int, tiny: bool = False) -> dict:
    import torch
    from diffusers import DDIMScheduler

    from diffusers_distill.noise_schedule import NoiseSchedule
    from diffusers_distill.students import build_dmd2_networks
    from diffusers_distill.teacher import PromptEmbeddings, PromptEncoder
    from diffusers_distill.training import core, dmd2

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet, rank = _unet(tiny)
    networks = build_dmd2_networks(unet, "lora", "lora", rank, rank, rank, rank)
    width = networks.base_unet.config.cross_attention_dim
    schedule = NoiseSchedule.from_scheduler_config(
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    )
    encoder = PromptEncoder(SimpleNamespace(text_encoder_2=None), 512, "zeros")  # zeros: no text encoder needed

    def embed(prompts):
        return PromptEmbeddings(torch.randn(len(prompts), 77, width, generator=torch.Generator().manual_seed(0)))

    parts = dmd2.DMD2Parts(
        networks=networks,
        schedule=schedule,
        prompt_encoder=encoder,
        embed=embed,
        vae=None,
        timesteps=[999],
        latent_shape=(1, 4, latent_size, latent_size),
        device=torch.device("cpu"),
    )
    config = dmd2.DMD2Config(train_batch_size=1, dfake_gen_update_ratio=1)
    accelerator = _accelerator()
    optimizers = [core.make_optimizer(networks.parameters_of(r), 1e-5, config) for r in ("generator", "fake_score")]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) for o in optimizers]
    data = SimpleNamespace(sample_prompts=lambda n, rng: ["a prompt"] * n)
    baseline = _start_training_peak()

    def run(step):
        dmd2.train_step(step, parts, config, accelerator, data, optimizers, schedulers, None)

    seconds = _time_iterations(run, iterations)
    return {"seconds": seconds, "peak_bytes": _rss(), "training_bytes": _training_peak(baseline)}


def measure_in_subprocess(name: str, latent_size: int, iterations: int, tiny: bool = False) -> dict:
    call = (
        f"b.measure_dmd2({latent_size}, {iterations}, {tiny})"
        if name == "dmd2"
        else f"b.measure_flow_map({name!r}, {latent_size}, {iterations}, {tiny})"
    )
    code = f"import json, benchmarks.flow_map_cost as b; print(json.dumps({call}))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=1, help="timed iterations per row (the fastest is shown)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    parser.add_argument("--tiny", action="store_true", help="the tiny test UNet (checks that the script runs)")
    args = parser.parse_args(argv)
    if args.latent_size < 8 or args.latent_size % 8 or args.iterations < 1:
        parser.error("--latent-size must be a multiple of 8 (>= 8) and --iterations >= 1")

    rows = {}
    for name in ("dmd2", *args.losses):
        rows[name] = measure_in_subprocess(name, args.latent_size, args.iterations, args.tiny)
        row = rows[name]
        print(f"{name}: {row['seconds']:.1f} s, peak {row['peak_bytes'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    base = rows["dmd2"]
    lines = [
        f"{'TINY test UNet (not a measurement)' if args.tiny else 'SD 1.5 UNet (random weights)'}, batch 1, "
        f"{args.latent_size}x{args.latent_size} latents, fp32, "
        f"LoRA rank {TINY_LORA_RANK if args.tiny else LORA_RANK}, CPU 1 thread, "
        f"fastest of {args.iterations} iterations.",
        "",
        "| iteration | s / iteration | x DMD2 | peak RSS (GiB) | training peak above the weights (GiB) | x DMD2 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        label = "DMD2 (generator turn)" if name == "dmd2" else f"flow map, {name}"
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f}x | {r['peak_bytes'] / GIB:.2f} | "
            f"{r['training_bytes'] / GIB:.2f} | {r['training_bytes'] / base['training_bytes']:.2f}x |"
        )
    if "itvm" in rows and "lfmd" in rows:
        itvm, lfmd = rows["itvm"], rows["lfmd"]
        lines += [
            "",
            f"ITVM / LFMD: peak RSS {itvm['peak_bytes'] / lfmd['peak_bytes']:.2f}x, training peak "
            f"{itvm['training_bytes'] / lfmd['training_bytes']:.2f}x, time "
            f"{itvm['seconds'] / lfmd['seconds']:.2f}x",
        ]
    text = "\n".join(lines) + "\n"
    print(text, end="")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_distill.fileio import atomic_path, atomic_write_json, atomic_write_text

    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "flow_map_cost.md"), text)
    atomic_write_json(os.path.join(args.output_dir, "flow_map_cost.json"), {"args": vars(args), "rows": rows})
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = list(rows)
    axes[0].bar(names, [rows[n]["seconds"] for n in names])
    axes[0].set_ylabel("s / iteration")
    axes[1].bar(names, [rows[n]["training_bytes"] / GIB for n in names])
    axes[1].set_ylabel("training peak above weights (GiB)")
    figure.tight_layout()
    with atomic_path(os.path.join(args.output_dir, "flow_map_cost.png")) as tmp:
        figure.savefig(tmp, dpi=120)
    return rows


if __name__ == "__main__":
    main()
