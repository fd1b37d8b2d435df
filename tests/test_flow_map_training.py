"""Flow-map distillation end to end on the tiny SD 1.5 / SDXL pipelines (library, CLI and `accelerate launch`)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_distill.training.config import ConfigError
from diffusers_distill.training.flow_map import FlowMapConfig, flow_map_inputs, flow_map_step, sample_times
from diffusers_distill.training.flow_map_config import FLOW_MAP_LOSSES
from diffusers_distill.training.train_flow_map import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "train_flow_map.py")
CONFIGS = os.path.join(REPO, "training", "configs")
TINY = dict(
    lora_rank=4,
    lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    jump_embedding_dim=8,
    train_batch_size=2,
    lr_warmup_steps=0,
    learning_rate=1e-3,
    report_to="none",
)


def flags(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        out += [f"--{name}", *map(str, value)] if isinstance(value, list) else [f"--{name}", str(value)]
    return out


def read_losses(output_dir):
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four captioned 32x32 images and a prompt file."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("flow-map-data")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "a photo of a cat"}) + "\n")
    (folder / "prompts.txt").write_text("a photo of a cat\na dog\n")
    return str(folder)


def tiny_config(teacher_dir, output_dir, **overrides) -> FlowMapConfig:
    return FlowMapConfig(pretrained_teacher_model=teacher_dir, output_dir=str(output_dir), **{**TINY, **overrides})


# ---------------------------------------------------------------------- fast: config, CLI
def test_config_validation_errors(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    base = dict(pretrained_teacher_model="sd15", prompt_file=str(prompts))
    cases = [
        (dict(base, loss="tvm"), r"--loss must be one of \('itvm', 'lfmd', 'meanflow', 'progressive'\), got 'tvm'"),
        (dict(base, target_ema_decay=1.0), r"--target_ema_decay must be in \[0, 1\), got 1.0"),
        (dict(base, diagonal_fraction=-0.1), r"--diagonal_fraction must be in \[0, 1\)"),
        (dict(base, itvm_num_nodes=4), r"--itvm_num_nodes must be one of \(1, 2, 3\), got 4"),
        (dict(base, jump_embedding_dim=7), "--jump_embedding_dim must be an even number >= 2, got 7"),
        (dict(base, sigma_spacing="cosine"), "--sigma_spacing must be one of"),
        (dict(base, loss="lfmd", gradient_checkpointing=True), "--gradient_checkpointing does not support the JVP"),
        (dict(base, default_num_inference_steps=0), "--default_num_inference_steps must be >= 1, got 0"),
        (dict(base, guidance_scale=-1.0), "--guidance_scale must be >= 0"),
        (dict(base, student_type="half"), r"--student_type must be one of \('lora', 'full'\)"),  # the core's checks
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            FlowMapConfig(**values).validate()
    FlowMapConfig(**base).validate()
    assert FlowMapConfig().loss == "itvm"  # the default is the measured recommendation of docs/flow_maps.md


def test_presets_load_and_cli_overrides():
    for name in ("sd15_flow_map", "sdxl_flow_map"):
        config = FlowMapConfig.from_file(os.path.join(CONFIGS, f"{name}.json"), pretrained_teacher_model="m")
        assert config.loss == "itvm" and config.target_ema_decay == 0.99
    preset = os.path.join(CONFIGS, "sd15_flow_map.json")
    config = parse_config(["--config", preset, "--loss", "progressive", "--target_ema_decay", "0.9", "--no-use_ema"])
    assert (config.loss, config.target_ema_decay, config.use_ema, config.resolution) == ("progressive", 0.9, False, 512)


def _seconds(command, env=None):
    import time

    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    return time.perf_counter() - start, result


def test_help_describes_every_flag_and_bad_options_are_one_line_without_torch(tmp_path):
    _, result = _seconds([sys.executable, SCRIPT, "--help"], env={"COLUMNS": "100000"})
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for f in dataclasses.fields(FlowMapConfig):
        assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()) in text, f.name
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    probe = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    args = ["--pretrained_teacher_model", "sd15", "--prompt_file", str(prompts), "--loss", "tvm"]
    _, result = _seconds([sys.executable, "-X", "importtime", "-c", probe, SCRIPT, *args])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("train_flow_map.py: error: --loss must be one of"), lines
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "diffusers" not in imported


# ---------------------------------------------------------------------- step functions alone
def test_sample_times_order_range_and_diagonal():
    generator = torch.Generator().manual_seed(0)
    s, t = sample_times(4000, 0.9, 0.25, generator, "cpu")
    assert bool((s >= t).all()) and bool((t >= 0).all()) and bool((s <= 0.9).all())
    diagonal = float((s == t).float().mean())
    assert abs(diagonal - 0.25) < 0.03, diagonal
    again = sample_times(4000, 0.9, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(again[0], s) and torch.equal(again[1], t)  # seeded: a resumed step draws the same times


@pytest.fixture
def flow_map_setup(sd15_pipeline_dir, data_dir, tmp_path):
    """Parts of the recipe built as train_flow_map builds them, without training."""
    from diffusers import DiffusionPipeline

    from diffusers_distill.training import core
    from diffusers_distill.training.flow_map import build_parts

    config = tiny_config(sd15_pipeline_dir, tmp_path, train_data_dir=data_dir)
    accelerator = core.make_accelerator(config)
    pipe = DiffusionPipeline.from_pretrained(sd15_pipeline_dir)
    parts = build_parts(config, accelerator, pipe, 32)
    data = core.load_training_data(config, 32)
    return config, accelerator, parts, data


def test_flow_map_inputs_noise_real_latents_or_jump_from_noise(flow_map_setup):
    """With images, x_s = (1 - s) x0 + s eps of the real latents; prompts only: the target's jump from pure noise at
    sigma_max (the untrained student = teacher, so it is one DDIM step of the teacher, Eq. DDIM)."""
    from diffusers_distill.training import core

    config, accelerator, parts, data = flow_map_setup
    x_s, s, t, cond, uncond = flow_map_inputs(parts, config, accelerator, data, torch.Generator().manual_seed(3))
    rng = torch.Generator().manual_seed(3)
    s_ref, t_ref = sample_times(2, parts.sigma_max, config.diagonal_fraction, rng, "cpu")
    noise = core.randn(parts.latent_shape, rng, "cpu")
    images, _ = data.sample_images(2, rng)
    x0 = core.encode_images(parts.vae, images)
    torch.testing.assert_close(x_s, (1 - s_ref).view(-1, 1, 1, 1) * x0 + s_ref.view(-1, 1, 1, 1) * noise)
    assert torch.equal(s, s_ref) and torch.equal(t, t_ref) and torch.count_nonzero(uncond.prompt_embeds) > 0

    data.images = []  # prompts only
    x_s, s, _, cond, _ = flow_map_inputs(parts, config, accelerator, data, torch.Generator().manual_seed(4))
    rng = torch.Generator().manual_seed(4)
    s_ref, _ = sample_times(2, parts.sigma_max, config.diagonal_fraction, rng, "cpu")
    z = core.randn(parts.latent_shape, rng, "cpu") * ((1 - parts.sigma_max) ** 2 + parts.sigma_max**2) ** 0.5
    with torch.no_grad():
        expected = parts.model.jump(z, torch.full_like(s_ref, parts.sigma_max), s_ref, cond.prompt_embeds)
    torch.testing.assert_close(x_s, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", FLOW_MAP_LOSSES)
def test_flow_map_step_trains_only_the_adapter_and_the_pathway(flow_map_setup, loss):
    config, accelerator, parts, data = flow_map_setup
    config.loss = loss
    logs = flow_map_step(parts, config, accelerator, data, torch.Generator().manual_seed(0))
    assert torch.isfinite(logs["loss"]) and logs["loss"] > 0
    with_grad = {n for n, p in parts.student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "time_embedding.cond_proj.weight" in with_grad and any("lora_B" in n for n in with_grad)
    assert all("lora_" in n or "cond_proj" in n for n in with_grad)
    assert parts.teacher_unet is None  # LoRA: one UNet, the teacher is the student with adapters off


def test_lora_student_with_adapters_off_is_the_teacher(flow_map_setup, sd15_pipeline_dir):
    """The shared-weights teacher of a LoRA student gives the teacher pipeline's own UNet output, also after the
    adapter and the pathway have been trained."""
    from diffusers import DiffusionPipeline

    from diffusers_distill.training.flow_map import teacher_network

    config, accelerator, parts, data = flow_map_setup
    with torch.no_grad():
        for p in parts.params:
            p.add_(0.1 * torch.randn_like(p))
    teacher = DiffusionPipeline.from_pretrained(sd15_pipeline_dir).unet
    x, text = torch.randn(2, 4, 32, 32), torch.randn(2, 77, teacher.config.cross_attention_dim)
    t = torch.tensor([999.0, 321.5])
    with torch.no_grad(), teacher_network(parts) as unet:
        shared = unet(x, t, text).sample
    with torch.no_grad():
        student = parts.student(x, t, text).sample
    torch.testing.assert_close(shared, teacher(x, t, text).sample, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student, shared)  # the adapters are back on after the context


# ---------------------------------------------------------------------- in-process training
def test_resume_gives_identical_losses_and_weights(sd15_pipeline_dir, data_dir, tmp_path, caplog):
    """Checkpoint at 3, resume to 6 == uninterrupted 6 steps: loss rows, exported adapter, pathway (both EMAs and
    the optimizer state are restored)."""
    from safetensors.torch import load_file

    from diffusers_distill.training.flow_map import train_flow_map

    common = dict(train_data_dir=data_dir, checkpointing_steps=3, max_train_steps=6, ema_decay=0.5)
    full = train_flow_map(tiny_config(sd15_pipeline_dir, tmp_path / "full", **common))
    assert {"ema_target.safetensors", "ema_student.safetensors", "student_lora"} <= set(
        os.listdir(tmp_path / "full" / "checkpoint-3")
    )
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    with caplog.at_level("INFO"):
        resumed = train_flow_map(tiny_config(sd15_pipeline_dir, resumed_dir, resume_from_checkpoint="latest", **common))
    assert "resuming from checkpoint-3 at step 3" in caplog.text
    assert [r["step"] for r in resumed["losses"]] == [4, 5, 6] and resumed["losses"] == full["losses"][3:]
    for name in ("pytorch_lora_weights.safetensors", "flow_map_pathway.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(resumed_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert load_file(tmp_path / "full" / "flow_map_pathway.safetensors")["time_embedding.cond_proj.weight"].any()


_FRESH_PROCESS = r"""
import sys, numpy as np, torch
from diffusers_distill import {cls}
kind, teacher, out, prompt, seed, size, result = sys.argv[1:]
pipe = {cls}.from_pretrained(out) if kind == "full" else {cls}.from_pretrained(teacher, student=out)
noise = torch.randn(1, 4, int(size), int(size), generator=torch.Generator().manual_seed(int(seed)))
image = pipe(prompt, latents=noise, output_type="np").images[0]
np.save(result, (image * 255).round().astype("uint8"))
"""


@pytest.mark.parametrize("arch,student_type", [("sd15", "lora"), ("sdxl", "full")])
def test_saved_student_loads_in_a_fresh_process_and_gives_the_validated_images(
    arch, student_type, sd15_pipeline_dir, sdxl_pipeline_dir, data_dir, tmp_path
):
    """The exported student, loaded with FlowMap*Pipeline.from_pretrained in a fresh process (LoRA into the teacher
    pipeline, full as its own folder), samples at its saved default step count exactly the images of the last
    validation grid of training (same EMA weights, same noise: ``randn(seed)``)."""
    from PIL import Image

    from diffusers_distill.training.flow_map import train_flow_map

    teacher = sd15_pipeline_dir if arch == "sd15" else sdxl_pipeline_dir
    out, prompt = tmp_path / "out", "a photo of a cat"
    config = tiny_config(
        teacher,
        out,
        prompt_file=os.path.join(data_dir, "prompts.txt"),
        max_train_steps=2,
        student_type=student_type,
        default_num_inference_steps=2,
        validation_prompts=[prompt],
        validation_steps=2,
        seed=5,
        ema_decay=0.5,
    )
    train_flow_map(config)
    validated = np.asarray(Image.open(out / "validation" / "step-2.png"))
    cls = "FlowMapStableDiffusionPipeline" if arch == "sd15" else "FlowMapStableDiffusionXLPipeline"
    result = tmp_path / "image.npy"
    command = [sys.executable, "-c", _FRESH_PROCESS.format(cls=cls), student_type, teacher, str(out), prompt, "5"]
    with open(os.path.join(teacher, "unet", "config.json")) as f:
        latent_size = json.load(f)["sample_size"]
    command += [str(latent_size), str(result)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    image = np.load(result)
    assert image.shape == validated.shape
    assert np.abs(image.astype(int) - validated.astype(int)).max() <= 2
    assert validated.std() > 0
    assert os.path.isfile(out / "README.md") and "flow-map" in (out / "README.md").read_text()


# ---------------------------------------------------------------------- accelerate launch
@pytest.fixture(scope="module")
def accelerate_config(tmp_path_factory):
    from accelerate.utils import write_basic_config

    path = str(tmp_path_factory.mktemp("accelerate") / "single.yaml")
    write_basic_config(save_location=path)
    return path


def launch(config_file, args):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    command += ["--num_cpu_threads_per_process", "1", SCRIPT, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("loss", FLOW_MAP_LOSSES)
def test_launch_every_loss(arch, loss, sd15_pipeline_dir, sdxl_pipeline_dir, data_dir, accelerate_config, tmp_path):
    """Three steps of each loss through `accelerate launch` (LoRA student; SDXL with real images), a checkpoint,
    the LoRA export loadable into the teacher pipeline, and a student that differs from the teacher."""
    from diffusers_distill import FlowMapStableDiffusionPipeline, FlowMapStableDiffusionXLPipeline

    teacher = sd15_pipeline_dir if arch == "sd15" else sdxl_pipeline_dir
    out = tmp_path / "out"
    data = {"train_data_dir": data_dir} if arch == "sdxl" else {"prompt_file": os.path.join(data_dir, "prompts.txt")}
    values = dict(
        TINY,
        pretrained_teacher_model=teacher,
        output_dir=str(out),
        loss=loss,
        max_train_steps=3,
        checkpointing_steps=2,
        **data,
    )
    result = launch(accelerate_config, flags(values))
    assert f"flow-map distillation ({loss}) finished at step 3 on 1 process(es)" in result.stdout
    assert [r["step"] for r in read_losses(out)] == [1, 2, 3]
    assert {"student_lora", "ema_student.safetensors", "optimizer.bin"} <= set(os.listdir(out / "checkpoint-2"))
    cls = FlowMapStableDiffusionPipeline if arch == "sd15" else FlowMapStableDiffusionXLPipeline
    pipe = cls.from_pretrained(teacher, student=str(out))
    assert pipe.config.default_num_inference_steps == 4 and pipe.unet.config.time_cond_proj_dim == 8
    assert pipe.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # the trained pathway, not the zero init


@pytest.mark.slow
def test_launch_two_processes_gloo_resumes_to_the_same_weights(sd15_pipeline_dir, data_dir, tmp_path):
    """2 processes (gloo, gradients averaged by the core): an uninterrupted run and a run resumed from its
    checkpoint export the same adapter and pathway."""
    import socket

    from safetensors.torch import load_file

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
        "num_machines: 1\nmachine_rank: 0\nmain_training_function: main\nmixed_precision: 'no'\n"
        f"use_cpu: false\nmain_process_ip: 127.0.0.1\nmain_process_port: {port}\n"
    )
    values = dict(
        TINY,
        pretrained_teacher_model=sd15_pipeline_dir,
        max_train_steps=3,
        checkpointing_steps=2,
        prompt_file=os.path.join(data_dir, "prompts.txt"),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}

    def run(output_dir, *extra):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--num_cpu_threads_per_process", "1", "--num_processes", "2", SCRIPT]
        command += flags({**values, "output_dir": str(output_dir)}) + list(extra)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result

    out = tmp_path / "out"
    assert "on 2 process(es)" in run(out).stdout
    assert os.path.exists(out / "checkpoint-2" / "random_states_1.pkl")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run(resumed, "--resume_from_checkpoint", "latest")
    assert read_losses(resumed)[-1] == read_losses(out)[-1]
    for name in ("pytorch_lora_weights.safetensors", "flow_map_pathway.safetensors"):
        a, b = load_file(out / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_push_to_hub_checks_the_repo_first_and_uploads_export_and_card(
    sd15_pipeline_dir, data_dir, tmp_path, monkeypatch
):
    """--push_to_hub: the repo is created before training; the real hub.push_student_to_hub uploads the LoRA export
    with its flow-map model card (the Hub client is replaced; no network)."""
    import huggingface_hub

    from diffusers_distill import hub
    from diffusers_distill.training.flow_map import train_flow_map

    calls = []
    monkeypatch.setattr(
        hub, "prepare_hub_repo", lambda repo_id, token=None: calls.append(("create", repo_id)) or f"user/{repo_id}"
    )
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: None)

    def upload_folder(repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), kwargs["commit_message"]))

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "my-flow-map"
    config = tiny_config(
        sd15_pipeline_dir, out, prompt_file=os.path.join(data_dir, "prompts.txt"), max_train_steps=1, push_to_hub=True
    )
    train_flow_map(config)
    assert calls[0] == ("create", "my-flow-map")
    assert calls[1][0:2] == ("upload", "user/my-flow-map") and calls[1][3] == "Upload flow-map student"
    assert {"README.md", "flow_map_config.json", "pytorch_lora_weights.safetensors"} <= set(calls[1][2])
    card = (out / "README.md").read_text()
    assert "FlowMapStableDiffusionPipeline.from_pretrained" in card and 'student="user/my-flow-map"' in card
