"""distill_digits_teacher end to end on the bundled digits teacher (a few DMD2 iterations)."""

import json
import math
import os

import pytest
import torch

from diffusers_distill.training.distill_digits import distill_digits_teacher


def test_distill_digits_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_student_steps must be one of"):
        distill_digits_teacher(str(tmp_path), num_student_steps=3)
    with pytest.raises(ValueError, match="student_type must be one of"):
        distill_digits_teacher(str(tmp_path), student_type="dora")
    assert not os.listdir(tmp_path)  # nothing written before validation


@pytest.mark.slow
def test_distill_digits_few_steps_end_to_end(tmp_path):
    out = str(tmp_path / "student")
    metrics = distill_digits_teacher(
        out, num_student_steps=1, max_train_steps=4, dfake_gen_update_ratio=2, train_batch_size=4, n_per_digit=2
    )
    assert metrics["global_step"] == 4
    for role in ("student", "teacher"):
        assert metrics[role]["n_images"] == 20
        for key in ("prompt_accuracy", "digits_fd"):
            assert math.isfinite(metrics[role][key]), (role, key)
        correct = metrics[role]["prompt_accuracy"] * 20  # a count of correctly classified images out of 20
        assert correct == pytest.approx(round(correct)), (role, correct)
    assert metrics["teacher"]["prompt_accuracy"] >= 0.5  # the trained teacher draws the prompted digit (chance: 0.1)
    assert metrics["teacher"]["steps"] == 25 and metrics["teacher"]["guidance"] == 2.0
    assert metrics["student"]["steps"] == 1 and metrics["student"]["guidance"] == 0.0
    assert metrics["student"]["mse"] > 0 and math.isfinite(metrics["student"]["psnr"])
    assert math.isfinite(metrics["final_losses"]["loss_dm"]) and math.isfinite(metrics["final_losses"]["loss_fake"])
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["student"]["digits_fd"] == pytest.approx(metrics["student"]["digits_fd"])
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
    with open(os.path.join(out, "data", "prompts.txt")) as f:
        words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        assert f.read().splitlines() == [f"a handwritten digit {w}" for w in words]


@pytest.mark.slow
def test_demo_distill_stage_writes_a_loadable_student_and_its_table(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from diffusers_distill import cli

    summary = cli.stage_distill(
        str(tmp_path), n_per_digit=2, max_train_steps=4, dfake_gen_update_ratio=2, train_batch_size=4
    )["dmd2_1step"]
    assert summary["global_step"] == 4 and summary["config"]["use_ema"] is True
    table = (tmp_path / "dmd2_metrics.md").read_text()
    assert "| DMD2 student (full, 4 it.) | 1 |" in table
    assert f"{summary['student']['digits_fd']:.2f}" in table and f"{summary['teacher']['digits_fd']:.2f}" in table
    student = DiffusionPipeline.from_pretrained(str(tmp_path / "dmd2_1step"))  # native diffusers, no package classes
    assert type(student) is StableDiffusionPipeline and type(student.scheduler).__name__ == "LCMScheduler"
    image = student("a handwritten digit seven", num_inference_steps=1, guidance_scale=0.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_step_routing_answers_the_routed_timesteps_with_the_teacher_cfg(sd15_pipeline):
    """benchmarks/dmd2_step_routing.py: routed timesteps get the teacher's CFG output, the others the student's,
    and the student's forward is restored afterwards."""
    import copy
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    spec = importlib.util.spec_from_file_location("dmd2_step_routing", os.path.join(path, "dmd2_step_routing.py"))
    routing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(routing)
    teacher = sd15_pipeline.unet
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, cond, uncond = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        own = student(x, torch.tensor(749), cond, return_dict=False)[0]
        eps_u = teacher(x, torch.tensor(249), uncond.expand(2, -1, -1), return_dict=False)[0]
        eps_c = teacher(x, torch.tensor(249), cond, return_dict=False)[0]
        restore = routing.route_to_teacher(student, teacher, uncond, 1.5, {249})
        torch.testing.assert_close(student(x, torch.tensor(249), cond)[0], eps_u + 1.5 * (eps_c - eps_u))
        torch.testing.assert_close(student(x, torch.tensor(749), cond, return_dict=False)[0], own)
        restore()
        assert not torch.allclose(student(x, torch.tensor(249), cond, return_dict=False)[0], eps_c)


@pytest.mark.slow
def test_demo_flow_map_stage_writes_a_loadable_student_and_its_table(tmp_path):
    """The opt-in demo stage: a flow-map student folder that its pipeline class loads, sampled at every step count
    of the table against the teacher rows (same seeded noise), and the table in the demo's metrics."""
    from diffusers_distill import cli
    from diffusers_distill.pipelines.pipeline_flow_map import FlowMapStableDiffusionPipeline

    assert "flow_map" not in cli.DEFAULT_DEMO_STAGES and "flow_map" in cli.DEMO_STAGES
    summary = cli.stage_flow_map(str(tmp_path), n_per_digit=2, max_train_steps=3, train_batch_size=4, steps=(1, 2))[
        "flow_map"
    ]
    assert summary["training"]["global_step"] == 3
    models = [(r["model"], r["steps"]) for r in summary["rows"]]
    assert models == [("teacher DDIM trailing (CFG 1.5)", s) for s in (25, 1, 2)] + [
        ("flow-map student (itvm)", s) for s in (1, 2)
    ]
    assert all(r["psnr"] is not None and r["fd_to_teacher"] > 0 for r in summary["rows"][1:])
    table = (tmp_path / "flow_map_metrics.md").read_text()
    assert f"{summary['rows'][-1]['digits_fd']:.2f}" in table and "FD to teacher@25 images" in table
    assert f"| {summary['rows'][-1]['fd_to_teacher']:.2f} |" in table
    pipe = FlowMapStableDiffusionPipeline.from_pretrained(str(tmp_path / "flow_map" / "student"))
    assert pipe.config.default_num_inference_steps == 4
    from diffusers_distill.evaluation import evaluate_pipeline

    m = evaluate_pipeline(str(tmp_path / "flow_map" / "student"), steps=2, n_per_digit=2, seed=0)
    assert m["digits_fd"] == pytest.approx(summary["rows"][-1]["digits_fd"], rel=1e-9)
    # the benchmark's --compare: another saved flow-map student gets a row per step count, from the same noise and
    # against the same teacher images (here the same folder, so the same numbers as the student's own rows)
    from diffusers_distill.training.distill_digits import evaluate_digits_flow_map

    student = str(tmp_path / "flow_map" / "student")
    rows = evaluate_digits_flow_map(
        str(tmp_path / "flow_map"), "itvm", summary["training"], (1, 2), 1.5, 2, 0, compare=[student]
    )
    own, compared = rows[3:5], rows[5:]
    assert [(r["model"], r["steps"]) for r in compared] == [("flow-map student `flow_map/student`", s) for s in (1, 2)]
    for a, b in zip(own, compared):
        assert (a["digits_fd"], a["fd_to_teacher"], a["psnr"]) == (b["digits_fd"], b["fd_to_teacher"], b["psnr"])
    with pytest.raises(ValueError, match="n_per_digit must be an integer >= 2"):
        cli.stage_flow_map(str(tmp_path / "bad"), n_per_digit=1)
