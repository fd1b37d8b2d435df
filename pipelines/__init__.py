"""Pipelines of diffusers-distill."""

from .pipeline_dmd2 import DMD2StableDiffusionPipeline, DMD2StableDiffusionXLPipeline
from .pipeline_flow_map import FlowMapStableDiffusionPipeline, FlowMapStableDiffusionXLPipeline

__all__ = [
    "DMD2StableDiffusionPipeline",
    "DMD2StableDiffusionXLPipeline",
    "FlowMapStableDiffusionPipeline",
    "FlowMapStableDiffusionXLPipeline",
]
