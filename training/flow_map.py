"""Flow-map distillation as a library: ``train_flow_map(FlowMapConfig(...))``, a short recipe on the training core.

A two-timed flow-map student phi(z, s, t) = z + (t - s) u(z, s, t) of an SD 1.5 / SDXL teacher (docs/flow_maps.md)
is trained with one of the four losses of :mod:`diffusers_distill.losses` against the teacher's CFG velocity in
rectified-flow time (the exact VP -> RF conversion, Eq. VP2RF). Each iteration:

1. draws prompts, RF times s >= t (a fraction with t = s, where the target is the teacher velocity itself) and the
   state x_s: noised real latents (1 - s) x0 + s eps when images are given, else the target network's own jump
   from pure noise at the teacher's sigma_max to s (prompt-only, data-free training);
2. computes the loss (``--loss itvm | lfmd | meanflow | progressive``) and backpropagates into the trainable
   weights (LoRA adapter + the new jump pathway, or the full UNet);
3. after the optimizer step, updates the *target* EMA (``--target_ema_decay``, the network that computes the
   ITVM / progressive targets) and the evaluation EMA (``--use_ema``, exported and validated).

This module holds only what is the flow map's: its networks (:func:`build_parts`), the step functions
:func:`flow_map_inputs` and :func:`flow_map_step` (each callable alone), the checkpoint contents and the export.
Data, accelerate, checkpoints, resume, EMA, logging, the NaN guard, validation grids and the Hub check come from
:mod:`.core` and :mod:`.checkpointing`. All randomness of an iteration comes from generators seeded by
(seed, step, rank), so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from diffusers_distill.flow_map import (
    JUMP_PATHWAY,
    FlowMapUNet,
    build_flow_map_student,
    forward_ad_attention,
    merge_flow_map_student,
    save_flow_map_lora_student,
    sd_teacher_velocity,
    vp_sigma_range,
)
from diffusers_distill.losses import itvm_loss, lagrangian_flow_map_loss, mean_flow_loss, progressive_flow_map_loss
from diffusers_distill.randomness import rand
from diffusers_distill.schedulers import TwoTimedFlowMapScheduler
from diffusers_distill.teacher import PromptEmbeddings, PromptEncoder, pipeline_arch

from . import core
from .config import ConfigError
from .core import NonFiniteLossError, randn
from .flow_map_config import FlowMapConfig

__all__ = [
    "ConfigError",
    "FlowMapConfig",
    "FlowMapParts",
    "NonFiniteLossError",
    "flow_map_inputs",
    "flow_map_step",
    "sample_flow_map",
    "train_flow_map",
]

logger = logging.getLogger(__name__)
STUDENT_ADAPTER = "default"  # peft's name for the adapter that build_flow_map_student adds


@dataclass
class FlowMapParts:
    """Everything the flow-map step functions use: the student, the frozen teacher, the target EMA, text encoding."""

    model: FlowMapUNet  # the student as u(z, s, t)
    teacher_unet: torch.nn.Module | None  # None for a LoRA student: the teacher is the student with adapters off
    params: list  # the trainable parameters (adapter + pathway, or the whole UNet)
    target: object | None  # diffusers EMAModel of ``params`` for the loss targets (None: the online weights)
    prompt_encoder: PromptEncoder
    embed: core.PromptCache
    vae: torch.nn.Module
    latent_shape: tuple[int, ...]
    sigma_max: float  # the teacher's largest RF time (0.936 for SD): pure noise
    sampler: TwoTimedFlowMapScheduler  # the exported pipeline's scheduler (its grid samples the validation images)
    prediction_type: str
    device: torch.device
    prepared: torch.nn.Module | None = None  # accelerate's (DDP) wrapper of core.TrainingPhase(model), once made

    @property
    def student(self):
        return self.model.unet


# ---------------------------------------------------------------------- step functions
@contextlib.contextmanager
def teacher_network(parts: FlowMapParts):
    """The frozen teacher UNet. A LoRA student shares the teacher's weights (one UNet in memory, as DMD2's shared
    base): with its adapters disabled and no ``timestep_cond`` (the jump pathway is skipped) it *is* the teacher."""
    if parts.teacher_unet is not None:
        yield parts.teacher_unet
        return
    parts.student.disable_adapters()
    try:
        yield parts.student
    finally:
        parts.student.enable_adapters()


@contextlib.contextmanager
def target_weights(parts: FlowMapParts):
    """The target network: the target EMA's weights swapped into the student (or the online weights), no grad."""
    with torch.no_grad(), core.ema_weights(parts.target, parts.params):
        yield


def _velocities(parts: FlowMapParts, config: FlowMapConfig, cond: PromptEmbeddings, uncond: PromptEmbeddings):
    """The three callables of the losses: the student u, the target u_ema and the CFG teacher velocity v."""
    kwargs = cond.unet_kwargs()
    added = kwargs.get("added_cond_kwargs")
    cond_kwargs, uncond_kwargs = kwargs, uncond.unet_kwargs()
    alphas = parts.model.alphas_cumprod

    def student(z, s, t):
        return parts.model(z, s, t, cond.prompt_embeds, added)

    def target(z, s, t):
        with target_weights(parts):
            return parts.model(z, s, t, cond.prompt_embeds, added)

    @torch.no_grad()
    def teacher(z, sigma):
        with teacher_network(parts) as unet:
            return sd_teacher_velocity(
                unet, z, sigma, alphas, cond_kwargs, uncond_kwargs, config.guidance_scale, parts.prediction_type
            )

    return student, target, teacher


def sample_times(batch: int, sigma_max: float, diagonal_fraction: float, rng, device):
    """RF times s >= t in [0, sigma_max]: the sorted pair of two uniforms; a ``diagonal_fraction`` of the pairs
    gets t = s (docs/flow_maps.md: the diagonal pairs carry ITVM's initial-velocity term)."""
    a, b = rand(batch, rng, device) * sigma_max, rand(batch, rng, device) * sigma_max
    s, t = torch.maximum(a, b), torch.minimum(a, b)
    diagonal = rand(batch, rng, device) < diagonal_fraction
    return s, torch.where(diagonal, s, t)


def flow_map_inputs(parts: FlowMapParts, config: FlowMapConfig, accelerator, data, rng):
    """One batch of training inputs: ``(x_s, s, t, cond, uncond)``.

    x_s = (1 - s) x0 + s eps from real latents when the data has images; otherwise (prompts only) the target
    network's jump from pure noise at sigma_max to s, so the student trains on its own marginals.
    """
    batch, device = parts.latent_shape[0], parts.device
    s, t = sample_times(batch, parts.sigma_max, config.diagonal_fraction, rng, device)
    noise = randn(parts.latent_shape, rng, device)
    if data.has_images:
        images, prompts = data.sample_images(batch, rng)
        x0 = core.encode_images(parts.vae, images)
        x_s = (1 - s).view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise
        cond = parts.embed(prompts)
    else:
        cond = parts.embed(data.sample_prompts(batch, rng))
        # pure noise at sigma_max in the scheduler's RF state: |z| ~ sqrt((1 - s)^2 + s^2), as TwoTimedFlowMap's
        # init_noise_sigma (the VP input x_T = eps)
        z = noise * float(((1 - parts.sigma_max) ** 2 + parts.sigma_max**2) ** 0.5)
        start = torch.full_like(s, parts.sigma_max)
        with accelerator.autocast():
            _, target, _ = _velocities(parts, config, cond, cond)
            x_s = z + (s - start).view(-1, 1, 1, 1) * target(z, start, s)
    uncond = parts.prompt_encoder.unconditional_embeddings(cond)
    return x_s.float().contiguous(), s, t, cond, uncond  # contiguous: the JVP of group_norm needs it


def flow_map_loss(parts: FlowMapParts, config: FlowMapConfig, x_s, s, t, cond, uncond) -> torch.Tensor:
    """The configured loss (with graph) of one batch; the JVP losses run with a forward-mode-AD attention."""
    student, target, teacher = _velocities(parts, config, cond, uncond)
    if config.loss == "itvm":
        return itvm_loss(
            student,
            target,
            teacher,
            x_s,
            s,
            t,
            num_nodes=config.itvm_num_nodes,
            initial_weight=config.itvm_initial_weight,
        )
    if config.loss == "progressive":
        return progressive_flow_map_loss(student, target, teacher, x_s, s, t)
    with forward_ad_attention(parts.student):
        if config.loss == "lfmd":
            return lagrangian_flow_map_loss(student, teacher, x_s, s, t)
        return mean_flow_loss(student, teacher, x_s, s, t)


def flow_map_step(parts: FlowMapParts, config: FlowMapConfig, accelerator, data, rng) -> dict:
    """Inputs, loss and backward into the trainable weights for one micro-batch; returns the detached loss."""
    x_s, s, t, cond, uncond = flow_map_inputs(parts, config, accelerator, data, rng)

    def compute_loss():  # run through the prepared module, so that DDP all-reduces the gradients in the backward
        with accelerator.autocast():
            return flow_map_loss(parts, config, x_s, s, t, cond, uncond)

    loss = compute_loss() if parts.prepared is None else parts.prepared(compute_loss)
    accelerator.backward(loss, inputs=parts.params)
    return {"loss": loss.detach()}


# ---------------------------------------------------------------------- building blocks of the recipe
def build_parts(config: FlowMapConfig, accelerator, pipe, resolution: int) -> FlowMapParts:
    """The student on the teacher's UNet (frozen weights in the compute dtype, trainable ones in fp32)."""
    from diffusers.training_utils import EMAModel, cast_training_params

    from diffusers_distill.students import DEFAULT_LORA_TARGET_MODULES

    teacher = pipe.unet.requires_grad_(False)
    student = build_flow_map_student(
        teacher,
        config.student_type,
        jump_embedding_dim=config.jump_embedding_dim,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_target_modules=config.lora_target_modules or DEFAULT_LORA_TARGET_MODULES,
    )
    core.cast_if_needed(teacher, core.weight_dtype(accelerator))
    core.cast_if_needed(student, core.weight_dtype(accelerator))
    cast_training_params(student, dtype=torch.float32)
    student.to(accelerator.device)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params = [p for p in student.parameters() if p.requires_grad]
    if config.student_type == "lora":  # the student holds the teacher's weights: drop the second copy
        pipe.register_modules(unet=None)
        teacher = None
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    model = FlowMapUNet(student, pipe.scheduler.alphas_cumprod, prediction_type).to(accelerator.device)
    target = EMAModel(params, decay=config.target_ema_decay) if config.target_ema_decay > 0 else None
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_size = resolution // vae_scale
    encoder = PromptEncoder(pipe, resolution, config.unconditional)
    return FlowMapParts(
        model=model,
        teacher_unet=teacher,  # None for LoRA: see teacher_network
        params=params,
        target=target,
        prompt_encoder=encoder,
        embed=core.PromptCache(encoder, accelerator.device, config.cache_text_embeddings),
        vae=pipe.vae,
        latent_shape=(config.train_batch_size, student.config.in_channels, latent_size, latent_size),
        sigma_max=vp_sigma_range(pipe.scheduler.alphas_cumprod)[1],
        sampler=TwoTimedFlowMapScheduler.from_config(pipe.scheduler.config, sigma_spacing=config.sigma_spacing),
        prediction_type=prediction_type,
        device=accelerator.device,
    )


def register_checkpoint_hooks(accelerator, parts: FlowMapParts, pipeline_class, ema=None) -> None:
    """accelerate hooks: the student in diffusers formats (LoRA adapter through THE LoRA save path + the pathway
    weight, or a full UNet with ``save_pretrained``) and both EMAs as safetensors, next to accelerate's
    optimizer/scheduler/RNG files."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from diffusers_distill.export import load_lora_adapter, save_lora_adapter
    from diffusers_distill.fileio import atomic_path

    student, is_lora = parts.student, bool(getattr(parts.student, "peft_config", None))
    pathway = parts.student.time_embedding.cond_proj.weight

    def save_hook(models, weights, output_dir):
        weights.clear()  # the prepared student is written below in diffusers formats, not as model.safetensors
        if not accelerator.is_main_process:
            return
        if is_lora:
            folder = os.path.join(output_dir, "student_lora")
            save_lora_adapter(folder, student, STUDENT_ADAPTER, pipeline_class)
            with atomic_path(os.path.join(folder, "pathway.safetensors")) as tmp:
                save_file({f"{JUMP_PATHWAY}.weight": pathway.detach().contiguous()}, tmp)
        else:
            student.save_pretrained(os.path.join(output_dir, "student"))
        if parts.target is not None:
            core.save_ema_state(parts.target, os.path.join(output_dir, "ema_target.safetensors"))
        if ema is not None:
            core.save_ema_state(ema, os.path.join(output_dir, "ema_student.safetensors"))

    def load_hook(models, input_dir):
        models.clear()  # restored below; accelerate must not look for model.safetensors
        with torch.no_grad():
            if is_lora:
                folder = os.path.join(input_dir, "student_lora")
                load_lora_adapter(folder, student, STUDENT_ADAPTER)
                pathway.copy_(load_file(os.path.join(folder, "pathway.safetensors"))[f"{JUMP_PATHWAY}.weight"])
            else:
                loaded = UNet2DConditionModel.from_pretrained(os.path.join(input_dir, "student"))
                student.load_state_dict(loaded.state_dict())
        if parts.target is not None:
            core.load_ema_state(parts.target, os.path.join(input_dir, "ema_target.safetensors"))
        if ema is not None:
            core.load_ema_state(ema, os.path.join(input_dir, "ema_student.safetensors"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def flow_map_pipeline_class(pipe):
    """``FlowMapStableDiffusionPipeline`` or ``FlowMapStableDiffusionXLPipeline`` for the teacher ``pipe``."""
    from diffusers_distill.pipelines.pipeline_flow_map import (
        FlowMapStableDiffusionPipeline,
        FlowMapStableDiffusionXLPipeline,
    )

    return FlowMapStableDiffusionXLPipeline if pipeline_arch(pipe) == "sdxl" else FlowMapStableDiffusionPipeline


def save_student(config: FlowMapConfig, parts: FlowMapParts, pipe, repo_id: str | None = None) -> None:
    """Final export: a LoRA student loads into the teacher pipeline
    (``FlowMap*Pipeline.from_pretrained(teacher, student=output_dir)``); a full student is a complete pipeline
    folder (``FlowMap*Pipeline.from_pretrained(output_dir)``, its UNet loads with plain diffusers). Both sample
    with ``--default_num_inference_steps`` steps on the ``--sigma_spacing`` grid by default; a model card is added."""
    from diffusers_distill.fileio import atomic_directory

    scheduler_config = {"sigma_spacing": config.sigma_spacing}
    if getattr(parts.student, "peft_config", None):
        save_flow_map_lora_student(
            config.output_dir,
            parts.student,
            type(pipe),
            default_num_inference_steps=config.default_num_inference_steps,
            base_model=config.pretrained_teacher_model,
            **scheduler_config,
        )
    else:
        student_pipe = flow_map_pipeline_class(pipe).from_teacher(
            pipe, merge_flow_map_student(parts.student), config.default_num_inference_steps, **scheduler_config
        )
        with atomic_directory(config.output_dir) as staging:
            student_pipe.save_pretrained(staging, safe_serialization=True)
    write_model_card(config, pipeline_arch(pipe), repo_id or config.hub_repo_name())


def write_model_card(config: FlowMapConfig, arch: str, repo_id: str) -> str:
    """``README.md`` of the exported student: how to load and sample it, and how it was trained."""
    from huggingface_hub import ModelCardData

    from diffusers_distill.fileio import atomic_write_text

    family = {"sd15": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"]}[arch]
    tags = ["diffusers", "text-to-image", "distillation", "few-step", "flow-map", config.loss, *family]
    tags += ["lora"] if config.student_type == "lora" else []
    card = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", base_model=config.pretrained_teacher_model, tags=tags
    )
    pipeline = "FlowMapStableDiffusionXLPipeline" if arch == "sdxl" else "FlowMapStableDiffusionPipeline"
    load = (
        f'{pipeline}.from_pretrained("{config.pretrained_teacher_model}", student="{repo_id}")'
        if config.student_type == "lora"
        else f'{pipeline}.from_pretrained("{repo_id}")'
    )
    text = f"""---
{card.to_yaml()}
---

# {repo_id.split("/")[-1]}

A two-timed flow-map student ({config.student_type}) of `{config.pretrained_teacher_model}`, distilled with the
`{config.loss}` loss of diffusers-distill (`training/train_flow_map.py`; teacher CFG {config.guidance_scale:g}
distilled in, {config.max_train_steps} iterations). One network call per step; any step count from 1 up samples the same
model (default {config.default_num_inference_steps}, `{config.sigma_spacing}` grid in rectified-flow time).

```python
from diffusers_distill import {pipeline}

pipe = {load}
image = pipe("a photo of a cat").images[0]                          # {config.default_num_inference_steps} steps
image = pipe("a photo of a cat", num_inference_steps=1).images[0]   # 1 step
```
"""
    return atomic_write_text(os.path.join(config.output_dir, "README.md"), text)


@torch.no_grad()
def sample_flow_map(model: FlowMapUNet, cond: PromptEmbeddings, noise: torch.Tensor, sigmas: list[float]):
    """Latents from ``noise`` by the deterministic jumps sigmas[0] -> sigmas[1] -> ... (gamma = 0), the RF state
    starting at sigmas[0] with the scheduler's scaling (the VP input there is exactly ``noise``)."""
    kwargs = cond.unet_kwargs()
    z = noise * float(((1 - sigmas[0]) ** 2 + sigmas[0] ** 2) ** 0.5)
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        z = model.jump(z, s, t, cond.prompt_embeds, kwargs.get("added_cond_kwargs"))
    return z


def validation_images(parts: FlowMapParts, config: FlowMapConfig, accelerator) -> torch.Tensor:
    """The validation prompts sampled by the student (default step count, the exported pipeline's grid, fixed
    seed) in [0, 1]."""
    prompts = list(config.validation_prompts)
    generator = torch.Generator().manual_seed(config.seed)
    noise = randn((len(prompts), *parts.latent_shape[1:]), generator, parts.device)
    parts.sampler.set_timesteps(config.default_num_inference_steps)
    sigmas = [s for s, _ in parts.sampler.jumps] + [0.0]  # float64 nodes, as the pipeline's steps use them
    with accelerator.autocast():
        latents = sample_flow_map(parts.model, parts.embed(prompts), noise, sigmas)
    return core.decode_latents(parts.vae, latents)


def make_optimizer(config: FlowMapConfig, parts: FlowMapParts, accelerator, total_steps: int):
    """AdamW + LR schedule for the student, prepared by accelerate."""
    lr = core.scaled_learning_rate(config, config.learning_rate, accelerator.num_processes)
    optimizer = core.make_optimizer(parts.params, lr, config)
    return accelerator.prepare(optimizer, core.make_lr_scheduler(optimizer, config, total_steps))


def train_step(
    step: int, parts: FlowMapParts, config: FlowMapConfig, accelerator, data, optimizer, scheduler, ema
) -> dict:
    """One iteration (``gradient_accumulation_steps`` micro-batches), then the optimizer step and both EMAs.
    Returns the loss averaged over the micro-batches (a tensor)."""
    totals: dict[str, torch.Tensor] = {}
    for micro_batch in range(config.gradient_accumulation_steps):
        with accelerator.accumulate(*([] if parts.prepared is None else [parts.prepared])):
            rng = core.step_generator(config.seed, step, accelerator.process_index, micro_batch)
            logs = flow_map_step(parts, config, accelerator, data, rng)
        for name, value in logs.items():
            totals[name] = totals.get(name, 0.0) + value.float() / config.gradient_accumulation_steps
    if core.apply_gradients(accelerator, optimizer, parts.params, config.max_grad_norm):
        if parts.target is not None:
            parts.target.step(parts.params)
        if ema is not None:
            ema.step(parts.params)
    scheduler.step()
    return totals


def train_loop(config, accelerator, parts, data, optimizer, scheduler, ema, start_step: int, total_steps: int):
    """Steps ``start_step .. total_steps`` through the core loop (train, log, NaN guard, checkpoint, validate)."""
    return core.train_loop(
        config,
        accelerator,
        start_step,
        total_steps,
        f"flow map ({config.loss})",
        train_step=lambda step: train_step(step, parts, config, accelerator, data, optimizer, scheduler, ema),
        current_lr=lambda: scheduler.get_last_lr()[0],
        validation_images=lambda: validation_images(parts, config, accelerator),
        ema=ema,
        ema_params=parts.params,
    )


# ---------------------------------------------------------------------- the recipe
def train_flow_map(config: FlowMapConfig) -> dict:
    """Run flow-map distillation; returns ``{"global_step", "losses" (list of dicts), "output_dir", ...}``.

    Per-step losses are also written to ``<output_dir>/losses.jsonl``.
    """
    from diffusers.training_utils import EMAModel

    # 1. Check every option before anything is loaded.
    config.validate()
    # 2-4. accelerate, logging, seed, Hub check, data, and the teacher; then the student on its UNet.
    accelerator, repo_id, data, pipe = core.start_run(config)
    parts = build_parts(config, accelerator, pipe, data.resolution)
    # 5. Optimizer and learning-rate schedule.
    total_steps = core.num_training_steps(config, len(data.prompts), accelerator.num_processes)
    optimizer, scheduler = make_optimizer(config, parts, accelerator, total_steps)
    parts.prepared = accelerator.prepare(core.TrainingPhase(parts.model))  # DDP with several processes
    # 6. Evaluation EMA, checkpoint hooks, resume.
    ema = EMAModel(parts.params, decay=config.ema_decay) if config.use_ema else None
    register_checkpoint_hooks(accelerator, parts, type(pipe), ema)
    start_step = core.resume_from_checkpoint(accelerator, config)
    # 7. Trackers and the prompt cache.
    core.start_tracking(config, accelerator, parts.embed, data.prompts)
    # 8. Train.
    history = train_loop(config, accelerator, parts, data, optimizer, scheduler, ema, start_step, total_steps)

    # 9. Export the (EMA) student and upload it.
    def export():
        with core.ema_weights(ema, parts.params):
            save_student(config, parts, pipe, repo_id)
        if repo_id is not None:
            from diffusers_distill import hub

            marker = "flow_map_config.json" if config.student_type == "lora" else "model_index.json"
            hub.push_student_to_hub(
                config.output_dir,
                repo_id,
                token=config.hub_token,
                required_file=marker,
                commit_message="Upload flow-map student",
                write_card=False,
            )

    return core.finish_run(config, accelerator, parts, data, history, start_step, export)
