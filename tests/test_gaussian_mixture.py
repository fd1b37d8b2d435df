"""Exact Gaussian-mixture denoiser, reference solver and scheduler harness (diffusers_distill.gaussian_mixture)."""

import functools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffusers_distill.gaussian_mixture import (
    GaussianMixture,
    GaussianMixtureDenoiser,
    GuidedGaussianMixture,
    blown_up,
    compare_samplers,
    default_base_config,
    plot_error_vs_nfe,
    sample_with_scheduler,
    scheduler_endpoints,
    solve_reference,
)

torch.set_num_threads(1)


def _anisotropic_mixture():
    generator = torch.Generator().manual_seed(3)
    means = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    stds = 0.05 + torch.rand(5, 3, generator=generator, dtype=torch.float64)
    return GaussianMixture(
        means, stds, weights=torch.tensor([1.0, 2.0, 3.0, 1.0, 0.5]), component_classes=torch.tensor([0, 0, 1, 1, 2])
    )


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, 2, 1])])
@pytest.mark.parametrize("alpha", [0.95, 0.3])
def test_eps_and_x0_match_autograd_score(labels, alpha):
    mixture = _anisotropic_mixture()
    sigma = math.sqrt(1 - alpha**2)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_(True)
    score = torch.autograd.grad(mixture.log_prob(x, alpha, sigma, labels).sum(), x)[0]
    eps_hat, x0_hat = mixture.posterior(x.detach(), alpha, sigma, labels)
    torch.testing.assert_close(eps_hat, -sigma * score, rtol=0, atol=1e-10)
    # Tweedie: x0_hat = (x - sigma eps_hat) / alpha
    torch.testing.assert_close(x0_hat, (x.detach() - sigma * eps_hat) / alpha, rtol=0, atol=1e-10)


def test_x0_is_prior_mean_at_pure_noise_and_flow_velocity():
    mixture = _anisotropic_mixture()
    x = torch.randn(2, 3, dtype=torch.float64)
    eps_hat, x0_hat = mixture.posterior(x, 0.0, 1.0)
    prior_mean = (mixture.weights[:, None] * mixture.means).sum(0)
    torch.testing.assert_close(x0_hat, prior_mean.expand(2, 3))
    torch.testing.assert_close(eps_hat, x)
    guided = GuidedGaussianMixture(mixture)
    torch.testing.assert_close(guided.flow_velocity(x, 1.0), x - prior_mean)


def _two_gaussian_closed_form(xbar_start, t_start, t_end, mu_u, s_u, mu_c, s_c, w):
    """Doc section 7.1: linear ODE dxbar/dt = a xbar + b, solved with the integrating factor Phi and 1-D quadrature."""

    def phi(t):
        return ((s_u**2 + t**2) / (s_u**2 + t_start**2)) ** ((1 - w) / 2) * (
            (s_c**2 + t**2) / (s_c**2 + t_start**2)
        ) ** (w / 2)

    def b(t, mu_u_i, mu_c_i):
        return -t * ((1 - w) * mu_u_i / (s_u**2 + t**2) + w * mu_c_i / (s_c**2 + t**2))

    out = np.empty_like(xbar_start)
    for i in range(len(mu_u)):
        integrand = functools.partial(
            lambda t, mu_u_i, mu_c_i: b(t, mu_u_i, mu_c_i) / phi(t), mu_u_i=mu_u[i], mu_c_i=mu_c[i]
        )
        integral = quad(integrand, t_start, t_end, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
        out[..., i] = phi(t_end) * (xbar_start[..., i] + integral)
    return out


def test_reference_solver_matches_two_gaussian_cfg_closed_form():
    mu_u, s_u, mu_c, s_c, w = np.array([0.0, 0.0]), 1.0, np.array([1.0, -0.5]), 0.1, 7.5
    conditional = GaussianMixture(torch.from_numpy(mu_c)[None], torch.tensor([s_c]))
    unconditional = GaussianMixture(torch.from_numpy(mu_u)[None], torch.tensor([s_u]))
    guided = GuidedGaussianMixture(conditional, torch.zeros(3, dtype=torch.long), w, unconditional)
    start = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.0
    t_start, t_end = 14.0, 0.02
    reference = solve_reference(guided, start, t_start, t_end)
    expected = _two_gaussian_closed_form(start.numpy(), t_start, t_end, mu_u, s_u, mu_c, s_c, w)
    np.testing.assert_allclose(reference.numpy(), expected, rtol=0, atol=1e-8)


def test_ddim_with_many_steps_lands_on_reference():
    from diffusers import DDIMScheduler

    mixture = GaussianMixture.ring()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(32, 2, generator=generator, dtype=torch.float64)
    guided = GuidedGaussianMixture(mixture, torch.randint(8, (32,), generator=generator), 3.0)
    scheduler = DDIMScheduler.from_config(default_base_config())
    model = GaussianMixtureDenoiser(guided, scheduler.alphas_cumprod)
    final = sample_with_scheduler(scheduler, model, noise, 1000)
    assert model.num_evaluations == 1000
    start, end, state_is_xbar = scheduler_endpoints(scheduler, scheduler.alphas_cumprod)
    assert not state_is_xbar and start == pytest.approx(14.6, abs=0.05) and end == pytest.approx(0.0292, abs=1e-3)
    reference = solve_reference(guided, noise * math.sqrt(1 + start**2), start, end)
    error = (final * math.sqrt(1 + end**2) - reference).norm(dim=1).max()
    assert error < 1e-2
    # DDIM is first order: 4x fewer steps -> about 4x the error (measured 3.3x; the s = 0.05 end is stiff)
    coarse = sample_with_scheduler(scheduler, model, noise, 250) * math.sqrt(1 + end**2)
    assert (coarse - reference).norm(dim=1).max() / error > 2.5


def test_euler_scheduler_is_driven_in_xbar_coordinates():
    from diffusers import EulerDiscreteScheduler

    # a wide mixture: Euler's fixed last step sigmabar 0.029 -> 0 caps the accuracy on sharp (s = 0.05) data
    mixture = GaussianMixture.ring(num_components=4, std=0.3)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    guided = GuidedGaussianMixture(mixture, torch.arange(16) % 4, 1.0)
    scheduler = EulerDiscreteScheduler.from_config(default_base_config())
    final = sample_with_scheduler(scheduler, GaussianMixtureDenoiser(guided, scheduler.alphas_cumprod), noise, 400)
    start, end, state_is_xbar = scheduler_endpoints(scheduler, scheduler.alphas_cumprod)
    assert state_is_xbar and end == 0.0
    reference = solve_reference(guided, noise * math.sqrt(1 + start**2), start, end)
    assert (final - reference).norm(dim=1).max() < 2e-2  # first order, 400 steps: measured 1.3e-2


def test_flow_prediction_with_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    mixture = GaussianMixture.ring(num_components=4, std=0.2)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    guided = GuidedGaussianMixture(mixture, torch.arange(16) % 4, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = GaussianMixtureDenoiser(guided, prediction_type="flow_prediction")
    final = sample_with_scheduler(scheduler, model, noise, 500)
    reference = solve_reference(guided, noise, 1.0, 0.0, parametrization="flow")
    assert (final - reference).norm(dim=1).max() < 1e-2


def test_compare_samplers_rows_and_plot(tmp_path):
    rows = compare_samplers(guidance_scales=(1.0, 15.0), steps=(5, 20), batch_size=64)
    assert len(rows) == 3 * 2 * 2
    by_key = {(r["sampler"], r["guidance"], r["steps"]): r for r in rows}
    assert by_key[("PLMS (PNDM)", 15.0, 5)]["nfe"] == 6  # PNDM spends one extra NFE
    # PLMS diverges at w = 15 with 5 steps (measured rmse 9.5, all samples), DDIM does not; DPM++2M improves with steps
    assert by_key[("PLMS (PNDM)", 15.0, 5)]["blowup_fraction"] > 0.5 and by_key[("PLMS (PNDM)", 15.0, 5)]["rmse"] > 1
    assert by_key[("DDIM", 15.0, 5)]["blowup_fraction"] == 0.0 and by_key[("DDIM", 1.0, 20)]["rmse"] < 0.05
    assert by_key[("DPM++2M", 15.0, 20)]["rmse"] < 0.6 * by_key[("DPM++2M", 15.0, 5)]["rmse"]
    path = plot_error_vs_nfe(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000 and path.endswith("plot.png")


def test_blown_up_and_bad_input():
    mixture = GaussianMixture.ring()
    samples = torch.tensor([[1.0, 0.0], [2.0, 0.0], [math.nan, 0.0]])
    assert blown_up(samples, mixture).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianMixtureDenoiser(GuidedGaussianMixture(mixture), None, "x0")
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="labels"):
        mixture.posterior(torch.zeros(1, 2), 1.0, 0.5, torch.tensor([9]))
