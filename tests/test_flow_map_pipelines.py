"""Flow-map pipelines: the loop calls the student with both times, defaults come from the saved folder, and a saved
pipeline gives the same images after from_pretrained in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffusers_distill import (
    FlowMapStableDiffusionPipeline,
    FlowMapStableDiffusionXLPipeline,
    TwoTimedFlowMapScheduler,
    testing,
)
from diffusers_distill.flow_map import build_flow_map_student, merge_flow_map_student

PIPELINES = {
    "sd15": (testing.tiny_sd15_pipeline, FlowMapStableDiffusionPipeline),
    "sdxl": (testing.tiny_sdxl_pipeline, FlowMapStableDiffusionXLPipeline),
}


def _flow_map_pipeline(arch, perturb=True, **scheduler_kwargs):
    make_teacher, cls = PIPELINES[arch]
    teacher = make_teacher()
    student = build_flow_map_student(teacher.unet, "lora", jump_embedding_dim=8, lora_rank=4)
    if perturb:  # as after training: the second-time pathway and the adapter are nonzero
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in student.named_parameters():
                if "lora_B" in name or "cond_proj" in name:
                    param.normal_(0, 0.3)
    pipe = cls.from_teacher(teacher, merge_flow_map_student(student), default_num_inference_steps=2, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return teacher, pipe


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_untrained_student_pipeline_equals_teacher_with_the_scheduler(arch):
    """Zero pathway: the flow-map pipeline = the stock pipeline (teacher UNet, no CFG) with the same scheduler."""
    teacher, pipe = _flow_map_pipeline(arch, perturb=False, sigma_spacing="karras")
    teacher.scheduler = TwoTimedFlowMapScheduler.from_config(pipe.scheduler.config)
    teacher.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, output_type="latent", height=32, width=32)
    ours = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    stock = teacher("a photo of a cat", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_the_loop_passes_each_jump_to_the_student():
    _, pipe = _flow_map_pipeline("sd15", sigma_spacing="shifted", shift=3.0)
    seen = []
    handle = pipe.unet.time_embedding.cond_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    pipe("a photo of a cat", num_inference_steps=3, output_type="latent", height=32, width=32)
    handle.remove()
    from diffusers_distill.flow_map import jump_embedding

    expected = [jump_embedding(torch.tensor([s - t], dtype=torch.float64), 8).float() for s, t in pipe.scheduler.jumps]
    assert len(seen) == 3 and len({round(s - t, 6) for s, t in pipe.scheduler.jumps}) == 3  # unequal jumps
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want.expand_as(got))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_save_then_from_pretrained_in_a_fresh_process_gives_the_same_images(arch, tmp_path):
    _, pipe = _flow_map_pipeline(arch, sigma_spacing="karras", gamma=0.3)
    images = pipe(
        "a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32
    ).images
    pipe.save_pretrained(tmp_path / "pipe")
    cls = type(pipe).__name__
    script = textwrap.dedent(f"""
        import numpy as np, torch
        import diffusers_distill
        pipe = diffusers_distill.{cls}.from_pretrained({str(tmp_path / "pipe")!r})
        assert pipe.config.default_num_inference_steps == 2
        assert pipe.scheduler.config.gamma == 0.3 and pipe.scheduler.config.sigma_spacing == "karras"
        pipe.set_progress_bar_config(disable=True)
        images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np",
                      height=32, width=32).images
        np.save({str(tmp_path / "images.npy")!r}, images)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, rtol=0, atol=1e-5)
    two_steps = images
    one_step = pipe(
        "a photo of a cat",
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        height=32,
        width=32,
    ).images
    assert not np.allclose(one_step, two_steps)  # the default (2 steps) was used above


def test_pipeline_argument_errors():
    teacher, pipe = _flow_map_pipeline("sd15")
    with pytest.raises(ValueError, match="default_num_inference_steps"):
        FlowMapStableDiffusionPipeline.from_teacher(teacher, pipe.unet, default_num_inference_steps=0)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        FlowMapStableDiffusionPipeline.from_teacher(teacher, teacher.unet)("a photo of a cat")
    with pytest.raises(ValueError, match="exactly one of `prompt`"):
        pipe()
    with pytest.raises(ValueError, match="gamma"):
        pipe("a photo of a cat", gamma=3.0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_student_loads_into_the_teacher_pipeline_in_a_fresh_process(arch, tmp_path, request):
    """save_flow_map_lora_student -> FlowMap*Pipeline.from_pretrained(teacher_folder, student=folder) gives the images
    of the merged student (the teacher UNet gains the saved pathway, the adapter loads with load_lora_weights)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffusers_distill.flow_map import save_flow_map_lora_student

    teacher_dir = request.getfixturevalue(f"{arch}_pipeline_dir")
    make_teacher, cls = PIPELINES[arch]
    teacher = cls.from_pretrained(teacher_dir)  # loads the teacher's own components
    student = build_flow_map_student(teacher.unet, "lora", jump_embedding_dim=8, lora_rank=4, lora_alpha=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name or "cond_proj" in name:
                param.normal_(0, 0.3)
    base = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    save_flow_map_lora_student(
        tmp_path / "student",
        student,
        base,
        default_num_inference_steps=2,
        sigma_spacing="shifted",
        shift=2.0,
        gamma=0.2,
    )
    saved = json.loads((tmp_path / "student" / "flow_map_config.json").read_text())
    assert (saved["arch"], saved["base_model"]) == (arch, None)  # evaluation.load_pipeline picks the class by it
    reference = cls.from_teacher(
        teacher,
        merge_flow_map_student(student),
        default_num_inference_steps=2,
        sigma_spacing="shifted",
        shift=2.0,
        gamma=0.2,
    )
    reference.set_progress_bar_config(disable=True)
    images = reference(
        "a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32
    ).images
    script = textwrap.dedent(f"""
        import numpy as np, torch
        import diffusers_distill
        pipe = diffusers_distill.{cls.__name__}.from_pretrained({teacher_dir!r}, student={str(tmp_path / "student")!r})
        assert pipe.config.default_num_inference_steps == 2 and pipe.scheduler.config.gamma == 0.2
        pipe.set_progress_bar_config(disable=True)
        images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np",
                      height=32, width=32).images
        np.save({str(tmp_path / "images.npy")!r}, images)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), images, rtol=0, atol=1e-4)
