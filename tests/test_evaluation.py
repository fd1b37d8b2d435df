"""The bundled digit classifier and the evaluation metrics (no teacher needed)."""

import math

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
    noise_fd = evaluation.digits_fd(torch.rand(400, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                                    classifier)
    assert real_fd < 0.05 * noise_fd, (real_fd, noise_fd)
    assert real_fd >= 0


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
