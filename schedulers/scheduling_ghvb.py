"""GHVBScheduler: see the class docstring. [P] = arXiv 2307.11118 (Wizadwongsa et al., ICLR 2024)."""

from __future__ import annotations

import numpy as np
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see schedulers/__init__.py)

from .multistep_base import VPMomentumSchedulerBase
from .slope_methods import GHVBMixin


class GHVBScheduler(GHVBMixin, VPMomentumSchedulerBase):
    """Generalized Heavy Ball (GHVB) sampler of order 1-4 for VP diffusion models (SD 1.5, SDXL).

    GHVB-k with damping beta keeps order k for every beta in (0, 1] and enlarges the stability region, which
    mitigates divergence artifacts at high guidance ([P] §4.2). beta = 1 is PLMS-k (Adams-Bashforth).
    ``coefficients="variable"`` (default) uses weights exact on the actual sigmabar grid (keeps order k on Karras
    and other non-uniform spacings); ``"fixed"`` uses the paper's constant mixer table m^(k)(beta).

    Config keys are those of diffusers' DPMSolverMultistepScheduler plus ``multistep_order`` (1-4; named apart from
    DPM-Solver's ``solver_order``, whose range is 1-3), ``momentum_beta`` (damping beta in (0, 1]; smaller = more
    momentum), ``coefficients`` ('variable' | 'fixed'), ``final_step`` ('multistep': the method's own formula, the
    paper's; 'dpmsolver++': a DPM-Solver++ data-form last step, see docs/schedulers.md), so
    ``GHVBScheduler.from_config(pipe.scheduler.config)`` works. ``final_sigmas_type`` defaults to 'sigma_min' (end
    at sigmabar(t=0), like DDIM / PNDM / DEIS): the last multistep step then stays short (docs/schedulers.md).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        multistep_order: int = 4,
        momentum_beta: float = 0.8,
        coefficients: str = "variable",
        final_step: str = "multistep",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "sigma_min",
        lower_order_final: bool = False,
    ):
        self._init_slope_method()
        self._init_vp()
