"""FlowMatchDPMSolverHeavyBallScheduler: see the class docstring. [P] = arXiv 2307.11118."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see schedulers/__init__.py)

from .multistep_base import FlowMatchMomentumSchedulerBase
from .slope_methods import DPMSolverHeavyBallMixin


class FlowMatchDPMSolverHeavyBallScheduler(DPMSolverHeavyBallMixin, FlowMatchMomentumSchedulerBase):
    """DPM-Solver++ (1 / 2M) + Heavy Ball for flow matching: alpha = 1 - sigma, x0 = x - sigma v (SD3, Flux).

    Config keys are those of diffusers' FlowMatchEulerDiscreteScheduler plus ``solver_order``, ``momentum_beta``
    (damping beta in (0, 1]; smaller = more momentum), so
    ``FlowMatchDPMSolverHeavyBallScheduler.from_config(pipe.scheduler.config)`` works.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        solver_order: int = 2,
        momentum_beta: float = 0.8,
        lower_order_final: bool = True,
    ):
        self._init_dpm_method()
        self._init_flow()
