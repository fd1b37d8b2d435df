"""Pipelines of diffusers-distill."""

from .pipeline_dmd2 import DMD2StableDiffusionPipeline, DMD2StableDiffusionXLPipeline

__all__ = ["DMD2StableDiffusionPipeline", "DMD2StableDiffusionXLPipeline"]
