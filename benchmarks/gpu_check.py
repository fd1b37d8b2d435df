"""A prepared GPU check of DMD2 training and the momentum schedulers: run it the day a GPU is lent.

For SD 1.5-size and SDXL-size UNets (their real configs, written below; random weights, no Hub) at 512 and 1024
resolution latents (64x64 and 128x128), and for the shared-base LoRA and the full (three UNets) layouts, it runs a few
real DMD2 iterations (``training.dmd2.train_step``: generator + fake-score phases with optimizer steps, 4-step
student with backward simulation, bf16 frozen weights and autocast, fp32 trainable weights) and reports

* seconds per iteration (the first iteration is a warm-up and not counted),
* peak GPU memory (``torch.cuda.max_memory_allocated``),
* host-device synchronisations per iteration, counted with ``torch.cuda.set_sync_debug_mode("warn")``,

and then runs the momentum schedulers' host-sync check of ``benchmarks/scheduler_overhead.py``. One table.

Every iteration is a generator turn (``dfake_gen_update_ratio=1``), the most expensive kind. The text encoders and
the VAE are left out (random prompt embeddings of the real shapes): they are frozen and not what this measures.

``--tiny`` (automatic without CUDA) runs the same code on the tiny test UNets at 16x16 latents on CPU; the test suite
runs it that way so this script cannot rot.

    python benchmarks/gpu_check.py [--iterations 3] [--tiny] [--layouts lora full] [--models sd15 sdxl]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# The UNet configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (their unet/config.json, the fields
# that differ from UNet2DConditionModel's defaults), so no download is needed.
SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
)
SDXL_UNET = dict(
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# (config, latent size, text sequence length, pooled size; None = no SDXL added conditions)
MODELS = {
    "sd15": (SD15_UNET, 64, 77, None),
    "sdxl": (SDXL_UNET, 128, 77, 1280),
}
LORA_RANK = 64  # DMD2's SDXL LoRA rank; the tiny UNets use 4
GIB = 1024**3


def build_unet(model: str, tiny: bool):
    """The UNet (random weights) and its latent size, text length, text width and pooled width."""
    from diffusers import UNet2DConditionModel

    from diffusers_distill.testing import tiny_unet

    if tiny:
        unet = tiny_unet(sdxl=model == "sdxl")
        pooled = 32 if model == "sdxl" else None
        return unet, 16, 7, unet.config.cross_attention_dim, pooled
    config, latent, length, pooled = MODELS[model]
    return UNet2DConditionModel(**config), latent, length, config["cross_attention_dim"], pooled


class _RandomPrompts:
    """Stands in for the prompt data, encoder and cache: random embeddings of the real shapes."""

    def __init__(self, length: int, width: int, pooled: int | None, resolution: int, device):
        self.length, self.width, self.pooled, self.resolution, self.device = length, width, pooled, resolution, device

    def sample_prompts(self, batch: int, rng) -> list[str]:
        return ["a prompt"] * batch

    def __call__(self, prompts):
        from diffusers_distill.teacher import PromptEmbeddings

        batch, device = len(prompts), self.device
        embeds = torch.randn(batch, self.length, self.width, device=device)
        if self.pooled is None:
            return PromptEmbeddings(embeds)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=torch.float32, device=device)
        return PromptEmbeddings(embeds, torch.randn(batch, self.pooled, device=device), time_ids)

    def unconditional_embeddings(self, like):
        from diffusers_distill.teacher import PromptEmbeddings

        pooled = None if like.pooled_prompt_embeds is None else torch.zeros_like(like.pooled_prompt_embeds)
        return PromptEmbeddings(torch.zeros_like(like.prompt_embeds), pooled, like.add_time_ids)


def dmd2_run(model: str, layout: str, tiny: bool, iterations: int, accelerator, steps: int) -> dict:
    """``iterations`` + 1 DMD2 iterations; returns s/iteration, peak memory and host syncs per iteration."""
    from diffusers.training_utils import cast_training_params

    from diffusers_distill.noise_schedule import NoiseSchedule
    from diffusers_distill.students import build_dmd2_networks
    from diffusers_distill.testing import sd_ddim_scheduler
    from diffusers_distill.training import core
    from diffusers_distill.training.dmd2 import DMD2Config, DMD2Parts, train_step

    device = accelerator.device
    unet, latent, length, width, pooled = build_unet(model, tiny)
    rank = 4 if tiny else LORA_RANK
    networks = build_dmd2_networks(
        unet, student_type=layout, fake_score_type=layout, lora_rank=rank, lora_alpha=rank, fake_lora_rank=rank
    )
    core.cast_if_needed(networks.base_unet, torch.bfloat16)  # frozen weights in bf16 ...
    cast_training_params(networks.base_unet, dtype=torch.float32)  # ... trainable adapters in fp32
    networks.to(device)
    config = DMD2Config(
        pretrained_teacher_model="random-weights",
        num_inference_steps=steps,
        dfake_gen_update_ratio=1,
        real_guidance_scale=8.0 if model == "sdxl" else 1.75,
        train_batch_size=1,
        mixed_precision="bf16",
        lr_warmup_steps=0,
    )
    prompts = _RandomPrompts(length, width, pooled, latent * 8, device)
    parts = DMD2Parts(
        networks=networks,
        schedule=NoiseSchedule.from_scheduler_config(sd_ddim_scheduler().config),
        prompt_encoder=prompts,
        embed=prompts,
        vae=None,
        timesteps=config.timesteps(),
        latent_shape=(1, unet.config.in_channels, latent, latent),
        device=device,
    )
    optimizers, schedulers = [], []
    for role in ("generator", "fake_score"):
        optimizer = core.make_optimizer(networks.parameters_of(role), 1e-6, config)
        optimizers.append(optimizer)
        schedulers.append(core.make_lr_scheduler(optimizer, config, iterations + 1))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    syncs, seconds = 0, 0.0
    for step in range(iterations + 1):
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(step, parts, config, accelerator, prompts, optimizers, schedulers, None)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        if cuda:
            torch.cuda.synchronize()
        if step > 0:  # the first iteration is a warm-up
            seconds += time.perf_counter() - start
            syncs += sum("synchroniz" in str(w.message) for w in caught)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    del networks, parts, optimizers
    if cuda:
        torch.cuda.empty_cache()
    return {"s_per_iteration": seconds / iterations, "peak_gib": peak, "syncs": syncs / iterations if cuda else None}


def scheduler_rows(device, tiny: bool) -> list[tuple[str, str]]:
    """(scheduler, host-sync result) from ``benchmarks/scheduler_overhead.py``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scheduler_overhead

    from diffusers_distill.gaussian_mixture import default_base_config

    size = 16 if tiny else 128
    generator = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(1, 4, size, size, generator=generator, device=device)
    model_output = torch.randn(1, 4, size, size, generator=generator, device=device)
    config = dict(default_base_config(), timestep_spacing="trailing")
    steps = 5 if tiny else 25
    return [
        (name, scheduler_overhead.sync_check(make, sample, model_output, steps))
        for name, make in scheduler_overhead.schedulers(config).items()
    ]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="Timed DMD2 iterations per run (after 1 warm-up).")
    parser.add_argument("--tiny", action="store_true", help="Tiny test UNets at 16x16 latents (automatic on CPU).")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=sorted(MODELS))
    parser.add_argument("--layouts", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--num_inference_steps", type=int, default=4, help="Student steps (4: backward simulation).")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error(f"--iterations must be at least 1, got {args.iterations}")
    import diffusers
    from accelerate import Accelerator

    diffusers.utils.logging.set_verbosity_error()  # the bf16 cast of the frozen base warns about "kept in float32: []"
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    tiny = args.tiny or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (1 thread)"
    size = "tiny test UNets, 16x16 latents" if tiny else "real SD 1.5 (64x64 latents) / SDXL (128x128) configs"
    print(
        f"gpu_check on {where}: {size}, bf16, batch 1, {args.num_inference_steps}-step student, "
        f"{args.iterations} timed iterations (+1 warm-up), every iteration a generator turn\n"
    )
    print("| check | model | latents | layout | s / iteration | peak GPU memory (GiB) | host syncs / iteration |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for model in args.models:
        for layout in args.layouts:
            result = dmd2_run(model, layout, tiny, args.iterations, accelerator, args.num_inference_steps)
            latent = 16 if tiny else MODELS[model][1]
            peak = "n/a (CPU)" if result["peak_gib"] is None else f"{result['peak_gib']:.1f}"
            syncs = "n/a (CPU)" if result["syncs"] is None else f"{result['syncs']:.1f}"
            name = f"{model}-tiny" if tiny else model
            print(
                f"| DMD2 iteration | {name} | {latent}x{latent} | {layout} | {result['s_per_iteration']:.3f} | "
                f"{peak} | {syncs} |",
                flush=True,
            )
            rows.append({"model": model, "layout": layout, **result})
    for name, sync in scheduler_rows(device, tiny):
        print(f"| scheduler host-sync check | {name} | {'16x16' if tiny else '128x128'} | - | - | - | {sync} |")
        rows.append({"scheduler": name, "sync": sync})
    return rows


if __name__ == "__main__":
    main()
