"""TwoTimedFlowMapScheduler: any-step sampling of a two-timed flow model (flow map) phi(z, s, t).

[FM] = docs/flow_maps.md of this package (definitions, Eq. VP2RF and Eq. DDIM); [ITVM] = Khungurn et al.,
arXiv 2505.01169; [CTM] = Kim et al., arXiv 2310.02279 (gamma-sampling); [TCD] = Zheng et al., arXiv 2402.19159.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .state import StepIndexState

TEACHER_TYPES = ("vp", "flow_match")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
SIGMA_SPACINGS = ("uniform", "shifted", "karras")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class TwoTimedFlowMapSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next node; ``pred_original_sample``: the flow map's jump to sigma = 0
    (z - s u), exact for the last step and an extrapolation otherwise."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _check_range(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)  # numpy too
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"`{name}` must be in {'(' if low_open else '['}{low}, {high}], got {value!r}.")


class TwoTimedFlowMapScheduler(StepIndexState, SchedulerMixin, ConfigMixin):
    """Sampler of a two-timed flow model (TTFM) phi(z, s, t) ([ITVM]; [FM] Eq. FM1) in rectified-flow time
    sigma (1 = noise, 0 = data), with any number of steps 1..N from one model.

    State: the RF latent z = (1 - sigma) x0 + sigma eps. Step i jumps from s = ``sigmas[i]`` to the *jump target*
    t' = ``jump_targets[i]`` = (1 - gamma) ``sigmas[i+1]`` ([FM] "Scheduler"; the model must be called with (s, t'),
    which :meth:`jump_for_timestep` returns):

        z' = z + (t' - s) u,   u = model_output                                  (prediction_type "flow")
        z' = [(1 - t') z + (t' - s) eps_bar] / (1 - s)                           ("epsilon", [FM] Eq. DDIM)

    ("v_prediction": the average v is first turned into eps_bar as in [FM] Eq. VP2RF), and, when gamma > 0 and it is
    not the last step, re-noises z' from t' to sigma_{i+1} with the exact RF forward kernel ([CTM] gamma-sampling,
    [TCD] ``eta``):

        z_{i+1} = a z' + c xi,   a = (1 - sigma_{i+1}) / (1 - t'),   c = sqrt(sigma_{i+1}^2 - a^2 t'^2),   xi ~ N(0, I)

    which maps the marginal at t' onto the marginal at sigma_{i+1}. gamma = 0 is the deterministic flow map;
    gamma = 1 is consistency-model multistep sampling (jump to data, re-noise). A zero-length jump is the identity.

    Teachers (``teacher_type``):

    * ``"vp"`` (SD 1.5 / SDXL; betas from the config): the RF range is [sigma_min, sigma_max] = [0.0283, 0.936]
      for SD, because its schedule ends at a nonzero terminal SNR. ``timesteps`` are the continuous VP timesteps
      t*(sigma_i) of the UNet's first time input ([FM] Eq. VP2RF), ``scale_model_input`` multiplies z by
      alpha + sigma = 1 / sqrt((1 - s)^2 + s^2), and ``init_noise_sigma`` = sqrt((1 - sigma_max)^2 + sigma_max^2)
      makes the initial latent exactly SD's x_T = eps in RF coordinates.
    * ``"flow_match"`` (SD3 / Flux): sigma_max = 1, ``timesteps`` = 1000 sigma, identity input scaling.

    Grids (``sigma_spacing``), nodes sigma_0 = sigma_max > ... > sigma_{N-1} > sigma_N = 0 with u_i = 1 - i / N,
    all nonzero nodes inside the teacher's range [sigma_min, sigma_max] for any N (so VP timesteps never repeat):
    ``"uniform"`` sigma_i = sigma_min + (sigma_max - sigma_min) u_i; ``"shifted"`` the same with u_i replaced by
    shift u_i / (1 + (shift - 1) u_i) (SD3's time shift); ``"karras"`` sigma_i = (sigma_max^(1/rho) + i/(N-1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022 Eq. 5 in RF sigma) for i < N. Custom grids:
    ``set_timesteps(sigmas=[...])``.

    ``from_config`` of a flow-matching scheduler's config (SD3's ``FlowMatchEulerDiscreteScheduler``) gives
    ``teacher_type="flow_match"``, with the shifted grid when its ``shift`` is not 1.

    Args:
        num_train_timesteps: training timesteps of the teacher (VP) / timestep scale (flow).
        teacher_type: ``"vp"`` or ``"flow_match"``.
        beta_start, beta_end, beta_schedule, trained_betas: the VP teacher's noise schedule (ignored for flow).
        prediction_type: what ``model_output`` is: ``"epsilon"`` (average epsilon of a VP student, SD's
            semantics), ``"v_prediction"`` (average v of a VP student) or ``"flow"`` (the average velocity u).
            ``None``: ``"epsilon"`` for VP teachers, ``"flow"`` for flow-matching ones.
        sigma_max: first node; ``None`` = the teacher's largest RF sigma (0.936 for SD, 1 for flow matching).
        sigma_min: lower end of every grid (the Karras grid's last nonzero node); ``None`` = the VP teacher's
            smallest RF sigma, or 1 / num_train_timesteps for flow matching.
        sigma_spacing: ``"uniform"``, ``"shifted"`` or ``"karras"``; shift (> 0) and karras_rho (> 0) as above.
        gamma: re-noising fraction in [0, 1] (0 = deterministic flow map, 1 = consistency multistep).
    """

    # Schedulers that run on the same teacher config, and switch back losslessly (diffusers keeps our keys): SD's for VP
    # teachers, the flow-matching ones for flow teachers. The ``compatibles`` property picks by ``teacher_type``.
    _vp_compatibles = [e.name for e in KarrasDiffusionSchedulers if e.name != "EDMEulerScheduler"]
    _flow_compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    _compatibles = _vp_compatibles + _flow_compatibles
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        teacher_type: str = "vp",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        prediction_type: str | None = None,
        sigma_max: float | None = None,
        sigma_min: float | None = None,
        sigma_spacing: str = "uniform",
        shift: float = 1.0,
        karras_rho: float = 7.0,
        gamma: float = 0.0,
    ):
        if (
            isinstance(num_train_timesteps, bool)
            or not isinstance(num_train_timesteps, numbers.Integral)
            or num_train_timesteps < 2
        ):
            raise ValueError(f"`num_train_timesteps` must be an int >= 2, got {num_train_timesteps!r}.")
        _check_choice("teacher_type", teacher_type, TEACHER_TYPES)
        _check_choice("sigma_spacing", sigma_spacing, SIGMA_SPACINGS)
        _check_range("shift", shift, 0.0, math.inf, low_open=True)
        _check_range("karras_rho", karras_rho, 0.0, math.inf, low_open=True)
        _check_range("gamma", gamma, 0.0, 1.0)
        self.prediction_type = prediction_type or ("epsilon" if teacher_type == "vp" else "flow")
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if teacher_type == "flow_match" and self.prediction_type != "flow":
            raise ValueError(
                f"`prediction_type` must be 'flow' for teacher_type='flow_match', got {prediction_type!r}."
            )
        if teacher_type == "vp":
            _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
            from diffusers import DDPMScheduler  # the betas of every VP schedule, exactly as diffusers builds them

            ddpm = DDPMScheduler(
                num_train_timesteps=num_train_timesteps,
                beta_start=beta_start,
                beta_end=beta_end,
                beta_schedule=beta_schedule,
                trained_betas=trained_betas,
            )
            self.betas, self.alphas_cumprod = ddpm.betas, ddpm.alphas_cumprod.to(torch.float64)
            from diffusers_distill.flow_map import vp_sigma_range

            self.teacher_sigma_min, self.teacher_sigma_max = vp_sigma_range(self.alphas_cumprod)
        else:
            self.betas = self.alphas_cumprod = None
            self.teacher_sigma_min, self.teacher_sigma_max = 1.0 / num_train_timesteps, 1.0
        if sigma_max is not None:
            _check_range("sigma_max", sigma_max, 0.0, self.teacher_sigma_max, low_open=True)
        if sigma_min is not None:
            _check_range("sigma_min", sigma_min, 0.0, self.sigma_max, low_open=True)
        # numpy numbers (a config built from arrays) are stored as Python numbers, so the config saves as JSON
        self.register_to_config(
            num_train_timesteps=int(num_train_timesteps),
            beta_start=float(beta_start),
            beta_end=float(beta_end),
            shift=float(shift),
            karras_rho=float(karras_rho),
            gamma=float(gamma),
            sigma_max=None if sigma_max is None else float(sigma_max),
            sigma_min=None if sigma_min is None else float(sigma_min),
        )
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self.jump_targets = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config``; a flow-matching scheduler's config without our keys (SD3's) selects
        ``teacher_type="flow_match"`` and, when its ``shift`` is not 1, ``sigma_spacing="shifted"``: otherwise
        the VP defaults would give SD 1.5's betas to a flow-matching model. Resolution-dependent shifting
        (``use_dynamic_shifting``, Flux) is refused, since ``set_timesteps`` takes no ``mu``."""
        flow_matching = isinstance(config, Mapping) and (
            config.get("_class_name") in cls._flow_compatibles
            or ("shift" in config and "beta_schedule" not in config)  # in memory, configs have no _class_name
        )
        if flow_matching:
            if config.get("use_dynamic_shifting") and "teacher_type" not in config:
                raise ValueError(
                    f"{cls.__name__} does not support resolution-dependent shifting "
                    "(`use_dynamic_shifting=True` in the scheduler config, as in Flux): pass a fixed `shift` and "
                    "`sigma_spacing='shifted'` to the constructor instead."
                )
            if "teacher_type" not in config and "teacher_type" not in kwargs:
                kwargs["teacher_type"] = "flow_match"
                if config.get("shift", 1.0) != 1.0 and "sigma_spacing" not in config:
                    kwargs.setdefault("sigma_spacing", "shifted")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ---------------------------------------------------------------- configuration-derived values
    @property
    def compatibles(self) -> list:
        """The diffusers schedulers for this ``teacher_type`` (SD's for "vp", flow matching's for "flow_match")."""
        names = self._vp_compatibles if self.config.teacher_type == "vp" else self._flow_compatibles
        return [c for c in self._get_compatibles() if c.__name__ in names]

    @property
    def sigma_max(self) -> float:
        return self.config.sigma_max if self.config.sigma_max is not None else self.teacher_sigma_max

    @property
    def sigma_min(self) -> float:
        return self.config.sigma_min if self.config.sigma_min is not None else self.teacher_sigma_min

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial RF latent for unit-variance noise: sqrt((1 - s0)^2 + s0^2) (1 at sigma = 1)."""
        first = self._sigmas[0] if self.sigmas is not None else self.sigma_max
        return math.hypot(1.0 - first, first)

    # ---------------------------------------------------------------- diffusers state machine: StepIndexState
    def sigma_to_timestep(self, sigma):
        """The model's first time input for RF ``sigma``: VP t*(sigma) ([FM] Eq. VP2RF), or 1000 sigma (flow)."""
        if self.config.teacher_type == "flow_match":
            return torch.as_tensor(sigma, dtype=torch.float64) * self.config.num_train_timesteps
        from diffusers_distill.flow_map import rf_sigma_to_vp_timestep

        return rf_sigma_to_vp_timestep(torch.as_tensor(sigma, dtype=torch.float64), self.alphas_cumprod)

    def _grid(self, num_steps: int) -> list[float]:
        config, top = self.config, self.sigma_max
        if config.sigma_spacing == "karras":
            if num_steps == 1:
                return [top]
            low = min(self.sigma_min, top)
            a, b = top ** (1 / config.karras_rho), low ** (1 / config.karras_rho)
            return [(a + i / (num_steps - 1) * (b - a)) ** config.karras_rho for i in range(num_steps)]
        fractions = [1.0 - i / num_steps for i in range(num_steps)]
        if config.sigma_spacing == "shifted":
            fractions = [config.shift * u / (1.0 + (config.shift - 1.0) * u) for u in fractions]
        low = min(self.sigma_min, top)
        return [low + (top - low) * u for u in fractions]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        gamma: float | None = None,
    ) -> None:
        """Build the grid: pass exactly one of ``num_inference_steps`` (>= 1) or ``sigmas`` (N strictly decreasing
        RF sigmas in (0, sigma_max]; a final 0 is appended). ``gamma`` overrides the config's for this schedule.
        Resets the step and begin indices."""
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"Pass exactly one of `num_inference_steps` or `sigmas`, got {given or 'none'}.")
        if gamma is not None:
            _check_range("gamma", gamma, 0.0, 1.0)
        if num_inference_steps is not None:
            if (
                isinstance(num_inference_steps, bool)
                or not isinstance(num_inference_steps, numbers.Integral)  # numpy integers too
                or num_inference_steps < 1
            ):
                raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
            nodes = self._grid(int(num_inference_steps))
        else:
            nodes = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()]
            limit = self.teacher_sigma_max
            finite = all(math.isfinite(v) for v in nodes)
            decreasing = all(b < a for a, b in zip(nodes, nodes[1:]))
            if not nodes or not finite or not decreasing or nodes[-1] <= 0 or nodes[0] > limit + 1e-9:
                raise ValueError(
                    f"`sigmas` must be a non-empty, finite, strictly decreasing sequence in (0, {limit:.6g}] "
                    f"(the teacher's RF range), got {nodes}."
                )
        gamma = self.config.gamma if gamma is None else gamma
        self._sigmas = nodes + [0.0]
        self._jump_targets = [(1.0 - gamma) * nxt for nxt in self._sigmas[1:]]
        self._gamma = gamma
        self.sigmas = torch.tensor(self._sigmas, dtype=torch.float32)
        self.jump_targets = torch.tensor(self._jump_targets, dtype=torch.float32)
        self.timesteps = self.sigma_to_timestep(torch.tensor(nodes, dtype=torch.float64)).float().to(device)
        self.num_inference_steps = len(nodes)
        self._step_index = None
        self._begin_index = None

    @property
    def jumps(self) -> list[tuple[float, float]]:
        """(s, t') of every step: the times the model must be called with."""
        self._check_ready()
        return list(zip(self._sigmas[:-1], self._jump_targets))

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (the second match when repeated, like diffusers)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, device=schedule_timesteps.device).reshape(-1)[0]
        candidates = (schedule_timesteps == timestep).nonzero()
        if len(candidates) == 0:
            raise ValueError(f"`timestep` {float(timestep)} is not in the schedule {schedule_timesteps.tolist()}.")
        return int(candidates[1 if len(candidates) > 1 else 0])

    def _current_index(self, timestep) -> int:
        if self._step_index is not None:
            return self._step_index
        if self._begin_index is not None:
            return self._begin_index
        return self.index_for_timestep(timestep)

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("`num_inference_steps` is None: call `set_timesteps` first.")

    def jump_for_timestep(self, timestep) -> tuple[float, float]:
        """(s, t') of the step at ``timestep`` (the current step when stepping), without changing the state."""
        self._check_ready()
        index = self._current_index(timestep)
        return self._sigmas[index], self._jump_targets[index]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """VP teachers: the UNet input (alpha + sigma) z = z / sqrt((1 - s)^2 + s^2) ([FM] Eq. VP2RF); identity
        for flow matching."""
        if self.config.teacher_type == "flow_match":
            return sample
        self._check_ready()
        s = self._sigmas[self._current_index(timestep)]
        return sample / math.hypot(1.0 - s, s)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> TwoTimedFlowMapSchedulerOutput | tuple:
        """Jump from s = sigmas[i] to t' = jump_targets[i] with the model output for (s, t'), then re-noise to
        sigmas[i+1] when gamma > 0 (class docstring). Runs in float32 (float64 for float64 samples); the result has
        the model output's dtype. ``generator`` seeds the re-noising (diffusers' ``randn_tensor``)."""
        self._check_ready()
        if self._step_index is None:
            self._step_index = self._current_index(timestep)
        index = self._step_index
        if index >= self.num_inference_steps:
            raise ValueError(f"`step` called {index + 1} times on a {self.num_inference_steps}-step schedule.")
        s, target, following = self._sigmas[index], self._jump_targets[index], self._sigmas[index + 1]
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        z, output = sample.to(dtype), model_output.to(dtype)
        if self.prediction_type == "flow":
            velocity = output
        else:
            eps_bar = output
            if self.prediction_type == "v_prediction":  # eps = alpha v + sigma_vp x, x = c z ([FM] Eq. VP2RF)
                scale = 1.0 / math.hypot(1.0 - s, s)
                eps_bar = (1.0 - s) * scale * output + s * scale * scale * z
            velocity = (eps_bar - z) / (1.0 - s)  # phi = [(1 - t) z + (t - s) eps_bar] / (1 - s)
        jumped = z + (target - s) * velocity
        denoised = z - s * velocity
        if target < following:  # gamma re-noising with the exact forward kernel from t' to sigma_{i+1}
            a = (1.0 - following) / (1.0 - target)
            c = math.sqrt(max(following**2 - (a * target) ** 2, 0.0))
            noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            jumped = a * jumped + c * noise
        self._step_index += 1
        prev_sample, denoised = jumped.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return TwoTimedFlowMapSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _node_sigmas(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        self._check_ready()
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timesteps.to(self.timesteps.device)]
        else:
            index = self._step_index if self._step_index is not None else self._begin_index
            indices = [index] * len(timesteps)
        sigma = self.sigmas[indices].to(device=like.device, dtype=like.dtype)
        if len(indices) == 1:
            sigma = sigma.expand(like.shape[0])
        return sigma.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """RF forward process (1 - sigma) x0 + sigma eps at the schedule nodes of ``timesteps`` (begin-index aware,
        like diffusers; img2img starts from it after ``set_begin_index``)."""
        sigma = self._node_sigmas(timesteps, original_samples)
        return (1.0 - sigma) * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """:meth:`add_noise` with the argument order of diffusers' flow-matching schedulers (SD3 img2img)."""
        return self.add_noise(sample, noise, timestep)
