"""diffusers-distill: fast sampling and few-step distillation for Hugging Face diffusers.

Every public class is importable from the top level (``from diffusers_distill import GHVBScheduler``);
the heavy submodules are imported lazily on first access. The scheduler modules are registered in ``sys.modules`` as
placeholders, so diffusers can reload saved pipelines that name them (see ``_DeferredModule``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

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


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a scheduler module until one of its attributes is read.

    diffusers reloads a saved pipeline whose scheduler is one of ours only if the module named in ``model_index.json``
    (e.g. ``diffusers_distill.schedulers.scheduling_ghvb``) is already in ``sys.modules``: it never imports it itself
    (see schedulers/__init__.py and docs/schedulers.md). Importing the real modules here would pull torch and diffusers
    into every ``import diffusers_distill`` (and into ``train_*.py --help``). So each module gets this placeholder,
    which imports the real module on the first attribute diffusers asks for (the class, ``SchedulerMixin``).
    The standard library's ``importlib.util.LazyLoader`` does not fit: the modules' relative imports re-enter the
    package ``__init__`` while the lazy module is half-executed.
    """

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):  # introspection (inspect, pickle) stays cheap
            raise AttributeError(attribute)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attribute)


def _register_scheduler_modules() -> None:
    spec = importlib.util.find_spec(f"{__name__}.schedulers")  # locates the folder without running its __init__
    for folder in spec.submodule_search_locations or ():
        for filename in sorted(os.listdir(folder)):
            if filename.startswith("scheduling_") and filename.endswith(".py"):
                name = f"{__name__}.schedulers.{filename[:-3]}"
                sys.modules.setdefault(name, _DeferredModule(name))


_register_scheduler_modules()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffusers_distill' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
