"""Two-timed flow maps (TTFM) of Stable Diffusion teachers: time conversions, teacher velocity, the student UNet.

Conventions (docs/flow_maps.md): rectified-flow (RF) time ``sigma`` in [0, 1] with 1 = noise and 0 = data, the RF
state z = (1 - sigma) x0 + sigma eps, the velocity v_sigma(z) = dz/dsigma = eps_hat - x0_hat, and the flow map
phi(z, s, t) = z + (t - s) u(z, s, t) that jumps from the initial time s to the terminal time t (s > t when
generating).

**VP -> RF, exactly** (docs/flow_maps.md, "Teacher velocity"). A VP state x_t = alpha_t x0 + sigma_t eps (SD 1.5 / SDXL,
alpha_t = sqrt(abar_t)) is a rescaled RF state: with kappa = sigma_t / alpha_t,

    z = x_t / (alpha_t + sigma_t),   sigma_rf = kappa / (1 + kappa).

So the teacher is queried at the continuous VP timestep t* with kappa(t*) = sigma_rf / (1 - sigma_rf) (log-linear
interpolation of log kappa over the integer training timesteps, as diffusers' ``_sigma_to_t`` does), on the input
x = (alpha + sigma)(t*) z = z / sqrt((1 - sigma_rf)^2 + sigma_rf^2), and its epsilon becomes

    v_sigma(z) = (eps_hat - z) / (1 - sigma_rf)                                                       (Eq. VP2RF)

which is affine in eps_hat, so classifier-free guidance can be applied on the UNet outputs. SD's schedule ends at a
nonzero terminal SNR (abar_999 = 0.0047), so its RF range is [0.0283, 0.936]; times outside are clamped to the
nearest training timestep. Flow-matching teachers (SD3, Flux) already output v_sigma at timestep = 1000 sigma.

**Student** (docs/flow_maps.md, "Student"). The student is a plain ``UNet2DConditionModel`` with
``time_cond_proj_dim = D``: its first time input is the teacher's (t*(s)), and the jump length s - t enters through
``timestep_cond = jump_embedding(s - t)``, which the UNet's ``TimestepEmbedding.cond_proj`` (bias-free, zero
initialised here) adds to the time embedding. The untrained student therefore equals the teacher for every t, and
its output keeps SD's semantics: an *average* epsilon over the jump (eps_bar), with

    phi(z, s, t) = [(1 - t) z + (t - s) eps_bar] / (1 - s)                                            (Eq. DDIM)

i.e. one DDIM step with eps_bar; at init a 1-step jump is exactly one DDIM step of the teacher.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from .constants import DEFAULT_LORA_TARGET_MODULES
from .gaussian_mixture import classifier_free_guidance
from .teacher import pipeline_arch

__all__ = [
    "FlowMapUNet",
    "build_flow_map_student",
    "flow_match_teacher_velocity",
    "forward_ad_attention",
    "jump_embedding",
    "merge_flow_map_student",
    "save_flow_map_lora_student",
    "rf_sigma_to_vp_timestep",
    "sd_teacher_velocity",
    "velocity_from_vp_output",
    "vp_input_scale",
    "vp_log_kappa",
    "vp_sigma_range",
    "vp_timestep_to_rf_sigma",
]

VP_PREDICTION_TYPES = ("epsilon", "v_prediction")
STUDENT_TYPES = ("lora", "full")
# The DMD2 LoRA students' module list (diffusers' LCM-LoRA script); the new pathway is trained in full.
FLOW_MAP_LORA_TARGET_MODULES = DEFAULT_LORA_TARGET_MODULES
JUMP_PATHWAY = "time_embedding.cond_proj"


# ------------------------------------------------------------------------------------------------------------------
# Time conversions (pure functions, differentiable in sigma)
# ------------------------------------------------------------------------------------------------------------------


def vp_log_kappa(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log kappa_t = log(sigma_t / alpha_t) = 0.5 log((1 - abar_t) / abar_t) per training timestep (float64)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return 0.5 * (torch.log1p(-abar) - torch.log(abar))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (``numpy.interp``, clamped at the ends), differentiable in ``x``."""
    x = x.clamp(xp[0], xp[-1])
    index = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[index - 1], xp[index], fp[index - 1], fp[index]
    return f0 + (x - x0) / (x1 - x0) * (f1 - f0)


def rf_sigma_to_vp_timestep(sigma, alphas_cumprod) -> torch.Tensor:
    """Continuous VP timestep t* with sigma_t*/alpha_t* = sigma / (1 - sigma) (log-kappa interpolation), clamped to
    [0, num_train_timesteps - 1]. Returned in sigma's floating dtype (float64 for python floats)."""
    sigma = torch.as_tensor(sigma)
    sigma = sigma if sigma.is_floating_point() else sigma.double()
    table = vp_log_kappa(alphas_cumprod).to(sigma.device)
    steps = torch.arange(len(table), dtype=torch.float64, device=sigma.device)
    log_kappa = torch.log(sigma.double()) - torch.log1p(-sigma.double())
    return _interp(log_kappa, table, steps).to(sigma.dtype)


def vp_timestep_to_rf_sigma(timestep, alphas_cumprod) -> torch.Tensor:
    """RF sigma = kappa / (1 + kappa) of a (possibly fractional) VP timestep (float64)."""
    timestep = torch.as_tensor(timestep, dtype=torch.float64)
    table = vp_log_kappa(alphas_cumprod).to(timestep.device)
    steps = torch.arange(len(table), dtype=torch.float64, device=timestep.device)
    return torch.sigmoid(_interp(timestep, steps, table))  # kappa / (1 + kappa) = sigmoid(log kappa)


def vp_sigma_range(alphas_cumprod) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the RF times a VP schedule covers (SD 1.5 / SDXL: 0.0283, 0.936)."""
    log_kappa = vp_log_kappa(alphas_cumprod)
    return float(torch.sigmoid(log_kappa[0])), float(torch.sigmoid(log_kappa[-1]))


def vp_input_scale(sigma):
    """alpha_t* + sigma_t* = 1 / sqrt((1 - sigma)^2 + sigma^2): the VP UNet input is this times the RF state."""
    return torch.rsqrt((1 - sigma) ** 2 + sigma**2) if torch.is_tensor(sigma) else 1 / math.hypot(1 - sigma, sigma)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, device=like.device)
    if value.ndim == 0:
        return value.to(like.dtype)
    return value.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def velocity_from_vp_output(model_output: torch.Tensor, z: torch.Tensor, sigma, prediction_type: str = "epsilon"):
    """RF velocity v_sigma from a VP model output at input x = vp_input_scale(sigma) z (Eq. VP2RF).

    ``epsilon``: v = (eps - z) / (1 - sigma). ``v_prediction`` (Salimans & Ho): eps = alpha v + sigma_vp x with
    alpha = (1 - sigma) c, sigma_vp = sigma c, c = vp_input_scale(sigma), then as for epsilon. ``sigma`` is a
    python float, a 0-d or a ``(B,)`` tensor; the result is in ``z``'s dtype (at least float32).
    """
    if prediction_type not in VP_PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {list(VP_PREDICTION_TYPES)}, got {prediction_type!r}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    z, model_output, sigma = z.to(dtype), model_output.to(dtype), _per_sample(sigma, z.to(dtype))
    if prediction_type == "epsilon":
        eps = model_output
    else:
        scale = vp_input_scale(sigma)
        eps = (1 - sigma) * scale * model_output + sigma * scale * scale * z
    return (eps - z) / (1 - sigma)


# ------------------------------------------------------------------------------------------------------------------
# Teacher velocity with classifier-free guidance
# ------------------------------------------------------------------------------------------------------------------


def _cat_kwargs(first: dict, second: dict) -> dict:
    """Concatenate two keyword dicts of model inputs along the batch (nested dicts such as SDXL's
    ``added_cond_kwargs`` too); non-tensor values must agree."""
    joined = {}
    for key, value in first.items():
        other = second[key]
        if isinstance(value, dict):
            joined[key] = _cat_kwargs(value, other)
        elif torch.is_tensor(value):
            joined[key] = torch.cat([value, other])
        else:
            joined[key] = value
    return joined


def _guided_output(call, x, timestep, cond_kwargs, uncond_kwargs, guidance_scale):
    """Model output with CFG ``uncond + w (cond - uncond)`` in one batched call (just ``cond`` when w = 1)."""
    if guidance_scale == 1.0 or uncond_kwargs is None:
        return call(x, timestep, cond_kwargs)
    both = call(torch.cat([x, x]), torch.cat([timestep, timestep]), _cat_kwargs(uncond_kwargs, cond_kwargs))
    uncond, cond = both.chunk(2)
    return classifier_free_guidance(uncond, cond, guidance_scale)


def sd_teacher_velocity(
    unet,
    z: torch.Tensor,
    sigma: torch.Tensor,
    alphas_cumprod,
    cond_kwargs: dict,
    uncond_kwargs: dict | None = None,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """v_sigma(z) of an SD 1.5 / SDXL (VP, epsilon or v) UNet with CFG, through the exact conversion (Eq. VP2RF).

    ``sigma`` is ``(B,)`` RF times; ``cond_kwargs`` / ``uncond_kwargs`` are UNet keyword arguments
    (``encoder_hidden_states``, SDXL ``added_cond_kwargs``). Returns float32 (float64 for float64 inputs).
    """
    sigma = torch.as_tensor(sigma, device=z.device).reshape(-1).expand(z.shape[0])
    timestep = rf_sigma_to_vp_timestep(sigma, alphas_cumprod).to(z.device)
    x = vp_input_scale(_per_sample(sigma, z)) * z

    def call(sample, steps, kwargs):
        return unet(sample.to(unet.dtype), steps, **kwargs, return_dict=False)[0]

    output = _guided_output(call, x, timestep, cond_kwargs, uncond_kwargs, guidance_scale)
    return velocity_from_vp_output(output, z, sigma, prediction_type)


def flow_match_teacher_velocity(
    transformer,
    z: torch.Tensor,
    sigma: torch.Tensor,
    cond_kwargs: dict,
    uncond_kwargs: dict | None = None,
    guidance_scale: float = 1.0,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """v_sigma(z) of a flow-matching teacher (SD3/Flux convention: timestep = 1000 sigma, output = eps - x0 =
    dz/dsigma), with CFG; no conversion is needed."""
    sigma = torch.as_tensor(sigma, device=z.device).reshape(-1).expand(z.shape[0])

    def call(sample, steps, kwargs):
        return transformer(hidden_states=sample.to(transformer.dtype), timestep=steps, **kwargs, return_dict=False)[0]

    output = _guided_output(call, z, sigma * num_train_timesteps, cond_kwargs, uncond_kwargs, guidance_scale)
    return output.to(torch.promote_types(z.dtype, torch.float32))


# ------------------------------------------------------------------------------------------------------------------
# Forward-mode AD through diffusers attention
# ------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def forward_ad_attention(model):
    """Within the context, ``model`` uses diffusers' classic ``AttnProcessor`` (bmm + softmax) so that
    ``torch.func.jvp`` works: the fused SDPA kernels have no forward-mode AD (torch raises NotImplementedError).
    The previous processors are restored on exit."""
    from diffusers.models.attention_processor import AttnProcessor

    previous = dict(model.attn_processors)
    model.set_attn_processor(AttnProcessor())
    try:
        yield model
    finally:
        model.set_attn_processor(previous)


# ------------------------------------------------------------------------------------------------------------------
# Student
# ------------------------------------------------------------------------------------------------------------------


def jump_embedding(delta: torch.Tensor, dim: int) -> torch.Tensor:
    """Low-frequency Fourier embedding of the jump length ``delta = s - t`` in [0, 1]: [sin(f_k delta),
    cos(f_k delta)] with f_k = pi 16^(k / (dim/2 - 1)), k = 0 .. dim/2 - 1 (pi .. 16 pi rad per unit time).

    Scale 1, not SD's 1000: the terminal-time derivatives of the Lagrangian losses flow through this pathway. Per
    unit time, |d emb/d delta| / |emb| is 124 / 5.7 here (dim 64) against 3032 / 12.6 for SD's 1000-scale sinusoid
    (docs/flow_maps.md, "Losses").
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"`dim` (time_cond_proj_dim) must be an even number >= 2, got {dim!r}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=delta.device) / max(half - 1, 1)
    frequencies = (math.pi * 16.0**exponents).to(delta.dtype if delta.is_floating_point() else torch.float32)
    angles = delta.reshape(-1, 1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def build_flow_map_student(
    teacher_unet,
    student_type: str = "lora",
    jump_embedding_dim: int = 64,
    lora_rank: int = 64,
    lora_alpha: float | None = None,
    lora_target_modules=FLOW_MAP_LORA_TARGET_MODULES,
):
    """A ``UNet2DConditionModel`` student of ``teacher_unet`` (SD 1.5 or SDXL) with a second-time pathway.

    The student has the teacher's config plus ``time_cond_proj_dim = jump_embedding_dim``, the teacher's weights,
    and a zero-initialised ``time_embedding.cond_proj``, so it equals the teacher. ``student_type="full"`` trains
    every weight; ``"lora"`` adds a peft LoRA adapter (``init_lora_weights="gaussian"``: B = 0, so the student still
    equals the teacher) and trains the adapter plus the new pathway in full (the pathway has no teacher weight to
    adapt). The teacher is not modified.
    """
    from diffusers import UNet2DConditionModel

    if student_type not in STUDENT_TYPES:
        raise ValueError(f"`student_type` must be one of {list(STUDENT_TYPES)}, got {student_type!r}")
    if teacher_unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError(
            "`teacher_unet` already has a `time_cond_proj_dim` pathway (an LCM-style student?); "
            "pass the original teacher UNet"
        )
    jump_embedding(torch.zeros(1), jump_embedding_dim)  # validates the dimension
    if lora_rank < 1:
        raise ValueError(f"`lora_rank` must be >= 1, got {lora_rank!r}")
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=jump_embedding_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if missing != [f"{JUMP_PATHWAY}.weight"] or unexpected:
        raise RuntimeError(
            f"unexpected weight mismatch building the student: missing {missing}, unexpected {unexpected}"
        )
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    if (student.device, student.dtype) != (teacher_unet.device, teacher_unet.dtype):
        student.to(device=teacher_unet.device, dtype=teacher_unet.dtype)
    if student_type == "full":
        return student.requires_grad_(True)
    from peft import LoraConfig

    student.requires_grad_(False)
    student.add_adapter(
        LoraConfig(
            r=lora_rank,
            lora_alpha=lora_rank if lora_alpha is None else lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(lora_target_modules),
        )
    )
    for name, param in student.named_parameters():
        param.requires_grad_("lora_" in name or name.startswith(JUMP_PATHWAY))
    return student


def merge_flow_map_student(student):
    """A copy of ``student`` with its LoRA adapters fused into the weights and removed, i.e. a plain
    ``UNet2DConditionModel`` whose ``save_pretrained`` folder loads with ``UNet2DConditionModel.from_pretrained``
    (``time_cond_proj_dim`` is in its config). Full students are copied unchanged."""
    merged = copy.deepcopy(student)
    if getattr(merged, "peft_config", None):
        merged.fuse_lora()
        merged.unload_lora()
    return merged.requires_grad_(False)


class FlowMapUNet(nn.Module):
    """The student as a two-timed flow map in RF time: ``forward(z, s, t, ...)`` returns the average velocity
    u_sigma(z, s, t), so phi(z, s, t) = z + (t - s) u (Eq. DDIM with the UNet's average-epsilon output).

    Args:
        unet: a ``UNet2DConditionModel`` with ``time_cond_proj_dim`` (from :func:`build_flow_map_student`).
        alphas_cumprod: the teacher's VP schedule (``pipe.scheduler.alphas_cumprod``).
        prediction_type: the teacher's output type (``epsilon`` or ``v_prediction``); the student keeps it.
    """

    def __init__(self, unet, alphas_cumprod, prediction_type: str = "epsilon"):
        super().__init__()
        if unet.config.get("time_cond_proj_dim") is None:
            raise ValueError("`unet` needs `time_cond_proj_dim` (build it with build_flow_map_student)")
        if prediction_type not in VP_PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {list(VP_PREDICTION_TYPES)}, got {prediction_type!r}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64), persistent=False)

    def model_output(self, z, s, t, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        """The UNet's own output (average epsilon, or average v) for the jump s -> t."""
        batch = z.shape[0]
        s = torch.as_tensor(s, device=z.device).reshape(-1).expand(batch)
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(batch)
        timestep = rf_sigma_to_vp_timestep(s, self.alphas_cumprod)
        x = vp_input_scale(_per_sample(s, z)) * z
        condition = jump_embedding(s - t, self.unet.config.time_cond_proj_dim)
        dtype = self.unet.dtype
        return self.unet(
            x.to(dtype),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            timestep_cond=condition.to(dtype),
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]

    def forward(self, z, s, t, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        s = torch.as_tensor(s, device=z.device).reshape(-1).expand(z.shape[0])
        output = self.model_output(z, s, t, encoder_hidden_states, added_cond_kwargs)
        return velocity_from_vp_output(output, z, s, self.prediction_type)

    def jump(self, z, s, t, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        """phi(z, s, t) = z + (t - s) u(z, s, t)."""
        u = self(z, s, t, encoder_hidden_states, added_cond_kwargs)
        t, s = torch.as_tensor(t, device=z.device), torch.as_tensor(s, device=z.device)
        return z.to(u.dtype) + _per_sample((t - s).reshape(-1).expand(z.shape[0]), u) * u


# ------------------------------------------------------------------------------------------------------------------
# Saving a LoRA student so that it loads into the teacher's pipeline
# ------------------------------------------------------------------------------------------------------------------

FLOW_MAP_CONFIG_NAME = "flow_map_config.json"
FLOW_MAP_PATHWAY_NAME = "flow_map_pathway.safetensors"


def save_flow_map_lora_student(
    output_dir,
    student,
    pipeline_class,
    default_num_inference_steps: int = 4,
    base_model: str | None = None,
    **scheduler_config,
) -> str:
    """Save a LoRA flow-map student for ``FlowMap*Pipeline.from_pretrained(teacher, student=output_dir)``.

    Three files, each written to a temporary name and moved into place (no half-written folder):

    * ``pytorch_lora_weights.safetensors``: the adapter (``pipeline_class.save_lora_weights``, peft key names) with
      its peft ``LoraConfig`` in the metadata, so ``load_lora_weights`` restores rank and alpha;
    * ``flow_map_pathway.safetensors``: the new ``time_embedding.cond_proj`` weight (the teacher has no such layer);
    * ``flow_map_config.json``: ``time_cond_proj_dim``, the default step count, the scheduler settings
      (``sigma_spacing``, ``shift``, ``gamma``, ... passed as ``scheduler_config``), the architecture (``"sd15"`` or
      ``"sdxl"``, from ``pipeline_class``) and ``base_model`` (the teacher's Hub id or path, when given), which
      :func:`diffusers_distill.evaluation.load_pipeline` loads the folder onto.
    """
    import json
    import os

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from .export import LORA_WEIGHT_NAME, lora_adapter_metadata
    from .fileio import atomic_directory

    adapters = sorted(getattr(student, "peft_config", {}) or {})
    if len(adapters) != 1:
        raise ValueError(
            f"`student` must carry exactly one LoRA adapter (build_flow_map_student(..., 'lora')), got {adapters}"
        )
    if student.config.get("time_cond_proj_dim") is None:
        raise ValueError("`student` needs `time_cond_proj_dim` (build it with build_flow_map_student)")
    if (
        isinstance(default_num_inference_steps, bool)
        or not isinstance(default_num_inference_steps, int)
        or default_num_inference_steps < 1
    ):
        raise ValueError(f"`default_num_inference_steps` must be an int >= 1, got {default_num_inference_steps!r}")
    from diffusers_distill.schedulers import TwoTimedFlowMapScheduler

    TwoTimedFlowMapScheduler(**scheduler_config)  # validates the scheduler settings before writing anything
    output_dir = os.fspath(output_dir)
    with atomic_directory(output_dir) as staging:
        # peft key names ("...to_q.lora_A.weight"), as diffusers' current LoRA training scripts store them: with
        # convert_state_dict_to_diffusers ("...to_q.lora.down.weight") diffusers 0.42 reloads no attention LoRA layers
        lora_layers = get_peft_model_state_dict(student, adapter_name=adapters[0])
        pipeline_class.save_lora_weights(
            staging,
            unet_lora_layers=lora_layers,
            unet_lora_adapter_metadata=lora_adapter_metadata(student, adapters[0]),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        weight = student.time_embedding.cond_proj.weight.detach().float().cpu().contiguous()
        save_file({f"{JUMP_PATHWAY}.weight": weight}, os.path.join(staging, FLOW_MAP_PATHWAY_NAME))
        config = {
            "time_cond_proj_dim": int(student.config.time_cond_proj_dim),
            "default_num_inference_steps": default_num_inference_steps,
            "scheduler": scheduler_config,
            "arch": pipeline_arch(pipeline_class),
            "base_model": None if base_model is None else os.fspath(base_model),
        }
        with open(os.path.join(staging, FLOW_MAP_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return output_dir
