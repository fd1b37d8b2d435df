"""The training core shared by the distillers (DMD2 now, the flow-map distiller next).

A method supplies its networks, losses and step functions; everything else lives here: the accelerate setup,
teacher loading, data, optimizers and schedules, gradient application, per-step randomness, the EMA, checkpoint
hooks, the losses log and the NaN guard, validation grids, the export and the Hub push. Each piece is a small
function, so a training recipe reads like diffusers' example scripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings

import torch

from diffusers_distill.fileio import atomic_path, atomic_write_text
from diffusers_distill.randomness import randint, randn
from diffusers_distill.teacher import PromptEmbeddings, PromptEncoder

from .config import ConfigError, TrainingConfig
from .data import load_data

__all__ = [
    "LossLog",
    "NonFiniteLossError",
    "PromptCache",
    "apply_gradients",
    "cast_if_needed",
    "check_finite",
    "decode_latents",
    "ema_weights",
    "encode_images",
    "full_state_dict",
    "load_ema_state",
    "load_teacher_pipeline",
    "load_training_data",
    "make_accelerator",
    "make_lr_scheduler",
    "make_optimizer",
    "num_training_steps",
    "prepare_hub",
    "reduce_logs",
    "resume_from_checkpoint",
    "randint",
    "randn",
    "save_ema_state",
    "save_validation_grid",
    "setup_logging",
    "step_generator",
    "uses_fsdp",
]

logger = logging.getLogger(__name__)

# Messages that carry no information for the user of a training script (filtered by exact text, nothing else):
# transformers names every image processor that would prefer torchvision when importing the pipelines.
_UNINFORMATIVE = (r".*requires torchvision \(not installed\); falling back.*",)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss becomes NaN/inf; the last good checkpoint is left in place."""


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        import re

        return not any(re.match(pattern, record.getMessage()) for pattern in _UNINFORMATIVE)


def setup_logging(accelerator=None) -> None:
    """diffusers-script logging: INFO lines from our loggers, warnings from the libraries (errors only on
    non-main processes), and the few known uninformative messages dropped at their logger."""
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    main = accelerator is None or accelerator.is_local_main_process
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_warning() if main else library.utils.logging.set_verbosity_error()
    for name in ("transformers", "transformers.utils.import_utils"):
        logging.getLogger(name).addFilter(_DropMessages())
    for pattern in _UNINFORMATIVE:
        warnings.filterwarnings("ignore", message=pattern)


# ---------------------------------------------------------------------- setup
def make_accelerator(config: TrainingConfig, find_unused_parameters: bool = False):
    """``Accelerator`` with diffusers' project layout (logs under output_dir) and gradient accumulation.

    ``find_unused_parameters`` is passed to DDP: a method whose training phases each update a different subset of
    the prepared module's parameters (DMD2: generator, then fake score) needs it, so that DDP marks the other
    subset ready at once instead of waiting for gradients that never come.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    accelerator = Accelerator(
        kwargs_handlers=[ddp_kwargs],
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)
        ),
    )
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    return accelerator


def uses_fsdp(accelerator) -> bool:
    """Whether accelerate shards the prepared networks with FSDP (an ``accelerate launch`` FSDP config)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP-sharded ``DTensor`` (a collective: every process must call it) or a tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with FSDP shards gathered into full CPU tensors. Under FSDP every process must call
    it (it all-gathers); written by hand because torch's ``get_model_state_dict`` expects the FSDP root, while the
    exports and checkpoints here need one role's UNet."""
    return {name: _full(value).detach().cpu() for name, value in module.state_dict().items()}


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen weights under ``--mixed_precision``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_if_needed(module, dtype) -> None:
    """``module.to(dtype)`` only when its dtype differs (diffusers warns about "modules kept in float32: []" on
    every dtype cast)."""
    if module.dtype != dtype:
        module.to(dtype=dtype)


def load_teacher_pipeline(config: TrainingConfig, device, dtype):
    """The frozen teacher pipeline on ``device``: text encoders in ``dtype``, the VAE in fp32 (SDXL's VAE
    overflows in fp16), no safety checker, no progress bars."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        config.teacher_path, revision=config.revision, variant=config.variant, cache_dir=config.cache_dir
    )
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.requires_grad_(False)
            cast_if_needed(encoder, dtype)
    pipe.vae.requires_grad_(False)
    cast_if_needed(pipe.vae, torch.float32)
    if config.enable_xformers_memory_efficient_attention:
        pipe.unet.enable_xformers_memory_efficient_attention()
    return pipe


def teacher_resolution(pipe, requested: int | None) -> int:
    """``requested`` or the teacher's native size (``unet.sample_size * vae scale``); warns when they differ."""
    native = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if requested is None:
        logger.info("--resolution not given: using the teacher's native %d", native)
        return int(native)
    if requested != native:
        logger.warning(
            "--resolution %d differs from the teacher's native %d: the student trains off-size", requested, native
        )
    return requested


def load_training_data(config: TrainingConfig, resolution: int):
    """Prompts (and real images) from the configured sources; data errors become one-line ``ConfigError``s."""
    try:
        return load_data(
            resolution,
            config.prompt_file,
            config.train_data_dir,
            config.dataset_name,
            config.dataset_config_name,
            config.image_column,
            config.caption_column,
            config.max_train_samples,
            cache_dir=config.cache_dir,
            num_workers=config.dataloader_num_workers,
        )
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(str(error).splitlines()[0] if str(error) else repr(error)) from error


# ---------------------------------------------------------------------- optimisation
def num_training_steps(config: TrainingConfig, num_prompts: int, num_processes: int) -> int:
    """``--max_train_steps``, else ``--num_train_epochs`` passes over the prompts with the global batch."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    global_batch = config.train_batch_size * num_processes * config.gradient_accumulation_steps
    return config.num_train_epochs * math.ceil(num_prompts / global_batch)


def scaled_learning_rate(config: TrainingConfig, learning_rate: float, num_processes: int) -> float:
    """``--scale_lr``: multiply by accumulation steps x batch size x processes (diffusers' rule)."""
    if not config.scale_lr:
        return learning_rate
    return learning_rate * config.gradient_accumulation_steps * config.train_batch_size * num_processes


def make_optimizer(params, lr: float, config: TrainingConfig):
    """AdamW (or bitsandbytes' 8-bit AdamW) with the configured betas, weight decay and epsilon."""
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    betas = (config.adam_beta1, config.adam_beta2)
    return optimizer_class(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def make_lr_scheduler(optimizer, config: TrainingConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=config.lr_num_cycles,
    )


def apply_gradients(accelerator, optimizer, params, max_grad_norm: float) -> bool:
    """At the end of a gradient-accumulation cycle: clip, step, zero; returns whether it stepped.

    Averaging across processes is not done here: the trainable networks are ``accelerator.prepare``d, so DDP (or
    FSDP) all-reduces the gradients during the backward pass, and ``accelerator.accumulate(model)`` skips that
    all-reduce on the micro-batches that only accumulate.
    """
    if not accelerator.sync_gradients:
        return False
    if uses_fsdp(accelerator):
        # torch's clipping handles FSDP's sharded gradients itself. accelerate's clip_grad_norm_ is not used here: it
        # finds the model by comparing parameter lists with ==, which raises for two models with as many parameters
        # (the generator's and the fake score's full UNets).
        accelerator.unscale_gradients()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def step_generator(seed: int, step: int, rank: int | None, micro_batch: int = 0) -> torch.Generator:
    """CPU generator of one (micro-)step; ``rank=None`` gives a stream shared by all processes. Seeding from
    (seed, step, rank) instead of a global RNG state makes a resumed run repeat the uninterrupted one exactly."""
    salt = 0 if rank is None else rank + 1
    value = seed * 1_000_003 + step * 7919 + salt * 104_729 + micro_batch * 15_485_863
    return torch.Generator().manual_seed(value % (2**63))


# ---------------------------------------------------------------------- EMA
@contextlib.contextmanager
def ema_weights(ema, params):
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


def save_ema_state(ema, path: str | None) -> None:
    """diffusers' ``EMAModel`` shadow weights as safetensors (registering the EMA for accelerate's checkpointing
    would pickle it; checkpoints here are safetensors only). Under FSDP every process calls this (the shards are
    gathered) and only the one given a ``path`` writes."""
    from safetensors.torch import save_file

    shadow = {f"shadow.{i}": _full(p).detach().contiguous() for i, p in enumerate(ema.shadow_params)}
    if path is None:
        return
    metadata = {"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)}
    with atomic_path(path) as tmp:
        save_file(shadow, tmp, metadata=metadata)


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this process's FSDP shard when ``like`` is a ``DTensor``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full


def load_ema_state(ema, path: str) -> None:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"--use_ema is set but the checkpoint has no {os.path.basename(path)}: {path}")
    with safe_open(path, framework="pt", device=str(ema.shadow_params[0].device)) as f:
        for i, p in enumerate(ema.shadow_params):
            p.copy_(_shard_like(f.get_tensor(f"shadow.{i}"), p))
        ema.optimization_step = int(f.metadata()["optimization_step"])


# ---------------------------------------------------------------------- prompts and latents
class PromptCache:
    """Prompt -> embeddings, optionally cached per prompt (``--cache_text_embeddings``)."""

    def __init__(self, encoder: PromptEncoder, device, cache: bool):
        self.encoder, self.device, self.cache = encoder, device, {} if cache else None

    def __call__(self, prompts: list[str]) -> PromptEmbeddings:
        if self.cache is None:
            return self.encoder(prompts, device=self.device)
        missing = sorted({p for p in prompts if p not in self.cache})
        if missing:
            encoded = self.encoder(missing, device=self.device)
            for i, prompt in enumerate(missing):
                self.cache[prompt] = encoded.index(slice(i, i + 1))
        return PromptEmbeddings.cat([self.cache[p] for p in prompts])

    def warm_up(self, prompts: list[str], batch_size: int = 64) -> None:
        if self.cache is not None:
            for start in range(0, len(prompts), batch_size):
                self(prompts[start : start + batch_size])


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (the VAE mode; SD3-style shift applied when configured)."""
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    return (images.float().clamp(-1, 1) + 1) / 2


# ---------------------------------------------------------------------- logging, NaN guard, validation
class LossLog:
    """``<output_dir>/losses.jsonl``: one row per step. On resume, rows after the resumed step (written by the
    interrupted run) are dropped first, so the file never repeats a step."""

    def __init__(self, output_dir: str, start_step: int, enabled: bool):
        self.path = os.path.join(output_dir, "losses.jsonl")
        self.enabled = enabled
        if enabled and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            atomic_write_text(self.path, "".join(kept))

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def check_finite(record: dict, last_checkpoint: str | None) -> None:
    """The NaN guard: raise :class:`NonFiniteLossError` naming the last good checkpoint."""
    if not all(math.isfinite(v) for k, v in record.items() if k != "step"):
        raise NonFiniteLossError(
            f"non-finite loss at step {record['step']}: {record}. Training stopped; the last good checkpoint is "
            f"{last_checkpoint or '(none saved yet)'}; resume from it with a lower learning rate or fp32."
        )


def save_validation_grid(accelerator, images: torch.Tensor, prompts: list[str], output_dir: str, step: int) -> str:
    """Log ``images`` ((B, 3, H, W) in [0, 1]) to the trackers and save them side by side as
    ``validation/step-N.png``; returns the PNG path."""
    import numpy as np
    from PIL import Image

    array = images.permute(0, 2, 3, 1).cpu().numpy()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", array, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=p) for img, p in zip(array, prompts)]}, step=step)
    grid = (np.concatenate(list(array), axis=1) * 255).round().astype("uint8")
    path = os.path.join(output_dir, "validation", f"step-{step}.png")
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp)
    return path


# ---------------------------------------------------------------------- the loop, resume, logs, Hub (any recipe)
class TrainingPhase(torch.nn.Module):
    """A recipe's training phase as the ``forward`` of one module, so that ``accelerator.prepare`` can wrap it.

    A distillation step calls its networks several times (student, EMA target, teacher; or several roles), so there
    is no single forward to hand to DDP. ``TrainingPhase(module)(compute)`` runs ``compute()`` as this module's
    forward: DDP then all-reduces, during the backward, the gradients of the parameters of ``module`` that the
    returned loss depends on (use ``find_unused_parameters=True`` when a phase trains only some of them).
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, compute, *args, **kwargs):
        return compute(*args, **kwargs)


def end_training(accelerator, parts) -> None:
    """End a run: drop the prepared (DDP) wrapper of ``parts.prepared`` and accelerate's references to it, collect
    them, then let accelerate end the run (trackers, process group).

    The order matters: a DDP reducer freed only after the process group is destroyed can deadlock in gloo's
    ProcessGroup destructor once the other rank has exited (seen with torch 2.13 in the 2-process tests), so the
    wrapper is released while the group is alive. Written by hand: ``accelerator.end_training`` does not free models.
    """
    parts.prepared = None
    accelerator.free_memory()  # clears accelerate's model/optimizer references and runs the garbage collector
    accelerator.end_training()


def train_loop(
    config: TrainingConfig,
    accelerator,
    start_step: int,
    total_steps: int,
    desc: str,
    train_step,
    current_lr,
    validation_images,
    ema=None,
    ema_params=(),
) -> list[dict]:
    """Steps ``start_step .. total_steps`` of any recipe: ``train_step(step)`` returns the step's loss tensors; they are
    averaged over processes, logged (``losses.jsonl``, the tracker with ``current_lr()``, the progress bar) and checked
    for NaN; then checkpoints every ``checkpointing_steps``, and every ``validation_steps`` a grid of
    ``validation_images()`` sampled with the EMA weights of ``ema_params``. Returns the logged records."""
    from tqdm.auto import tqdm

    from .checkpointing import find_latest_checkpoint, save_checkpoint

    loss_log = LossLog(config.output_dir, start_step, accelerator.is_main_process)
    last_checkpoint, history = find_latest_checkpoint(config.output_dir), []
    progress = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        desc=desc,
        disable=not accelerator.is_local_main_process,
    )
    for step in progress:
        record = reduce_logs(accelerator, step + 1, train_step(step))
        check_finite(record, last_checkpoint)
        history.append(record)
        loss_log.append(record)
        progress.set_postfix({n: f"{v:.4g}" for n, v in record.items() if n != "step"})
        accelerator.log({**record, "lr": current_lr()}, step=step + 1)
        if (step + 1) % config.checkpointing_steps == 0:
            last_checkpoint = save_checkpoint(accelerator, config.output_dir, step + 1, config.checkpoints_total_limit)
        # FSDP: every process samples (the sharded weights are all-gathered), the main one saves
        sampling = accelerator.is_main_process or uses_fsdp(accelerator)
        if config.validation_prompts and (step + 1) % config.validation_steps == 0 and sampling:
            with ema_weights(ema, ema_params):
                images = validation_images()
            if accelerator.is_main_process:
                save_validation_grid(accelerator, images, config.validation_prompts, config.output_dir, step + 1)
    return history


def resume_from_checkpoint(accelerator, config: TrainingConfig) -> int:
    """Load ``--resume_from_checkpoint`` (the recipe's registered hooks restore its networks); returns the step to
    continue from (0 without a checkpoint)."""
    from .checkpointing import checkpoint_step, resolve_resume_checkpoint

    path = resolve_resume_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if path is None:
        return 0
    step = checkpoint_step(path)
    logger.info("resuming from %s at step %d", os.path.basename(os.path.normpath(path)), step)
    accelerator.load_state(path)
    return step


def reduce_logs(accelerator, step: int, logs: dict) -> dict:
    """Per-process loss tensors -> ``{"step": step, name: mean over processes (float)}``."""
    names = sorted(logs)
    values = accelerator.reduce(torch.stack([logs[n] for n in names]).to(accelerator.device), reduction="mean")
    return {"step": step, **{n: float(v) for n, v in zip(names, values.tolist())}}


def prepare_hub(config: TrainingConfig, accelerator) -> str | None:
    """With ``--push_to_hub``: check the token and create the repo now (main process), not after training;
    returns the repo id (None without ``--push_to_hub`` or on other processes)."""
    if not (config.push_to_hub and accelerator.is_main_process):
        return None
    from diffusers_distill import hub

    try:
        repo_id = hub.prepare_hub_repo(config.hub_repo_name(), token=config.hub_token)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    default = "" if config.hub_model_id else " (the name of --output_dir; set --hub_model_id to choose another)"
    logger.info("--push_to_hub: the student will be uploaded to %s%s", repo_id, default)
    return repo_id


def start_run(config: TrainingConfig):
    """Steps 2-4 of every recipe, in the order that reports errors early: accelerate (DDP with
    ``find_unused_parameters``, since the phases train disjoint parameters: see :class:`TrainingPhase`; an FSDP
    config the recipe cannot run stops here, with ``config.fsdp_unsupported()``), logging and the seed (identical
    initial weights, e.g. LoRA init, on every process); the Hub repo and token (checked now, not after training);
    the data (its errors come before the teacher loads); the teacher pipeline, whose resolution
    the data then takes. Returns ``(accelerator, repo_id, data, pipe)``."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config, find_unused_parameters=True)
    setup_logging(accelerator)
    reason = config.fsdp_unsupported() if uses_fsdp(accelerator) else None
    if reason is not None:  # an FSDP accelerate config for a run the recipe cannot shard: before anything loads
        raise ConfigError(reason)
    set_seed(config.seed)
    repo_id = prepare_hub(config, accelerator)
    data = load_training_data(config, config.resolution or 512)
    pipe = load_teacher_pipeline(config, accelerator.device, weight_dtype(accelerator))
    data.resolution = teacher_resolution(pipe, config.resolution)
    return accelerator, repo_id, data, pipe


def start_tracking(config: TrainingConfig, accelerator, prompt_cache: PromptCache, prompts: list[str]) -> None:
    """Step 7: the trackers (main process, unless ``--report_to none``) and the prompt cache filled."""
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=config.tracker_config())
    prompt_cache.warm_up(prompts)


def finish_run(
    config: TrainingConfig, accelerator, parts, data, history: list, start_step: int, export, gather=None
) -> dict:
    """Step 9: after every process has finished, the main process warns about skipped images and runs ``export()``
    (the student saved with its EMA weights, and uploaded); then the run ends (:func:`end_training`). With
    ``gather``, every process first calls ``gather()`` (under FSDP: all-gather the student's shards) and the main
    process runs ``export(gather())``. Returns ``{"global_step", "losses", "output_dir", "num_skipped_images",
    "num_processes"}``."""
    accelerator.wait_for_everyone()
    gathered = gather() if gather is not None else None
    if accelerator.is_main_process:
        if data.num_skipped_images:
            logger.warning("skipped %d unreadable images", data.num_skipped_images)
        export() if gather is None else export(gathered)
    end_training(accelerator, parts)
    return {
        "global_step": history[-1]["step"] if history else start_step,
        "losses": history,
        "output_dir": config.output_dir,
        "num_skipped_images": data.num_skipped_images,
        "num_processes": accelerator.num_processes,
    }
