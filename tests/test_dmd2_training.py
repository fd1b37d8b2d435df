"""DMD2 training end to end on the tiny SD 1.5 / SDXL pipelines (library, CLI and `accelerate launch`)."""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_distill.training import dmd2 as dmd2_module
from diffusers_distill.training.config import ConfigError
from diffusers_distill.training.data import load_data, load_prompt_file
from diffusers_distill.training.dmd2 import DMD2Config, NonFiniteLossError, find_latest_checkpoint, train_dmd2
from diffusers_distill.training.train_dmd2 import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_dmd2.py")
CONFIGS = os.path.join(REPO, "training", "configs")
TINY = [
    *("--resolution", "64", "--lora_rank", "4", "--fake_lora_rank", "4"),
    *("--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0"),
    *("--train_batch_size", "2", "--lr_warmup_steps", "0", "--learning_rate", "1e-3"),
    *("--report_to", "none", "--dfake_gen_update_ratio", "2"),
]


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
    multi.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
        "num_machines: 1\nmachine_rank: 0\nmain_training_function: main\nmixed_precision: 'no'\n"
        f"use_cpu: false\nmain_process_ip: 127.0.0.1\nmain_process_port: {free_port()}\n"
    )
    return single, str(multi)


def launch(config_file, args, num_processes=None, **env_overrides):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    command += ["--num_cpu_threads_per_process", "1"]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_overrides}
    result = subprocess.run(command + [SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


# ---------------------------------------------------------------------- fast: config, CLI, data
def test_config_validation_errors(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    base = dict(pretrained_teacher_model="x", prompt_file=str(prompts))
    cases = [
        (dict(base, student_type="half"), r"--student_type must be one of \('lora', 'full'\), got 'half'"),
        (dict(base, generator_gan_loss_weight=1e-3), "GAN losses .* need real images"),
        (dict(prompt_file=str(prompts)), "--pretrained_teacher_model is required"),
        (dict(base, num_inference_steps=2, denoising_timesteps=[999]), "--denoising_timesteps must have 2 entries"),
        (dict(base, num_inference_steps=2, denoising_timesteps=[499, 999]), "strictly decreasing"),
        (dict(base, mixed_precision="fp8"), "--mixed_precision must be one of"),
        (dict(base, use_ema=True, ema_decay=1.0), r"--ema_decay must be in \[0, 1\)"),
        (dict(base, resolution=60), "--resolution must be a multiple of 8, got 60"),
        (dict(base, gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1, got 0"),
        (dict(base, prompt_file=str(tmp_path / "missing.txt")), "--prompt_file not found"),
        (dict(base, pretrained_teacher_model=str(tmp_path)), "not a diffusers pipeline folder"),
        (dict(base, push_to_hub=True, hub_model_id="a/b/c"), "--hub_model_id must look like"),
        (dict(base, enable_xformers_memory_efficient_attention=True), "needs the xformers package"),
        (
            dict(base, num_inference_steps=4, teacher_regression_from_step=0),
            r"--teacher_regression_from_step must be in \[1, 3\] .*got 0",
        ),
        (dict(base, teacher_regression_from_step=1), r"needs a multi-step student \(--num_inference_steps >= 2\)"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            DMD2Config(**values).validate()
    assert DMD2Config(**base, num_inference_steps=4).timesteps() == [999, 749, 499, 249]
    assert DMD2Config(**base, conditioning_timestep=399).timesteps() == [399]
    DMD2Config(**dict(base, pretrained_teacher_model="sd15")).validate()  # the bundled teachers are accepted by name


def test_presets_load_and_cli_overrides():
    for name in ("sd15_1step", "sd15_4step", "sdxl_1step", "sdxl_4step", "sdxl_4step_full"):
        config = DMD2Config.from_file(os.path.join(CONFIGS, f"{name}.json"), pretrained_teacher_model="m")
        assert config.num_inference_steps == (4 if "4step" in name else 1)
    # the reference's SDXL 4-step recipes: a LoRA or full generator, always a FULL fake score and the GAN term
    for name, generator, lr in (("sdxl_4step", "lora", 5e-5), ("sdxl_4step_full", "full", 5e-7)):
        config = DMD2Config.from_file(os.path.join(CONFIGS, f"{name}.json"))
        assert (config.student_type, config.fake_score_type, config.learning_rate) == (generator, "full", lr)
        assert (config.generator_gan_loss_weight, config.fake_score_gan_loss_weight) == (5e-3, 1e-2)
        assert config.teacher_regression_from_step is None  # the reference trains every step with DMD2
    # ours (the reference has no SD 1.5 4-step recipe): steps 3 and 4 regress onto the teacher (docs/dmd2.md)
    assert DMD2Config.from_file(os.path.join(CONFIGS, "sd15_4step.json")).teacher_regression_from_step == 2
    sdxl = DMD2Config.from_file(os.path.join(CONFIGS, "sdxl_1step.json"))
    assert (sdxl.conditioning_timestep, sdxl.real_guidance_scale, sdxl.dfake_gen_update_ratio) == (399, 8.0, 5)
    preset = os.path.join(CONFIGS, "sdxl_4step.json")
    flags = ["--pretrained_teacher_model", "m", "--learning_rate", "2e-6", "--no-gradient_checkpointing"]
    config = parse_config(["--config", preset, *flags, "--validation_prompts", "a", "b"])
    assert config.learning_rate == 2e-6 and config.resolution == 1024 and not config.gradient_checkpointing
    assert config.validation_prompts == ["a", "b"]
    with pytest.raises(ValueError, match="unknown keys"):
        DMD2Config.from_file(os.path.join(CONFIGS, "sd15_1step.json"), bogus=1)
    # the DMD2 reference code's names are accepted for the fake-score options
    reference = parse_config(["--guidance_learning_rate", "3e-4", "--gen_cls_loss_weight", "0.5"])
    assert (reference.fake_score_learning_rate, reference.generator_gan_loss_weight) == (3e-4, 0.5)
    assert DMD2Config.from_dict({"guidance_cls_loss_weight": 0.25}).fake_score_gan_loss_weight == 0.25


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
    rows = [json.dumps({"file_name": f"{i}.png", "text": f"cat {i}"}) + "\n" for i in range(3)]
    (clean / "metadata.jsonl").write_text("".join(rows))
    data = load_data(64, dataset_name=str(clean), max_train_samples=2)
    assert data.prompts == ["cat 0", "cat 1"] and len(data.images) == 2
    images, captions = data.sample_images(3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 64, 64) and set(captions) <= {"cat 0", "cat 1"}
    with pytest.raises(ValueError, match="caption_column='caption' is not a column"):
        load_data(64, dataset_name=str(clean), caption_column="caption")


def test_parallel_image_decoding_draws_the_same_batches(data_dir):
    serial, parallel = load_data(64, train_data_dir=data_dir), load_data(64, train_data_dir=data_dir, num_workers=3)
    for step in range(4):
        a = serial.sample_images(3, torch.Generator().manual_seed(step))
        b = parallel.sample_images(3, torch.Generator().manual_seed(step))
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert serial.num_skipped_images == parallel.num_skipped_images


def test_step_count_and_learning_rate_scaling():
    from diffusers_distill.training import core

    config = DMD2Config(max_train_steps=None, num_train_epochs=3, train_batch_size=4, gradient_accumulation_steps=2)
    assert core.num_training_steps(config, num_prompts=17, num_processes=2) == 3 * 2  # ceil(17 / 16) per epoch
    config.max_train_steps = 5
    assert core.num_training_steps(config, num_prompts=17, num_processes=2) == 5
    assert core.scaled_learning_rate(config, 1e-4, num_processes=2) == 1e-4
    config.scale_lr = True
    assert core.scaled_learning_rate(config, 1e-4, num_processes=2) == pytest.approx(1e-4 * 2 * 4 * 2)


def test_latest_checkpoint_ignores_partial(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert find_latest_checkpoint(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------- noise algebra, prompts, network layout
def test_noise_schedule_matches_diffusers_and_inverts(sd15_pipeline):
    from diffusers import DDPMScheduler

    from diffusers_distill.noise_schedule import NoiseSchedule

    schedule = NoiseSchedule.from_scheduler_config(sd15_pipeline.scheduler.config)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 999])
    x_t = schedule.add_noise(x0, noise, t)
    reference = DDPMScheduler.from_config(sd15_pipeline.scheduler.config).add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.x0_from_eps(x_t, noise, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, x0, t), noise, rtol=1e-4, atol=1e-4)
    v_schedule = NoiseSchedule(schedule.alphas_cumprod, "v_prediction")  # v = sqrt(a) eps - sqrt(1-a) x0
    v = v_schedule.denoising_target(x0, noise, t)
    v_reference = DDPMScheduler.from_config(sd15_pipeline.scheduler.config).get_velocity(x0, noise, t)
    torch.testing.assert_close(v, v_reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_schedule.output_to_x0(x_t, v, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_schedule.output_to_eps(x_t, v, t), noise, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        NoiseSchedule(schedule.alphas_cumprod, "sample")


def test_prompt_encoder_and_unconditional(sd15_pipeline, sdxl_pipeline):
    from diffusers_distill.teacher import PromptEncoder

    encoder = PromptEncoder(sd15_pipeline, resolution=64)
    assert (encoder.arch, encoder.unconditional) == ("sd15", "empty")
    cond = encoder(["a cat", "a dog"])
    torch.testing.assert_close(encoder.unconditional_embeddings(cond).prompt_embeds[1], encoder([""]).prompt_embeds[0])
    xl = PromptEncoder(sdxl_pipeline, resolution=64)
    cond = xl(["a cat"])
    assert cond.pooled_prompt_embeds.shape == (1, 32) and cond.add_time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    uncond = xl.unconditional_embeddings(cond)
    assert xl.unconditional == "zeros" and not uncond.prompt_embeds.any() and not uncond.pooled_prompt_embeds.any()
    with pytest.raises(ValueError, match="unconditional must be one of"):
        PromptEncoder(sd15_pipeline, unconditional="none")


def test_shared_base_lora_roles(sd15_pipeline):
    from diffusers_distill.noise_schedule import NoiseSchedule
    from diffusers_distill.students import build_dmd2_networks, generator_input, generator_timesteps
    from diffusers_distill.teacher import PromptEncoder, unet_output

    schedule = NoiseSchedule.from_scheduler_config(sd15_pipeline.scheduler.config)
    unet = sd15_pipeline.unet
    x, t = torch.randn(2, 4, 32, 32), torch.tensor([999, 400])
    cond = PromptEncoder(sd15_pipeline, resolution=64)(["a cat", "a dog"])
    reference = unet_output(unet, x, t, cond).detach()
    nets = build_dmd2_networks(
        unet, lora_rank=4, fake_lora_rank=8, lora_target_modules=["to_q", "to_v"], gan_feature_size=16
    )
    head = list(nets.gan_head.parameters())
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(trainable) == len(nets.parameters_of("generator")) + len(nets.parameters_of("fake_score")) - len(head)
    with torch.no_grad():
        for p in nets.parameters_of("generator"):
            p.normal_()

    def output(role):
        with torch.no_grad(), nets.role(role) as role_unet:
            return unet_output(role_unet, x, t, cond)

    torch.testing.assert_close(output("real_score"), reference)
    assert not torch.allclose(output("generator"), reference)
    torch.testing.assert_close(output("fake_score"), reference)  # the fake score's B matrices are still zero
    with nets.role("generator"):  # roles nest: leaving the inner one restores the outer adapter
        torch.testing.assert_close(output("real_score"), reference)
        assert unet.active_adapters() == ["generator"]
    assert nets.gan_logits(x, t, cond).shape == (2,)
    with pytest.raises(ValueError, match="role must be one of"):
        nets.unet("critic")
    assert generator_timesteps(4) == [999, 749, 499, 249] and generator_timesteps(2) == [999, 499]
    x_in, t_in = generator_input(nets, schedule, x, cond, [999, 749, 499, 249], 0)
    assert torch.equal(x_in, x) and t_in.tolist() == [999, 999]
    x_in, t_in = generator_input(nets, schedule, x, cond, [999, 749, 499, 249], 2, torch.Generator().manual_seed(0))
    assert t_in.tolist() == [499, 499] and not torch.equal(x_in, x)
    with pytest.raises(ValueError, match="num_simulated_steps"):
        generator_input(nets, schedule, x, cond, [999], 1)


@pytest.mark.parametrize("fake_score_type", ["lora", "full"])
def test_step_conditioned_fake_score(sd15_pipeline, fake_score_type):
    """The fake score's step embedding starts at zero, acts only in the fake-score role with a step set (never on
    the generator or the real score of a shared base), and selects one learned offset per generator step."""
    import copy

    from diffusers_distill.students import build_dmd2_networks
    from diffusers_distill.teacher import PromptEncoder, unet_output

    unet = copy.deepcopy(sd15_pipeline.unet)
    x, t = torch.randn(2, 4, 32, 32), torch.tensor([999, 400])
    cond = PromptEncoder(sd15_pipeline, resolution=64)(["a cat", "a dog"])
    nets = build_dmd2_networks(
        unet,
        fake_score_type=fake_score_type,
        lora_rank=4,
        fake_lora_rank=4,
        lora_target_modules=["to_q"],
        num_fake_score_steps=4,
    )

    def output(role, step=None):
        context = nets.sample_step(step) if step is not None else contextlib.nullcontext()
        with torch.no_grad(), context, nets.role(role) as role_unet:
            return unet_output(role_unet, x, t, cond)

    unconditioned = output("fake_score")
    torch.testing.assert_close(output("fake_score", 2), unconditioned)  # zero-initialised
    embedding = nets.fake_score_step_embedding.weight
    assert any(p is embedding for p in nets.parameters_of("fake_score"))
    assert not any(p is embedding for p in nets.parameters_of("generator"))
    with torch.no_grad():
        embedding.copy_(torch.randn_like(embedding))
    real, generator = output("real_score"), output("generator")
    outputs = [output("fake_score", k) for k in range(4)]
    assert all(not torch.allclose(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1 :])
    torch.testing.assert_close(output("fake_score"), unconditioned)  # no step set: unconditioned
    with nets.sample_step(1):
        torch.testing.assert_close(output("real_score"), real)
        torch.testing.assert_close(output("generator"), generator)
        with nets.role("fake_score"):  # roles nest: the real score inside the fake score's context stays plain
            torch.testing.assert_close(output("real_score"), real)
    with pytest.raises(ValueError, match=r"step must be in \[0, 3\], got 4"):
        with nets.sample_step(4):
            pass


# ---------------------------------------------------------------------- step functions, one at a time
@pytest.fixture
def dmd2_parts(sd15_pipeline):
    from accelerate import Accelerator

    config = DMD2Config(
        pretrained_teacher_model="unused",
        resolution=64,
        lora_rank=4,
        fake_lora_rank=4,
        lora_target_modules=["to_q", "to_v"],
        train_batch_size=2,
    )
    accelerator = Accelerator(cpu=True)
    sd15_pipeline.set_progress_bar_config(disable=True)
    return config, accelerator, dmd2_module.build_parts(config, accelerator, sd15_pipeline, 64), None


def test_generator_step_updates_only_the_generator(dmd2_parts):
    from diffusers_distill.training.data import TrainingData

    config, accelerator, parts, _ = dmd2_parts
    data = TrainingData(["a cat", "a dog"])
    rng = torch.Generator().manual_seed(0)
    x0, cond, _, _ = dmd2_module.generator_forward(parts, config, accelerator, data, rng, rng, with_grad=True)
    assert x0.shape == (2, 4, 32, 32) and x0.requires_grad
    logs = dmd2_module.generator_step(parts, config, accelerator, x0, cond, rng)
    assert set(logs) == {"loss_dm"} and math.isfinite(logs["loss_dm"].item())
    generator, fake = parts.networks.parameters_of("generator"), parts.networks.parameters_of("fake_score")
    assert all(p.grad is not None for p in generator) and any(p.grad.abs().sum() > 0 for p in generator)
    assert all(p.grad is None for p in fake)
    logs = dmd2_module.fake_score_step(parts, config, accelerator, data, x0, cond, rng)
    assert set(logs) == {"loss_fake"} and math.isfinite(logs["loss_fake"].item())
    assert all(p.grad is not None for p in fake) and any(p.grad.abs().sum() > 0 for p in fake)


@pytest.mark.parametrize("below_input,k,highest", [(False, 2, 980), (True, 0, 980), (True, 2, 499), (True, 3, 249)])
def test_dm_timesteps_below_the_step_input(dmd2_parts, monkeypatch, below_input, k, highest):
    """--dm_timesteps_below_input: the DM loss of step k noises its sample at most to the step's own t_k."""
    config, accelerator, parts, _ = dmd2_parts
    config = dataclasses.replace(config, dm_timesteps_below_input=below_input)
    parts.timesteps = [999, 749, 499, 249]
    drawn = []
    original = dmd2_module.randint

    def recording_randint(low, high, *args):
        drawn.append((low, high))
        return original(low, high, *args)

    monkeypatch.setattr(dmd2_module, "randint", recording_randint)
    x0 = torch.randn(2, 4, 32, 32, requires_grad=True)
    dmd2_module.generator_step(parts, config, accelerator, x0, parts.embed(["a", "b"]), torch.Generator(), k)
    assert drawn[0] == (20, highest + 1)


def test_late_steps_regress_onto_the_teacher(dmd2_parts):
    """--teacher_regression_from_step 2: steps 2 and 3 of a 4-step student regress x0 onto the teacher's CFG x0 at
    the step's own input (no DM loss); step 1 keeps the DM loss; only the generator gets gradients."""
    from diffusers_distill.teacher import guided_x0

    config, accelerator, parts, _ = dmd2_parts
    config = dataclasses.replace(config, num_inference_steps=4, teacher_regression_from_step=2)
    cond = parts.embed(["a cat", "a dog"])
    x_t, t = torch.randn(2, 4, 32, 32), torch.full((2,), 499)
    with torch.no_grad(), parts.networks.role("real_score") as teacher:
        uncond = parts.prompt_encoder.unconditional_embeddings(cond)
        x0_teacher = guided_x0(teacher, parts.schedule, x_t, t, cond, uncond, config.real_guidance_scale)
    x0 = (x0_teacher + 0.5).requires_grad_(True)  # 0.5 away from the teacher everywhere: MSE 0.25
    logs = dmd2_module.generator_step(parts, config, accelerator, x0, cond, torch.Generator(), 2, (x_t, t))
    assert set(logs) == {"loss_teacher_regression"}
    assert logs["loss_teacher_regression"].item() == pytest.approx(0.25, rel=1e-5)
    assert all(p.grad is None for p in parts.networks.parameters_of("fake_score"))
    x0 = torch.randn(2, 4, 32, 32, requires_grad=True)
    logs = dmd2_module.generator_step(parts, config, accelerator, x0, cond, torch.Generator(), 1, (x_t, t))
    assert set(logs) == {"loss_dm"}


def test_fake_score_step_regresses_the_denoising_target(dmd2_parts):
    """With the fake score's output replaced by the exact target, the loss is 0; with zeros it is E[target^2]."""
    from diffusers_distill.training.data import TrainingData

    config, accelerator, parts, _ = dmd2_parts
    x0 = torch.randn(2, 4, 32, 32)
    cond = parts.embed(["a cat", "a dog"])
    seen = {}

    def exact_target(unet, x_t, t, embeddings):
        rng = torch.Generator().manual_seed(7)
        t_ref = torch.randint(0, 1000, (2,), generator=rng)
        noise = torch.randn(x0.shape, generator=rng)
        assert torch.equal(t, t_ref)
        seen["target"] = parts.schedule.denoising_target(x0, noise, t)
        return seen["target"].clone().requires_grad_(True)

    original = dmd2_module.unet_output
    dmd2_module.unet_output = exact_target
    try:
        logs = dmd2_module.fake_score_step(
            parts, config, accelerator, TrainingData(["x"]), x0, cond, torch.Generator().manual_seed(7)
        )
    finally:
        dmd2_module.unet_output = original
    assert logs["loss_fake"].item() == 0.0 and seen["target"].abs().sum() > 0


# ---------------------------------------------------------------------- in-process training
def tiny_config(teacher_dir, output_dir, **overrides):
    values = dict(
        pretrained_teacher_model=teacher_dir,
        output_dir=str(output_dir),
        resolution=64,
        lora_rank=4,
        fake_lora_rank=4,
        lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        train_batch_size=2,
        lr_warmup_steps=0,
        learning_rate=1e-3,
        report_to="none",
        dfake_gen_update_ratio=2,
    )
    values.update(overrides)
    return DMD2Config(**values)


def test_resume_gives_identical_losses(sd15_pipeline_dir, data_dir, tmp_path, caplog):
    common = dict(
        train_data_dir=data_dir,
        num_inference_steps=4,
        generator_gan_loss_weight=5e-3,
        fake_score_gan_loss_weight=1e-2,
        fake_score_step_conditioning=True,  # its embedding must be checkpointed too
        checkpointing_steps=3,
        max_train_steps=6,
    )
    full = train_dmd2(tiny_config(sd15_pipeline_dir, tmp_path / "full", **common))
    assert full["global_step"] == 6 and full["num_skipped_images"] > 0  # the corrupt file is drawn and skipped
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    (resumed_dir / "checkpoint-5.tmp").mkdir()  # a half-written checkpoint must be ignored
    # the interrupted run had logged steps 4 and 5 after its last checkpoint: they must not be repeated
    rows = read_losses(tmp_path / "full")
    (resumed_dir / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    with caplog.at_level("INFO"):
        resumed = train_dmd2(tiny_config(sd15_pipeline_dir, resumed_dir, resume_from_checkpoint="latest", **common))
    assert "resuming from checkpoint-3 at step 3" in caplog.text
    assert [r["step"] for r in resumed["losses"]] == [4, 5, 6]
    assert resumed["losses"] == full["losses"][3:]
    assert read_losses(resumed_dir) == read_losses(tmp_path / "full")  # steps 1..6 once each
    assert set(full["losses"][0]) == {"step", "loss_dm", "loss_fake", "loss_gen_gan", "loss_disc"}


def test_ema_student_is_exported_and_resumes_exactly(sd15_pipeline_dir, data_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    common = dict(
        prompt_file=os.path.join(data_dir, "prompts.txt"),
        student_type="full",
        use_ema=True,
        ema_decay=0.5,
        dfake_gen_update_ratio=1,
        checkpointing_steps=3,
        max_train_steps=6,
    )
    train_dmd2(tiny_config(sd15_pipeline_dir, tmp_path / "full", **common))
    exported = list(UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet").parameters())
    raw = list(UNet2DConditionModel.from_pretrained(tmp_path / "full" / "checkpoint-6" / "generator").parameters())
    shadow = load_file(tmp_path / "full" / "checkpoint-6" / "ema_generator.safetensors")
    assert len(shadow) == len(exported) == len(raw)
    assert all(torch.equal(shadow[f"shadow.{i}"], p) for i, p in enumerate(exported))  # the export is the EMA ...
    assert not all(torch.equal(a, b) for a, b in zip(exported, raw))  # ... not the last raw weights
    for root, _, files in os.walk(tmp_path / "full" / "unet"):
        for name in files:  # exported files get the usual modes (umask), not mkstemp's 0600
            assert os.stat(os.path.join(root, name)).st_mode & 0o044 == 0o044, name

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    train_dmd2(tiny_config(sd15_pipeline_dir, resumed_dir, resume_from_checkpoint="latest", **common))
    resumed = list(UNet2DConditionModel.from_pretrained(resumed_dir / "unet").parameters())
    assert all(torch.equal(a, b) for a, b in zip(exported, resumed))


def test_gradient_accumulation_and_epochs(sd15_pipeline_dir, data_dir, tmp_path):
    """Two micro-batches of 1 per step; the step count comes from --num_train_epochs (3 prompts / 2 -> 2 a pass)."""
    config = tiny_config(
        sd15_pipeline_dir,
        tmp_path,
        prompt_file=os.path.join(data_dir, "prompts.txt"),
        train_batch_size=1,
        gradient_accumulation_steps=2,
        max_train_steps=None,
        num_train_epochs=2,
        checkpointing_steps=100,
        dfake_gen_update_ratio=1,
        scale_lr=True,
        lr_scheduler="cosine_with_restarts",
        lr_num_cycles=2,
    )
    result = train_dmd2(config)
    assert result["global_step"] == 4 and [r["step"] for r in result["losses"]] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss_dm"]) and math.isfinite(r["loss_fake"]) for r in result["losses"])


def test_multistep_without_backward_simulation_uses_real_latents(sdxl_pipeline_dir, data_dir, tmp_path):
    config = tiny_config(
        sdxl_pipeline_dir,
        tmp_path,
        train_data_dir=data_dir,
        num_inference_steps=2,
        backward_simulation=False,
        max_train_steps=3,
        checkpointing_steps=10,
    )
    result = train_dmd2(config)
    assert result["global_step"] == 3 and all(math.isfinite(r["loss_fake"]) for r in result["losses"])


def test_push_to_hub_checks_the_repo_first_and_uploads_the_export(sd15_pipeline_dir, data_dir, tmp_path, monkeypatch):
    from diffusers_distill import hub

    calls = []
    monkeypatch.setattr(
        hub,
        "prepare_hub_repo",
        lambda repo_id, token=None: calls.append(("create", repo_id, token)) or f"user/{repo_id}",
    )

    def fake_push(output_dir, repo_id, token=None, **kwargs):
        calls.append(("push", repo_id, token, sorted(os.listdir(output_dir))))

    monkeypatch.setattr(hub, "push_student_to_hub", fake_push)
    config = tiny_config(
        sd15_pipeline_dir,
        tmp_path / "my-student",
        prompt_file=os.path.join(data_dir, "prompts.txt"),
        max_train_steps=1,
        push_to_hub=True,
        hub_token="hf_x",
    )
    train_dmd2(config)
    assert calls[0] == ("create", "my-student", "hf_x")  # default: the output folder's name, as in diffusers
    assert calls[1][:3] == ("push", "user/my-student", "hf_x") and "pytorch_lora_weights.safetensors" in calls[1][3]


def test_hub_failure_is_reported_before_the_teacher_loads(sd15_pipeline_dir, data_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from diffusers_distill.training import core

    def refuse(*args, **kwargs):
        raise PermissionError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    monkeypatch.setattr(core, "load_teacher_pipeline", lambda *a, **k: pytest.fail("the teacher must not load"))
    config = tiny_config(
        sd15_pipeline_dir,
        tmp_path,
        prompt_file=os.path.join(data_dir, "prompts.txt"),
        push_to_hub=True,
        hub_model_id="user/x",
    )
    with pytest.raises(ConfigError, match=r"--push_to_hub: cannot create or access the Hub repo 'user/x' \(401"):
        train_dmd2(config)


def test_nan_loss_stops_and_keeps_last_checkpoint(sd15_pipeline_dir, data_dir, tmp_path, monkeypatch):
    real_loss = dmd2_module.fake_score_loss
    calls = {"n": 0}

    def loss_that_breaks(output, target):
        calls["n"] += 1
        return real_loss(output, target) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(dmd2_module, "fake_score_loss", loss_that_breaks)
    config = tiny_config(
        sd15_pipeline_dir,
        tmp_path,
        prompt_file=os.path.join(data_dir, "prompts.txt"),
        checkpointing_steps=2,
        max_train_steps=5,
    )
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3.*checkpoint-2"):
        train_dmd2(config)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "losses.jsonl"]


def test_failed_checkpoint_leaves_no_tmp_folder(tmp_path):
    from diffusers_distill.training.checkpointing import save_checkpoint

    class FullDisk:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            os.makedirs(path)
            (tmp_path / "checkpoint-4.tmp" / "optimizer.bin").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(FullDisk(), str(tmp_path), 4, None)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- the script: help, errors, launch
def _seconds(command, env=None):
    import time

    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    return time.perf_counter() - start, result


def test_help_describes_every_flag_and_is_cheaper_than_importing_the_package():
    """--help imports no torch: compared with `import diffusers_distill` + torch (the least a training run needs),
    as a ratio, so a slow shared machine does not make the test flaky."""
    help_seconds, result = _seconds([sys.executable, SCRIPT, "--help"], env={"COLUMNS": "100000"})
    assert result.returncode == 0, result.stderr
    import_seconds, _ = _seconds([sys.executable, "-c", "import diffusers_distill, torch"])
    assert help_seconds < import_seconds, (help_seconds, import_seconds)
    text = " ".join(result.stdout.split())
    for f in dataclasses.fields(DMD2Config):
        assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()) in text, f.name


def test_bad_config_is_one_line_before_any_model_loads(tmp_path):
    """A bad option and a bad data file each give one line naming the flag, exit code 2, and no torch import."""
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("a cat\n")
    probe = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    cases = [
        (
            ["--pretrained_teacher_model", "sd15", "--prompt_file", str(prompts), "--student_type", "half"],
            "train_dmd2.py: error: --student_type must be one of ('lora', 'full'), got 'half'",
        ),
        (
            ["--pretrained_teacher_model", "sd15", "--prompt_file", str(prompts)],
            "train_dmd2.py: error: --prompt_file must end with .txt or .jsonl, got",
        ),
    ]
    for args, message in cases:
        seconds, result = _seconds([sys.executable, "-X", "importtime", "-c", probe, SCRIPT, *args])
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
        imported = {
            line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
        }
        assert "torch" not in imported and "diffusers" not in imported  # found before any heavy import


def test_bad_data_is_reported_before_the_teacher_loads(sd15_pipeline_dir, tmp_path, monkeypatch):
    from diffusers_distill.training import core

    bad = tmp_path / "empty.txt"
    bad.write_text("\n")
    monkeypatch.setattr(core, "load_teacher_pipeline", lambda *a, **k: pytest.fail("the teacher must not load"))
    with pytest.raises(ConfigError, match="--prompt_file .* contains no prompts"):
        train_dmd2(tiny_config(sd15_pipeline_dir, tmp_path / "out", prompt_file=str(bad)))


def test_bundled_teacher_name_and_resolution(tmp_path, caplog):
    """`sd15` is the bundled digits teacher; its resolution (32) is used when none is given; a different one warns."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten digit seven\n")
    common = dict(
        pretrained_teacher_model="sd15",
        prompt_file=str(prompts),
        student_type="full",
        fake_score_type="full",
        train_batch_size=1,
        max_train_steps=1,
        report_to="none",
    )
    with caplog.at_level("INFO"):
        train_dmd2(DMD2Config(output_dir=str(tmp_path / "a"), **common))
    assert "--resolution not given: using the teacher's native 32" in caplog.text
    assert "differs from the teacher's native" not in caplog.text
    with caplog.at_level("WARNING"):
        train_dmd2(DMD2Config(output_dir=str(tmp_path / "b"), resolution=48, **common))
    assert "--resolution 48 differs from the teacher's native 32" in caplog.text


@pytest.mark.slow
def test_launch_sd15_lora_1step_and_load_lora(sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    args = ["--pretrained_teacher_model", sd15_pipeline_dir, "--output_dir", str(out)]
    args += ["--prompt_file", os.path.join(data_dir, "prompts.txt"), "--max_train_steps", "4"]
    args += ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--validation_prompts", "a cat"]
    args += ["--validation_steps", "4", "--lora_alpha", "8", "--cache_text_embeddings", *TINY]
    result = launch(accelerate_configs[0], [*args, "--report_to", "tensorboard"])
    for noise in ("kept in float32", "Already found a `peft_config`", "requires torchvision"):
        assert noise not in result.stdout + result.stderr, noise
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for name in files)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-4"]
    assert {"generator_lora", "fake_score_lora", "optimizer.bin"} <= set(os.listdir(out / "checkpoint-4"))
    assert len(read_losses(out)) == 4 and os.path.exists(out / "validation" / "step-4.png")
    assert os.stat(out / "pytorch_lora_weights.safetensors").st_mode & 0o777 == 0o666 & ~_umask()
    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir)
    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([999])
    text = torch.randn(1, 77, 32)
    before = pipe.unet(x, t, text).sample
    pipe.load_lora_weights(str(out))
    after = pipe.unet(x, t, text).sample
    assert not torch.allclose(before, after)  # the trained generator adapter is non-zero


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_launch_sdxl_lora_4step_gan_resume(sdxl_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    out = tmp_path / "out"
    args = ["--pretrained_teacher_model", sdxl_pipeline_dir, "--output_dir", str(out), "--train_data_dir", data_dir]
    args += ["--num_inference_steps", "4", "--gen_cls_loss_weight", "5e-3", "--guidance_cls_loss_weight", "1e-2"]
    args += ["--checkpointing_steps", "2", "--real_guidance_scale", "8", *TINY]
    launch(accelerate_configs[0], [*args, "--max_train_steps", "2"])
    result = launch(accelerate_configs[0], [*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert "resuming from checkpoint-2 at step 2" in result.stderr
    losses = read_losses(out)
    assert [r["step"] for r in losses] == [1, 2, 3] and "loss_disc" in losses[0]
    assert os.path.exists(out / "pytorch_lora_weights.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("arch,steps", [("sd15", "4"), ("sdxl", "1")])
def test_launch_full_students(
    arch, steps, sd15_pipeline_dir, sdxl_pipeline_dir, data_dir, accelerate_configs, tmp_path
):
    from diffusers import DiffusionPipeline

    teacher = sd15_pipeline_dir if arch == "sd15" else sdxl_pipeline_dir
    out = tmp_path / "out"
    args = ["--pretrained_teacher_model", teacher, "--output_dir", str(out)]
    if arch == "sd15":  # the SD 1.5 4-step preset as shipped (bf16, gradient checkpointing, late-step regression)
        args += ["--config", os.path.join(CONFIGS, "sd15_4step.json")]
    args += ["--prompt_file", os.path.join(data_dir, "prompts.txt"), "--student_type", "full"]
    args += ["--fake_score_type", "full", "--num_inference_steps", steps, "--max_train_steps", "4"]
    launch(accelerate_configs[0], [*args, "--checkpointing_steps", "2", *TINY])
    assert {"generator", "fake_score"} <= set(os.listdir(out / "checkpoint-2"))
    if arch == "sd15":  # some generator turn drew a late step (k >= 2), trained by the regression onto the teacher
        assert any("loss_teacher_regression" in row for row in read_losses(out))
    student = DiffusionPipeline.from_pretrained(str(out))  # a native diffusers folder
    expected = "StableDiffusionPipeline" if arch == "sd15" else "StableDiffusionXLPipeline"
    assert type(student).__name__ == expected


def _file_digest(path):
    """Digest of a safetensors file's tensors and metadata (not of its bytes: safetensors serialises the metadata
    from a hash map, so its key order, and the file bytes, vary from process to process)."""
    import hashlib

    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        digest.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            digest.update(
                key.encode() + str(tensor.dtype).encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes()
            )
    return digest.hexdigest()


@pytest.mark.slow
def test_launch_two_processes_gloo_resumes_to_the_same_weights(
    sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path
):
    """2 processes (gloo): the saved student of an uninterrupted run and of a run resumed from its checkpoint are
    byte-identical, and the checkpoint holds both ranks' RNG states."""
    common = ["--pretrained_teacher_model", sd15_pipeline_dir, "--prompt_file", os.path.join(data_dir, "prompts.txt")]
    common += ["--max_train_steps", "3", "--num_inference_steps", "4", "--checkpointing_steps", "2", *TINY]
    out = tmp_path / "out"
    result = launch(accelerate_configs[1], [*common, "--output_dir", str(out)], num_processes=2, ACCELERATE_USE_CPU="1")
    assert "on 2 process(es)" in result.stdout
    assert [r["step"] for r in read_losses(out)] == [1, 2, 3]
    assert os.path.isdir(out / "checkpoint-2") and not os.path.exists(out / "checkpoint-2.tmp")
    assert os.path.exists(out / "checkpoint-2" / "random_states_1.pkl")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    args = [*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
    launch(accelerate_configs[1], args, num_processes=2, ACCELERATE_USE_CPU="1")
    weights = "pytorch_lora_weights.safetensors"
    assert read_losses(resumed)[-1] == read_losses(out)[-1]
    assert _file_digest(resumed / weights) == _file_digest(out / weights)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    """SIGKILL a run right after its first checkpoint; resuming it ends with the same weights and loss rows."""
    import signal
    import time

    common = ["--pretrained_teacher_model", sd15_pipeline_dir, "--prompt_file", os.path.join(data_dir, "prompts.txt")]
    common += ["--max_train_steps", "12", "--checkpointing_steps", "3", "--num_inference_steps", "2", *TINY]
    reference = tmp_path / "reference"
    launch(accelerate_configs[0], [*common, "--output_dir", str(reference)])

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_configs[0]]
    command += ["--num_cpu_threads_per_process", "1", SCRIPT, *common, "--output_dir", str(killed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-3").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training process, without any cleanup
    process.wait()
    assert (killed / "checkpoint-3").is_dir() and not (killed / "pytorch_lora_weights.safetensors").exists()
    launch(accelerate_configs[0], [*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    weights = "pytorch_lora_weights.safetensors"
    assert _file_digest(killed / weights) == _file_digest(reference / weights)
    assert read_losses(killed) == read_losses(reference)


@pytest.fixture
def strict_randomness(monkeypatch):
    """torch.randn/randint that, like CUDA, refuse a generator on another device than the requested one (on CPU,
    torch accepts any device, so a CPU-only test would not see the GPU crash)."""
    real = {name: getattr(torch, name) for name in ("randn", "randint")}

    def strict(name):
        def draw(*args, generator=None, device=None, **kwargs):
            if generator is not None and device is not None and torch.device(device).type != generator.device.type:
                raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
            return real[name](*args, generator=generator, device=device, **kwargs)

        return draw

    for name in real:
        monkeypatch.setattr(torch, name, strict(name))


def test_n_step_paths_draw_noise_on_the_generator_device(strict_randomness):
    """A CPU generator with tensors on another device (``meta`` stands in for CUDA): every N-step path draws on the
    generator's device and moves the result."""
    from diffusers_distill.noise_schedule import NoiseSchedule
    from diffusers_distill.randomness import randint, randn
    from diffusers_distill.students import build_dmd2_networks, generator_input, sample_student
    from diffusers_distill.teacher import PromptEmbeddings
    from diffusers_distill.testing import sd_ddim_scheduler, tiny_unet

    generator = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="device type for generator"):  # the mistake the helper avoids
        torch.randn((2,), generator=generator, device="meta")
    meta = torch.device("meta")
    nets = build_dmd2_networks(tiny_unet(), lora_rank=2, fake_lora_rank=2, lora_target_modules=["to_q"]).to(meta)
    schedule = NoiseSchedule.from_scheduler_config(sd_ddim_scheduler().config)
    noise = torch.empty(2, 4, 16, 16, device=meta)
    cond = PromptEmbeddings(torch.empty(2, 7, 32, device=meta))
    x_t, t = generator_input(nets, schedule, noise, cond, [999, 749, 499, 249], 3, generator)
    assert x_t.device == meta and t.device == meta
    assert sample_student(nets, schedule, cond, [999, 499], noise, generator).device == meta
    assert randn((3,), generator, meta).device == meta and randint(0, 10, 3, generator, meta).device == meta
    # the helper draws the same numbers whatever the target device
    a = randn((5,), torch.Generator().manual_seed(1), "cpu")
    torch.testing.assert_close(a, torch.randn((5,), generator=torch.Generator().manual_seed(1)))


# Run by `accelerate launch` in the DDP test below. Every random draw of an iteration is made for the GLOBAL batch
# from a stream shared by all processes, and each process keeps its own slice: 2 processes x batch B then see
# exactly the samples of 1 process x batch 2B, so the two runs must train the same weights.
GLOBAL_BATCH_WORKER = """
import os
import sys
from diffusers_distill import students
from diffusers_distill.training import core, data, dmd2, train_dmd2

world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))  # set by the launcher
step_generator = core.step_generator
core.step_generator = lambda seed, step, rank, micro_batch=0: step_generator(seed, step, None, micro_batch)

def randn(shape, generator, device, dtype=None):
    full = dmd2_randn((shape[0] * world, *shape[1:]), generator, device, dtype)
    return full[rank * shape[0] : (rank + 1) * shape[0]]

def randint(low, high, size, generator, device):
    return dmd2_randint(low, high, size * world, generator, device)[rank * size : (rank + 1) * size]

def sample_prompts(self, batch_size, generator):
    return sample(self, batch_size * world, generator)[rank * batch_size : (rank + 1) * batch_size]

def sample_images(self, batch_size, generator, *args, **kwargs):
    images, captions = sample_all_images(self, batch_size * world, generator, *args, **kwargs)
    return images[rank * batch_size : (rank + 1) * batch_size], captions[rank * batch_size : (rank + 1) * batch_size]

dmd2_randn, dmd2_randint, sample = dmd2.randn, dmd2.randint, data.TrainingData.sample_prompts
sample_all_images = data.TrainingData.sample_images
dmd2.randn = students.randn = randn
dmd2.randint = randint
data.TrainingData.sample_prompts = sample_prompts
data.TrainingData.sample_images = sample_images
sys.exit(train_dmd2.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["lora", "full"])
def test_ddp_two_processes_match_one_process_with_twice_the_batch(
    layout, sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path
):
    """accelerate's DDP (gloo, 2 processes, batch 1 each) trains the same student as 1 process with batch 2, for the
    shared-base LoRA layout (two adapters on one UNet, alternating phases) and the full layout; 4-step students,
    generator and fake-score turns, 2-step gradient accumulation."""
    worker = tmp_path / "worker.py"
    worker.write_text(GLOBAL_BATCH_WORKER)
    common = ["--pretrained_teacher_model", sd15_pipeline_dir, "--prompt_file", os.path.join(data_dir, "prompts.txt")]
    common += ["--max_train_steps", "3", "--num_inference_steps", "4", "--checkpointing_steps", "100", *TINY]
    common += ["--gradient_accumulation_steps", "2", "--student_type", layout, "--fake_score_type", layout]
    # Adam's g / sqrt(v) turns float rounding on near-zero gradients (a different reduction order of the batch)
    # into sign flips of a whole step; an epsilon above those gradients keeps the update linear in them.
    common += ["--adam_epsilon", "1e-3"]
    runs = {}
    for processes, batch in ((2, "1"), (1, "2")):
        out = tmp_path / f"p{processes}"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_configs[1]]
        command += ["--num_cpu_threads_per_process", "1", "--num_processes", str(processes)]
        command += ["--main_process_port", str(free_port()), str(worker)]  # a port no earlier launch left waiting
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        args = [*common, "--train_batch_size", batch, "--output_dir", str(out)]
        result = subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert f"on {processes} process(es)" in result.stdout
        runs[processes] = out
    for a, b in zip(read_losses(runs[2]), read_losses(runs[1])):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    if layout == "lora":
        two, one = (load_file(str(runs[p] / "pytorch_lora_weights.safetensors")) for p in (2, 1))
        before = None
    else:
        two, one = (UNet2DConditionModel.from_pretrained(str(runs[p] / "unet")).state_dict() for p in (2, 1))
        before = UNet2DConditionModel.from_pretrained(sd15_pipeline_dir, subfolder="unet").state_dict()
    assert two.keys() == one.keys()
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    if before is not None:  # the full student did train
        assert any(not torch.equal(one[key], before[key]) for key in one)


# accelerate switches to FSDP only on accelerators (its MULTI_CPU branch never does), while torch's FSDP2 runs on
# CPU with gloo. This sitecustomize (put on PYTHONPATH of the launched processes only) makes accelerate's backend
# choice report MULTI_GPU with the gloo backend, so an FSDP config takes accelerate's real FSDP2 path (its prepare,
# fully_shard wrapping, FSDP checkpoint files) on CPU; ACCELERATE_TORCH_DEVICE=cpu keeps the tensors on the CPU.
FORCE_CPU_FSDP = """
import os
import accelerate.state
from accelerate.utils import DistributedType

_prepare_backend = accelerate.state.PartialState._prepare_backend

def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_GPU
    return _prepare_backend(self, cpu, sagemaker_dp, backend)

accelerate.state.PartialState._prepare_backend = prepare_backend
"""


def fsdp_launcher(tmp_path):
    """``(command prefix, environment)`` that launch 2 processes with the documented FSDP config on CPU (each call
    of the prefix gets a fresh port)."""
    import yaml

    with open(os.path.join(CONFIGS, "accelerate_fsdp.yaml")) as f:
        fsdp_config = yaml.safe_load(f)
    assert fsdp_config["distributed_type"] == "FSDP" and fsdp_config["fsdp_config"]["fsdp_version"] == 2
    fsdp_config.update(num_processes=2, mixed_precision="no")
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(fsdp_config))
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(FORCE_CPU_FSDP)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1"]
    command += ["--config_file", str(tmp_path / "fsdp.yaml"), "--main_process_port"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_TORCH_DEVICE": "cpu"}
    return command, {**env, "PYTHONPATH": str(tmp_path / "site")}


@pytest.mark.slow
def test_fsdp_refuses_lora_layouts_and_flow_maps(sd15_pipeline_dir, data_dir, tmp_path):
    """Under FSDP, a LoRA layout (DMD2) and the flow-map trainer stop at start with a message naming what to use."""
    command, env = fsdp_launcher(tmp_path)
    teacher = ["--pretrained_teacher_model", sd15_pipeline_dir, "--prompt_file", os.path.join(data_dir, "prompts.txt")]
    dmd2 = [os.path.join(REPO, "training", "train_dmd2.py"), *teacher, "--output_dir", str(tmp_path / "lora")]
    result = subprocess.run([*command, str(free_port()), *dmd2], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0 and "FSDP (an accelerate FSDP config) needs the full layouts" in result.stderr
    assert "got --student_type lora --fake_score_type lora" in result.stderr
    flow_map = [os.path.join(REPO, "training", "train_flow_map.py"), *teacher, "--output_dir", str(tmp_path / "fm")]
    result = subprocess.run(
        [*command, str(free_port()), *flow_map], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode != 0 and "train_flow_map supports DDP" in result.stderr


@pytest.mark.slow
def test_fsdp_two_processes_match_ddp(sd15_pipeline_dir, data_dir, accelerate_configs, tmp_path):
    """The documented FSDP config (training/configs/accelerate_fsdp.yaml: FSDP2, each role its own root) trains the
    full layout to the same student as DDP: 2 processes x batch 2 (gloo), 4-step student, GAN terms, EMA,
    gradient accumulation 2, a validation grid. Its checkpoint resumes exactly, and the export loads with plain
    diffusers."""
    from diffusers import UNet2DConditionModel

    fsdp_command, fsdp_env = fsdp_launcher(tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(GLOBAL_BATCH_WORKER)
    common = ["--pretrained_teacher_model", sd15_pipeline_dir, "--prompt_file", os.path.join(data_dir, "prompts.txt")]
    common += ["--train_data_dir", data_dir, "--max_train_steps", "3", "--num_inference_steps", "4", *TINY]
    common += ["--gradient_accumulation_steps", "2", "--student_type", "full", "--fake_score_type", "full"]
    common += ["--generator_gan_loss_weight", "0.5", "--fake_score_gan_loss_weight", "0.5", "--use_ema"]
    common += ["--checkpointing_steps", "2", "--validation_prompts", "a dog", "--validation_steps", "3"]
    common += ["--adam_epsilon", "1e-3"]  # see the DDP test

    def run(name, engine, *extra):
        if engine == "fsdp":
            command, env = [*fsdp_command, str(free_port())], fsdp_env
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1"]
            command += ["--config_file", accelerate_configs[1], "--main_process_port", str(free_port())]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        out = tmp_path / name
        command += ["--num_processes", "2", str(worker), *common, "--output_dir", str(out), *extra]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return out, result.stderr

    def student(path):
        return UNet2DConditionModel.from_pretrained(str(path / "unet")).state_dict()

    fsdp, log = run("fsdp", "fsdp")
    assert "Saving FSDP model" in log  # accelerate's FSDP path ran, not DDP
    assert {"pytorch_model_fsdp.bin", "pytorch_model_fsdp_1.bin", "ema_generator.safetensors"} <= set(
        os.listdir(fsdp / "checkpoint-2")
    )
    assert (fsdp / "validation" / "step-3.png").is_file()
    ddp, _ = run("ddp", "ddp")
    for a, b in zip(read_losses(fsdp), read_losses(ddp), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    fsdp_student, ddp_student = student(fsdp), student(ddp)
    assert fsdp_student.keys() == ddp_student.keys()
    for key in ddp_student:
        torch.testing.assert_close(fsdp_student[key], ddp_student[key], rtol=1e-4, atol=1e-5)
    # resume from the FSDP checkpoint (weights, optimizers, EMA) in a new folder: the same last step, same student
    (tmp_path / "resumed").mkdir()
    shutil.copytree(fsdp / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, _ = run("resumed", "fsdp", "--resume_from_checkpoint", "latest")
    assert read_losses(resumed) == read_losses(fsdp)[2:]
    resumed_student = student(resumed)
    for key in fsdp_student:
        torch.testing.assert_close(resumed_student[key], fsdp_student[key], rtol=0, atol=0)
