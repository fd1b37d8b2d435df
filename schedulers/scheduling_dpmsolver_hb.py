"""DPMSolverHeavyBallScheduler: see the class docstring. [P] = arXiv 2307.11118 (Wizadwongsa et al., ICLR 2024)."""

from __future__ import annotations

import numpy as np
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see schedulers/__init__.py)

from .multistep_base import VPMomentumSchedulerBase
from .slope_methods import DPMSolverHeavyBallMixin


class DPMSolverHeavyBallScheduler(DPMSolverHeavyBallMixin, VPMomentumSchedulerBase):
    """DPM-Solver++ (1 or 2M, midpoint) with Heavy Ball momentum on the data prediction, for VP models.

    beta = 1 reproduces diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")`` including
    ``lower_order_final``, ``euler_at_final`` and ``final_sigmas_type``.

    Config keys are those of diffusers' DPMSolverMultistepScheduler plus ``solver_order``, ``momentum_beta``
    (damping beta in (0, 1]; smaller = more momentum), so
    ``DPMSolverHeavyBallScheduler.from_config(pipe.scheduler.config)`` works.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        momentum_beta: float = 0.8,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        lambda_min_clipped: float = -float("inf"),
    ):
        self._init_dpm_method()
        self._init_vp(lambda_min_clipped)
