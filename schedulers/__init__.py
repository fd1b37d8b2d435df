"""Momentum schedulers (Heavy Ball / Generalized Heavy Ball, arXiv 2307.11118) as drop-in diffusers schedulers.

Reloading saved pipelines: ``save_pretrained`` records a scheduler from this package in ``model_index.json`` as
``["diffusers_distill.schedulers.scheduling_ghvb", "GHVBScheduler"]`` (its defining module). diffusers imports only
its own libraries; any other module named there is looked up in ``sys.modules`` and must expose the class *and*
``SchedulerMixin`` (diffusers picks the loading method by ``issubclass`` against the module's ``SchedulerMixin``).
So each ``scheduling_*`` module imports ``SchedulerMixin``, and ``import diffusers_distill`` puts a placeholder for
every ``scheduling_*`` module in ``sys.modules`` that imports the real one on first use
(``diffusers_distill._DeferredModule``).
Keep the module paths stable: saved folders and Hub repos name them.
"""

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
