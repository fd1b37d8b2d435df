"""DMD2 losses (arXiv 2405.14867): DM gradient direction on a toy Gaussian problem, GAN loss values."""

import math

import pytest
import torch

from diffusers_distill.losses import (
    distribution_matching_gradient,
    distribution_matching_loss,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)


def gaussian_denoiser(x_t, alpha, sigma, mean, std):
    """Exact E[x0 | x_t] for x0 ~ N(mean, std^2 I) and x_t = alpha x0 + sigma eps."""
    gain = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    return mean + gain * (x_t - alpha * mean)


def test_dm_gradient_points_from_fake_to_real():
    torch.manual_seed(0)
    dim, n = 8, 4096
    mu_real, mu_fake = torch.full((dim,), 2.0), torch.full((dim,), -1.0)
    x0 = mu_fake + torch.randn(n, dim)  # generator samples follow the fake distribution
    alpha, sigma = math.sqrt(0.5), math.sqrt(0.5)
    x_t = alpha * x0 + sigma * torch.randn(n, dim)
    x0_real = gaussian_denoiser(x_t, alpha, sigma, mu_real, 1.0)
    x0_fake = gaussian_denoiser(x_t, alpha, sigma, mu_fake, 1.0)
    grad = distribution_matching_gradient(x0, x0_real, x0_fake)
    descent = -grad.mean(0)
    cosine = torch.nn.functional.cosine_similarity(descent, mu_real - mu_fake, dim=0)
    assert cosine > 0.999
    # x0_fake - x0_real = gain*(1 - alpha)... is constant here: (mu_fake - mu_real)(1 - gain*alpha)
    gain = alpha / (alpha**2 + sigma**2)
    normaliser = (x0 - x0_real).abs().mean(1, keepdim=True)
    expected = (mu_fake - mu_real) * (1 - gain * alpha) / normaliser
    torch.testing.assert_close(grad, expected.expand_as(grad), rtol=1e-5, atol=1e-5)


def test_dm_loss_gradient_equals_normalised_gradient_over_numel():
    torch.manual_seed(1)
    x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    distribution_matching_loss(x0, x0_real, x0_fake).backward()
    expected = distribution_matching_gradient(x0.detach(), x0_real, x0_fake) / x0.numel()
    torch.testing.assert_close(x0.grad, expected)


def test_dm_descent_moves_samples_towards_real_mean():
    torch.manual_seed(2)
    mu_real, mu_fake = torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0])
    x0 = (mu_fake + torch.randn(512, 2)).requires_grad_(True)
    optimizer = torch.optim.SGD([x0], lr=0.05 * x0.numel())  # the loss gradient is g / numel
    start = (x0.detach().mean(0) - mu_real).norm()
    for _ in range(20):
        x_t = 0.8 * x0.detach() + 0.6 * torch.randn_like(x0)
        loss = distribution_matching_loss(
            x0, gaussian_denoiser(x_t, 0.8, 0.6, mu_real, 1.0), gaussian_denoiser(x_t, 0.8, 0.6, mu_fake, 1.0)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (x0.detach().mean(0) - mu_real).norm() < 0.5 * start


def test_dm_gradient_non_finite_is_zeroed():
    x0 = torch.ones(2, 2, 2)
    x0_real = x0.clone()
    x0_real[1] += 0.5  # sample 0: normaliser 0 -> (0 - (-1)) / 0 = inf; sample 1: finite
    x0_fake = x0 + 1
    grad = distribution_matching_gradient(x0, x0_real, x0_fake)
    assert torch.equal(grad[0], torch.zeros(2, 2))  # not nan_to_num's default 3.4e38
    torch.testing.assert_close(grad[1], torch.full((2, 2), (-0.5 + 1) / 0.5))
    x0_real[0] = float("nan")
    assert torch.equal(distribution_matching_gradient(x0, x0_real, x0_fake)[0], torch.zeros(2, 2))


def test_gan_losses_values():
    zeros = torch.zeros(4)
    assert gan_generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert gan_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    logits = torch.tensor([-2.0, 0.5, 3.0])
    assert gan_generator_loss(logits).item() == pytest.approx(-torch.log(torch.sigmoid(logits)).mean().item())
    fake, real = torch.tensor([-4.0, -3.0]), torch.tensor([5.0, 4.0])  # a good discriminator
    assert gan_discriminator_loss(fake, real).item() < 0.1
    assert gan_discriminator_loss(real, fake).item() > 7.0


def test_fake_score_loss_is_mse():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    assert fake_score_loss(a, b).item() == pytest.approx(2.5)
