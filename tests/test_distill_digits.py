"""distill_digits_teacher end to end on the bundled digits teacher (a few DMD2 iterations)."""

import json
import math
import os

import pytest

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
    metrics = distill_digits_teacher(out, num_student_steps=1, max_train_steps=4, dfake_gen_update_ratio=2,
                                     train_batch_size=4, n_per_digit=2)  # fmt: skip
    assert metrics["global_step"] == 4
    for role in ("student", "teacher"):
        assert metrics[role]["n_images"] == 20
        for key in ("prompt_accuracy", "digits_fd"):
            assert math.isfinite(metrics[role][key]), (role, key)
        assert 0.0 <= metrics[role]["prompt_accuracy"] <= 1.0
    assert metrics["teacher"]["steps"] == 25 and metrics["teacher"]["guidance"] == 2.0
    assert metrics["student"]["steps"] == 1 and metrics["student"]["guidance"] == 0.0
    assert metrics["student"]["mse"] > 0 and math.isfinite(metrics["student"]["psnr"])
    assert math.isfinite(metrics["final_losses"]["loss_dm"]) and math.isfinite(metrics["final_losses"]["loss_fake"])
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["student"]["digits_fd"] == pytest.approx(metrics["student"]["digits_fd"])
    assert os.path.getsize(os.path.join(out, "samples.png")) > 0
    with open(os.path.join(out, "data", "prompts.txt")) as f:
        assert f.read().splitlines() == [f"a handwritten digit {w}" for w in
                                         ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                          "nine")]  # fmt: skip
