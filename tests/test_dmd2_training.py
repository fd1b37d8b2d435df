"""DMD2 training end to end on the tiny SD 1.5 / SDXL pipelines (library, CLI and `accelerate launch`)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_distill.training import dmd2 as dmd2_module
from diffusers_distill.training.data import load_data, load_prompt_file
from diffusers_distill.training.dmd2 import DMD2Config, NonFiniteLossError, find_latest_checkpoint, train_dmd2
from diffusers_distill.training.train_dmd2 import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_dmd2.py")
CONFIGS = os.path.join(REPO, "training", "configs")
TINY = ["--resolution", "64", "--lora_rank", "4", "--fake_lora_rank", "4", "--lora_target_modules", "to_q", "to_k",
        "to_v", "to_out.0", "--train_batch_size", "2", "--lr_warmup_steps", "0", "--learning_rate", "1e-3",
        "--report_to", "none", "--dfake_gen_update_ratio", "2"]  # fmt: skip


def read_losses(output_dir):
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four captioned 64x64 images + one corrupt file, and a prompt file."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("dmd2-data")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a photo of a cat"}) + "\n")
        (folder / "corrupt.png").write_bytes(b"not a png")
        f.write(json.dumps({"file_name": "corrupt.png", "text": "a dog"}) + "\n")
    (folder / "prompts.txt").write_text("a photo of a cat\na dog\nhandwritten digit\n")
    return str(folder)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def accelerate_configs(tmp_path_factory):
    from accelerate.utils import write_basic_config

    folder = tmp_path_factory.mktemp("accelerate")
    single = str(folder / "single.yaml")
    write_basic_config(save_location=single)
    multi = folder / "multi_cpu.yaml"
    # torchrun-style launcher (MULTI_GPU config) + ACCELERATE_USE_CPU=1 -> MULTI_CPU with the gloo backend;
    # a `use_cpu: true` config would use accelerate's single-process launcher (it expects mpirun for CPU).
    multi.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                     "num_machines: 1\nmachine_rank: 0\nmain_training_function: main\nmixed_precision: 'no'\n"
                     f"use_cpu: false\nmain_process_ip: 127.0.0.1\nmain_process_port: {free_port()}\n")  # fmt: skip
    return single, str(multi)


def launch(config_file, args, num_processes=None, **env_overrides):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
               "--num_cpu_threads_per_process", "1"]  # fmt: skip
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_overrides}
    result = subprocess.run(command + [SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# ---------------------------------------------------------------------- fast: config, CLI, data
def test_config_validation_errors(tmp_path):
    base = dict(pretrained_teacher_model="x", prompt_file="p.txt")
    with pytest.raises(ValueError, match="student_type must be one of"):
        DMD2Config(**base, student_type="half").validate()
    with pytest.raises(ValueError, match="GAN losses .* need real images"):
        DMD2Config(**base, gen_cls_loss_weight=1e-3).validate()
    with pytest.raises(ValueError, match="pretrained_teacher_model is required"):
        DMD2Config(prompt_file="p.txt").validate()
    with pytest.raises(ValueError, match="denoising_timesteps must have"):
        DMD2Config(**base, num_inference_steps=2, denoising_timesteps=[999]).validate()
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        DMD2Config(**base, mixed_precision="fp8").validate()
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        DMD2Config(**base, use_ema=True, ema_decay=1.0).validate()
    assert DMD2Config(**base, num_inference_steps=4).timesteps() == [999, 749, 499, 249]
    assert DMD2Config(**base, conditioning_timestep=399).timesteps() == [399]


def test_presets_load_and_cli_overrides():
    for name in ("sd15_1step", "sd15_4step", "sdxl_1step", "sdxl_4step"):
        config = DMD2Config.from_file(os.path.join(CONFIGS, f"{name}.json"), pretrained_teacher_model="m")
        assert config.num_inference_steps == (4 if "4step" in name else 1)
    sdxl = DMD2Config.from_file(os.path.join(CONFIGS, "sdxl_1step.json"))
    assert (sdxl.conditioning_timestep, sdxl.real_guidance_scale, sdxl.dfake_gen_update_ratio) == (399, 8.0, 5)
    config = parse_config(["--config", os.path.join(CONFIGS, "sdxl_4step.json"), "--pretrained_teacher_model", "m",
                           "--learning_rate", "2e-6", "--no-gradient_checkpointing", "--validation_prompts", "a", "b"])  # fmt: skip
    assert config.learning_rate == 2e-6 and config.resolution == 1024 and not config.gradient_checkpointing
    assert config.validation_prompts == ["a", "b"]
    with pytest.raises(ValueError, match="unknown keys"):
        DMD2Config.from_file(os.path.join(CONFIGS, "sd15_1step.json"), bogus=1)


def test_data_sources_and_corrupt_images(data_dir, tmp_path):
    data = load_data(64, train_data_dir=data_dir)
    assert len(data.images) == 5 and data.prompts[-1] == "a dog"
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        images, captions = data.sample_images(2, generator)
        assert images.shape == (2, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
        assert captions == ["a photo of a cat"] * 2  # the corrupt image is never returned
    assert data.num_skipped_images > 0
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a cat"}\n{"prompt": "a dog"}\n')
    assert load_prompt_file(str(jsonl)) == ["a cat", "a dog"]
    sidecar = tmp_path / "side"
    sidecar.mkdir()
    shutil.copy(os.path.join(data_dir, "0.png"), sidecar / "x.png")
    (sidecar / "x.txt").write_text("a photo of a dog")
    assert load_data(64, train_data_dir=str(sidecar)).prompts == ["a photo of a dog"]
    with pytest.raises(ValueError, match="prompt_file must end with"):
        load_prompt_file("prompts.csv")


def test_datasets_source_is_lazy(data_dir, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(data_dir, f"{i}.png"), clean / f"{i}.png")
    (clean / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"cat {i}"}) + "\n"
                                                  for i in range(3)))  # fmt: skip
    data = load_data(64, dataset_name=str(clean), max_train_samples=2)
    assert data.prompts == ["cat 0", "cat 1"] and len(data.images) == 2
    images, captions = data.sample_images(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 64, 64) and set(captions) <= {"cat 0", "cat 1"}
    with pytest.raises(ValueError, match="caption_column='caption' is not a column"):
        load_data(64, dataset_name=str(clean), caption_column="caption")


def test_latest_checkpoint_ignores_partial(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert find_latest_checkpoint(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------- teacher and network layout
def test_teacher_conversions_and_unconditional(sd15_pipeline, sdxl_pipeline):
    from diffusers import DDPMScheduler

    from diffusers_distill.teacher import DiffusionTeacher

    teacher = DiffusionTeacher(sd15_pipeline, resolution=64)
    assert (teacher.arch, teacher.unconditional, teacher.latent_size) == ("sd15", "empty", 32)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    x_t = teacher.add_noise(x0, noise, t)
    reference = DDPMScheduler.from_config(sd15_pipeline.scheduler.config).add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher.x0_from_eps(x_t, noise, t), x0, rtol=1e-4, atol=1e-4)
    teacher.prediction_type = "v_prediction"  # v = sqrt(a) eps - sqrt(1-a) x0
    v = teacher.denoising_target(x0, noise, t)
    torch.testing.assert_close(teacher.output_to_x0(x_t, v, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher.output_to_eps(x_t, v, t), noise, rtol=1e-4, atol=1e-4)
    cond = teacher.encode_prompts(["a cat", "a dog"])
    torch.testing.assert_close(teacher.unconditional_embeddings(cond).prompt_embeds[1],
                               teacher.encode_prompts([""]).prompt_embeds[0])  # fmt: skip
    xl = DiffusionTeacher(sdxl_pipeline, resolution=64)
    cond = xl.encode_prompts(["a cat"])
    assert cond.pooled_prompt_embeds.shape == (1, 32) and cond.add_time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    uncond = xl.unconditional_embeddings(cond)
    assert xl.unconditional == "zeros" and not uncond.prompt_embeds.any() and not uncond.pooled_prompt_embeds.any()
    with pytest.raises(ValueError, match="unconditional must be one of"):
        DiffusionTeacher(sd15_pipeline, unconditional="none")


def test_shared_base_lora_roles(sd15_pipeline):
    from diffusers_distill.students import build_dmd2_networks, generator_input, generator_timesteps
    from diffusers_distill.teacher import DiffusionTeacher

    teacher = DiffusionTeacher(sd15_pipeline, resolution=64)
    unet = sd15_pipeline.unet
    x, t = torch.randn(2, 4, 32, 32), torch.tensor([999, 400])
    cond = teacher.encode_prompts(["a cat", "a dog"])
    reference = teacher.predict(unet, x, t, cond).detach()
    nets = build_dmd2_networks(unet, lora_rank=4, fake_lora_rank=8, lora_target_modules=["to_q", "to_v"],
                               gan_feature_size=16)  # fmt: skip
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == sum(
        p.numel() for p in nets.generator_parameters() + nets.critic_parameters()[: -len(list(nets.gan_head.parameters()))]
    )
    with torch.no_grad():
        for p in nets.generator_parameters():
            p.normal_()
    torch.testing.assert_close(teacher.predict(nets.teacher(), x, t, cond), reference)
    assert not torch.allclose(teacher.predict(nets.generator(), x, t, cond), reference)
    torch.testing.assert_close(teacher.predict(nets.fake(), x, t, cond), reference)  # fake B is still zero
    torch.testing.assert_close(teacher.predict(nets.teacher(), x, t, cond), reference)
    assert nets.classify(teacher, x, t, cond).shape == (2,)
    assert generator_timesteps(4) == [999, 749, 499, 249] and generator_timesteps(2) == [999, 499]
    x_in, t_in = generator_input(nets, teacher, x, cond, [999, 749, 499, 249], 0)
    assert torch.equal(x_in, x) and t_in.tolist() == [999, 999]
    x_in, t_in = generator_input(nets, teacher, x, cond, [999, 749, 499, 249], 2, torch.Generator().manual_seed(0))
    assert t_in.tolist() == [499, 499] and not torch.equal(x_in, x)
    with pytest.raises(ValueError, match="num_simulated_steps"):
        generator_input(nets, teacher, x, cond, [999], 1)


# ---------------------------------------------------------------------- in-process training
def tiny_config(teacher_dir, output_dir, **overrides):
    values = dict(pretrained_teacher_model=teacher_dir, output_dir=str(output_dir), resolution=64, lora_rank=4,
                  fake_lora_rank=4, lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"], train_batch_size=2,
                  lr_warmup_steps=0, learning_rate=1e-3, report_to="none", dfake_gen_update_ratio=2)  # fmt: skip
    values.update(overrides)
    return DMD2Config(**values)


def test_resume_gives_identical_losses(sd15_pipeline_dir, data_dir, tmp_path):
    common = dict(train_data_dir=data_dir, num_inference_steps=4, gen_cls_loss_weight=5e-3,
                  guidance_cls_loss_weight=1e-2, checkpointing_steps=3, max_train_steps=6)  # fmt: skip
    full = train_dmd2(tiny_config(sd15_pipeline_dir, tmp_path / "full", **common))
    assert full["global_step"] == 6 and full["num_skipped_images"] >= 0
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    (resumed_dir / "checkpoint-5.tmp").mkdir()  # a half-written checkpoint must be ignored
    resumed = train_dmd2(tiny_config(sd15_pipeline_dir, resumed_dir, resume_from_checkpoint="latest", **common))
    assert [r["step"] for r in resumed["losses"]] == [4, 5, 6]
    assert resumed["losses"] == full["losses"][3:]
    assert set(full["losses"][0]) == {"step", "loss_dm", "loss_fake", "loss_gen_gan", "loss_disc"}


def test_ema_student_is_exported_and_resumes_exactly(sd15_pipeline_dir, data_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    common = dict(prompt_file=os.path.join(data_dir, "prompts.txt"), student_type="full", use_ema=True, ema_decay=0.5,
                  dfake_gen_update_ratio=1, checkpointing_steps=3, max_train_steps=6)  # fmt: skip
    train_dmd2(tiny_config(sd15_pipeline_dir, tmp_path / "full", **common))
    exported = list(UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet").parameters())
    raw = list(UNet2DConditionModel.from_pretrained(tmp_path / "full" / "checkpoint-6" / "generator").parameters())
    shadow = load_file(tmp_path / "full" / "checkpoint-6" / "ema_generator.safetensors")
    assert len(shadow) == len(exported) == len(raw)
    assert all(torch.equal(shadow[f"shadow.{i}"], p) for i, p in enumerate(exported))  # the export is the EMA ...
    assert not all(torch.equal(a, b) for a, b in zip(exported, raw))  # ... not the last raw weights

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    train_dmd2(tiny_config(sd15_pipeline_dir, resumed_dir, resume_from_checkpoint="latest", **common))
    resumed = list(UNet2DConditionModel.from_pretrained(resumed_dir / "unet").parameters())
    assert all(torch.equal(a, b) for a, b in zip(exported, resumed))


def test_multistep_without_backward_simulation_uses_real_latents(sdxl_pipeline_dir, data_dir, tmp_path):
    result = train_dmd2(tiny_config(sdxl_pipeline_dir, tmp_path, train_data_dir=data_dir, num_inference_steps=2,
                                    backward_simulation=False, max_train_steps=3, checkpointing_steps=10))  # fmt: skip
    assert result["global_step"] == 3 and all(math.isfinite(r["loss_fake"]) for r in result["losses"])


def test_push_to_hub_uploads_the_exported_folder(sd15_pipeline_dir, data_dir, tmp_path, monkeypatch):
    from diffusers_distill import hub

    calls = []

    def fake_push(output_dir, repo_id, token=None, **kwargs):
        calls.append((output_dir, repo_id, token, sorted(os.listdir(output_dir))))

    monkeypatch.setattr(hub, "push_student_to_hub", fake_push)
    config = tiny_config(sd15_pipeline_dir, tmp_path / "my-student", prompt_file=os.path.join(data_dir, "prompts.txt"),
                         max_train_steps=1, push_to_hub=True, hub_token="hf_x")  # fmt: skip
    train_dmd2(config)
    assert len(calls) == 1
    output_dir, repo_id, token, files = calls[0]
    assert (output_dir, repo_id, token) == (str(tmp_path / "my-student"), "my-student", "hf_x")
    assert "pytorch_lora_weights.safetensors" in files


def test_nan_loss_stops_and_keeps_last_checkpoint(sd15_pipeline_dir, data_dir, tmp_path, monkeypatch):
    real_loss = dmd2_module.fake_score_loss
    calls = {"n": 0}

    def loss_that_breaks(output, target):
        calls["n"] += 1
        return real_loss(output, target) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(dmd2_module, "fake_score_loss", loss_that_breaks)
    config = tiny_config(sd15_pipeline_dir, tmp_path, prompt_file=os.path.join(data_dir, "prompts.txt"),
                         checkpointing_steps=2, max_train_steps=5)  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3.*checkpoint-2"):
        train_dmd2(config)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "losses.jsonl"]


# ---------------------------------------------------------------------- accelerate launch (slow)
@pytest.mark.slow
def test_launch_sd15_lora_1step_and_load_lora(sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    launch(accelerate_configs[0], ["--pretrained_teacher_model", sd15_pipeline_dir, "--output_dir", str(out),
                                   "--prompt_file", os.path.join(data_dir, "prompts.txt"), "--max_train_steps", "4",
                                   "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                                   "--validation_prompts", "a cat", "--validation_steps", "4", "--lora_alpha", "8",
                                   "--cache_text_embeddings", *TINY, "--report_to", "tensorboard"])  # fmt: skip
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for name in files)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-4"]
    assert {"generator_lora", "fake_lora", "optimizer.bin"} <= set(os.listdir(out / "checkpoint-4"))
    assert len(read_losses(out)) == 4 and os.path.exists(out / "validation" / "step-4.png")
    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir)
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([999])
    text = torch.randn(1, 77, 32)
    before = pipe.unet(x, t, text).sample
    pipe.load_lora_weights(str(out))
    after = pipe.unet(x, t, text).sample
    assert not torch.allclose(before, after)  # the trained generator adapter is non-zero


@pytest.mark.slow
def test_launch_sdxl_lora_4step_gan_resume(sdxl_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    out = tmp_path / "out"
    args = ["--pretrained_teacher_model", sdxl_pipeline_dir, "--output_dir", str(out), "--train_data_dir", data_dir,
            "--num_inference_steps", "4", "--gen_cls_loss_weight", "5e-3", "--guidance_cls_loss_weight", "1e-2",
            "--checkpointing_steps", "2", "--real_guidance_scale", "8", *TINY]  # fmt: skip
    launch(accelerate_configs[0], [*args, "--max_train_steps", "2"])
    launch(accelerate_configs[0], [*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    losses = read_losses(out)
    assert [r["step"] for r in losses] == [1, 2, 3] and "loss_disc" in losses[0]
    assert os.path.exists(out / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("arch,steps", [("sd15", "4"), ("sdxl", "1")])
def test_launch_full_students(arch, steps, sd15_pipeline_dir, sdxl_pipeline_dir, data_dir, accelerate_configs,
                              tmp_path):  # fmt: skip
    teacher = sd15_pipeline_dir if arch == "sd15" else sdxl_pipeline_dir
    out = tmp_path / "out"
    launch(accelerate_configs[0], ["--pretrained_teacher_model", teacher, "--output_dir", str(out),
                                   "--prompt_file", os.path.join(data_dir, "prompts.txt"), "--student_type", "full",
                                   "--fake_score_type", "full", "--num_inference_steps", steps,
                                   "--max_train_steps", "2", "--checkpointing_steps", "2", *TINY])  # fmt: skip
    assert {"generator", "fake"} <= set(os.listdir(out / "checkpoint-2"))
    from diffusers import DiffusionPipeline

    student = DiffusionPipeline.from_pretrained(str(out))  # a native diffusers folder (H5's export)
    expected = "StableDiffusionPipeline" if arch == "sd15" else "StableDiffusionXLPipeline"
    assert type(student).__name__ == expected


@pytest.mark.slow
def test_launch_two_processes_gloo(sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    out = tmp_path / "out"
    result = launch(accelerate_configs[1], ["--pretrained_teacher_model", sd15_pipeline_dir, "--output_dir", str(out),
                                   "--prompt_file", os.path.join(data_dir, "prompts.txt"), "--max_train_steps", "3",
                                   "--num_inference_steps", "4", "--checkpointing_steps", "2", *TINY],
           num_processes=2, ACCELERATE_USE_CPU="1")  # fmt: skip
    checksums = re.findall(r"generator checksum ([-+0-9.]+e[-+][0-9]+)", result.stdout)  # ranks' prints may interleave
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both processes hold the same trained weights
    assert "on 2 process(es)" in result.stdout
    assert [r["step"] for r in read_losses(out)] == [1, 2, 3]
    assert os.path.isdir(out / "checkpoint-2") and not os.path.exists(out / "checkpoint-2.tmp")
    assert os.path.exists(out / "checkpoint-2" / "random_states_1.pkl")
