"""FlowMatchGHVBScheduler: see the class docstring. [P] = arXiv 2307.11118 (Wizadwongsa et al., ICLR 2024)."""

from __future__ import annotations

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see schedulers/__init__.py)

from .multistep_base import FlowMatchMomentumSchedulerBase
from .slope_methods import GHVBMixin


class FlowMatchGHVBScheduler(GHVBMixin, FlowMatchMomentumSchedulerBase):
    """GHVB-k on the flow-matching ODE dx/dsigma = v (SD3, Flux). Order 1 with beta = 1 is
    FlowMatchEulerDiscreteScheduler; see ``GHVBScheduler`` for the method.

    Config keys are those of diffusers' FlowMatchEulerDiscreteScheduler plus ``multistep_order`` (1-4; named apart
    from DPM-Solver's ``solver_order``, whose range is 1-3), ``momentum_beta`` (damping beta in (0, 1]; smaller =
    more momentum), ``coefficients`` ('variable' | 'fixed'), ``final_step`` ('multistep': the method's own formula,
    the paper's; 'dpmsolver++': a DPM-Solver++ data-form last step, see docs/schedulers.md), so
    ``FlowMatchGHVBScheduler.from_config(pipe.scheduler.config)`` works.
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
        multistep_order: int = 4,
        momentum_beta: float = 0.8,
        coefficients: str = "variable",
        final_step: str = "multistep",
        lower_order_final: bool = False,
    ):
        self._init_slope_method()
        self._init_flow()
