"""diffusers contract of the momentum schedulers: validation messages, config round trip, state reset, noising."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

from diffusers_distill import FlowMatchGHVBScheduler, GHVBScheduler, PLMSHeavyBallScheduler
from diffusers_distill.testing import momentum_scheduler_classes

VP_CLASSES = momentum_scheduler_classes("vp")
FLOW_CLASSES = momentum_scheduler_classes("flow")
ALL_CLASSES = VP_CLASSES + FLOW_CLASSES


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("beta", [0.0, -0.1, 1.5])
def test_rejects_momentum_beta_outside_unit_interval(cls, beta):
    with pytest.raises(ValueError, match="momentum_beta"):
        cls(momentum_beta=beta)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_rejects_bad_order(cls):
    key, max_order = ("solver_order", 2) if "DPMSolver" in cls.__name__ else ("multistep_order", 4)
    with pytest.raises(ValueError, match=rf"`{key}` must be an integer in \[1, {max_order}\]"):
        cls(**{key: max_order + 1})
    with pytest.raises(ValueError, match=key):
        cls(**{key: 0})


@pytest.mark.parametrize("cls", VP_CLASSES)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prediction_type", "flow"),
        ("beta_schedule", "cosine"),
        ("timestep_spacing", "uniform"),
        ("final_sigmas_type", "max"),
    ],
)
def test_rejects_unknown_vp_choices(cls, key, value):
    with pytest.raises(ValueError, match=f"`{key}` must be one of"):
        cls(**{key: value})


@pytest.mark.parametrize("cls", [GHVBScheduler, PLMSHeavyBallScheduler, FlowMatchGHVBScheduler])
def test_rejects_unknown_coefficients(cls):
    with pytest.raises(ValueError, match=r"`coefficients` must be one of \['variable', 'fixed'\]"):
        cls(coefficients="adaptive")


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_flow_rejects_unsupported_options(cls):
    with pytest.raises(ValueError, match="invert_sigmas"):
        cls(invert_sigmas=True)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        cls(stochastic_sampling=True)
    with pytest.raises(ValueError, match="mu"):
        cls(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="sigmas"):
        cls().set_timesteps(sigmas=[0.5, 0.8])
    with pytest.raises(ValueError, match="agree in length"):
        cls().set_timesteps(sigmas=[0.8, 0.5], timesteps=[800.0, 500.0, 200.0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(1001)


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_vp_set_timesteps_validation(cls):
    scheduler = cls()
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps(timesteps=[900, 500], sigmas=[3.0, 1.0])
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[500, 900])
    with pytest.raises(ValueError, match=r"\[0, num_train_timesteps=1000\)"):
        scheduler.set_timesteps(timesteps=[1000, 500])
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="set_timesteps"):
        cls().step(torch.zeros(1), 999, torch.zeros(1))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_save_and_load_round_trip_keeps_config(cls, tmp_path):
    key = "solver_order" if "DPMSolver" in cls.__name__ else "multistep_order"
    scheduler = cls(momentum_beta=0.65, num_train_timesteps=800, **{key: 2})
    scheduler.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert loaded.config.momentum_beta == 0.65


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_from_sd15_pndm_config(cls):
    pndm = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        timestep_spacing="leading",
    )
    scheduler = cls.from_config(pndm.config, momentum_beta=0.7)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.timestep_spacing == "leading"
    assert scheduler.config.momentum_beta == 0.7
    torch.testing.assert_close(scheduler.alphas_cumprod, pndm.alphas_cumprod)


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_set_timesteps_resets_state_and_custom_timesteps(cls):
    scheduler = cls(momentum_beta=0.7)
    sample = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))

    def run():
        scheduler.set_timesteps(6)
        x = sample
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(x), t, x).prev_sample
        return x

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)
    scheduler.set_timesteps(timesteps=[901, 700, 300, 50])
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([901, 700, 300, 50]))
    assert scheduler.sigmas.shape == (5,) and scheduler.step_index is None


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_add_noise_matches_dpmsolver_with_begin_index(cls):
    ours, reference = cls(), DPMSolverMultistepScheduler()
    for scheduler in (ours, reference):
        scheduler.set_timesteps(10)
        scheduler.set_begin_index(3)
    x0, noise = torch.randn(2, 4), torch.randn(2, 4)
    timestep = ours.timesteps[3:4].repeat(2)
    torch.testing.assert_close(ours.add_noise(x0, noise, timestep), reference.add_noise(x0, noise, timestep))


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_flow_schedule_and_scale_noise_match_flow_match_euler(cls):
    ours, reference = cls(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = [1.0 - i / 8 for i in range(8)]
    for scheduler in (ours, reference):
        scheduler.set_timesteps(sigmas=sigmas)
        scheduler.set_begin_index(2)
    torch.testing.assert_close(ours.timesteps, reference.timesteps)
    torch.testing.assert_close(ours.sigmas, reference.sigmas)
    x0, noise = torch.randn(2, 4), torch.randn(2, 4)
    timestep = ours.timesteps[2:3]
    torch.testing.assert_close(ours.scale_noise(x0, timestep, noise), reference.scale_noise(x0, timestep, noise))


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_flow_dynamic_shift_with_mu_like_flux(cls):
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    ours, reference = cls(**config), FlowMatchEulerDiscreteScheduler(**config)
    sigmas = torch.linspace(1.0, 1 / 6, 6).tolist()
    ours.set_timesteps(sigmas=sigmas, mu=0.8)
    reference.set_timesteps(sigmas=sigmas, mu=0.8)
    torch.testing.assert_close(ours.sigmas, reference.sigmas)
    x = torch.randn(1, 4)
    for t in ours.timesteps:
        x = ours.step(-x, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_step_keeps_dtype_and_returns_denoised():
    scheduler = GHVBScheduler()
    scheduler.set_timesteps(5)
    sample = torch.randn(1, 4, dtype=torch.float16)
    output = scheduler.step(torch.randn(1, 4, dtype=torch.float16), scheduler.timesteps[0], sample)
    assert output.prev_sample.dtype == torch.float16 and output.pred_original_sample.shape == (1, 4)
    assert scheduler.step_index == 1


def test_demo_gaussian_mixture_stage_shows_package_schedulers_beside_diffusers(tmp_path):
    from diffusers_distill.cli import stage_gaussian_mixture

    result = stage_gaussian_mixture(str(tmp_path))
    names = {row["sampler"] for row in result["gaussian_mixture"]}
    assert {"DDIM", "DPM++2M", "DEIS", "UniPC", "GHVB (default)", "PLMS-HB (default)", "DPM++2M-HB (default)"} <= names
    table = (tmp_path / "gaussian_mixture_metrics.md").read_text()
    assert "| GHVB (default) |" in table and "| DEIS |" in table and "**guidance 15**" in table
    assert (tmp_path / "gaussian_mixture_error_vs_nfe.png").stat().st_size > 1000
