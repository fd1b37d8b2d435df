"""DMD2 training loop as a library: ``train_dmd2(DMD2Config(...))``.

Implements Algorithm 1 of DMD2 (Yin et al., NeurIPS 2024, arXiv 2405.14867) as the reference code does it
(see ``docs/dmd2.md``): per iteration the generator produces a sample (1-step from noise, or N-step with
backward simulation); on generator turns (one per ``dfake_gen_update_ratio`` iterations, the two time-scale update
rule) it is updated with the distribution-matching loss (+ optional GAN loss); every iteration the fake score
(+ GAN head) is updated with the denoising loss on the detached sample (+ optional discriminator loss).

Engineering choices beyond the reference code:

* models are not wrapped in DDP (roles share one base UNet and run several forwards per backward); gradients of
  the trainable parameters are averaged across processes by hand before each optimizer step;
* all randomness of an iteration comes from generators seeded by (seed, step, rank), so a resumed run
  reproduces the uninterrupted one exactly, whatever the RNG state;
* checkpoints go through ``accelerator.save_state`` into ``checkpoint-N.tmp`` and are renamed when complete; the
  save hook writes LoRA adapters in diffusers format (``pytorch_lora_weights.safetensors``), full UNet copies with
  ``save_pretrained`` and the GAN head as safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import typing
from dataclasses import dataclass

import torch

from diffusers_distill.losses import (
    distribution_matching_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from diffusers_distill.students import (
    DEFAULT_LORA_TARGET_MODULES,
    FAKE_ADAPTER,
    GENERATOR_ADAPTER,
    build_dmd2_networks,
    generator_input,
    generator_timesteps,
    sample_student,
)
from diffusers_distill.teacher import DiffusionTeacher, PromptEmbeddings

from .data import load_data

__all__ = ["DMD2Config", "train_dmd2", "find_latest_checkpoint", "NonFiniteLossError"]

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN/inf; the last good checkpoint is left in place."""


@dataclass
class DMD2Config:
    """All options of ``train_dmd2``; field names are the CLI flag names (``--field_name``)."""

    pretrained_teacher_model: str = ""
    revision: str | None = None
    output_dir: str = "dmd2-distilled"
    logging_dir: str = "logs"
    # data
    prompt_file: str | None = None
    train_data_dir: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_train_samples: int | None = None
    resolution: int = 512
    # student
    student_type: str = "lora"
    fake_score_type: str = "lora"
    num_inference_steps: int = 1
    conditioning_timestep: int = 999
    denoising_timesteps: list[int] | None = None
    backward_simulation: bool = True
    lora_rank: int = 64
    lora_alpha: float | None = 8.0
    fake_lora_rank: int = 64
    fake_lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None
    # DMD2 losses
    real_guidance_scale: float = 1.75
    unconditional: str = "auto"
    dfake_gen_update_ratio: int = 10
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    dm_loss_weight: float = 1.0
    gen_cls_loss_weight: float = 0.0
    guidance_cls_loss_weight: float = 0.0
    diffusion_gan_max_timestep: int = 1000
    # optimisation
    train_batch_size: int = 1
    max_train_steps: int = 1000
    learning_rate: float = 1e-5
    guidance_learning_rate: float | None = None
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 10.0
    use_ema: bool = False
    ema_decay: float = 0.999
    use_8bit_adam: bool = False
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cache_text_embeddings: bool = False
    seed: int = 0
    # checkpoints, logging, validation, hub
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: list[str] | None = None
    validation_steps: int = 200
    report_to: str = "tensorboard"
    tracker_project_name: str = "dmd2"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None

    # ------------------------------------------------------------------ helpers
    @classmethod
    def from_file(cls, path: str, **overrides) -> "DMD2Config":
        """Load a preset (``.json``, or ``.yaml``/``.yml``), then apply ``overrides``."""
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml  # accelerate depends on pyyaml

                values = yaml.safe_load(f) or {}
            elif path.endswith(".json"):
                values = json.load(f)
            else:
                raise ValueError(f"config must be a .json, .yaml or .yml file, got {path!r}")
        values.update(overrides)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in config {path}: {sorted(unknown)}")
        return cls(**values)

    def timesteps(self) -> list[int]:
        if self.denoising_timesteps:
            return list(self.denoising_timesteps)
        return generator_timesteps(self.num_inference_steps, self.conditioning_timestep)

    def validate(self) -> None:
        """Raise ValueError on bad options, before any work is done."""
        choices = {
            "student_type": ("lora", "full"),
            "fake_score_type": ("lora", "full"),
            "mixed_precision": ("no", "fp16", "bf16"),
            "unconditional": ("auto", "empty", "zeros"),
            "report_to": ("tensorboard", "wandb", "all", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.pretrained_teacher_model:
            raise ValueError("pretrained_teacher_model is required (a Hub id or a local pipeline folder)")
        positive = ("resolution", "train_batch_size", "max_train_steps", "num_inference_steps",
                    "dfake_gen_update_ratio", "checkpointing_steps", "validation_steps", "lora_rank",
                    "fake_lora_rank")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not 0.0 <= self.min_step_percent < self.max_step_percent <= 1.0:
            raise ValueError("need 0 <= min_step_percent < max_step_percent <= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        steps = self.timesteps()
        if len(steps) != self.num_inference_steps:
            raise ValueError(f"denoising_timesteps must have num_inference_steps={self.num_inference_steps} entries")
        if any(not 0 <= t < 1000 for t in steps) or steps != sorted(steps, reverse=True):
            raise ValueError(f"denoising_timesteps must be decreasing values in [0, 999], got {steps}")
        uses_gan = self.gen_cls_loss_weight > 0 or self.guidance_cls_loss_weight > 0
        has_images = bool(self.train_data_dir or self.dataset_name)
        if not (self.prompt_file or has_images):
            raise ValueError("give prompt_file, train_data_dir or dataset_name")
        if uses_gan and not has_images:
            raise ValueError(
                "the GAN losses (gen_cls_loss_weight/guidance_cls_loss_weight > 0) need real images: "
                "pass train_data_dir or dataset_name, or set both weights to 0"
            )
        if self.num_inference_steps > 1 and not self.backward_simulation and not has_images:
            raise ValueError(
                "backward_simulation=False (noised real latents as input) needs train_data_dir or dataset_name"
            )
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(
                f"resume_from_checkpoint must be 'latest' or an existing folder, got {self.resume_from_checkpoint!r}"
            )
        if self.report_to == "wandb" and self.hub_token is not None:
            raise ValueError("do not combine report_to=wandb with hub_token (the token would be logged)")


# ---------------------------------------------------------------------- checkpoints
def _checkpoint_steps(output_dir: str) -> list[int]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if m)


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-N`` with the largest N (``*.tmp`` folders are half-written and ignored)."""
    steps = _checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def _prune_checkpoints(output_dir: str, keep: int) -> None:
    for step in _checkpoint_steps(output_dir)[: max(0, len(_checkpoint_steps(output_dir)) - keep)]:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"))


def _save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        if total_limit is not None:
            _prune_checkpoints(output_dir, total_limit - 1)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)  # atomic on POSIX: "latest" never sees a half-written checkpoint
    accelerator.wait_for_everyone()
    return final


def _lora_layers(unet, adapter_name: str) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))


def _save_lora_adapter(folder: str, unet, adapter_name: str, pipeline_class) -> None:
    pipeline_class.save_lora_weights(
        folder,
        unet_lora_layers=_lora_layers(unet, adapter_name),
        unet_lora_adapter_metadata=unet.peft_config[adapter_name].to_dict(),
    )


def _load_lora_adapter(folder: str, unet, adapter_name: str) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected LoRA keys in {folder}: {result.unexpected_keys[:5]}")


def _register_checkpoint_hooks(accelerator, networks, pipeline_class, ema=None) -> None:
    """accelerate hooks: trainable weights in diffusers formats next to accelerate's optimizer/scheduler/RNG.

    The generator EMA (diffusers' ``EMAModel``) goes into ``ema_generator.safetensors`` by hand: registering it with
    ``accelerator.register_for_checkpointing`` would pickle it, and checkpoints here are safetensors only.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        if networks.generator_is_lora:
            folder = os.path.join(output_dir, "generator_lora")
            _save_lora_adapter(folder, networks.base_unet, GENERATOR_ADAPTER, pipeline_class)
        else:
            networks.generator_unet.save_pretrained(os.path.join(output_dir, "generator"))
        if networks.fake_is_lora:
            _save_lora_adapter(os.path.join(output_dir, "fake_lora"), networks.base_unet, FAKE_ADAPTER, pipeline_class)
        else:
            networks.fake_unet.save_pretrained(os.path.join(output_dir, "fake"))
        if networks.gan_head is not None:
            state = {k: v.contiguous() for k, v in networks.gan_head.state_dict().items()}
            save_file(state, os.path.join(output_dir, "gan_head.safetensors"))
        if ema is not None:
            shadow = {f"shadow.{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)}
            save_file(shadow, os.path.join(output_dir, "ema_generator.safetensors"),
                      metadata={"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)})

    def load_hook(models, input_dir):
        from diffusers import UNet2DConditionModel

        if networks.generator_is_lora:
            _load_lora_adapter(os.path.join(input_dir, "generator_lora"), networks.base_unet, GENERATOR_ADAPTER)
        else:
            loaded = UNet2DConditionModel.from_pretrained(os.path.join(input_dir, "generator"))
            networks.generator_unet.load_state_dict(loaded.state_dict())
        if networks.fake_is_lora:
            _load_lora_adapter(os.path.join(input_dir, "fake_lora"), networks.base_unet, FAKE_ADAPTER)
        else:
            loaded = UNet2DConditionModel.from_pretrained(os.path.join(input_dir, "fake"))
            networks.fake_unet.load_state_dict(loaded.state_dict())
        if networks.gan_head is not None:
            networks.gan_head.load_state_dict(load_file(os.path.join(input_dir, "gan_head.safetensors")))
        if ema is not None:
            path = os.path.join(input_dir, "ema_generator.safetensors")
            if not os.path.isfile(path):
                raise ValueError(f"use_ema is set but the checkpoint {input_dir} has no ema_generator.safetensors")
            with safe_open(path, framework="pt", device=str(ema.shadow_params[0].device)) as f:
                for i, p in enumerate(ema.shadow_params):
                    p.copy_(f.get_tensor(f"shadow.{i}"))
                ema.optimization_step = int(f.metadata()["optimization_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------- small pieces of the loop
def _step_generator(seed: int, step: int, rank: int | None) -> torch.Generator:
    """Generator for one iteration; rank=None gives a stream shared by all processes."""
    salt = 0 if rank is None else rank + 1
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63))


def _randn(shape, generator, device):
    return torch.randn(shape, generator=generator).to(device)


def _randint(low, high, size, generator, device):
    return torch.randint(low, high, (size,), generator=generator).to(device)


def _average_gradients(params, accelerator) -> None:
    """All-reduce (mean) the gradients of ``params`` across processes (written by hand: the networks are not
    DDP-wrapped because several roles share one UNet and run more than one forward per backward)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


@contextlib.contextmanager
def _checkpointing_disabled(unet):
    """Temporarily turn off gradient checkpointing: with a shared LoRA base, a recomputation during backward
    would run with whichever adapter is active then, not the one of the forward."""
    modules = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in modules:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in modules:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def _ema_weights(ema, params):
    """Temporarily put the EMA weights into ``params`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _make_optimizer(params, lr: float, config: DMD2Config):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`") from err
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )  # fmt: skip


def _optimizer_step(accelerator, optimizer, loss, params, max_grad_norm) -> None:
    accelerator.backward(loss)
    _average_gradients(params, accelerator)
    accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _Embedder:
    """Prompt -> embeddings, with an optional cache (``cache_text_embeddings``)."""

    def __init__(self, teacher: DiffusionTeacher, device, cache: bool):
        self.teacher, self.device, self.cache = teacher, device, {} if cache else None

    def __call__(self, prompts: list[str]) -> PromptEmbeddings:
        if self.cache is None:
            return self.teacher.encode_prompts(prompts, device=self.device)
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            encoded = self.teacher.encode_prompts(missing, device=self.device)
            for i, prompt in enumerate(missing):
                self.cache[prompt] = encoded.index(slice(i, i + 1))
        return PromptEmbeddings.cat([self.cache[p] for p in prompts])


@torch.no_grad()
def _encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def _decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    return (images.float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]


def _log_validation(accelerator, config, networks, teacher, embed, timesteps, step) -> str:
    """Sample the validation prompts with a fixed seed; log a grid to the trackers and save it as PNG."""
    import numpy as np
    from PIL import Image

    prompts = list(config.validation_prompts)
    shape = (len(prompts), 4, teacher.latent_size, teacher.latent_size)
    generator = torch.Generator().manual_seed(config.seed)
    noise = _randn(shape, generator, accelerator.device)
    with accelerator.autocast():
        latents = sample_student(networks, teacher, embed(prompts), timesteps, noise, generator)
    images = _decode_latents(teacher.pipeline.vae, latents).permute(0, 2, 3, 1).cpu().numpy()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=p) for img, p in zip(images, prompts)]}, step=step)
    grid = (np.concatenate(list(images), axis=1) * 255).round().astype("uint8")
    folder = os.path.join(config.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step}.png")
    Image.fromarray(grid).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    return path


def _student_config(config: DMD2Config, teacher: DiffusionTeacher, timesteps: list[int]):
    from diffusers_distill.export import StudentConfig

    return StudentConfig(
        arch=teacher.arch, student_type=config.student_type, num_inference_steps=len(timesteps),
        timesteps=list(timesteps), guidance_scale=0.0, base_model=config.pretrained_teacher_model,
        conditioning_timestep=timesteps[0], prediction_type=teacher.prediction_type,
    )  # fmt: skip


def _save_student(config, networks, teacher, timesteps) -> None:
    """Final export through ``diffusers_distill.export`` (LoRA file, or a native full pipeline folder)."""
    from diffusers_distill import export

    pipe = teacher.pipeline
    student_config = _student_config(config, teacher, timesteps)
    if networks.generator_is_lora:
        export.save_lora_student(config.output_dir, networks.base_unet, GENERATOR_ADAPTER, type(pipe), student_config)
    else:
        networks.teacher()  # adapters off: the saved teacher components must be the plain base
        export.save_full_student(config.output_dir, pipe, networks.generator_unet, student_config)


def _load_teacher_pipeline(config: DMD2Config, device, weight_dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(config.pretrained_teacher_model, revision=config.revision)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.requires_grad_(False).to(dtype=weight_dtype)
    pipe.vae.requires_grad_(False).to(dtype=torch.float32)  # VAE kept in fp32 (SDXL's VAE overflows in fp16)
    return pipe


def _flat_tracker_config(config: DMD2Config) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(config).items()
            if k != "hub_token"}  # fmt: skip


# ---------------------------------------------------------------------- the loop
def train_dmd2(config: DMD2Config) -> dict:
    """Run DMD2 distillation; returns ``{"global_step", "losses" (list of dicts), "output_dir"}``.

    Per-step losses are also appended to ``<output_dir>/losses.jsonl``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from tqdm.auto import tqdm

    config.validate()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        ),
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    set_seed(config.seed)  # identical initial weights (LoRA init, GAN head) on every process

    data = load_data(
        config.resolution, config.prompt_file, config.train_data_dir, config.dataset_name,
        config.dataset_config_name, config.image_column, config.caption_column, config.max_train_samples,
    )  # fmt: skip
    pipe = _load_teacher_pipeline(config, device, weight_dtype)
    teacher = DiffusionTeacher(pipe, config.resolution, config.unconditional)
    timesteps = config.timesteps()
    uses_gan = config.gen_cls_loss_weight > 0 or config.guidance_cls_loss_weight > 0
    unet = pipe.unet
    feature_size = teacher.latent_size // 2 ** (len(unet.config.block_out_channels) - 1)
    networks = build_dmd2_networks(
        unet, config.student_type, config.fake_score_type, config.lora_rank, config.lora_alpha,
        config.fake_lora_rank, config.fake_lora_alpha, config.lora_target_modules or DEFAULT_LORA_TARGET_MODULES,
        gan_feature_size=feature_size if uses_gan else None,
    )  # fmt: skip
    networks.base_unet.to(dtype=weight_dtype)  # frozen weights in the compute dtype ...
    cast_training_params(networks.base_unet, dtype=torch.float32)  # ... trainable adapters in fp32
    networks.to(device)
    if config.gradient_checkpointing:
        for module in (networks.base_unet, networks.generator_unet, networks.fake_unet):
            if module is not None:
                module.enable_gradient_checkpointing()
    generator_params = networks.generator_parameters()
    critic_params = networks.critic_parameters()

    optimizer_g = _make_optimizer(generator_params, config.learning_rate, config)
    optimizer_c = _make_optimizer(critic_params, config.guidance_learning_rate or config.learning_rate, config)
    schedulers = [
        get_scheduler(config.lr_scheduler, opt, num_warmup_steps=config.lr_warmup_steps,
                      num_training_steps=config.max_train_steps)
        for opt in (optimizer_g, optimizer_c)
    ]  # fmt: skip
    optimizer_g, optimizer_c, scheduler_g, scheduler_c = accelerator.prepare(optimizer_g, optimizer_c, *schedulers)
    # An EMA of the generator's trainable weights (full UNet or its LoRA adapter), updated after each generator step;
    # the exported student and the validation grids use it.
    ema = EMAModel(generator_params, decay=config.ema_decay) if config.use_ema else None
    _register_checkpoint_hooks(accelerator, networks, type(pipe), ema)

    global_step = 0
    if config.resume_from_checkpoint:
        path = (find_latest_checkpoint(config.output_dir) if config.resume_from_checkpoint == "latest"
                else config.resume_from_checkpoint)  # fmt: skip
        if path is None:
            logger.warning("resume_from_checkpoint=latest but no checkpoint in %s: starting fresh", config.output_dir)
        else:
            accelerator.load_state(path)
            global_step = int(CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path))).group(1))
            logger.info("resumed from %s at step %d", path, global_step)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=_flat_tracker_config(config))

    embed = _Embedder(teacher, device, config.cache_text_embeddings)
    if config.cache_text_embeddings:
        for start in range(0, len(data.prompts), 64):
            embed(data.prompts[start : start + 64])
    min_step = int(config.min_step_percent * teacher.num_train_timesteps)
    max_step = int(config.max_step_percent * teacher.num_train_timesteps)
    batch = config.train_batch_size
    latent_shape = (batch, unet.config.in_channels, teacher.latent_size, teacher.latent_size)
    losses_path = os.path.join(config.output_dir, "losses.jsonl")
    history: list[dict] = []
    last_checkpoint = find_latest_checkpoint(config.output_dir)
    progress = tqdm(range(global_step, config.max_train_steps), initial=global_step, total=config.max_train_steps,
                    desc="DMD2", disable=not accelerator.is_local_main_process)  # fmt: skip

    for step in progress:
        rng = _step_generator(config.seed, step, accelerator.process_index)
        shared_rng = _step_generator(config.seed, step, None)
        generator_turn = step % config.dfake_gen_update_ratio == 0
        prompts = data.sample_prompts(batch, rng)
        cond = embed(prompts)
        logs: dict[str, float] = {}

        # ---- generator forward (DMD2 Alg. 1; backward simulation for N steps, Sec. 4.4)
        noise = _randn(latent_shape, rng, device)
        k = int(torch.randint(len(timesteps), (1,), generator=shared_rng)) if len(timesteps) > 1 else 0
        if k > 0 and not config.backward_simulation:
            real, _ = data.sample_images(batch, rng)
            t_in = torch.full((batch,), timesteps[k], device=device, dtype=torch.long)
            x_in = teacher.add_noise(_encode_images(pipe.vae, real), _randn(latent_shape, rng, device), t_in)
        else:
            x_in, t_in = generator_input(networks, teacher, noise, cond, timesteps, k, rng)
        with accelerator.autocast(), torch.set_grad_enabled(generator_turn):
            x0 = teacher.predict_x0(networks.generator(), x_in, t_in, cond)

        # ---- generator update: distribution matching (+ GAN) loss
        if generator_turn:
            t_dm = _randint(min_step, max_step + 1, batch, rng, device)
            x_t = teacher.add_noise(x0.detach(), _randn(latent_shape, rng, device), t_dm)
            with torch.no_grad(), accelerator.autocast():
                uncond = teacher.unconditional_embeddings(cond)
                x0_real = teacher.guided_x0(networks.teacher(), x_t, t_dm, cond, uncond, config.real_guidance_scale)
                x0_fake = teacher.predict_x0(networks.fake(), x_t, t_dm, cond)
            loss_dm = distribution_matching_loss(x0, x0_real, x0_fake)
            loss_g = config.dm_loss_weight * loss_dm
            logs["loss_dm"] = loss_dm.detach()
            if config.gen_cls_loss_weight > 0:
                s = _randint(0, config.diffusion_gan_max_timestep, batch, rng, device)
                x_s = teacher.add_noise(x0, _randn(latent_shape, rng, device), s)
                with accelerator.autocast(), _checkpointing_disabled(networks.base_unet):
                    loss_gan = gan_generator_loss(networks.classify(teacher, x_s, s, cond))
                loss_g = loss_g + config.gen_cls_loss_weight * loss_gan
                logs["loss_gen_gan"] = loss_gan.detach()
            networks.generator()  # the generator's adapter must be active if checkpointed blocks recompute
            optimizer_g.zero_grad(set_to_none=True)
            _optimizer_step(accelerator, optimizer_g, loss_g, generator_params, config.max_grad_norm)
            if ema is not None:
                ema.step(generator_params)
        scheduler_g.step()

        # ---- critic update: fake-score denoising (+ discriminator) loss on the detached sample
        x0_sample = x0.detach()
        t_f = _randint(0, teacher.num_train_timesteps, batch, rng, device)
        noise_f = _randn(latent_shape, rng, device)
        with accelerator.autocast():
            fake_out = teacher.predict(networks.fake(), teacher.add_noise(x0_sample, noise_f, t_f), t_f, cond)
        loss_fake = fake_score_loss(fake_out, teacher.denoising_target(x0_sample, noise_f, t_f))
        loss_c = loss_fake
        logs["loss_fake"] = loss_fake.detach()
        if config.guidance_cls_loss_weight > 0:
            real_images, captions = data.sample_images(batch, rng)
            real_latents = _encode_images(pipe.vae, real_images)
            s_fake = _randint(0, config.diffusion_gan_max_timestep, batch, rng, device)
            s_real = _randint(0, config.diffusion_gan_max_timestep, batch, rng, device)
            with accelerator.autocast():
                x_fake = teacher.add_noise(x0_sample, _randn(latent_shape, rng, device), s_fake)
                x_real = teacher.add_noise(real_latents, _randn(latent_shape, rng, device), s_real)
                loss_d = gan_discriminator_loss(
                    networks.classify(teacher, x_fake, s_fake, cond),
                    networks.classify(teacher, x_real, s_real, embed(captions)),
                )
            loss_c = loss_c + config.guidance_cls_loss_weight * loss_d
            logs["loss_disc"] = loss_d.detach()
        networks.fake()
        optimizer_c.zero_grad(set_to_none=True)  # drop gradients the generator's GAN loss left on the critic
        _optimizer_step(accelerator, optimizer_c, loss_c, critic_params, config.max_grad_norm)
        scheduler_c.step()

        # ---- bookkeeping
        names = sorted(logs)
        values = accelerator.reduce(torch.stack([logs[n].float() for n in names]).to(device), reduction="mean")
        record = {"step": step + 1, **{n: float(v) for n, v in zip(names, values.tolist())}}
        if not all(math.isfinite(record[n]) for n in names):
            raise NonFiniteLossError(
                f"non-finite loss at step {step + 1}: {record}. Training stopped; the last good checkpoint is "
                f"{last_checkpoint or '(none saved yet)'}; resume from it with a lower learning rate or fp32."
            )
        history.append(record)
        global_step = step + 1
        progress.set_postfix({n: f"{record[n]:.4g}" for n in names})
        if accelerator.is_main_process:
            with open(losses_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({**{n: record[n] for n in names}, "lr": scheduler_c.get_last_lr()[0]}, step=global_step)
        if global_step % config.checkpointing_steps == 0:
            last_checkpoint = _save_checkpoint(
                accelerator, config.output_dir, global_step, config.checkpoints_total_limit
            )
        if config.validation_prompts and global_step % config.validation_steps == 0 and accelerator.is_main_process:
            with _ema_weights(ema, generator_params):
                _log_validation(accelerator, config, networks, teacher, embed, timesteps, global_step)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if data.num_skipped_images:
            logger.warning("skipped %d unreadable images", data.num_skipped_images)
        with _ema_weights(ema, generator_params):
            _save_student(config, networks, teacher, timesteps)
        if config.push_to_hub:
            from diffusers_distill.hub import push_student_to_hub

            repo_id = config.hub_model_id or os.path.basename(os.path.normpath(config.output_dir))
            push_student_to_hub(config.output_dir, repo_id, token=config.hub_token)
    with torch.no_grad():  # identical on every process when gradients were averaged correctly
        generator_checksum = float(sum(p.double().sum() for p in generator_params))
    accelerator.end_training()
    num_processes = accelerator.num_processes
    # Let a later train_dmd2 call in the same process use another mixed_precision (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    return {
        "global_step": global_step, "losses": history, "output_dir": config.output_dir,
        "num_skipped_images": data.num_skipped_images, "num_processes": num_processes,
        "generator_checksum": generator_checksum,
    }  # fmt: skip


def config_field_types() -> dict[str, typing.Any]:
    """Resolved type hints of ``DMD2Config`` (for building a CLI)."""
    return typing.get_type_hints(DMD2Config)

