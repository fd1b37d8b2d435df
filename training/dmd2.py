"""DMD2 distillation as a library: ``train_dmd2(DMD2Config(...))``, a short recipe on the training core.

Implements Algorithm 1 of DMD2 (Yin et al., NeurIPS 2024, arXiv 2405.14867) as the reference code does it
(see ``docs/dmd2.md``): each iteration the generator produces a sample (1-step from noise, or N-step with backward
simulation); on generator turns (one per ``dfake_gen_update_ratio`` iterations, the two time-scale update rule) it
is updated with the distribution-matching loss (+ optional GAN loss); every iteration the fake score (+ GAN head)
is updated with the denoising loss on the detached sample (+ optional discriminator loss).

This module holds only what is DMD2's: its networks (:mod:`diffusers_distill.students`), the step functions
:func:`generator_forward`, :func:`generator_step` and :func:`fake_score_step` (each callable alone), the checkpoint
contents and the export. Data, accelerate, checkpoints, resume, EMA, logging, the NaN guard, validation grids and
the Hub push come from :mod:`.core` and :mod:`.checkpointing`. All randomness of an iteration comes from generators
seeded by (seed, step, rank), so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch

from diffusers_distill.losses import (
    distribution_matching_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    teacher_regression_loss,
)
from diffusers_distill.noise_schedule import NoiseSchedule
from diffusers_distill.students import (
    DEFAULT_LORA_TARGET_MODULES,
    FAKE_SCORE_ADAPTER,
    GENERATOR_ADAPTER,
    DMD2Networks,
    build_dmd2_networks,
    generator_input,
    sample_student,
)
from diffusers_distill.teacher import PromptEncoder, guided_x0, predict_x0, unet_output

from . import core
from .checkpointing import find_latest_checkpoint
from .config import ConfigError
from .core import NonFiniteLossError, randint, randn
from .dmd2_config import DMD2Config

__all__ = [
    "ConfigError",
    "DMD2Config",
    "DMD2Parts",
    "NonFiniteLossError",
    "fake_score_step",
    "find_latest_checkpoint",
    "generator_forward",
    "generator_step",
    "train_dmd2",
]

logger = logging.getLogger(__name__)


@dataclass
class DMD2Parts:
    """Everything the DMD2 step functions use: the networks, the teacher's noise schedule and text encoding."""

    networks: DMD2Networks
    schedule: NoiseSchedule
    prompt_encoder: PromptEncoder
    embed: core.PromptCache
    vae: torch.nn.Module
    timesteps: list[int]
    latent_shape: tuple[int, ...]
    device: torch.device
    # role -> the prepared module whose forward runs that role's phase (see _distributed), once made
    prepared: dict[str, torch.nn.Module] | None = None
    fsdp: bool = False  # accelerate shards the networks with FSDP (full layouts; one prepared root per role)


def _distributed(parts: DMD2Parts, role: str):
    """The module whose forward runs ``role``'s training phase: ``core.TrainingPhase(networks)``, DDP-wrapped when
    prepared (both roles share it); under FSDP one FSDP root per role (see :func:`prepare_networks`).

    DDP design (docs/dmd2.md, "Distributed training"): the generator phase and the fake-score phase each make ONE
    call of the prepared module, whose outputs depend on exactly the parameters that phase trains: the generator's
    output x0 (generator phase; the fake score's passes for the losses run outside it, without gradient to their
    weights) and the fake score's loss (fake phase; x0 is detached there). With ``find_unused_parameters=True``
    DDP marks the other role's parameters unused at that forward, keeps their gradients untouched (globally unused)
    and all-reduces the phase's own. Wrapping the UNet per role is impossible in the shared-base LoRA layout (both
    adapters live in one module), and ``static_graph`` cannot hold since the used parameters alternate by phase.
    """
    return core.TrainingPhase(parts.networks) if parts.prepared is None else parts.prepared[role]


def _run_phase(parts: DMD2Parts, role: str, compute):
    """``compute()`` as the forward of ``role``'s prepared module (see :func:`_distributed`)."""
    phase = _distributed(parts, role)
    result = phase(compute)
    if parts.fsdp:  # FSDP leaves a root's own weights gathered after its forward; shard them again, so that the
        phase.reshard()  # parameter lists read later (EMA, clipping, export) are the shards the optimizer steps
    return result


def _in_phase(parts: DMD2Parts, role: str, compute):
    """``compute()``, run inside ``role``'s FSDP root under FSDP (so that the root's shards are all-gathered for it,
    on every process), else directly: for the calls outside a training phase (backward simulation, the fake score's
    passes in the generator loss, validation)."""
    return _run_phase(parts, role, compute) if parts.fsdp else compute()


# ---------------------------------------------------------------------- step functions
def generator_forward(parts: DMD2Parts, config: DMD2Config, accelerator, data, rng, shared_rng, with_grad: bool):
    """Sample prompts and the generator's input (DMD2 Sec. 4.4) and run the generator: ``(x0, prompt embeddings,
    step index k, (x_t, t) the generator's input)``.

    ``shared_rng`` (identical on all processes) picks which of the N steps (k) is trained this iteration.
    """
    batch, device, steps = parts.latent_shape[0], parts.device, parts.timesteps
    cond = parts.embed(data.sample_prompts(batch, rng))
    noise = randn(parts.latent_shape, rng, device)
    k = int(torch.randint(len(steps), (1,), generator=shared_rng)) if len(steps) > 1 else 0
    if k > 0 and not config.backward_simulation:
        real, _ = data.sample_images(batch, rng)
        t_in = torch.full((batch,), steps[k], device=device, dtype=torch.long)
        fresh = randn(parts.latent_shape, rng, device)
        x_in = parts.schedule.add_noise(core.encode_images(parts.vae, real), fresh, t_in)
    else:
        x_in, t_in = _in_phase(
            parts, "generator", lambda: generator_input(parts.networks, parts.schedule, noise, cond, steps, k, rng)
        )

    def run_generator():
        with accelerator.autocast(), torch.set_grad_enabled(with_grad), parts.networks.role("generator") as generator:
            return predict_x0(generator, parts.schedule, x_in, t_in, cond)

    return _run_phase(parts, "generator", run_generator), cond, k, (x_in, t_in)


def _checkpointing_disabled(unet):
    """Gradient checkpointing off: with a shared LoRA base, a recomputation during backward would run with whichever
    adapter is active then, not the one of the forward (used for the GAN head's pass through the fake score)."""
    modules = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]

    @contextlib.contextmanager
    def context():
        for m in modules:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in modules:
                m.gradient_checkpointing = True

    return context()


def _backward(parts: DMD2Parts, accelerator, loss, role: str) -> None:
    """Backward of a phase's loss into ``role``'s parameters, with the role active (checkpointed LoRA blocks recompute
    with whichever adapter is active). Without FSDP, ``inputs=`` keeps every other role's weights out of it; FSDP's
    sharded parameters cannot be named there, and each phase's graph reaches only its role's weights: the generator
    loss's real and fake passes run without gradient (its GAN term goes through x0), the fake-score loss sees a
    detached x0."""
    nets = parts.networks
    with nets.role(role):
        accelerator.backward(loss, **({} if parts.fsdp else {"inputs": nets.parameters_of(role)}))


def teacher_regression_step(parts: DMD2Parts, config: DMD2Config, accelerator, x0, cond, inputs) -> dict:
    """Generator loss of a step k >= ``--teacher_regression_from_step``: ``x0`` regressed onto the teacher's CFG x0
    prediction at the same input ``inputs = (x_t, t)`` (ours, docs/dmd2.md, "Multi-step students"); backward into
    the generator. Returns the detached loss."""
    x_t, t = inputs
    with torch.no_grad(), accelerator.autocast(), parts.networks.role("real_score") as teacher:
        uncond = parts.prompt_encoder.unconditional_embeddings(cond)
        x0_teacher = guided_x0(teacher, parts.schedule, x_t, t, cond, uncond, config.real_guidance_scale)
    loss = teacher_regression_loss(x0, x0_teacher)
    _backward(parts, accelerator, loss, "generator")
    return {"loss_teacher_regression": loss.detach()}


def generator_step(parts: DMD2Parts, config: DMD2Config, accelerator, x0, cond, rng, k: int = 0, inputs=None) -> dict:
    """Generator loss on ``x0`` (made by step ``k`` from ``inputs = (x_t, t)``, with graph): distribution matching
    (DMD2 eq. 2) + optional GAN term, or for the steps from ``--teacher_regression_from_step`` on the regression
    onto the teacher (:func:`teacher_regression_step`); backward into the generator's parameters only. Returns the
    detached losses."""
    if config.teacher_regression_from_step is not None and k >= config.teacher_regression_from_step:
        return teacher_regression_step(parts, config, accelerator, x0, cond, inputs)
    nets, schedule, device, batch = parts.networks, parts.schedule, parts.device, x0.shape[0]
    min_step = int(config.min_step_percent * schedule.num_train_timesteps)
    max_step = int(config.max_step_percent * schedule.num_train_timesteps)
    if config.dm_timesteps_below_input:
        max_step = max(min_step, min(max_step, parts.timesteps[k]))
    t_dm = randint(min_step, max_step + 1, batch, rng, device)
    x_t = schedule.add_noise(x0.detach(), randn(x0.shape, rng, device), t_dm)
    with torch.no_grad(), accelerator.autocast():
        uncond = parts.prompt_encoder.unconditional_embeddings(cond)
        with nets.role("real_score") as real_score:
            x0_real = guided_x0(real_score, schedule, x_t, t_dm, cond, uncond, config.real_guidance_scale)

        def fake_x0():
            with nets.role("fake_score") as fake_score:
                return predict_x0(fake_score, schedule, x_t, t_dm, cond)

        x0_fake = _in_phase(parts, "fake_score", fake_x0)
    loss_dm = distribution_matching_loss(x0, x0_real, x0_fake)
    loss, logs = config.dm_loss_weight * loss_dm, {"loss_dm": loss_dm.detach()}
    if config.generator_gan_loss_weight > 0:
        s = randint(0, config.diffusion_gan_max_timestep, batch, rng, device)
        x_s = schedule.add_noise(x0, randn(x0.shape, rng, device), s)

        def gan_loss():
            with accelerator.autocast(), _checkpointing_disabled(nets.base_unet):
                return gan_generator_loss(nets.gan_logits(x_s, s, cond))

        loss_gan = _in_phase(parts, "fake_score", gan_loss)
        logs["loss_gen_gan"] = loss_gan.detach()
        if parts.fsdp:
            # backward's ``inputs=`` cannot name FSDP's sharded parameters, so the GAN gradient reaches the
            # generator through x0 alone: d(loss_gan)/d(x0) (no weight gradient for the fake score), then x0 . g
            (grad_x0,) = torch.autograd.grad(config.generator_gan_loss_weight * loss_gan, x0)
            loss = loss + (x0 * grad_x0).sum()
        else:
            loss = loss + config.generator_gan_loss_weight * loss_gan
    _backward(parts, accelerator, loss, "generator")
    return logs


def fake_score_step(parts: DMD2Parts, config: DMD2Config, accelerator, data, x0, cond, rng) -> dict:
    """Fake-score loss on the detached sample: denoising (DMD2 Sec. 4.1) + optional discriminator loss on real
    images (Sec. 4.2); backward into the fake score and GAN head. Returns the detached losses."""
    nets, schedule, device = parts.networks, parts.schedule, parts.device
    x0, batch = x0.detach(), x0.shape[0]

    def fake_score_loss_and_logs():  # one forward of the prepared networks (see _distributed)
        t = randint(0, schedule.num_train_timesteps, batch, rng, device)
        noise = randn(x0.shape, rng, device)
        with accelerator.autocast(), nets.role("fake_score") as fake_score:
            output = unet_output(fake_score, schedule.add_noise(x0, noise, t), t, cond)
        loss_fake = fake_score_loss(output, schedule.denoising_target(x0, noise, t))
        loss, logs = loss_fake, {"loss_fake": loss_fake.detach()}
        if config.fake_score_gan_loss_weight > 0:
            real_images, captions = data.sample_images(batch, rng)
            real_latents = core.encode_images(parts.vae, real_images)
            s_fake = randint(0, config.diffusion_gan_max_timestep, batch, rng, device)
            s_real = randint(0, config.diffusion_gan_max_timestep, batch, rng, device)
            with accelerator.autocast():
                x_fake = schedule.add_noise(x0, randn(x0.shape, rng, device), s_fake)
                x_real = schedule.add_noise(real_latents, randn(x0.shape, rng, device), s_real)
                fake_logits = nets.gan_logits(x_fake, s_fake, cond)
                real_logits = nets.gan_logits(x_real, s_real, parts.embed(captions))
                loss_disc = gan_discriminator_loss(fake_logits, real_logits)
            loss = loss + config.fake_score_gan_loss_weight * loss_disc
            logs["loss_disc"] = loss_disc.detach()
        return loss, logs

    loss, logs = _run_phase(parts, "fake_score", fake_score_loss_and_logs)
    _backward(parts, accelerator, loss, "fake_score")
    return logs


# ---------------------------------------------------------------------- building blocks of the recipe
def build_parts(config: DMD2Config, accelerator, pipe, resolution: int) -> DMD2Parts:
    """The DMD2 networks on the teacher's UNet (frozen weights in the compute dtype, trainable ones in fp32)."""
    from diffusers.training_utils import cast_training_params

    unet, vae_scale = pipe.unet, 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_size = resolution // vae_scale
    feature_size = latent_size // 2 ** (len(unet.config.block_out_channels) - 1)
    networks = build_dmd2_networks(
        unet,
        config.student_type,
        config.fake_score_type,
        config.lora_rank,
        config.lora_alpha,
        config.fake_lora_rank,
        config.fake_lora_alpha,
        config.lora_target_modules or DEFAULT_LORA_TARGET_MODULES,
        gan_feature_size=feature_size if config.uses_gan else None,
        num_fake_score_steps=len(config.timesteps()) if config.fake_score_step_conditioning else 0,
    )
    core.cast_if_needed(networks.base_unet, core.weight_dtype(accelerator))  # frozen weights in the compute dtype ...
    cast_training_params(networks.base_unet, dtype=torch.float32)  # ... trainable adapters in fp32
    networks.to(accelerator.device)
    if config.gradient_checkpointing:
        for module in (networks.base_unet, networks.generator_unet, networks.fake_score_unet):
            if module is not None:
                module.enable_gradient_checkpointing()
    encoder = PromptEncoder(pipe, resolution, config.unconditional)
    return DMD2Parts(
        networks=networks,
        schedule=NoiseSchedule.from_scheduler_config(pipe.scheduler.config),
        prompt_encoder=encoder,
        embed=core.PromptCache(encoder, accelerator.device, config.cache_text_embeddings),
        vae=pipe.vae,
        timesteps=config.timesteps(),
        latent_shape=(config.train_batch_size, unet.config.in_channels, latent_size, latent_size),
        device=accelerator.device,
        fsdp=core.uses_fsdp(accelerator),  # only the full layouts get here under FSDP (DMD2Config.fsdp_unsupported)
    )


def _extra_fake_score_modules(networks: DMD2Networks):
    """The fake score's modules outside any UNet (checkpoint file name, module)."""
    modules = (("gan_head", networks.gan_head), ("fake_score_step_embedding", networks.fake_score_step_embedding))
    return [(name, module) for name, module in modules if module is not None]


def register_checkpoint_hooks(accelerator, networks: DMD2Networks, pipeline_class, ema=None, fsdp=False) -> None:
    """accelerate hooks: the trainable weights in diffusers formats next to accelerate's optimizer/scheduler/RNG
    files: LoRA adapters through THE LoRA save path, full UNets with ``save_pretrained``, the GAN head and the EMA
    as safetensors. Under FSDP accelerate writes the sharded roots and optimizers itself (its FSDP checkpoint
    files, read back with ``torch.load(weights_only=True)``); the hooks add the EMA, gathered from its shards."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from diffusers_distill.export import load_lora_adapter, save_lora_adapter

    roles = (("generator", GENERATOR_ADAPTER), ("fake_score", FAKE_SCORE_ADAPTER))

    def save_hook(models, weights, output_dir):
        weights.clear()  # the prepared networks are written below in diffusers formats, not as model.safetensors
        if fsdp:  # every process takes part in gathering the EMA's shards; the main one writes
            if ema is not None:
                path = os.path.join(output_dir, "ema_generator.safetensors")
                core.save_ema_state(ema, path if accelerator.is_main_process else None)
            return
        if not accelerator.is_main_process:
            return
        for role, adapter in roles:
            if networks.unet(role) is networks.base_unet:
                save_lora_adapter(os.path.join(output_dir, f"{role}_lora"), networks.base_unet, adapter, pipeline_class)
            else:
                networks.unet(role).save_pretrained(os.path.join(output_dir, role))
        for name, module in _extra_fake_score_modules(networks):
            state = {k: v.contiguous() for k, v in module.state_dict().items()}
            save_file(state, os.path.join(output_dir, f"{name}.safetensors"))
        if ema is not None:
            core.save_ema_state(ema, os.path.join(output_dir, "ema_generator.safetensors"))

    def load_hook(models, input_dir):
        models.clear()  # restored below; accelerate must not look for model.safetensors
        if fsdp:  # accelerate loaded its FSDP files into the sharded roots
            if ema is not None:
                core.load_ema_state(ema, os.path.join(input_dir, "ema_generator.safetensors"))
            return
        for role, adapter in roles:
            if networks.unet(role) is networks.base_unet:
                load_lora_adapter(os.path.join(input_dir, f"{role}_lora"), networks.base_unet, adapter)
            else:
                loaded = UNet2DConditionModel.from_pretrained(os.path.join(input_dir, role))
                networks.unet(role).load_state_dict(loaded.state_dict())
        for name, module in _extra_fake_score_modules(networks):
            module.load_state_dict(load_file(os.path.join(input_dir, f"{name}.safetensors")))
        if ema is not None:
            core.load_ema_state(ema, os.path.join(input_dir, "ema_generator.safetensors"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def gather_student(parts: DMD2Parts, ema) -> dict[str, torch.Tensor] | None:
    """Under FSDP (every process calls this): the full generator UNet's (EMA) weights, gathered from the shards for
    :func:`save_student`; None otherwise (the export reads the unsharded networks)."""
    if not parts.fsdp:
        return None
    with core.ema_weights(ema, parts.networks.parameters_of("generator")):
        return core.full_state_dict(parts.networks.generator_unet)


def save_student(config: DMD2Config, parts: DMD2Parts, pipe, generator_state: dict | None = None) -> None:
    """Final export through :mod:`diffusers_distill.export` (LoRA file, or a native full pipeline folder);
    ``generator_state``: the full generator's weights gathered by :func:`gather_student` (FSDP)."""
    from diffusers import UNet2DConditionModel

    from diffusers_distill import export

    networks, timesteps = parts.networks, parts.timesteps
    student_config = export.StudentConfig(
        arch=parts.prompt_encoder.arch,
        student_type=config.student_type,
        num_inference_steps=len(timesteps),
        timesteps=list(timesteps),
        guidance_scale=0.0,
        base_model=config.pretrained_teacher_model,
        conditioning_timestep=timesteps[0],
        prediction_type=parts.schedule.prediction_type,
    )
    if networks.generator_is_lora:
        export.save_lora_student(config.output_dir, networks.base_unet, GENERATOR_ADAPTER, type(pipe), student_config)
    else:
        generator = networks.generator_unet
        if generator_state is not None:  # FSDP: a plain UNet with the gathered weights
            generator = UNet2DConditionModel.from_config(generator.config)
            generator.load_state_dict(generator_state)
        with networks.role("real_score"):  # adapters off: the saved teacher components must be the plain base
            export.save_full_student(config.output_dir, pipe, generator, student_config)


def validation_images(parts: DMD2Parts, config: DMD2Config, accelerator) -> torch.Tensor:
    """The validation prompts sampled by the student with a fixed seed, decoded to [0, 1]."""
    prompts = list(config.validation_prompts)
    shape = (len(prompts), *parts.latent_shape[1:])
    generator = torch.Generator().manual_seed(config.seed)
    noise = randn(shape, generator, parts.device)
    embeddings = parts.embed(prompts)

    def sample():
        return sample_student(parts.networks, parts.schedule, embeddings, parts.timesteps, noise, generator)

    with accelerator.autocast():
        latents = _in_phase(parts, "generator", sample)
    return core.decode_latents(parts.vae, latents)


def prepare_networks(config: DMD2Config, parts: DMD2Parts, accelerator, total_steps: int):
    """AdamW + LR schedule for the generator and for the fake score; the networks, optimizers and schedules
    prepared by accelerate (sets ``parts.prepared``). Returns ``(optimizers, schedulers)``, each (generator, fake).

    DDP (or one process): one ``core.TrainingPhase(networks)`` for both roles (see :func:`_distributed`). FSDP: one
    root per role, each prepared together with its optimizer (FSDP2 swaps the optimizer's parameters for the
    shards, and accelerate's FSDP checkpoints pair the i-th model with the i-th optimizer): the generator UNet, and
    the fake score UNet with the GAN head and step embedding. The frozen real score (the teacher) is not sharded.
    """
    nets, optimizers, schedulers = parts.networks, [], []
    for role, lr in (("generator", config.learning_rate), ("fake_score", config.fake_score_learning_rate)):
        lr = core.scaled_learning_rate(config, config.learning_rate if lr is None else lr, accelerator.num_processes)
        optimizer = core.make_optimizer(nets.parameters_of(role), lr, config)
        optimizers.append(optimizer)
        schedulers.append(core.make_lr_scheduler(optimizer, config, total_steps))
    if not parts.fsdp:
        prepared = accelerator.prepare(core.TrainingPhase(nets), *optimizers, *schedulers)  # DDP with several processes
        parts.prepared = {"generator": prepared[0], "fake_score": prepared[0]}
        return prepared[1:3], prepared[3:]
    fake = [m for m in (nets.fake_score_unet, nets.fake_score_step_embedding, nets.gan_head) if m is not None]
    roots = (("generator", nets.generator_unet), ("fake_score", torch.nn.ModuleList(fake)))
    parts.prepared = {}
    for i, (role, module) in enumerate(roots):
        parts.prepared[role], optimizers[i], schedulers[i] = accelerator.prepare(
            core.TrainingPhase(module), optimizers[i], schedulers[i]
        )
    return optimizers, schedulers


def train_step(step: int, parts: DMD2Parts, config: DMD2Config, accelerator, data, optimizers, schedulers, ema) -> dict:
    """One DMD2 iteration (``gradient_accumulation_steps`` micro-batches): generator update on its turns (TTUR),
    fake-score update always. Returns the losses averaged over the micro-batches (tensors)."""
    generator_turn = step % config.dfake_gen_update_ratio == 0
    totals: dict[str, torch.Tensor] = {}
    prepared = [] if parts.prepared is None else list({id(m): m for m in parts.prepared.values()}.values())
    for micro_batch in range(config.gradient_accumulation_steps):
        with accelerator.accumulate(*prepared):
            rng = core.step_generator(config.seed, step, accelerator.process_index, micro_batch)
            shared_rng = core.step_generator(config.seed, step, None, micro_batch)
            x0, cond, k, inputs = generator_forward(parts, config, accelerator, data, rng, shared_rng, generator_turn)
            with parts.networks.sample_step(k):  # the fake score's step condition, when it has one
                logs = generator_step(parts, config, accelerator, x0, cond, rng, k, inputs) if generator_turn else {}
                logs.update(fake_score_step(parts, config, accelerator, data, x0, cond, rng))
        for name, value in logs.items():
            totals[name] = totals.get(name, 0.0) + value.float() / config.gradient_accumulation_steps
    generator_params = parts.networks.parameters_of("generator")
    (optimizer_g, optimizer_f), (scheduler_g, scheduler_f) = optimizers, schedulers
    if generator_turn and core.apply_gradients(accelerator, optimizer_g, generator_params, config.max_grad_norm):
        if ema is not None:
            ema.step(generator_params)
    scheduler_g.step()
    core.apply_gradients(accelerator, optimizer_f, parts.networks.parameters_of("fake_score"), config.max_grad_norm)
    scheduler_f.step()
    return totals


def train_loop(config, accelerator, parts, data, optimizers, schedulers, ema, start_step: int, total_steps: int):
    """Steps ``start_step .. total_steps`` through the core loop (train, log, NaN guard, checkpoint, validate)."""
    return core.train_loop(
        config,
        accelerator,
        start_step,
        total_steps,
        "DMD2",
        train_step=lambda step: train_step(step, parts, config, accelerator, data, optimizers, schedulers, ema),
        current_lr=lambda: schedulers[1].get_last_lr()[0],
        validation_images=lambda: validation_images(parts, config, accelerator),
        ema=ema,
        ema_params=parts.networks.parameters_of("generator"),
    )


# ---------------------------------------------------------------------- the recipe
def train_dmd2(config: DMD2Config) -> dict:
    """Run DMD2 distillation; returns ``{"global_step", "losses" (list of dicts), "output_dir", ...}``.

    Per-step losses are also written to ``<output_dir>/losses.jsonl``.
    """
    from diffusers.training_utils import EMAModel

    # 1. Check every option before anything is loaded.
    config.validate()
    # 2-4. accelerate, logging, seed, Hub check, data, and the teacher; then the DMD2 networks on its UNet.
    accelerator, repo_id, data, pipe = core.start_run(config)
    parts = build_parts(config, accelerator, pipe, data.resolution)
    # 5. Optimizers and learning-rate schedules; the networks prepared (DDP with several processes, or FSDP).
    total_steps = core.num_training_steps(config, len(data.prompts), accelerator.num_processes)
    optimizers, schedulers = prepare_networks(config, parts, accelerator, total_steps)
    # 6. EMA of the generator, checkpoint hooks, resume.
    generator_params = parts.networks.parameters_of("generator")
    ema = EMAModel(generator_params, decay=config.ema_decay) if config.use_ema else None
    register_checkpoint_hooks(accelerator, parts.networks, type(pipe), ema, fsdp=parts.fsdp)
    start_step = core.resume_from_checkpoint(accelerator, config)
    # 7. Trackers and the prompt cache.
    core.start_tracking(config, accelerator, parts.embed, data.prompts)
    # 8. Train.
    history = train_loop(config, accelerator, parts, data, optimizers, schedulers, ema, start_step, total_steps)

    # 9. Export the (EMA) student and upload it.
    def export(generator_state=None):
        with core.ema_weights(ema, generator_params):
            save_student(config, parts, pipe, generator_state)
        if repo_id is not None:
            from diffusers_distill import hub

            hub.push_student_to_hub(config.output_dir, repo_id, token=config.hub_token)

    gather = functools.partial(gather_student, parts, ema)  # the gathered FSDP weights, or None
    return core.finish_run(config, accelerator, parts, data, history, start_step, export, gather)
