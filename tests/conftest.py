"""Shared fixtures: offline, single-threaded, tiny pipelines built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from diffusers_distill import testing  # noqa: E402


@pytest.fixture
def sd15_pipeline():
    """A fresh tiny StableDiffusionPipeline (SD 1.5 classes, PNDM scheduler config)."""
    return testing.tiny_sd15_pipeline()


@pytest.fixture
def sdxl_pipeline():
    """A fresh tiny StableDiffusionXLPipeline (SDXL classes, Euler scheduler config)."""
    return testing.tiny_sdxl_pipeline()


@pytest.fixture
def sd3_pipeline():
    """A fresh tiny StableDiffusion3Pipeline (flow matching, FlowMatchEuler scheduler config)."""
    return testing.tiny_sd3_pipeline()


@pytest.fixture(scope="session")
def sd15_pipeline_dir(tmp_path_factory):
    """A tiny SD 1.5 pipeline saved to disk: the offline stand-in for a Hub model id."""
    path = tmp_path_factory.mktemp("tiny-sd15")
    testing.tiny_sd15_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sdxl_pipeline_dir(tmp_path_factory):
    """A tiny SDXL pipeline saved to disk: the offline stand-in for a Hub model id."""
    path = tmp_path_factory.mktemp("tiny-sdxl")
    testing.tiny_sdxl_pipeline().save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------- shared across test files (additive)
@pytest.fixture(params=testing.momentum_scheduler_classes("vp"), ids=lambda cls: cls.__name__)
def vp_scheduler_class(request):
    """Each VP (SD-style) momentum scheduler class in turn."""
    return request.param


@pytest.fixture(params=testing.momentum_scheduler_classes("flow"), ids=lambda cls: cls.__name__)
def flow_scheduler_class(request):
    """Each flow-matching momentum scheduler class in turn."""
    return request.param


@pytest.fixture
def sd_ddim_scheduler():
    """A DDIM scheduler on SD 1.5's noise schedule (``diffusers_distill.constants.SD_NOISE_SCHEDULE``)."""
    return testing.sd_ddim_scheduler()


@pytest.fixture
def lora_sd15_pipeline():
    """A tiny SD 1.5 pipeline whose UNet carries a random LoRA adapter "generator" (rank 4, alpha 16)."""
    pipe = testing.tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    testing.add_random_lora(pipe.unet)
    return pipe
