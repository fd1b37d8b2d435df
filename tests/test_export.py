"""Export of DMD2 students: StudentConfig, LoRA files that reload exactly, native full-student folders."""

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from diffusers_distill import testing
from diffusers_distill.export import (
    LORA_WEIGHT_NAME,
    STUDENT_CONFIG_NAME,
    StudentConfig,
    lcm_original_steps_for,
    save_full_student,
    save_lora_student,
    student_scheduler,
)

DMD2_4STEP = [999, 749, 499, 249]
ONE_STEP = dict(num_inference_steps=1, timesteps=[999])


def _config(**overrides):
    values = dict(arch="sd15", student_type="lora", num_inference_steps=4, timesteps=DMD2_4STEP, base_model="base")
    values.update(overrides)
    return StudentConfig(**values)


def _unet_out(unet, sample_inputs):
    with torch.no_grad():
        return unet(*sample_inputs).sample


def _sd_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    sample = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    hidden = torch.randn(1, 7, c.cross_attention_dim, generator=g)
    return sample, torch.tensor([749]), hidden


# ----------------------------------------------------------------------------------------------- StudentConfig
def test_student_config_round_trip(tmp_path):
    config = _config(guidance_scale=0.0, conditioning_timestep=999)
    config.save(tmp_path)
    assert StudentConfig.load(tmp_path) == config
    data = json.loads((tmp_path / STUDENT_CONFIG_NAME).read_text())
    assert data["timesteps"] == DMD2_4STEP and data["arch"] == "sd15"
    assert StudentConfig.from_dict({**data, "future_key": 1}) == config
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"arch": "sd3"}, "arch must be one of"),
        ({"student_type": "dora"}, "student_type must be one of"),
        ({"prediction_type": "flow"}, "prediction_type must be one of"),
        ({"num_inference_steps": 0}, "num_inference_steps must be"),
        ({"timesteps": [999, 499]}, "timesteps must have num_inference_steps=4"),
        ({"timesteps": [249, 499, 749, 999]}, "strictly decreasing"),
        ({"timesteps": [1000, 749, 499, 249]}, r"\[0, 999\]"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"conditioning_timestep": 1000}, "conditioning_timestep"),
    ],
)
def test_student_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


# ----------------------------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize(
    "timesteps, original",
    [([999], 1), ([999, 499], 2), ([999, 666, 333], 1000), (DMD2_4STEP, 4), ([399], None), ([999, 500], None)],
)
def test_lcm_original_steps_for(timesteps, original):
    assert lcm_original_steps_for(timesteps) == original


@pytest.mark.parametrize("timesteps", [[999], DMD2_4STEP, [999, 874, 749, 624, 499, 374, 249, 124]])
def test_student_scheduler_default_schedule_is_training_schedule(timesteps):
    config = _config(num_inference_steps=len(timesteps), timesteps=timesteps)
    scheduler = student_scheduler(testing.sd_ddim_scheduler().config, config)
    assert isinstance(scheduler, LCMScheduler)
    scheduler.set_timesteps(len(timesteps))
    assert scheduler.timesteps.tolist() == timesteps
    # the teacher's noise schedule is kept
    assert scheduler.config.beta_schedule == testing.sd_ddim_scheduler().config.beta_schedule


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_student_reloads_exactly_with_alpha(tmp_path, arch):
    pipe = testing.tiny_sd15_pipeline() if arch == "sd15" else testing.tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    testing.add_random_lora(pipe.unet, rank=4, alpha=16)
    kwargs = dict(
        prompt="a photo of a cat", num_inference_steps=2, guidance_scale=0.0, height=64, width=64, output_type="np"
    )
    expected = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images

    out = tmp_path / "student"
    os.makedirs(out / "checkpoint-2")  # training leftovers in output_dir must survive the export
    save_lora_student(out, pipe.unet, "generator", type(pipe), _config(arch=arch))
    assert sorted(os.listdir(out)) == sorted(["checkpoint-2", LORA_WEIGHT_NAME, STUDENT_CONFIG_NAME])
    with safe_open(str(out / LORA_WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)  # one format
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 16

    fresh = testing.tiny_sd15_pipeline() if arch == "sd15" else testing.tiny_sdxl_pipeline()
    fresh.set_progress_bar_config(disable=True)
    base = fresh(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert not torch.allclose(torch.from_numpy(base), torch.from_numpy(expected), atol=1e-3)
    fresh.load_lora_weights(str(out), adapter_name="dmd2")
    reloaded = fresh(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(torch.from_numpy(reloaded), torch.from_numpy(expected), atol=1e-5, rtol=0)
    fresh.fuse_lora(lora_scale=1.0)
    fresh.unload_lora_weights()
    fused = fresh(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(torch.from_numpy(fused), torch.from_numpy(expected), atol=1e-4, rtol=0)


def test_lora_student_unet_level_round_trip(tmp_path):
    pipe = testing.tiny_sd15_pipeline()
    testing.add_random_lora(pipe.unet)
    inputs = _sd_inputs(pipe.unet)
    expected = _unet_out(pipe.unet, inputs)
    save_lora_student(tmp_path, pipe.unet, "generator", StableDiffusionPipeline, _config())
    fresh = testing.tiny_sd15_pipeline()
    fresh.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_unet_out(fresh.unet, inputs), expected, atol=1e-5, rtol=0)


def test_save_lora_student_rejects_bad_arguments(tmp_path):
    pipe = testing.tiny_sd15_pipeline()
    testing.add_random_lora(pipe.unet)
    with pytest.raises(ValueError, match="adapter_name must be one of \\['generator'\\]"):
        save_lora_student(tmp_path, pipe.unet, "fake", StableDiffusionPipeline, _config())
    with pytest.raises(ValueError, match="student_type must be 'lora'"):
        save_lora_student(tmp_path, pipe.unet, "generator", StableDiffusionPipeline, _config(student_type="full"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------- full
@pytest.mark.parametrize("timesteps", [[999], DMD2_4STEP])
def test_full_student_loads_natively_with_training_schedule(tmp_path, timesteps):
    teacher = testing.tiny_sd15_pipeline()
    student_unet = testing.tiny_sd15_pipeline(seed=1).unet  # "trained" weights differ from the teacher's
    config = _config(student_type="full", num_inference_steps=len(timesteps), timesteps=timesteps)
    save_full_student(tmp_path, teacher, student_unet, config)

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert StudentConfig.load(tmp_path) == config
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(loaded) is StableDiffusionPipeline and isinstance(loaded.scheduler, LCMScheduler)
    loaded.scheduler.set_timesteps(len(timesteps))
    assert loaded.scheduler.timesteps.tolist() == timesteps
    inputs = _sd_inputs(student_unet)
    torch.testing.assert_close(_unet_out(loaded.unet, inputs), _unet_out(student_unet, inputs))


def test_full_student_sdxl_and_rejections(tmp_path):
    teacher = testing.tiny_sdxl_pipeline()
    config = _config(arch="sdxl", student_type="full")
    with pytest.raises(ValueError, match="teacher_pipeline must be a StableDiffusionPipeline"):
        save_full_student(tmp_path, teacher, teacher.unet, _config(student_type="full"))
    with pytest.raises(ValueError, match="student_type must be 'full'"):
        save_full_student(tmp_path, teacher, teacher.unet, _config(arch="sdxl"))
    save_full_student(tmp_path, teacher, teacher.unet, config)
    save_full_student(tmp_path, teacher, teacher.unet, config)  # overwriting an existing export works
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    assert type(loaded) is StableDiffusionXLPipeline
    assert loaded.config.force_zeros_for_empty_prompt == teacher.config.force_zeros_for_empty_prompt
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_full_student_passes_hub_download_check_and_loads_in_fresh_process(tmp_path):
    """Hub repos are checked by diffusers' download() for non-native components; a fresh interpreter without
    diffusers_distill imported must load the folder (diffusers 0.42 only resolves libraries in sys.modules)."""
    import subprocess
    import sys

    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    save_full_student(tmp_path, testing.tiny_sd15_pipeline(), testing.tiny_unet(), _config(student_type="full"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    filenames = [os.path.relpath(os.path.join(r, n), tmp_path) for r, _, ns in os.walk(tmp_path) for n in ns]
    custom, folders = _get_custom_components_and_folders("user/student", index, filenames)
    assert custom == {} and {"unet", "vae", "scheduler", "text_encoder", "tokenizer"} <= set(folders)

    code = (
        "import sys, diffusers; "
        f"p = diffusers.DiffusionPipeline.from_pretrained({str(tmp_path)!r}, local_files_only=True); "
        "p.scheduler.set_timesteps(4); "
        "print(type(p).__name__, p.scheduler.timesteps.tolist(), 'diffusers_distill' in sys.modules)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=tmp_path
    )
    assert out.stdout.strip().splitlines()[-1] == "StableDiffusionPipeline [999, 749, 499, 249] False"


FRESH_LOAD = """
import json, sys
import numpy as np, torch
from diffusers import LCMScheduler, {cls}
from safetensors import safe_open

base, student, out = sys.argv[1:4]
pipe = {cls}.from_pretrained(base, local_files_only=True)
pipe.load_lora_weights(student, adapter_name="student")
with safe_open(student + "/pytorch_lora_weights.safetensors", "pt") as f:
    in_file = sorted({{k[len("unet."):].rsplit(".lora_", 1)[0] for k in f.keys()}})
adapted = sorted(n for n, m in pipe.unet.named_modules() if "student" in getattr(m, "lora_A", {{}}))
config = pipe.unet.peft_config["student"]
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe("a photo of a cat", timesteps=[999], guidance_scale=0.0, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
np.save(out, image)
print(json.dumps({{"in_file": in_file, "adapted": adapted, "r": config.r, "alpha": config.lora_alpha,
                  "modules": "diffusers_distill" in sys.modules}}))
"""


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_default_target_lora_loads_completely_with_plain_diffusers(tmp_path, arch):
    """DEFAULT --lora_target_modules: in a fresh process with plain diffusers, load_lora_weights adapts every module
    in the file, rank/alpha survive, and the 1-step image equals the one of the student that wrote the file."""
    import subprocess
    import sys

    import numpy as np

    from diffusers_distill.constants import DEFAULT_LORA_TARGET_MODULES

    make = testing.tiny_sd15_pipeline if arch == "sd15" else testing.tiny_sdxl_pipeline
    base = tmp_path / "base"
    make().save_pretrained(base)
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    testing.add_random_lora(pipe.unet, rank=4, alpha=16, target_modules=DEFAULT_LORA_TARGET_MODULES, scale=0.05)
    adapted_here = sorted(n for n, m in pipe.unet.named_modules() if "generator" in getattr(m, "lora_A", {}))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    kwargs = dict(timesteps=[999], guidance_scale=0.0, height=32, width=32, output_type="np")
    expected = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    save_lora_student(tmp_path / "student", pipe.unet, "generator", type(pipe), _config(arch=arch, **ONE_STEP))

    cls = "StableDiffusionPipeline" if arch == "sd15" else "StableDiffusionXLPipeline"
    code = FRESH_LOAD.format(cls=cls)
    argv = [sys.executable, "-c", code, str(base), str(tmp_path / "student"), str(tmp_path / "image.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["modules"]  # plain diffusers, not this package
    assert len(adapted_here) > 60 and report["in_file"] == adapted_here and report["adapted"] == adapted_here
    assert (report["r"], report["alpha"]) == (4, 16)
    loaded = np.load(tmp_path / "image.npy")
    torch.testing.assert_close(torch.from_numpy(loaded), torch.from_numpy(expected), atol=1e-5, rtol=0)
