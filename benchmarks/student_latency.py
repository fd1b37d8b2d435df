"""Latency of the 1-step student pipeline against the bare UNet + VAE calls it makes (aim: at most 1.05x).

A DMD2 1-step student samples with diffusers' ``LCMScheduler`` at ``timesteps=[999]`` and no CFG. This times

* **diffusers pipeline**: ``StableDiffusionPipeline(prompt_embeds=..., num_inference_steps=1, timesteps=[999],
  guidance_scale=0, output_type="pt")`` with the LCM scheduler (prompt embeddings precomputed: the text encoder
  is the same in every column and not what is measured), what a student folder gives with plain diffusers;
* **DMD2 pipeline**: the same call of ``DMD2StableDiffusionPipeline`` on the same components, whose device
  lookups take one pass (``pipelines/execution_device.py``);
* **bare**: the calls it makes, by hand: noise, one UNet call, the x0 formula, one VAE decode, ``/2 + 0.5`` clamp;

best of ``--repeats`` rounds (the three interleaved) after one warm-up call of each, for

* the bundled digits teacher (SD 1.5 architecture, at the size it ships: 8x8 latents) at 1 step, which is
  exactly the computation of a 1-step student exported from it (a LoRA student fused, or a full student, has the
  same UNet shape);
* SD 1.5-size random weights (the real SD 1.5 UNet and VAE configs, no Hub) at 64x64 latents (512px images).

    OMP_NUM_THREADS=1 python benchmarks/student_latency.py [--repeats 5] [--models digits sd15]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# stable-diffusion-v1-5's vae/config.json (fields that differ from AutoencoderKL's defaults)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)


def digits_pipeline():
    from diffusers import StableDiffusionPipeline

    from diffusers_distill.digits import digits_teacher_path

    return StableDiffusionPipeline.from_pretrained(digits_teacher_path("sd15"), safety_checker=None)


def sd15_size_pipeline():
    """SD 1.5's UNet and VAE (real configs, random weights) with a tiny text encoder (never called: the
    768-wide prompt embeddings are passed in)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusers_distill.testing import sd_ddim_scheduler, tiny_clip_tokenizer, tiny_text_config

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_check import SD15_UNET

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def best_of(calls: dict, repeats: int) -> dict:
    """Best time of each call over ``repeats`` rounds, the calls interleaved within a round (so that a slow spell
    of the shared machine hits every column alike), after one warm-up call of each."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def measure(pipe, repeats: int) -> dict:
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)  # the students' scheduler
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    latent = unet.config.sample_size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    alpha_bar = pipe.scheduler.alphas_cumprod[999]
    t = torch.tensor([999])

    from diffusers_distill import DMD2StableDiffusionPipeline

    ours = DMD2StableDiffusionPipeline(**pipe.components)
    ours.set_progress_bar_config(disable=True)

    def pipeline(pipe=pipe):
        return pipe(
            prompt_embeds=embeds,
            num_inference_steps=1,
            timesteps=[999],
            guidance_scale=0.0,
            height=latent * scale,
            width=latent * scale,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    def bare():
        x = torch.randn(1, unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
        eps = unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        image = vae.decode(x0 / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    difference = (pipeline() - bare()).abs().max().item()  # the same computation (LCM's c_skip at 999 ~ 1e-8)
    if not torch.equal(pipeline(ours), pipeline()):
        raise AssertionError("DMD2StableDiffusionPipeline and StableDiffusionPipeline gave different images")
    return {
        **best_of({"pipeline_s": pipeline, "ours_s": lambda: pipeline(ours), "bare_s": bare}, repeats),
        "latent": latent,
        "max_abs_difference": difference,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls of each (best of), after a warm-up.")
    parser.add_argument("--models", nargs="+", default=["digits", "sd15"], choices=["digits", "sd15"])
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    builders = {
        "digits": ("digits teacher (SD 1.5 arch.)", digits_pipeline),
        "sd15": ("SD 1.5 size", sd15_size_pipeline),
    }
    print(f"1-step student latency on CPU (1 thread), fp32, batch 1, best of {args.repeats}\n")
    print(
        "| model | latents | diffusers pipeline (s) | DMD2 pipeline (s) | bare UNet + VAE (s) | ratio diffusers | "
        "ratio DMD2 | max abs difference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        label, build = builders[name]
        result = measure(build(), args.repeats)
        ratio, ratio_ours = result["pipeline_s"] / result["bare_s"], result["ours_s"] / result["bare_s"]
        size = f"{result['latent']}x{result['latent']}"
        print(
            f"| {label} | {size} | {result['pipeline_s']:.4f} | {result['ours_s']:.4f} | {result['bare_s']:.4f} | "
            f"{ratio:.3f} | {ratio_ours:.3f} | {result['max_abs_difference']:.1e} |",
            flush=True,
        )
        rows.append({"model": name, "ratio": ratio, "ratio_dmd2": ratio_ours, **result})
    return rows


if __name__ == "__main__":
    main()
