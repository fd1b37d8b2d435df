"""Names and numbers shared by the teachers, students, training scripts and exports (one place each).

Nothing here imports torch, so the training scripts can validate their flags before any heavy import.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ARCHITECTURES",
    "LAYOUTS",
    "PREDICTION_TYPES",
    "TEACHER_PREDICTION_TYPES",
    "NUM_TRAIN_TIMESTEPS",
    "SD_NOISE_SCHEDULE",
    "DEFAULT_LORA_TARGET_MODULES",
    "dmd2_timesteps",
    "validate_timesteps",
]

# Stable Diffusion families a student can be distilled from / exported for.
ARCHITECTURES = ("sd15", "sdxl")
# How a trainable network is stored: a peft LoRA adapter on the frozen base, or a full trainable copy.
LAYOUTS = ("lora", "full")
# UNet output parameterisations diffusers' VP schedulers know.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The ones the distillation code converts to x0/eps (a teacher predicting x0 directly is not supported).
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction")
NUM_TRAIN_TIMESTEPS = 1000
# SD 1.5's (and SDXL's) DDPM training schedule, as diffusers scheduler config entries.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
# The module list of diffusers' LCM-LoRA SDXL script, which DMD2's LoRA also uses.
DEFAULT_LORA_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def validate_timesteps(
    timesteps: Sequence[int],
    name: str = "timesteps",
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    expected_length: int | None = None,
) -> list[int]:
    """Check a student's timestep list: integers in ``[0, num_train_timesteps - 1]``, strictly decreasing.

    Returns the list as plain ``int``; raises ``ValueError`` naming ``name`` otherwise.
    """
    values = [int(t) for t in timesteps]
    if expected_length is not None and len(values) != expected_length:
        raise ValueError(f"{name} must have {expected_length} entries (one per step), got {values}")
    if not values:
        raise ValueError(f"{name} must not be empty")
    if any(not 0 <= t < num_train_timesteps for t in values):
        raise ValueError(f"{name} must lie in [0, {num_train_timesteps - 1}], got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing, got {values}")
    return values


def dmd2_timesteps(
    num_inference_steps: int, conditioning_timestep: int = 999, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[int]:
    """DMD2's student timesteps: ``[conditioning_timestep]`` for one step, else the fixed list
    ``range(T-1, 0, -(T // N))``, e.g. [999, 749, 499, 249] for N=4 (DMD2 Sec. 4.4)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    validate_timesteps([conditioning_timestep], "conditioning_timestep", num_train_timesteps)
    if num_inference_steps == 1:
        return [conditioning_timestep]
    stride = num_train_timesteps // num_inference_steps
    return list(range(num_train_timesteps - 1, 0, -stride))[:num_inference_steps]
