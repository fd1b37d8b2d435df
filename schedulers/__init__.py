"""Momentum schedulers (Heavy Ball / Generalized Heavy Ball, arXiv 2307.11118) as drop-in diffusers schedulers."""

from .scheduling_dpmsolver_hb import DPMSolverHeavyBallScheduler
from .scheduling_flow_match_dpmsolver_hb import FlowMatchDPMSolverHeavyBallScheduler
from .scheduling_flow_match_ghvb import FlowMatchGHVBScheduler
from .scheduling_flow_match_plms_hb import FlowMatchPLMSHeavyBallScheduler
from .scheduling_ghvb import GHVBScheduler
from .scheduling_plms_hb import PLMSHeavyBallScheduler
from .scheduling_two_timed_flow_map import TwoTimedFlowMapScheduler

__all__ = [
    "DPMSolverHeavyBallScheduler",
    "FlowMatchDPMSolverHeavyBallScheduler",
    "FlowMatchGHVBScheduler",
    "FlowMatchPLMSHeavyBallScheduler",
    "GHVBScheduler",
    "PLMSHeavyBallScheduler",
    "TwoTimedFlowMapScheduler",
]
