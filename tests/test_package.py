import importlib

import numpy as np
import torch

import diffusers_distill


def test_every_export_resolves():
    for name in diffusers_distill.__all__:
        assert getattr(diffusers_distill, name) is not None, name


def test_subpackages_share_one_namespace():
    for sub in ("schedulers", "pipelines", "training"):
        module = importlib.import_module(f"diffusers_distill.{sub}")
        assert module.__name__ == f"diffusers_distill.{sub}"


def test_tiny_pipelines_generate(sd15_pipeline, sdxl_pipeline, sd3_pipeline):
    for pipe in (sd15_pipeline, sdxl_pipeline, sd3_pipeline):
        image = pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert image.shape == (1, 32, 32, 3)
        assert np.isfinite(image).all()


def test_tiny_pipeline_round_trips_through_disk(sd15_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir, local_files_only=True)
    assert pipe.tokenizer("a photo of a cat").input_ids[1:-1] == pipe.tokenizer("a photo of a cat").input_ids[1:-1]
    assert len(pipe.tokenizer("a photo of a cat").input_ids) == 7  # bos + 5 whole-word tokens + eos
