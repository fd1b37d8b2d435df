"""Train the bundled digits teachers: SD 1.5 and SDXL architectures on the bundled real handwritten digits
(UCI, as in sklearn's load_digits).

Stages (all seeded, CPU, one thread):

1. a tiny ``AutoencoderKL`` (32x32 RGB -> 4x8x8 latents), reconstruction + small KL loss; its
   ``scaling_factor`` is set to 1 / std of the training latents, as SD does;
2. seeded, randomly initialised CLIP text encoders and a CLIP BPE tokenizer built locally from the prompt
   vocabulary. For SD 1.5 the text encoder is first pre-trained to tell the prompts apart (a linear probe on its
   token states, :func:`pretrain_text_encoder`), standing in for CLIP's pre-training, then frozen as in SD;
3. a ``UNet2DConditionModel`` with cross-attention trained with the DDPM epsilon-prediction loss
   ``|| eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, c) ||^2`` (Ho et al. 2020, eq. 14) on SD's
   ``scaled_linear`` schedule, with 10% prompt dropout so classifier-free guidance (Ho & Salimans 2022) works,
   Min-SNR-5 loss weights (Hang et al. 2023), cosine learning-rate decay and an EMA of the weights (which is shipped);
4. the same for SDXL: two frozen text encoders (penultimate hidden states concatenated, pooled projection) and
   ``text_time`` added conditions.

The defaults are the recipe of the shipped SD 1.5 teacher (v2). The shipped SDXL teacher (v1) was trained with
``--arch sdxl --max_train_steps 1500 --lr_schedule linear --ema_decay 0 --snr_gamma 0`` and meets the quality aims
as it is (docs/digits_teacher.md).

Usage::

    python -m diffusers_distill.training.train_digits_teacher --arch sd15            # writes the package asset
    python -m diffusers_distill.training.train_digits_teacher --arch sdxl --max_train_steps 1500 \
        --lr_schedule linear --ema_decay 0 --snr_gamma 0                              # the shipped SDXL teacher
    python -m diffusers_distill.training.train_digits_teacher --arch sd15 --output_dir /tmp/teachers
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from diffusers_distill.digits import (
    ASSETS_DIR,
    IMAGE_SIZE,
    PROMPT_WORDS,
    digit_prompt,
    load_digits_split,
)
from diffusers_distill.fileio import atomic_directory

LATENT_SIZE = IMAGE_SIZE // 4
TEXT_HIDDEN = 32
PROMPT_DROPOUT = 0.1


def sd_noise_schedule_config() -> dict:
    """SD 1.5's training noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=[16, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet(sdxl: bool):
    """A 2-level cross-attention UNet on 8x8 latents (SDXL variant with ``text_time`` conditions)."""
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=TEXT_HIDDEN, **common)
    time_dim = 16
    return UNet2DConditionModel(
        cross_attention_dim=2 * TEXT_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
        **common,
    )


def build_text_encoders(tokenizer_dir: str, seed: int):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffusers_distill.testing import tiny_clip_tokenizer, tiny_text_config

    tokenizer = tiny_clip_tokenizer(words=PROMPT_WORDS, folder=tokenizer_dir, model_max_length=16)
    config = tiny_text_config(tokenizer, hidden_size=TEXT_HIDDEN, projection_dim=TEXT_HIDDEN, intermediate_size=64)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval().requires_grad_(False)
    text_encoder_2 = CLIPTextModelWithProjection(config).eval().requires_grad_(False)
    return tokenizer, text_encoder, text_encoder_2


def pretrain_text_encoder(text_encoder, input_ids: torch.Tensor, steps: int, lr: float, seed: int, log: list):
    """Teach a randomly initialised CLIP text encoder to tell the prompts apart, before the UNet sees it.

    SD's CLIP text encoder arrives pre-trained, so different prompts already have clearly different embeddings; a
    random CLIP maps prompts that differ by one word to nearly the same sequence (pairwise distances 2.4-6.8 against
    a norm of 22.6 here), and the UNet's cross-attention then learns the prompt very slowly. A linear probe on every
    token's final hidden state is trained with the encoder to classify which of the ``len(input_ids)`` prompts
    (the digits and the empty prompt) it came from (cross-entropy); afterwards the encoder is frozen, as in SD.
    """
    torch.manual_seed(seed)
    probe = torch.nn.Linear(text_encoder.config.hidden_size, len(input_ids))
    text_encoder.train().requires_grad_(True)
    opt = torch.optim.Adam(list(text_encoder.parameters()) + list(probe.parameters()), lr=lr)
    targets = torch.arange(len(input_ids))
    for step in range(steps):
        logits = probe(text_encoder(input_ids)[0]).mean(dim=1)  # every token votes
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item()})
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        embeds = text_encoder(input_ids)[0].flatten(1)
    distances = torch.cdist(embeds, embeds)[~torch.eye(len(input_ids), dtype=torch.bool)]
    print(
        f"[text encoder] probe loss {loss.item():.4f}, min pairwise prompt distance {distances.min():.2f} "
        f"(norm {embeds.norm(dim=1).mean():.2f})",
        flush=True,
    )
    return float(distances.min())


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int, log: list):
    """Reconstruction (L1 + MSE) + 1e-6 KL, the small-KL regime of SD's VAE (Rombach et al. 2022, sec. 3)."""
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item()})
            print(f"[vae] step {step} loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor


def train_unet(
    unet,
    latents,
    labels,
    cond,
    steps,
    batch_size,
    lr,
    seed,
    log,
    tag,
    *,
    extra_params=(),
    lr_schedule="cosine",
    warmup_steps=100,
    ema_decay=0.0,
    snr_gamma=0.0,
):
    """Epsilon-prediction DDPM loss with prompt dropout; ``cond(labels, drop_mask)`` -> UNet kwargs.

    ``extra_params`` are trained with the UNet (e.g. the text encoder, whose output ``cond`` computes).
    ``lr_schedule``: linear warm-up over ``warmup_steps``, then ``"cosine"`` decay to 0 or ``"constant"`` (diffusers'
    ``get_scheduler``), or ``"linear"`` decay to 10% of the peak (the recipe of the v1 teachers).
    ``ema_decay > 0`` keeps an exponential moving average of the trained weights (diffusers' ``EMAModel`` with its
    warm-up ``1 - (1 + step)^(-2/3)``, capped at ``ema_decay``) and copies it into the model at the end.
    ``snr_gamma > 0`` weights each sample's loss by ``min(SNR(t), gamma) / SNR(t)`` (Min-SNR, Hang et al. 2023,
    eq. 12 for epsilon prediction).
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    noise_scheduler = DDPMScheduler(**sd_noise_schedule_config())
    params = list(unet.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if lr_schedule == "linear":  # the v1 recipe: warm-up, then linear decay to 10% of the peak
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)) * (1 - 0.9 * s / steps)
        )
    else:
        sched = get_scheduler(
            lr_schedule if lr_schedule == "cosine" else "constant_with_warmup",
            opt,
            num_warmup_steps=warmup_steps,
            num_training_steps=steps,
        )
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=2 / 3) if ema_decay > 0 else None
    g = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        z0, y = latents[idx], labels[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < PROMPT_DROPOUT
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, **cond(y, drop)).sample
        if snr_gamma > 0:
            snr = compute_snr(noise_scheduler, t)
            per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * torch.clamp(snr, max=snr_gamma) / snr).mean()
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(params)
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item()})
            print(f"[{tag}] step {step} loss {loss.item():.4f}", flush=True)
    if ema is not None:
        ema.copy_to(params)
    for p in params:
        p.requires_grad_(False)
    return unet.eval()


def _stock_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**sd_noise_schedule_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_teacher(pipe, folder: str, report: dict) -> None:
    """Save ``pipe`` (safetensors) with ``training_report.json`` as ``folder``, atomically.

    The pipeline is written into a staging folder and then replaces any previous ``folder`` whole
    (:func:`diffusers_distill.fileio.atomic_directory`), with the usual file modes, so the shipped assets are
    world-readable and never half-written.
    """
    parent, name = os.path.split(os.path.abspath(folder))
    with atomic_directory(parent) as staging:
        pipe.save_pretrained(os.path.join(staging, name), safe_serialization=True)
        with open(os.path.join(staging, name, "training_report.json"), "w") as f:
            json.dump(report, f, indent=1)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (defaults: the recipe of the shipped SD 1.5 teacher), validated before any training."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="both", choices=["sd15", "sdxl", "both"])
    parser.add_argument("--output_dir", default=ASSETS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_steps", type=int, default=400)
    parser.add_argument("--max_train_steps", type=int, default=2500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_schedule", default="cosine", choices=["cosine", "constant", "linear"])
    parser.add_argument("--lr_warmup_steps", type=int, default=100)
    parser.add_argument("--ema_decay", type=float, default=0.999, help="0 disables the UNet EMA")
    parser.add_argument("--snr_gamma", type=float, default=5.0, help="Min-SNR gamma; 0 disables the weighting")
    parser.add_argument(
        "--text_encoder_steps",
        type=int,
        default=300,
        help="SD 1.5: steps of prompt-separation pre-training of the CLIP text encoder (0: random)",
    )
    parser.add_argument(
        "--train_text_encoder",
        type=int,
        default=0,
        choices=[0, 1],
        help="SD 1.5: also train the CLIP text encoder with the UNet (1) or keep it frozen (0)",
    )
    parser.add_argument(
        "--vae_from",
        default=None,
        help="reuse the VAE of this pipeline folder instead of training one (quick experiments)",
    )
    args = parser.parse_args(argv)
    if args.max_train_steps <= 0 or args.vae_steps <= 0 or args.batch_size <= 0:
        raise ValueError("--max_train_steps, --vae_steps and --batch_size must be positive integers")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.snr_gamma < 0 or args.lr_warmup_steps < 0 or args.text_encoder_steps < 0:
        raise ValueError("--snr_gamma, --lr_warmup_steps and --text_encoder_steps must be >= 0")
    return args


def vae_and_latents(args, images: torch.Tensor, log: list):
    """Stage 1: train the VAE (or load ``--vae_from``'s); returns it and the scaled training latents."""
    if not args.vae_from:
        return train_vae(images, args.vae_steps, args.batch_size, args.seed, log)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(args.vae_from, "vae"), local_files_only=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    return vae, latents * vae.config.scaling_factor


def unet_recipe(args) -> dict:
    """The ``train_unet`` keyword arguments shared by both architectures."""
    return {
        "lr_schedule": args.lr_schedule,
        "warmup_steps": args.lr_warmup_steps,
        "ema_decay": args.ema_decay,
        "snr_gamma": args.snr_gamma,
    }


def train_sd15_teacher(args, vae, latents, labels, tokenizer, text_encoder, prompts, common_report: dict) -> None:
    """Stages 2-3 for SD 1.5: pre-train a copy of the text encoder, train the UNet, save ``digits-sd15``."""
    from diffusers import StableDiffusionPipeline

    # SD 1.5 conditions only through cross-attention on the token embeddings; a frozen random CLIP gives
    # prompts that differ by one word nearby embeddings, so by default the text encoder is trained as well
    # (it is tiny), on the prompts and the empty (unconditional) prompt.
    sd15_text_encoder = copy.deepcopy(text_encoder)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=sd15_text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(False),
        scheduler=_stock_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # a copy: calling a fast tokenizer with padding/truncation leaves that state in the saved tokenizer.json
    input_ids = copy.deepcopy(tokenizer)(
        prompts + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    te_log: list = []
    min_distance = None
    if args.text_encoder_steps > 0:
        min_distance = pretrain_text_encoder(
            sd15_text_encoder, input_ids, args.text_encoder_steps, args.learning_rate, args.seed + 3, te_log
        )
    extra_params = []
    if args.train_text_encoder:
        sd15_text_encoder.train().requires_grad_(True)
        extra_params = list(sd15_text_encoder.parameters())

    def cond_sd15(y, drop):
        with torch.set_grad_enabled(bool(args.train_text_encoder)):
            embeds = sd15_text_encoder(input_ids)[0]  # what StableDiffusionPipeline.encode_prompt computes
        e = embeds[y]
        e = torch.where(drop[:, None, None], embeds[10].expand_as(e), e)
        return {"encoder_hidden_states": e}

    extra_report = dict(
        train_text_encoder=bool(args.train_text_encoder),
        text_encoder_steps=args.text_encoder_steps,
        text_encoder_loss=te_log,
        text_encoder_min_prompt_distance=min_distance,
    )
    train_and_save_unet(args, pipe, "sd15", latents, labels, cond_sd15, 1, common_report, extra_report, extra_params)
    sd15_text_encoder.eval().requires_grad_(False)


def train_and_save_unet(
    args,
    pipe,
    arch: str,
    latents,
    labels,
    cond,
    seed_offset: int,
    common_report: dict,
    extra_report: dict,
    extra_params=(),
) -> None:
    """A fresh UNet of ``arch`` trained with :func:`train_unet` (seed ``args.seed + seed_offset``) into ``pipe``,
    then saved as ``digits-<arch>`` with the training report."""
    torch.manual_seed(args.seed)
    pipe.unet = build_unet(arch == "sdxl")
    t1, c1 = time.time(), time.process_time()
    log: list = []
    train_unet(
        pipe.unet,
        latents,
        labels,
        cond,
        args.max_train_steps,
        args.batch_size,
        args.learning_rate,
        args.seed + seed_offset,
        log,
        arch,
        extra_params=extra_params,
        **unet_recipe(args),
    )
    report = dict(
        common_report,
        arch=arch,
        **extra_report,
        unet_seconds=round(time.time() - t1, 1),
        unet_cpu_seconds=round(time.process_time() - c1, 1),
        unet_loss=log,
    )
    save_teacher(pipe, os.path.join(args.output_dir, f"digits-{arch}"), report)
    print(f"{arch} done in {report['unet_seconds']}s", flush=True)


def train_sdxl_teacher(
    args, vae, latents, labels, tokenizer, text_encoder, text_encoder_2, prompts, common_report: dict
) -> None:
    """Stage 4: SDXL with two frozen text encoders and ``text_time`` conditions; saves ``digits-sdxl``."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=build_unet(True),
        scheduler=_stock_scheduler(),
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    # SDXL's force_zeros_for_empty_prompt: the unconditional branch is all-zero embeddings at sampling
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)

    def cond_sdxl(y, drop):
        e, p = embeds[y].clone(), pooled[y].clone()
        e[drop] = 0
        p[drop] = 0
        return {
            "encoder_hidden_states": e,
            "added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids.expand(len(y), -1)},
        }

    train_and_save_unet(args, pipe, "sdxl", latents, labels, cond_sdxl, 2, common_report, {})


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    images, labels = load_digits_split("train")
    t0 = time.time()
    vae_log: list = []
    vae, latents = vae_and_latents(args, images, vae_log)
    vae_time = time.time() - t0
    print(f"vae done in {vae_time:.0f}s, scaling_factor {vae.config.scaling_factor:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer, text_encoder, text_encoder_2 = build_text_encoders(tok_dir, args.seed)
    prompts = [digit_prompt(i) for i in range(10)]
    common_report = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "vae_seconds": round(vae_time, 1),
        "vae_loss": vae_log,
        "vae_scaling_factor": vae.config.scaling_factor,
        "unet_steps": args.max_train_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lr_schedule": args.lr_schedule,
        "lr_warmup_steps": args.lr_warmup_steps,
        "ema_decay": args.ema_decay,
        "snr_gamma": args.snr_gamma,
        "vae_from": args.vae_from,
        "prompt_dropout": PROMPT_DROPOUT,
        "torch_threads": torch.get_num_threads(),
        "train_images": len(labels),
    }
    if args.arch in ("sd15", "both"):
        train_sd15_teacher(args, vae, latents, labels, tokenizer, text_encoder, prompts, common_report)
    if args.arch in ("sdxl", "both"):
        train_sdxl_teacher(args, vae, latents, labels, tokenizer, text_encoder, text_encoder_2, prompts, common_report)


if __name__ == "__main__":
    main()
