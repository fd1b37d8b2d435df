"""DMD2 student pipelines: defaults from student_config.json, LoRA/full loading, native saving."""

import json
from unittest import mock

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusers_distill import DMD2StableDiffusionPipeline, DMD2StableDiffusionXLPipeline, testing
from diffusers_distill.constants import DEFAULT_LORA_TARGET_MODULES
from diffusers_distill.export import StudentConfig, save_full_student, save_lora_student

DMD2_4STEP = [999, 749, 499, 249]

SIZE = dict(height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def lora_student_dir(tmp_path_factory):
    """A tiny SD 1.5 LoRA student (4 steps) and the images the adapter-enabled training pipeline gives."""
    path = tmp_path_factory.mktemp("lora-student")
    pipe = testing.tiny_sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # the DEFAULT target modules: a file that loads only partly (attention dropped) would change the images
    testing.add_random_lora(pipe.unet, target_modules=DEFAULT_LORA_TARGET_MODULES, scale=0.05)
    config = StudentConfig("sd15", "lora", 4, DMD2_4STEP, base_model="base")
    save_lora_student(path, pipe.unet, "generator", StableDiffusionPipeline, config)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        "a cat", timesteps=DMD2_4STEP, guidance_scale=0.0, generator=torch.Generator().manual_seed(0), **SIZE
    ).images
    return str(path), expected


def _spy_unet_calls(pipe):
    calls = []
    original = pipe.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        calls.append((int(timestep.flatten()[0]), sample.shape[0]))
        return original(sample, timestep, *args, **kwargs)

    pipe.unet.forward = spy
    return calls


def test_lora_student_on_base_defaults_and_output(sd15_pipeline_dir, lora_student_dir):
    student_dir, expected = lora_student_dir
    pipe = DMD2StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir, student=student_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.student_config.timesteps == DMD2_4STEP
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.get_active_adapters() == ["dmd2"]
    calls = _spy_unet_calls(pipe)
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), **SIZE).images
    # defaults: the 4 training timesteps, and no unconditional pass (batch 1 per UNet call)
    assert calls == [(999, 1), (749, 1), (499, 1), (249, 1)]
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(expected), atol=1e-5, rtol=0)


def test_explicit_arguments_override_student_defaults(sd15_pipeline_dir, lora_student_dir):
    pipe = DMD2StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir, local_files_only=True)
    assert pipe.student_call_defaults() == {}  # a plain base pipeline keeps diffusers' defaults
    pipe.load_student(lora_student_dir[0])
    assert pipe.student_call_defaults() == {"num_inference_steps": 4, "timesteps": DMD2_4STEP, "guidance_scale": 0.0}
    assert pipe.student_call_defaults(num_inference_steps=2) == {"num_inference_steps": 2, "guidance_scale": 0.0}
    assert pipe.student_call_defaults(guidance_scale=2.0)["guidance_scale"] == 2.0
    pipe.set_progress_bar_config(disable=True)
    calls = _spy_unet_calls(pipe)
    pipe("a cat", num_inference_steps=2, **SIZE)
    assert calls == [(999, 1), (499, 1)]  # LCM grid sub-sampled, as configured by the export
    calls.clear()
    pipe("a cat", guidance_scale=3.0, **SIZE)
    assert [c[1] for c in calls] == [2] * 4  # CFG on -> conditional + unconditional batch


def test_fused_lora_student_matches(sd15_pipeline_dir, lora_student_dir):
    student_dir, expected = lora_student_dir
    pipe = DMD2StableDiffusionPipeline.from_pretrained(
        sd15_pipeline_dir, student=student_dir, fuse_student=True, local_files_only=True
    )
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", generator=torch.Generator().manual_seed(0), **SIZE).images
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(expected), atol=1e-4, rtol=0)


def test_full_student_folder_ours_equals_plain_diffusers(tmp_path):
    teacher = testing.tiny_sdxl_pipeline()
    student_unet = testing.tiny_sdxl_pipeline(seed=1).unet
    save_full_student(tmp_path, teacher, student_unet, StudentConfig("sdxl", "full", 4, DMD2_4STEP))
    ours = DMD2StableDiffusionXLPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    plain = DiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(plain) is StableDiffusionXLPipeline and ours.student_config.num_inference_steps == 4
    for pipe in (ours, plain):
        pipe.set_progress_bar_config(disable=True)
    a = ours("a cat", generator=torch.Generator().manual_seed(0), **SIZE).images
    b = plain(
        "a cat", num_inference_steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(0), **SIZE
    ).images
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b))


def test_save_pretrained_writes_native_class_and_config(tmp_path, sd15_pipeline_dir, lora_student_dir):
    pipe = DMD2StableDiffusionPipeline.from_pretrained(
        sd15_pipeline_dir, student=lora_student_dir[0], fuse_student=True, local_files_only=True
    )
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert StudentConfig.load(tmp_path).timesteps == DMD2_4STEP
    assert type(DiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)) is StableDiffusionPipeline


def test_load_student_rejects_wrong_arch_and_missing_config(tmp_path, sd15_pipeline_dir):
    pipe = DMD2StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir, local_files_only=True)
    with pytest.raises(ValueError, match="student_config.json"):
        pipe.load_student(str(tmp_path))
    StudentConfig("sdxl", "lora", 4, DMD2_4STEP).save(tmp_path)
    with pytest.raises(ValueError, match="student arch must be 'sd15'"):
        pipe.load_student(str(tmp_path))
    assert pipe.student_config is None


def test_hub_id_student_config_is_fetched(tmp_path, sd15_pipeline_dir):
    """A Hub id (not a local dir) fetches student_config.json with hf_hub_download (mocked: no network)."""
    StudentConfig("sd15", "full", 1, [999]).save(tmp_path)
    with (
        mock.patch("huggingface_hub.hf_hub_download", return_value=str(tmp_path / "student_config.json")) as dl,
        mock.patch.object(
            StableDiffusionPipeline,
            "from_pretrained",
            return_value=DMD2StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir),
        ),
    ):
        pipe = DMD2StableDiffusionPipeline.from_pretrained("user/dmd2-1step", revision="main")
    dl.assert_called_once_with("user/dmd2-1step", "student_config.json", revision="main")
    assert pipe.student_config.timesteps == [999]
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]


def test_save_pretrained_refuses_push_to_hub(tmp_path, sd15_pipeline_dir):
    pipe = DMD2StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir, local_files_only=True)
    with pytest.raises(ValueError, match="push_student_to_hub"):
        pipe.save_pretrained(tmp_path, push_to_hub=True, repo_id="user/x")
    assert list(tmp_path.iterdir()) == []
