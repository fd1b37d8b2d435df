"""diffusers-distill: fast sampling and few-step distillation for Hugging Face diffusers.

Every public class is importable from the top level (``from diffusers_distill import GHVBScheduler``);
the heavy submodules are imported lazily on first access, except the schedulers (needed to reload saved pipelines).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    # schedulers
    "GHVBScheduler": ".schedulers",
    "PLMSHeavyBallScheduler": ".schedulers",
    "DPMSolverHeavyBallScheduler": ".schedulers",
    "FlowMatchGHVBScheduler": ".schedulers",
    "FlowMatchPLMSHeavyBallScheduler": ".schedulers",
    "FlowMatchDPMSolverHeavyBallScheduler": ".schedulers",
    "TwoTimedFlowMapScheduler": ".schedulers",
    # DMD2 training (noise algebra, prompt encoding, losses, network layout, training loop)
    "NoiseSchedule": ".noise_schedule",
    "PromptEncoder": ".teacher",
    "distribution_matching_loss": ".losses",
    "fake_score_loss": ".losses",
    "gan_generator_loss": ".losses",
    "gan_discriminator_loss": ".losses",
    "DMD2Networks": ".students",
    "build_dmd2_networks": ".students",
    "DMD2Config": ".training.dmd2",
    "train_dmd2": ".training.dmd2",
    "distill_digits_teacher": ".training.distill_digits",
    # DMD2 student outputs
    "DMD2StableDiffusionPipeline": ".pipelines",
    "DMD2StableDiffusionXLPipeline": ".pipelines",
    "StudentConfig": ".export",
    "save_lora_student": ".export",
    "save_full_student": ".export",
    "push_student_to_hub": ".hub",
    "write_model_card": ".hub",
    # two-timed flow maps (students, teacher velocity, losses)
    "FlowMapUNet": ".flow_map",
    "build_flow_map_student": ".flow_map",
    "merge_flow_map_student": ".flow_map",
    "sd_teacher_velocity": ".flow_map",
    "flow_match_teacher_velocity": ".flow_map",
    "FlowMapStableDiffusionPipeline": ".pipelines",
    "FlowMapStableDiffusionXLPipeline": ".pipelines",
    "itvm_loss": ".losses",
    "lagrangian_flow_map_loss": ".losses",
    "mean_flow_loss": ".losses",
    "progressive_flow_map_loss": ".losses",
    "GaussianMixture": ".gaussian_mixture",
    "GuidedGaussianMixture": ".gaussian_mixture",
    "GaussianMixtureDenoiser": ".gaussian_mixture",
    # bundled digits teacher + built-in evaluation
    "digits_teacher_path": ".digits",
    "digits_classifier_path": ".digits",
    "load_digits_split": ".digits",
    "digit_prompt": ".digits",
    "DigitClassifier": ".evaluation",
    "load_digit_classifier": ".evaluation",
    "prompt_accuracy": ".evaluation",
    "digits_fd": ".evaluation",
    "image_mse": ".evaluation",
    "image_psnr": ".evaluation",
    "evaluate_pipeline": ".evaluation",
    "save_image_grid": ".evaluation",
    # tiny offline pipelines (tests, benchmarks, examples)
    "tiny_sd15_pipeline": ".testing",
    "tiny_sdxl_pipeline": ".testing",
    "tiny_sd3_pipeline": ".testing",
}

__all__ = sorted(_EXPORTS)

# Imported eagerly (not lazily like the rest): diffusers reloads a saved pipeline whose scheduler is one of ours only if
# the scheduler's module is already in sys.modules (see schedulers/__init__.py and docs/schedulers.md).
from . import schedulers as _schedulers  # noqa: E402,F401


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffusers_distill' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
