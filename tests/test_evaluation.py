"""The bundled digit classifier and the evaluation metrics (no teacher needed)."""

import math
import os

import numpy as np
import pytest
import torch

from diffusers_distill import digits, evaluation


@pytest.fixture(scope="module")
def classifier():
    return evaluation.load_digit_classifier()


def test_split_is_fixed_disjoint_and_in_range():
    train_x, train_y = digits.load_digits_split("train")
    held_x, held_y = digits.load_digits_split("held_out")
    assert train_x.shape == (1438, 3, 32, 32) and held_x.shape == (359, 3, 32, 32)
    assert train_x.min() >= -1 and train_x.max() <= 1
    assert set(held_y.tolist()) == set(range(10))
    again, _ = digits.load_digits_split("held_out")
    assert torch.equal(again, held_x)
    # no held-out image appears in the train split
    flat_train = {tuple(r) for r in train_x[:, 0, ::4, ::4].flatten(1).mul(1e4).round().long().tolist()}
    overlap = sum(tuple(r) in flat_train for r in held_x[:, 0, ::4, ::4].flatten(1).mul(1e4).round().long().tolist())
    assert overlap <= 2  # the UCI digits contain a couple of exact duplicates


def test_prompts_and_bad_labels():
    assert digits.digit_prompt(7) == "a handwritten digit seven"
    with pytest.raises(ValueError, match="label"):
        digits.digit_prompt(10)
    with pytest.raises(ValueError, match="split"):
        digits.load_digits_split("test")
    with pytest.raises(ValueError, match="arch"):
        digits.digits_teacher_path("sd3")


def test_classifier_accuracy_on_held_out_real_digits(classifier):
    images, labels = digits.load_digits_split("held_out")
    accuracy = evaluation.prompt_accuracy(images, labels, classifier)
    assert accuracy >= 0.97, accuracy
    wrong = (labels + 1) % 10
    assert evaluation.prompt_accuracy(images, wrong, classifier) < 0.05


def test_digits_fd_real_vs_noise(classifier):
    train_images, _ = digits.load_digits_split("train")
    real_fd = evaluation.digits_fd(train_images[:400], classifier)
    noise_fd = evaluation.digits_fd(
        torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, classifier
    )
    assert real_fd < 0.05 * noise_fd, (real_fd, noise_fd)
    # digits-FD is the Frechet distance of the classifier's features to those of the held-out reference digits
    with torch.no_grad():
        features = classifier.features(train_images[:400]).double().numpy()
        reference, _ = digits.load_digits_split("held_out", channels=1)
        reference = classifier.features(reference).double().numpy()
    direct = evaluation.frechet_distance(
        features.mean(0), np.cov(features, rowvar=False), reference.mean(0), np.cov(reference, rowvar=False)
    )
    assert real_fd == pytest.approx(direct, rel=1e-9)
    # ... so the reference digits themselves score 0 (up to the matrix square root's rounding, ~1e-4 here)
    assert evaluation.digits_fd(digits.load_digits_split("held_out")[0], classifier) == pytest.approx(0, abs=1e-3)
    # an explicit reference set: the held-out digits passed in give the default; any set against itself gives 0
    held_out = digits.load_digits_split("held_out")[0]
    assert evaluation.digits_fd(train_images[:400], classifier, reference=held_out) == pytest.approx(real_fd, rel=1e-9)
    assert evaluation.digits_fd(train_images[:400], classifier, reference=train_images[:400]) == pytest.approx(
        0, abs=1e-3
    )
    to_train = evaluation.digits_fd(held_out, classifier, reference=train_images[:400])
    assert to_train == pytest.approx(real_fd, rel=1e-6)  # Frechet distance is symmetric


def test_frechet_distance_closed_form():
    # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2
    fd = evaluation.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]]))
    assert fd == pytest.approx(4.0 + 1.0)
    sigma = np.diag([1.0, 2.0, 3.0])
    assert evaluation.frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma) == pytest.approx(0.0, abs=1e-8)


def test_mse_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.2)
    assert evaluation.image_mse(a, b) == pytest.approx(0.04)
    assert evaluation.image_psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.04))
    assert evaluation.image_psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        evaluation.image_mse(a, b[:1])


def test_grid_round_trip(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 12).reshape(12, 1, 1, 1).expand(12, 3, 2, 2)
    path = tmp_path / "grid.png"
    evaluation.save_image_grid(images, str(path), nrow=4)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (6, 8, 3)
    assert grid[0, 0, 0] == 0 and grid[4, 6, 0] == 255
    assert grid[2, 2, 0] == round((images[5, 0, 0, 0].item() + 1) * 127.5)


def test_bad_arguments_rejected_before_work(sd15_pipeline):
    with pytest.raises(ValueError, match="steps"):
        evaluation.evaluate_pipeline(sd15_pipeline, steps=0)
    with pytest.raises(ValueError, match="guidance"):
        evaluation.evaluate_pipeline(sd15_pipeline, guidance=-1.0)
    with pytest.raises(ValueError, match="scheduler"):
        evaluation.evaluate_pipeline(sd15_pipeline, scheduler="nope")
    with pytest.raises(ValueError, match="model_index.json"):
        evaluation.evaluate_pipeline("/nonexistent/pipeline")


def test_real_data_floor_is_seeded_and_shrinks_with_sample_count(classifier):
    floor = evaluation.real_data_fd(10, seed=0)
    assert evaluation.real_data_fd(10, seed=0) == floor
    assert floor == pytest.approx(53.09, abs=0.05)  # docs/evaluation.md, "Real-data floor"
    assert evaluation.real_data_fd(30, seed=0) < floor < evaluation.real_data_fd(4, seed=0)
    noise = torch.rand(100, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert floor < 0.05 * evaluation.digits_fd(noise, classifier)
    with pytest.raises(ValueError, match="n_per_digit"):
        evaluation.real_data_fd(1)


def test_clip_score_and_fid_closed_forms():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert evaluation.clip_score_from_embeddings(e, 3 * e) == pytest.approx(100.0)
    # cos = 0, 0 (clamped from -1) and 1/sqrt(2)
    t = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
    assert evaluation.clip_score_from_embeddings(e, t) == pytest.approx(100 / math.sqrt(2) / 3)
    a = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert evaluation.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    assert evaluation.fid_from_features(a + 2.0, a) == pytest.approx(3 * 4.0)


class _TinyFeatures(torch.nn.Module):
    """A small fixed (seeded) conv net standing in for Inception: uint8 (N, 3, H, W) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
        )
        self.calls = 0

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        x = torch.nn.functional.interpolate(images.float() / 127.5 - 1, size=(16, 16), mode="bilinear")
        return self.net(x)


class _TinyCLIP:
    """Image embedding = mean RGB; text embedding = a fixed vector per prompt (offline CLIP stand-in)."""

    def __call__(self, images, prompts):
        image_embeds = images.float().mean(dim=(2, 3)) / 255 - 0.5
        text_embeds = torch.stack([torch.tensor([len(p) % 3 - 1.0, 1.0, (len(p) % 5) / 5]) for p in prompts])
        return image_embeds, text_embeds


def test_evaluate_prompts_fid_and_clip_plumbing(sd15_pipeline_dir, tmp_path):
    from PIL import Image

    ref = tmp_path / "real"
    ref.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(6):  # mixed sizes: the feature network gets equal-size batches
        size = 24 if i % 2 else 40
        array = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(array).save(ref / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    prompts = ["a red square", "a blue circle", "a cat"]
    features, clip = _TinyFeatures(), _TinyCLIP()
    settings = dict(
        reference_dir=str(ref),
        steps=2,
        guidance=3.0,
        n_per_prompt=2,
        batch_size=4,
        fid_features=features,
        clip_embedder=clip,
    )
    m = evaluation.evaluate_prompts(sd15_pipeline_dir, prompts, grid_path=str(tmp_path / "grid.png"), **settings)
    assert m["n_images"] == 6 and m["n_reference_images"] == 6 and m["steps"] == 2
    generated = evaluation.to_uint8(m["images"])
    real = evaluation.load_reference_images(str(ref))
    with torch.no_grad():
        gen_f = features(generated)
        real_f = torch.cat([features(torch.stack(real[0::2])), features(torch.stack(real[1::2]))])
    real_f = real_f[[0, 3, 1, 4, 2, 5]]  # back to file order
    assert m["fid"] == pytest.approx(evaluation.fid_from_features(gen_f, real_f), rel=1e-6)
    assert m["fid"] > 0
    all_prompts = [p for p in prompts for _ in range(2)]
    assert m["clip_score"] == pytest.approx(evaluation.clip_score_from_embeddings(*clip(generated, all_prompts)))
    assert (tmp_path / "grid.png").exists()
    again = evaluation.evaluate_prompts(sd15_pipeline_dir, prompts, **settings)
    assert torch.equal(again["images"], m["images"]) and again["fid"] == m["fid"]


def test_evaluate_prompts_rejects_bad_input_before_work(sd15_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="prompts"):
        evaluation.evaluate_prompts(sd15_pipeline_dir, [], clip=False)
    with pytest.raises(ValueError, match="reference_dir"):
        evaluation.evaluate_prompts(sd15_pipeline_dir, ["a"], reference_dir=str(tmp_path / "none"), clip=False)
    with pytest.raises(ValueError, match="n_per_prompt"):
        evaluation.evaluate_prompts(sd15_pipeline_dir, ["a"], n_per_prompt=0, clip=False)
    with pytest.raises(ValueError, match="prompts"):
        evaluation.read_prompts(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------------------- students in the CLI
@pytest.fixture(scope="module")
def dmd2_student_dirs(tmp_path_factory):
    """Saved full DMD2 students (native StableDiffusionPipeline + LCMScheduler + student_config.json) whose UNet is
    the bundled teacher's: 1 step at [999] and 2 steps at [999, 499] (not LCMScheduler's default 2-step grid)."""
    import copy

    from diffusers import StableDiffusionPipeline

    from diffusers_distill.export import StudentConfig, save_full_student

    teacher = StableDiffusionPipeline.from_pretrained(digits.digits_teacher_path("sd15"), local_files_only=True)
    dirs = {}
    for timesteps in ([999], [999, 499]):
        folder = tmp_path_factory.mktemp(f"dmd2-{len(timesteps)}step")
        config = StudentConfig(
            arch="sd15",
            student_type="full",
            num_inference_steps=len(timesteps),
            timesteps=timesteps,
            base_model=digits.digits_teacher_path("sd15"),
        )
        save_full_student(str(folder), teacher, copy.deepcopy(teacher.unet), config)
        dirs[len(timesteps)] = str(folder)
    return dirs


def _cli_metrics(argv, out):
    import json

    from diffusers_distill import cli

    assert cli.main(["evaluate", *argv, "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("seconds")
    return metrics


def test_cli_on_saved_1step_dmd2_student_matches_python_api(dmd2_student_dirs, tmp_path):
    from diffusers_distill.training.distill_digits import load_digits_student

    folder = dmd2_student_dirs[1]
    sampling = evaluation.read_student_sampling(folder)
    assert (sampling.method, sampling.steps, sampling.timesteps, sampling.guidance) == ("dmd2", 1, (999,), 0.0)
    cli_metrics = _cli_metrics(["--pipeline", folder, "--n_per_digit", "3"], tmp_path / "cli")
    # the student's own scheduler, steps, timesteps and guidance, with no flags
    assert cli_metrics["scheduler"] == "LCMScheduler" and cli_metrics["student"] == "dmd2"
    assert (cli_metrics["steps"], cli_metrics["timesteps"], cli_metrics["guidance"]) == (1, [999], 0.0)
    api = evaluation.evaluate_pipeline(
        load_digits_student(folder), scheduler=None, steps=1, guidance=0.0, n_per_digit=3, seed=0
    )
    assert cli_metrics["prompt_accuracy"] == api["prompt_accuracy"]
    assert cli_metrics["digits_fd"] == pytest.approx(api["digits_fd"], rel=1e-9)
    # an explicit scheduler replaces the student's, still at the student's steps and guidance, on its own spacing
    ddim = _cli_metrics(["--pipeline", folder, "--scheduler", "ddim", "--n_per_digit", "3"], tmp_path / "ddim")
    assert (ddim["scheduler"], ddim["steps"], ddim["guidance"], ddim["timesteps"]) == ("ddim", 1, 0.0, None)
    assert ddim["timestep_spacing"] == "trailing" and ddim["digits_fd"] != cli_metrics["digits_fd"]


def test_two_identical_evaluate_runs_give_identical_metrics(dmd2_student_dirs, tmp_path):
    # a 2-step LCM student re-injects noise between its steps: only a seeded pipeline generator makes runs repeat
    folder = dmd2_student_dirs[2]
    argv = ["--pipeline", folder, "--n_per_digit", "2", "--seed", "5"]
    first = _cli_metrics(argv, tmp_path / "a")
    assert first["timesteps"] == [999, 499] and first["timestep_spacing"] == "explicit"
    assert _cli_metrics(argv, tmp_path / "b") == first
    other_seed = _cli_metrics([*argv[:-1], "6"], tmp_path / "c")
    assert other_seed["digits_fd"] != first["digits_fd"]


def test_teacher_rows_use_trailing_spacing(tmp_path):
    m = _cli_metrics(["--pipeline", "sd15", "--steps", "4", "--n_per_digit", "2"], tmp_path / "t")
    assert m["scheduler"] == "ddim" and m["timestep_spacing"] == "trailing" and m["student"] is None
    assert m["guidance"] == digits.RECOMMENDED_GUIDANCE["sd15"]
    assert m["real_data_fd"] == pytest.approx(evaluation.real_data_fd(2, seed=0))
    scheduler = evaluation.make_scheduler("ddim", {"num_train_timesteps": 1000, "steps_offset": 1})
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_cli_offline_messages_and_nonzero_exit(tmp_path, capsys):
    from diffusers_distill import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n# comment\n\na photo of a dog\n")
    assert evaluation.read_prompts(str(prompts)) == ["a photo of a cat", "a photo of a dog"]
    out = tmp_path / "never"
    cases = [
        (
            ["--pipeline", "diffusers-distill-tests/no-such-model", "--prompts", str(prompts), "--no_clip"],
            "not in the Hugging Face cache",
        ),
        (
            ["--pipeline", "sd15", "--prompts", str(prompts), "--clip_model", "diffusers-distill-tests/no-such-clip"],
            "CLIP score needs the CLIP model 'diffusers-distill-tests/no-such-clip'",
        ),
        (
            [
                "--pipeline",
                "sd15",
                "--prompts",
                str(prompts),
                "--no_clip",
                "--reference_dir",
                str(tmp_path),
                "--fid_weights",
                str(tmp_path / "missing.pth"),
            ],
            "FID",
        ),
    ]
    for png in ("a.png", "b.png"):
        from PIL import Image

        Image.new("RGB", (8, 8)).save(tmp_path / png)
    for argv, message in cases:
        assert cli.main(["evaluate", *argv, "--output_dir", str(out)]) == 3
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line
        assert not out.exists()  # nothing generated or written


def test_cli_on_lora_student_loads_it_onto_its_base_model(dmd2_student_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from diffusers_distill.export import StudentConfig, save_lora_student
    from diffusers_distill.training.distill_digits import load_digits_student

    teacher = StableDiffusionPipeline.from_pretrained(digits.digits_teacher_path("sd15"), local_files_only=True)
    teacher.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="generator"
    )
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, param in teacher.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    folder = tmp_path / "lora-student"
    config = StudentConfig(
        arch="sd15",
        student_type="lora",
        num_inference_steps=1,
        timesteps=[999],
        base_model=digits.digits_teacher_path("sd15"),
    )
    save_lora_student(str(folder), teacher.unet, "generator", StableDiffusionPipeline, config)
    cli_metrics = _cli_metrics(["--pipeline", str(folder), "--n_per_digit", "2"], tmp_path / "cli")
    assert (cli_metrics["student"], cli_metrics["steps"], cli_metrics["timesteps"]) == ("dmd2", 1, [999])
    api = evaluation.evaluate_pipeline(
        load_digits_student(str(folder)), scheduler=None, steps=1, guidance=0.0, n_per_digit=2, seed=0
    )
    assert cli_metrics["digits_fd"] == pytest.approx(api["digits_fd"], rel=1e-9)
    assert api["scheduler"] == "LCMScheduler"
    # the same 1-step sampling of the teacher's own UNet (full student without the adapter) gives other images
    no_adapter = _cli_metrics(["--pipeline", dmd2_student_dirs[1], "--n_per_digit", "2"], tmp_path / "no_adapter")
    assert no_adapter["timesteps"] == [999] and no_adapter["digits_fd"] != cli_metrics["digits_fd"]
    with pytest.raises(ValueError, match="does not take custom timesteps"):  # the teacher's DDIMScheduler
        evaluation.evaluate_pipeline(
            digits.digits_teacher_path("sd15"), scheduler="keep", steps=1, timesteps=[999], n_per_digit=2
        )


def test_evaluate_pipeline_on_a_saved_flow_map_student(tmp_path):
    """A flow-map pipeline folder is recognised as a student: its default steps, guidance 0 (CFG distilled in,
    the pipeline takes no guidance_scale); a guidance > 0 is refused before sampling."""
    from diffusers import StableDiffusionPipeline

    from diffusers_distill.digits import digits_teacher_path
    from diffusers_distill.flow_map import build_flow_map_student, merge_flow_map_student
    from diffusers_distill.pipelines.pipeline_flow_map import FlowMapStableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(digits_teacher_path("sd15"), safety_checker=None)
    student = merge_flow_map_student(build_flow_map_student(teacher.unet, "lora", jump_embedding_dim=8, lora_rank=4))
    pipe = FlowMapStableDiffusionPipeline.from_teacher(teacher, student, default_num_inference_steps=2)
    pipe.save_pretrained(tmp_path / "flow-map")
    sampling = evaluation.read_student_sampling(str(tmp_path / "flow-map"))
    assert (sampling.method, sampling.steps, sampling.timesteps, sampling.guidance) == ("flow_map", 2, None, 0.0)
    assert evaluation.read_student_sampling(pipe) == evaluation.StudentSampling(
        "flow_map", 2, None, 0.0, "model_index.json"
    )
    m = evaluation.evaluate_pipeline(str(tmp_path / "flow-map"), n_per_digit=2)
    assert (m["student"], m["steps"], m["guidance"], m["n_images"]) == ("flow_map", 2, 0.0, 20)
    images, _ = evaluation.generate_digits(pipe, steps=2, guidance=0.0, n_per_digit=2)
    assert torch.equal(images, m["images"])
    with pytest.raises(ValueError, match="guidance must be 0 for FlowMapStableDiffusionPipeline"):
        evaluation.evaluate_pipeline(pipe, guidance=1.5, n_per_digit=2)
    assert evaluation.read_student_sampling(digits_teacher_path("sd15")) is None  # a plain pipeline folder


def test_evaluate_pipeline_on_a_lora_flow_map_student_folder(tmp_path):
    """A LoRA flow-map student folder (flow_map_config.json, no model_index.json) is loaded onto the base model it
    records, with the flow-map pipeline, and sampled at its default steps without CFG: the same images as the
    documented loading path. Without a recorded or given base model the error says what to pass."""
    from diffusers import StableDiffusionPipeline

    from diffusers_distill.digits import digits_teacher_path
    from diffusers_distill.flow_map import build_flow_map_student, save_flow_map_lora_student
    from diffusers_distill.pipelines.pipeline_flow_map import FlowMapStableDiffusionPipeline

    base = digits_teacher_path("sd15")
    teacher = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    student = build_flow_map_student(teacher.unet, "lora", jump_embedding_dim=8, lora_rank=4)
    with torch.no_grad():  # a student that differs from the teacher
        for name, p in student.named_parameters():
            if "lora_B" in name or "cond_proj" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    folder = save_flow_map_lora_student(tmp_path / "lora", student, StableDiffusionPipeline, 3, base_model=base)
    assert evaluation.read_student_sampling(folder) == evaluation.StudentSampling(
        "flow_map", 3, None, 0.0, os.path.join(folder, "flow_map_config.json")
    )
    m = evaluation.evaluate_pipeline(folder, n_per_digit=1)
    assert (m["student"], m["steps"], m["guidance"], m["n_images"]) == ("flow_map", 3, 0.0, 10)
    pipe = FlowMapStableDiffusionPipeline.from_pretrained(base, student=folder, safety_checker=None)
    images, _ = evaluation.generate_digits(pipe, steps=3, guidance=0.0, n_per_digit=1)
    assert torch.equal(images, m["images"])
    cli_metrics = _cli_metrics(["--pipeline", folder, "--n_per_digit", "1"], tmp_path / "cli")
    assert (cli_metrics["student"], cli_metrics["steps"]) == ("flow_map", 3)
    assert cli_metrics["digits_fd"] == pytest.approx(m["digits_fd"], rel=1e-9)
    untrained = build_flow_map_student(StableDiffusionPipeline.from_pretrained(base).unet, "lora", 8, lora_rank=4)
    no_base = save_flow_map_lora_student(tmp_path / "no-base", untrained, StableDiffusionPipeline, 3)
    teacher_pipe = FlowMapStableDiffusionPipeline.from_pretrained(base, student=no_base, safety_checker=None)
    teacher_images, _ = evaluation.generate_digits(teacher_pipe, steps=3, guidance=0.0, n_per_digit=1)
    assert not torch.equal(teacher_images, images)  # the adapter and pathway were applied
    with pytest.raises(ValueError, match="records no base_model; pass base_model"):
        evaluation.load_pipeline(no_base)
