"""Shared state machine of the momentum schedulers: diffusers contract + VP and flow-matching geometry.

Each concrete scheduler = one algorithm mixin (how the slopes are combined) + one geometry base (VP or flow).
The geometry precomputes, per node i of the schedule, python floats on the CPU:

* ``_alpha[i]``, ``_sigma[i]``: x_t = alpha x0 + sigma eps (data form, DPM-Solver++; [P] Eq. 3);
* ``_grid[i]``, ``_grid_alpha[i]``: the grid variable of the slope form (VP: sigmabar = sigma/alpha with the
  epsilon slope, [P] Eq. 2; flow: sigma with the velocity slope and alpha = 1).

so ``step()`` only does tensor arithmetic with python scalars (no host-device synchronisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .state import StepIndexState

VP_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
COEFFICIENT_TYPES = ("variable", "fixed")
FINAL_STEP_TYPES = ("dpmsolver++", "multistep")


@dataclass
class MomentumSchedulerOutput(BaseOutput):
    """Output of ``step``: the next sample and the current data prediction (x0)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError naming ``name`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_integer(name: str, value, low: int, high: int) -> int:
    """Return ``value`` as an int; ValueError naming ``name`` and [low, high] unless it is an integer (python or
    numpy, not bool, not float) in that range."""
    if not _is_integer(value) or not low <= int(value) <= high:
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got {value!r}.")
    return int(value)


def check_order_and_beta(scheduler, order_key: str, max_order: int) -> None:
    """Validate the multistep order (config key ``order_key``) and the damping coefficient beta in (0, 1], and store
    them in the config as python numbers (numpy scalars are accepted but are not JSON-serialisable)."""
    config = scheduler.config
    order = check_integer(order_key, config[order_key], 1, max_order)
    beta = config.momentum_beta
    if not (_is_real(beta) and 0.0 < float(beta) <= 1.0):
        raise ValueError(f"`momentum_beta` must be a real number in (0, 1], got {beta!r}.")
    scheduler.register_to_config(**{order_key: order, "momentum_beta": float(beta)})


def check_decreasing(name: str, values) -> np.ndarray:
    """``values`` as a float64 array; ValueError naming ``name`` unless it is a non-empty 1-D sequence of finite,
    strictly decreasing numbers."""
    try:
        array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a sequence of numbers, got {values!r}.") from None
    if array.ndim != 1 or len(array) == 0 or not np.all(np.isfinite(array)) or np.any(np.diff(array) >= 0):
        raise ValueError(
            f"`{name}` must be a non-empty, strictly decreasing sequence of finite numbers, got {array.tolist()}."
        )
    return array


def linear_combination(weights, tensors, initial: torch.Tensor | None = None, initial_weight: float = 1.0):
    """initial_weight * initial + sum_j w_j t_j for python-float weights (one new tensor, in-place accumulation)."""
    pairs = [(w, t) for w, t in zip(weights, tensors) if w != 0.0]
    if initial is not None:
        pairs.insert(0, (initial_weight, initial))
    if not pairs:
        return torch.zeros_like(tensors[0])
    total = pairs[0][1] * pairs[0][0]
    for weight, tensor in pairs[1:]:
        total.add_(tensor, alpha=weight)
    return total


class MomentumSchedulerBase(StepIndexState, SchedulerMixin, ConfigMixin):
    """diffusers plumbing common to every momentum scheduler (indices, step skeleton)."""

    order = 1

    def _init_common_state(self) -> None:
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._reset_algorithm_state()

    # ---------------------------------------------------------------- algorithm hooks
    def _reset_algorithm_state(self) -> None:
        raise NotImplementedError

    def _advance(self, model_output: torch.Tensor, sample: torch.Tensor, index: int):
        """Return (prev_sample, pred_original_sample) for node ``index``; updates the momentum state."""
        raise NotImplementedError

    # ---------------------------------------------------------------- diffusers contract (and StepIndexState)
    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity: latents are kept in x_t space."""
        return sample

    # what index_for_timestep does with a timestep that is not in the schedule: DPMSolverMultistep returns the last
    # index ("last"), FlowMatchEulerDiscrete fails ("raise")
    _unknown_timestep = "last"

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (second match when repeated, like diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        candidates = (schedule_timesteps == timestep).nonzero()
        if len(candidates) == 0:
            if self._unknown_timestep == "raise":
                raise ValueError(
                    f"`timestep` {float(timestep)!r} is not in the schedule set by `set_timesteps` "
                    f"({len(schedule_timesteps)} timesteps from {float(schedule_timesteps[0])!r} to "
                    f"{float(schedule_timesteps[-1])!r})."
                )
            return len(schedule_timesteps) - 1
        return candidates[1 if len(candidates) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _schedule_indices(self, timesteps: torch.Tensor, device) -> list[int]:
        """Node indices for add_noise/scale_noise, honouring begin_index/step_index as diffusers does."""
        if self.begin_index is None:
            schedule = self.timesteps.to(device)
            return [self.index_for_timestep(t, schedule) for t in timesteps.to(device).reshape(-1)]
        index = self.step_index if self.step_index is not None else self.begin_index
        return [index] * timesteps.reshape(-1).shape[0]

    def _check_num_inference_steps(self, num_inference_steps) -> None:
        if num_inference_steps is not None:
            check_integer("num_inference_steps", num_inference_steps, 1, self.config.num_train_timesteps)

    def _finish_set_timesteps(self, sigmas: np.ndarray) -> None:
        """Store the per-node python scalars and reset all history, momentum and indices."""
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32)).to("cpu")
        nodes = self.sigmas.double().tolist()
        self._alpha, self._sigma, self._grid, self._grid_alpha = self._node_scalars(nodes)
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None
        self._begin_index = None
        self._reset_algorithm_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> MomentumSchedulerOutput | tuple:
        """Advance ``sample`` by one node of the schedule (deterministic; ``generator`` is unused).

        Computation runs in float32 (float64 if the sample is float64) and the result is cast back to the
        model output's dtype.
        """
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is None: call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        compute_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        prev_sample, denoised = self._advance(
            model_output.to(compute_dtype), sample.to(compute_dtype), self._step_index
        )
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        denoised = denoised.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return MomentumSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    # ---------------------------------------------------------------- shared helpers for the algorithms
    def _is_forced_first_order_final(self, index: int) -> bool:
        """Last step that diffusers' lower_order_final (fewer than 15 steps) makes first order."""
        return (
            index == self.num_inference_steps - 1
            and bool(self.config.lower_order_final)
            and self.num_inference_steps < 15
        )


class VPMomentumSchedulerBase(MomentumSchedulerBase):
    """VP geometry (SD 1.5 / SDXL). Timesteps and sigmas come from diffusers' DPMSolverMultistepScheduler with the
    same config, so every spacing / Karras / final-sigma option matches it exactly."""

    # every diffusers VP scheduler that builds its noise schedule from these betas (EDMEuler ignores them)
    _compatibles = [e.name for e in KarrasDiffusionSchedulers if e.name != "EDMEulerScheduler"]

    def _init_vp(self, lambda_min_clipped: float = -float("inf")) -> None:
        config = self.config
        check_choice("beta_schedule", config.beta_schedule, VP_BETA_SCHEDULES)
        check_choice("prediction_type", config.prediction_type, VP_PREDICTION_TYPES)
        check_choice("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", config.final_sigmas_type, FINAL_SIGMAS_TYPES)
        # The betas, spacings and Karras conversion are exactly diffusers' DPMSolverMultistepScheduler ones.
        self._schedule = DPMSolverMultistepScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            trained_betas=config.trained_betas,
            timestep_spacing=config.timestep_spacing,
            steps_offset=config.steps_offset,
            rescale_betas_zero_snr=config.rescale_betas_zero_snr,
            use_karras_sigmas=config.use_karras_sigmas,
            final_sigmas_type=config.final_sigmas_type,
            lambda_min_clipped=lambda_min_clipped,
        )
        self.betas = self._schedule.betas
        self.alphas_cumprod = self._schedule.alphas_cumprod
        self.timesteps = self._schedule.timesteps.clone()
        self.sigmas = self._schedule.sigmas.clone()
        self._init_common_state()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule and reset momentum/history/indices.

        Pass exactly one of ``num_inference_steps``, ``timesteps`` (strictly decreasing integers in
        [0, num_train_timesteps)) or ``sigmas`` (N strictly decreasing positive sigmabar = sigma/alpha values; the
        final sigma follows ``final_sigmas_type``). ``mu`` is accepted for signature compatibility and ignored.
        """
        num_train = self.config.num_train_timesteps
        given = [
            name
            for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"Pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`, got {given or 'none'}."
            )
        self._check_num_inference_steps(num_inference_steps)
        if timesteps is not None:
            values = check_decreasing("timesteps", timesteps)
            if np.any(values != np.round(values)):
                raise ValueError(f"`timesteps` must be integers (UNet timesteps), got {values.tolist()}.")
            if values.min() < 0 or values.max() >= num_train:
                raise ValueError(
                    f"`timesteps` must lie in [0, num_train_timesteps={num_train}), got {values.tolist()}."
                )
            if self.config.use_karras_sigmas:
                raise ValueError("`timesteps` cannot be combined with `use_karras_sigmas=True`.")
            timesteps = values.astype(np.int64).tolist()
        if sigmas is not None:
            values = check_decreasing("sigmas", sigmas)
            if values.min() <= 0:
                raise ValueError(f"`sigmas` (sigmabar = sigma / alpha) must be positive, got {values.tolist()}.")
            sigmas = values.tolist()

        if sigmas is None:
            self._schedule.set_timesteps(num_inference_steps=num_inference_steps, timesteps=timesteps)
            self.timesteps = self._schedule.timesteps.to(device)
            self._finish_set_timesteps(self._schedule.sigmas.numpy())
            return
        train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().numpy()
        node_timesteps = self._schedule._sigma_to_t(np.asarray(sigmas, dtype=np.float64), np.log(train_sigmas))
        if self.config.final_sigmas_type == "sigma_min":
            final = float(train_sigmas[0])
        else:
            final = 0.0
        self.timesteps = torch.from_numpy(np.asarray(node_timesteps, dtype=np.float32)).to(device)
        self._finish_set_timesteps(np.append(np.asarray(sigmas, dtype=np.float64), final))

    @staticmethod
    def _node_scalars(sigma_bars: list[float]):
        alphas = [1.0 / math.sqrt(1.0 + s * s) for s in sigma_bars]
        sigmas = [s * a for s, a in zip(sigma_bars, alphas)]
        return alphas, sigmas, list(sigma_bars), alphas

    def _to_slope(self, model_output, sample, index):
        """Epsilon prediction, the slope of dxbar/dsigmabar ([P] Eq. 2)."""
        alpha, sigma = self._alpha[index], self._sigma[index]
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            return alpha * model_output + sigma * sample
        return (sample - alpha * model_output) / sigma

    def _to_data(self, model_output, sample, index):
        """Data prediction x0 for DPM-Solver++."""
        alpha, sigma = self._alpha[index], self._sigma[index]
        if self.config.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        if self.config.prediction_type == "v_prediction":
            return alpha * sample - sigma * model_output
        return model_output

    def _slope_to_data(self, slope, sample, index):
        return (sample - self._sigma[index] * slope) / self._alpha[index]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x0 + sigma_t eps at the schedule node of ``timesteps`` (begin_index aware, like diffusers)."""
        indices = self._schedule_indices(timesteps, original_samples.device)
        sigma_bar = self.sigmas[indices].to(device=original_samples.device, dtype=original_samples.dtype)
        sigma_bar = sigma_bar.reshape(-1, *([1] * (original_samples.ndim - 1)))
        alpha = 1.0 / torch.sqrt(sigma_bar**2 + 1.0)
        return alpha * original_samples + sigma_bar * alpha * noise


class FlowMatchMomentumSchedulerBase(MomentumSchedulerBase):
    """Flow-matching geometry (SD3 / Flux): x_sigma = (1 - sigma) x0 + sigma eps, model output v = eps - x0.
    Timesteps/sigmas come from diffusers' FlowMatchEulerDiscreteScheduler with the same config."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    _unknown_timestep = "raise"

    def _init_flow(self) -> None:
        config = self.config
        check_choice("time_shift_type", config.time_shift_type, ("exponential", "linear"))
        if config.invert_sigmas:
            raise ValueError("`invert_sigmas` must be False (inverted schedules are not supported).")
        if config.stochastic_sampling:
            raise ValueError("`stochastic_sampling` must be False (momentum samplers are deterministic).")
        self._schedule = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.num_train_timesteps,
            shift=config.shift,
            use_dynamic_shifting=config.use_dynamic_shifting,
            base_shift=config.base_shift,
            max_shift=config.max_shift,
            base_image_seq_len=config.base_image_seq_len,
            max_image_seq_len=config.max_image_seq_len,
            shift_terminal=config.shift_terminal,
            use_karras_sigmas=config.use_karras_sigmas,
            use_exponential_sigmas=config.use_exponential_sigmas,
            use_beta_sigmas=config.use_beta_sigmas,
            time_shift_type=config.time_shift_type,
        )
        self.timesteps = self._schedule.timesteps.clone()
        self.sigmas = self._schedule.sigmas.clone()
        self._init_common_state()

    @property
    def shift(self) -> float:
        return self._schedule.shift

    def set_shift(self, shift: float) -> None:
        self._schedule.set_shift(shift)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Build the schedule exactly like FlowMatchEulerDiscreteScheduler and reset momentum/history/indices.

        Flux calls this with ``sigmas=linspace(1, 1/N, N)`` and ``mu``; SD3 with ``num_inference_steps``. ``sigmas``
        and ``timesteps`` may be passed together (same length, used as given, like FlowMatchEulerDiscrete).
        """
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is True.")
        if num_inference_steps is None and sigmas is None and timesteps is None:
            raise ValueError("Pass one of `num_inference_steps`, `sigmas` or `timesteps`.")
        self._check_num_inference_steps(num_inference_steps)
        num_train = self.config.num_train_timesteps
        if sigmas is not None:
            values = check_decreasing("sigmas", sigmas)
            if not (values.min() > 0.0 and values.max() <= 1.0):
                raise ValueError(f"`sigmas` must lie in (0, 1], got {values.tolist()}.")
            sigmas = values.tolist()
        if timesteps is not None:
            values = check_decreasing("timesteps", timesteps)
            if not (values.min() > 0.0 and values.max() <= num_train):
                raise ValueError(
                    f"`timesteps` must lie in (0, num_train_timesteps={num_train}], got {values.tolist()}."
                )
            timesteps = values.tolist()
        lengths = {name: len(v) for name, v in (("sigmas", sigmas), ("timesteps", timesteps)) if v is not None}
        if num_inference_steps is not None:
            lengths["num_inference_steps"] = int(num_inference_steps)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"`sigmas`, `timesteps` and `num_inference_steps` must agree in length, got {lengths}.")
        self._schedule.set_timesteps(
            num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps
        )
        self.timesteps = self._schedule.timesteps
        self._finish_set_timesteps(self._schedule.sigmas.cpu().numpy())

    @staticmethod
    def _node_scalars(sigmas: list[float]):
        alphas = [1.0 - s for s in sigmas]
        return alphas, list(sigmas), list(sigmas), [1.0] * len(sigmas)

    def _to_slope(self, model_output, sample, index):
        """Velocity dx/dsigma = eps - x0 (the model output itself)."""
        return model_output

    def _to_data(self, model_output, sample, index):
        return sample - self._sigma[index] * model_output

    def _slope_to_data(self, slope, sample, index):
        return sample - self._sigma[index] * slope

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward flow-matching process sigma * noise + (1 - sigma) * sample (begin_index aware)."""
        timestep = torch.as_tensor(timestep).reshape(-1)
        indices = self._schedule_indices(timestep, sample.device)
        sigma = self.sigmas[indices].to(device=sample.device, dtype=sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample
