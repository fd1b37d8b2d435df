"""Memory and step time of DMD2's network layouts: shared-base LoRA vs three full UNet copies.

DMD2 (Yin et al. 2024) trains a generator and a "fake score" network next to the frozen teacher. The official code
keeps three full UNets (teacher + generator + fake score); diffusers-distill's default puts the generator and the
fake score as two LoRA adapters on one frozen base (``diffusers_distill.students.build_dmd2_networks``).

For each UNet config (the tiny test UNet, and the SD 1.5 UNet = ``UNet2DConditionModel()`` default config, ~860M
parameters, random weights) and each layout this prints

* analytic fp32 training memory: parameters (all copies) + gradients + AdamW moments (2 per trainable parameter),
  counted on the ``meta`` device, so no memory is allocated;
* measured (in a fresh subprocess per run): peak RSS growth (``ru_maxrss``) over one DMD2-shaped iteration
  (teacher forward without grad, generator forward/backward/AdamW step, fake-score forward/backward/AdamW step),
  and its wall time. The SD-size three-copy layout needs ~31 GiB and is measured only with ``--measure-sd-full``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/dmd2_memory.py [--measure-sd] [--measure-sd-full]
[--output-dir outputs/benchmarks]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYOUTS = ("lora", "full")
# DMD2's rank 64 for SD-size; rank 4 for the tiny UNet (32-channel layers), where rank 64 would outgrow the base
LORA_RANK = {"tiny": 4, "sd15": 64}
GIB = 1024**3


def build_unet(model: str, device: str = "cpu"):
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_distill.testing import tiny_unet

    with torch.device(device):
        return tiny_unet() if model == "tiny" else UNet2DConditionModel()  # default config = SD 1.5 UNet


def build_networks(model: str, layout: str, device: str = "cpu"):
    from diffusers_distill.students import build_dmd2_networks

    rank = LORA_RANK[model]
    unet = build_unet(model, device)
    return build_dmd2_networks(
        unet, student_type=layout, fake_score_type=layout, lora_rank=rank, lora_alpha=rank, fake_lora_rank=rank
    )


def analytic_bytes(networks) -> dict[str, float]:
    """fp32 bytes of parameters (every copy, frozen or not) + gradients + AdamW exp_avg/exp_avg_sq."""
    modules = [networks.base_unet, networks.generator_unet, networks.fake_score_unet]
    total = sum(p.numel() for m in modules if m is not None for p in m.parameters())
    trainable = sum(p.numel() for p in networks.parameters_of("generator") + networks.parameters_of("fake_score"))
    return {"params": total, "trainable": trainable, "bytes": 4 * (total + trainable + 2 * trainable)}


def _loss_step(unet, optimizer, inputs):
    out = unet(*inputs).sample
    out.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model: str, layout: str, latent_size: int) -> dict[str, float]:
    """One DMD2-shaped iteration in this process; returns peak RSS growth (bytes) and the step time (s)."""
    import torch

    torch.set_num_threads(1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    networks = build_networks(model, layout)
    unet_config = networks.base_unet.config
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, unet_config.in_channels, latent_size, latent_size, generator=generator)
    text = torch.randn(1, 77, unet_config.cross_attention_dim, generator=generator)
    inputs = (x_t, torch.tensor([999]), text)
    opt_g = torch.optim.AdamW(networks.parameters_of("generator"), lr=1e-5)
    opt_f = torch.optim.AdamW(networks.parameters_of("fake_score"), lr=1e-5)
    start = time.perf_counter()
    with torch.no_grad(), networks.role("real_score") as real_score:
        real_score(*inputs)
    for role, optimizer in (("generator", opt_g), ("fake_score", opt_f)):
        with networks.role(role) as unet:
            _loss_step(unet, optimizer, inputs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_bytes": peak - rss_before, "seconds": seconds}


def measure_in_subprocess(model: str, layout: str, latent_size: int) -> dict[str, float]:
    """ru_maxrss is a per-process high-water mark, so every measurement runs in its own interpreter."""
    code = (
        f"import json, benchmarks.dmd2_memory as b; print(json.dumps(b.measure({model!r}, {layout!r}, {latent_size})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure-sd", action="store_true", help="also measure SD-size LoRA (~5 GiB RAM, ~20 s)")
    parser.add_argument("--measure-sd-full", action="store_true", help="also measure SD-size three-copy (~31 GiB)")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)

    rows = []
    for model in ("tiny", "sd15"):
        for layout in LAYOUTS:
            row = {"model": model, "layout": layout, **analytic_bytes(build_networks(model, layout, device="meta"))}
            if model == "tiny" or (args.measure_sd and layout == "lora") or args.measure_sd_full:
                row.update(measure_in_subprocess(model, layout, args.latent_size if model == "sd15" else 16))
            rows.append(row)

    header = f"{'model':6} {'layout':6} {'params':>12} {'trainable':>12} {'analytic GiB':>13} {'peak RSS GiB':>13}"
    print(f"{header} {'step s':>8}")
    for r in rows:
        rss = f"{r['rss_bytes'] / GIB:13.3f}" if "rss_bytes" in r else f"{'-':>13}"
        sec = f"{r['seconds']:8.2f}" if "seconds" in r else f"{'-':>8}"
        sizes = f"{r['params']:12,d} {r['trainable']:12,d} {r['bytes'] / GIB:13.3f}"
        print(f"{r['model']:6} {r['layout']:6} {sizes} {rss} {sec}")
    for model in ("tiny", "sd15"):
        lora, full = (next(r for r in rows if r["model"] == model and r["layout"] == lay) for lay in LAYOUTS)
        ratio = f"analytic {lora['bytes'] / full['bytes']:.3f}x"
        if "rss_bytes" in lora and "rss_bytes" in full:
            ratio += f", measured peak RSS {lora['rss_bytes'] / full['rss_bytes']:.3f}x"
        print(f"{model}: shared-base LoRA / three-copy memory = {ratio}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_distill.fileio import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, model in zip(axes, ("tiny", "sd15")):
        sub = [r for r in rows if r["model"] == model]
        xs = range(len(sub))
        ax.bar([x - 0.2 for x in xs], [r["bytes"] / GIB for r in sub], 0.4, label="analytic (params+grads+AdamW)")
        ax.bar([x + 0.2 for x in xs], [r.get("rss_bytes", 0) / GIB for r in sub], 0.4, label="measured peak RSS")
        ax.set_xticks(list(xs), [f"{r['layout']}" for r in sub])
        ax.set_title(f"{model} UNet")
        ax.set_ylabel("GiB")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "dmd2_memory.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    print(f"saved {path}")
    return rows


if __name__ == "__main__":
    main()
