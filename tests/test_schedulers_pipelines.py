"""Drop-in use of the momentum schedulers in tiny SD 1.5 / SDXL / SD3 pipelines (txt2img, img2img, Flux-style call)."""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from diffusers_distill import DPMSolverHeavyBallScheduler, GHVBScheduler
from diffusers_distill.testing import momentum_scheduler_classes

VP_CLASSES = momentum_scheduler_classes("vp")
FLOW_CLASSES = momentum_scheduler_classes("flow")
CALL = dict(height=32, width=32, output_type="np", guidance_scale=7.5)


def _generate(pipe, steps=5, **kwargs):
    return pipe(
        "a photo of a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **CALL, **kwargs
    ).images


def _check_twice_identical(pipe, **kwargs):
    first = _generate(pipe, **kwargs)
    second = _generate(pipe, **kwargs)
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)  # state (history, momentum, indices) is reset per call
    return first


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_sd15_txt2img_and_img2img(sd15_pipeline, cls):
    sd15_pipeline.scheduler = cls.from_config(sd15_pipeline.scheduler.config, momentum_beta=0.8)
    assert sd15_pipeline.scheduler.config.steps_offset == 1
    _check_twice_identical(sd15_pipeline)
    img2img = StableDiffusionImg2ImgPipeline(**sd15_pipeline.components)
    image = torch.rand(1, 3, 32, 32)
    first = _check_twice_identical(img2img, image=image, strength=0.6)
    assert img2img.scheduler.begin_index is not None  # strength < 1 went through set_begin_index + add_noise
    assert first.std() > 0


@pytest.mark.parametrize("cls", [GHVBScheduler, DPMSolverHeavyBallScheduler])
def test_sdxl_txt2img_and_img2img(sdxl_pipeline, cls):
    sdxl_pipeline.scheduler = cls.from_config(sdxl_pipeline.scheduler.config, use_karras_sigmas=True)
    assert sdxl_pipeline.scheduler.config.timestep_spacing == "leading"
    _check_twice_identical(sdxl_pipeline)
    img2img = StableDiffusionXLImg2ImgPipeline(**sdxl_pipeline.components)
    _check_twice_identical(img2img, image=torch.rand(1, 3, 32, 32), strength=0.5)


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_sd3_txt2img_img2img_and_flux_style_sigmas(sd3_pipeline, cls):
    sd3_pipeline.scheduler = cls.from_config(sd3_pipeline.scheduler.config)
    assert sd3_pipeline.scheduler.config.shift == 3.0
    _check_twice_identical(sd3_pipeline)
    img2img = StableDiffusion3Img2ImgPipeline(**sd3_pipeline.components)
    _check_twice_identical(img2img, image=torch.rand(1, 3, 32, 32), strength=0.6)
    # Flux-like call: dynamic shifting, sigmas = linspace(1, 1/N, N) and mu.
    sd3_pipeline.scheduler = cls.from_config(sd3_pipeline.scheduler.config, use_dynamic_shifting=True)
    steps = 4
    _check_twice_identical(sd3_pipeline, steps=steps, sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=0.7)
