"""TwoTimedFlowMapScheduler: grids, the diffusers contract, exactness with an exact flow map, gamma re-noising."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

from diffusers_distill import TwoTimedFlowMapScheduler
from diffusers_distill.flow_map import vp_timestep_to_rf_sigma
from diffusers_distill.gaussian_mixture import GaussianMixture, GuidedGaussianMixture, solve_reference

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("teacher_type", ["vp", "flow_match"])
@pytest.mark.parametrize("spacing", ["uniform", "shifted", "karras"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_grid_shapes_and_endpoints(teacher_type, spacing, num_steps):
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type, sigma_spacing=spacing, shift=3.0)
    scheduler.set_timesteps(num_steps)
    sigmas = scheduler.sigmas.double()
    top = 0.9359575644572175 if teacher_type == "vp" else 1.0  # SD 1.5's RF range ends at 0.936 (nonzero SNR)
    assert scheduler.sigmas.shape == (num_steps + 1,) and scheduler.timesteps.shape == (num_steps,)
    assert sigmas[0].item() == pytest.approx(top, abs=1e-7) and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert [s for s, _ in scheduler.jumps] == pytest.approx(sigmas[:-1].tolist())
    assert [t for _, t in scheduler.jumps] == pytest.approx(sigmas[1:].tolist())  # gamma = 0: jump to next node
    if teacher_type == "vp":
        assert scheduler.timesteps[0].item() == pytest.approx(999.0, abs=1e-3)
    else:
        torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


def test_grid_formulas():
    scheduler = TwoTimedFlowMapScheduler(teacher_type="flow_match", sigma_spacing="shifted", shift=3.0)
    scheduler.set_timesteps(4)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    low = 1e-3  # flow matching's sigma_min = 1 / num_train_timesteps: the grid spans [sigma_min, 1]
    expected = low + (1 - low) * 3 * u / (1 + 2 * u)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, rtol=1e-6, atol=1e-7)
    vp = TwoTimedFlowMapScheduler()
    vp.set_timesteps(4)
    low, high = vp.sigma_min, vp.sigma_max
    torch.testing.assert_close(vp.sigmas[:-1].double(), low + (high - low) * u, rtol=1e-6, atol=1e-7)
    karras = TwoTimedFlowMapScheduler(sigma_spacing="karras", karras_rho=7.0)
    karras.set_timesteps(3)
    low, high = karras.sigma_min, karras.sigma_max
    middle = ((high ** (1 / 7) + low ** (1 / 7)) / 2) ** 7
    torch.testing.assert_close(
        karras.sigmas.double(), torch.tensor([high, middle, low, 0.0], dtype=torch.float64), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(gamma=1.5), "gamma"),
        (dict(gamma=-0.1), "gamma"),
        (dict(sigma_spacing="log"), "sigma_spacing"),
        (dict(teacher_type="ve"), "teacher_type"),
        (dict(shift=0.0), "shift"),
        (dict(karras_rho=-1.0), "karras_rho"),
        (dict(sigma_max=0.99), "sigma_max"),
        (dict(sigma_min=0.95, sigma_max=0.9), "sigma_min"),
        (dict(prediction_type="sample"), "prediction_type"),
        (dict(teacher_type="flow_match", prediction_type="epsilon"), "prediction_type"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(num_train_timesteps=1), "num_train"),
    ],
)
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}"):
        TwoTimedFlowMapScheduler(**kwargs)


def test_bad_set_timesteps_and_step_arguments():
    scheduler = TwoTimedFlowMapScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1))
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="exactly one of"):
        scheduler.set_timesteps(4, sigmas=[0.5, 0.2])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    for bad in ([0.2, 0.5], [0.5, 0.0], [0.99, 0.5], []):  # increasing, zero, above SD's 0.936, empty
        with pytest.raises(ValueError, match="`sigmas` must be"):
            scheduler.set_timesteps(sigmas=bad)
    with pytest.raises(ValueError, match="gamma"):
        scheduler.set_timesteps(4, gamma=2.0)
    scheduler.set_timesteps(1)
    scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))
    with pytest.raises(ValueError, match="1-step schedule"):
        scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))
    fresh = TwoTimedFlowMapScheduler(teacher_type="flow_match")
    fresh.set_timesteps(2)
    with pytest.raises(ValueError, match="not in the schedule"):
        fresh.step(torch.zeros(1), 123.0, torch.zeros(1))


def test_save_load_round_trip_and_from_sd_config(tmp_path):
    scheduler = TwoTimedFlowMapScheduler(sigma_spacing="karras", gamma=0.3, karras_rho=5.0, sigma_max=0.9)
    scheduler.save_pretrained(tmp_path)
    loaded = TwoTimedFlowMapScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    for s in (scheduler, loaded):
        s.set_timesteps(4)
    torch.testing.assert_close(loaded.sigmas, scheduler.sigmas)
    assert loaded.jumps == scheduler.jumps and loaded.sigmas[0].item() == pytest.approx(0.9)
    pndm = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    from_sd = TwoTimedFlowMapScheduler.from_config(pndm.config)
    torch.testing.assert_close(from_sd.alphas_cumprod.float(), pndm.alphas_cumprod)
    assert from_sd.prediction_type == "epsilon"


def test_state_machine_and_begin_index():
    scheduler = TwoTimedFlowMapScheduler()
    scheduler.set_timesteps(4)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert scheduler.step_index is None and scheduler.begin_index is None
    for i, t in enumerate(scheduler.timesteps):
        assert scheduler.jump_for_timestep(t) == scheduler.jumps[i]
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
        assert scheduler.step_index == i + 1
    scheduler.set_timesteps(4)
    assert scheduler.step_index is None
    scheduler.set_begin_index(2)  # img2img: start at node 2 whatever timestep is passed first
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    sigma = scheduler.sigmas[2]
    noised = scheduler.add_noise(x0, noise, scheduler.timesteps[2:3])
    torch.testing.assert_close(noised, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(scheduler.scale_noise(x0, scheduler.timesteps[2:3], noise), noised)
    assert scheduler.jump_for_timestep(scheduler.timesteps[2]) == scheduler.jumps[2]
    scheduler.step(torch.zeros(2, 3), scheduler.timesteps[2], noised)
    assert scheduler.step_index == 3
    lookup = TwoTimedFlowMapScheduler()
    lookup.set_timesteps(4)  # without begin_index, add_noise finds each sample's node by its timestep
    both = lookup.add_noise(torch.stack([x0[0], x0[1]]), noise, lookup.timesteps[[1, 3]])
    torch.testing.assert_close(both[1], (1 - lookup.sigmas[3]) * x0[1] + lookup.sigmas[3] * noise[1])


def _exact_average_velocity(guided, z, s, t):
    """u = (phi(z, s, t) - z) / (t - s) with the exact flow map (DOP853 in float64)."""
    return (solve_reference(guided, z, s, t, "flow", rtol=1e-11, atol=1e-11) - z) / (t - s)


@pytest.mark.parametrize("spacing", ["uniform", "karras"])
def test_exact_flow_map_gives_the_same_endpoint_for_1_2_4_8_steps(spacing):
    """With the exact map as model, every step count lands on the exact ODE solution: the flow-map promise."""
    mixture = GaussianMixture.ring(num_components=4, std=0.3, radius=2.0)
    guided = GuidedGaussianMixture(mixture)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = solve_reference(guided, noise, 1.0, 0.0, "flow", rtol=1e-11, atol=1e-11)
    for num_steps in (1, 2, 4, 8):
        scheduler = TwoTimedFlowMapScheduler(teacher_type="flow_match", sigma_spacing=spacing)
        scheduler.set_timesteps(num_steps)
        z = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            s, target = scheduler.jump_for_timestep(t)
            z = scheduler.step(_exact_average_velocity(guided, z, s, target), t, z).prev_sample
        torch.testing.assert_close(z, reference, rtol=0, atol=1e-8)
    one_step = TwoTimedFlowMapScheduler(teacher_type="flow_match")  # the Euler step is far off at 1 step
    one_step.set_timesteps(1)
    euler = one_step.step(guided.flow_velocity(noise, 1.0), one_step.timesteps[0], noise).prev_sample
    assert (euler - reference).norm(dim=1).mean() > 0.3


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_gamma_renoising_has_the_marginal_variance(gamma):
    """Gaussian data N(0, d^2): the exact map scales by std(t)/std(s), std(sigma)^2 = (1-sigma)^2 d^2 + sigma^2; after
    every re-noised step the empirical variance must be the marginal one at the next node."""
    data_std, n = 0.5, 200_000

    def std(sigma):
        return math.sqrt((1 - sigma) ** 2 * data_std**2 + sigma**2)

    scheduler = TwoTimedFlowMapScheduler(teacher_type="flow_match", gamma=gamma)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        s, target = scheduler.jump_for_timestep(t)
        assert target == pytest.approx((1 - gamma) * scheduler.sigmas[i + 1].item())
        velocity = z * (std(target) / std(s) - 1) / (target - s)
        z = scheduler.step(velocity, t, z, generator=generator).prev_sample
        expected = std(scheduler.sigmas[i + 1].item()) ** 2
        assert z.var().item() == pytest.approx(expected, rel=0.015)


def test_gamma_noise_is_seeded_and_deterministic_at_zero():
    def run(gamma, seed):
        scheduler = TwoTimedFlowMapScheduler(teacher_type="flow_match", gamma=gamma)
        scheduler.set_timesteps(3)
        z = torch.ones(2, 4)
        generator = torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps:
            z = scheduler.step(-0.5 * z, t, z, generator=generator).prev_sample
        return z

    torch.testing.assert_close(run(0.5, 0), run(0.5, 0), rtol=0, atol=0)
    assert not torch.allclose(run(0.5, 0), run(0.5, 1))
    torch.testing.assert_close(run(0.0, 0), run(0.0, 1), rtol=0, atol=0)
    scheduler = TwoTimedFlowMapScheduler(teacher_type="flow_match", gamma=0.5)
    scheduler.set_timesteps(3, gamma=0.0)  # per-call override
    assert scheduler.jumps[0][1] == pytest.approx(scheduler.sigmas[1].item())


def test_stock_sd_pipeline_with_teacher_is_ddim():
    """In an unmodified StableDiffusionPipeline (teacher UNet, CFG), the scheduler at gamma 0 on DDIM's grid gives
    DDIM's images: RF Euler with the converted epsilon is DDIM (docs/flow_maps.md Eq. DDIM); the initial latent and
    the VP input scaling come from init_noise_sigma and scale_model_input."""
    from diffusers_distill import testing

    ddim = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    flow_map = TwoTimedFlowMapScheduler.from_config(ddim.config)
    timesteps = [999, 749, 499, 249]
    sigmas = vp_timestep_to_rf_sigma(torch.tensor(timesteps, dtype=torch.float64), flow_map.alphas_cumprod).tolist()
    outputs = []
    for scheduler, kwargs in ((ddim, dict(num_inference_steps=4)), (flow_map, dict(sigmas=sigmas))):
        pipe = testing.tiny_sd15_pipeline(scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(
            pipe(
                "a photo of a cat",
                guidance_scale=3.0,
                output_type="latent",
                height=32,
                width=32,
                generator=torch.Generator().manual_seed(0),
                **kwargs,
            ).images
        )
    assert ddim.timesteps.tolist() == timesteps
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    assert isinstance(pipe, StableDiffusionPipeline)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_step_keeps_dtype_and_predicts_x0_exactly_on_the_last_step(prediction_type):
    """Every head lands on the same point for the same underlying jump; the last step's pred_original_sample is the
    final sample (a jump to sigma = 0), and half precision in gives half precision out."""
    scheduler = TwoTimedFlowMapScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(sigmas=[0.5])
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = (z - 0.5 * x0) / 0.5  # the eps that makes x0 the jump target of z at sigma = 0.5
    scale = 1 / (0.5**2 + 0.5**2) ** 0.5  # VP input scale; alpha = sigma_vp = 0.5 * scale
    outputs = {"epsilon": eps, "flow": eps - x0, "v_prediction": 0.5 * scale * eps - 0.5 * scale * x0}
    out = scheduler.step(outputs[prediction_type], scheduler.timesteps[0], z)
    torch.testing.assert_close(out.prev_sample, x0)
    torch.testing.assert_close(out.pred_original_sample, x0)
    scheduler.set_timesteps(2)
    half = scheduler.step(torch.zeros(1, 4, dtype=torch.float16), scheduler.timesteps[0], torch.ones(1, 4).half())
    assert half.prev_sample.dtype == torch.float16


@pytest.mark.parametrize("spacing", ["uniform", "shifted", "karras"])
@pytest.mark.parametrize("num_steps", [36, 100, 999])
def test_long_vp_grids_stay_in_the_teachers_range(spacing, num_steps):
    """Nodes below SD's smallest RF sigma (0.0283) would all map to VP timestep 0: repeated timesteps that
    ``index_for_timestep`` cannot tell apart, and a student told t=0 while the state is at a smaller sigma."""
    scheduler = TwoTimedFlowMapScheduler(sigma_spacing=spacing, shift=3.0)
    scheduler.set_timesteps(num_steps)
    nodes = scheduler.sigmas[:-1].double()
    assert nodes.min().item() >= scheduler.sigma_min - 1e-7
    assert len(set(scheduler.timesteps.tolist())) == num_steps
    assert bool((scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all())
    for i in (0, num_steps // 2, num_steps - 1):
        assert scheduler.index_for_timestep(scheduler.timesteps[i]) == i


def test_from_config_of_flow_matching_schedulers():
    """SD3's scheduler config has no betas: it must give a flow-matching flow map with SD3's shift, not SD 1.5's
    VP schedule; a resolution-dependent (Flux) config is refused with a message naming the key."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for config in (sd3.config, FlowMatchEulerDiscreteScheduler.load_config(_saved(sd3))):
        scheduler = TwoTimedFlowMapScheduler.from_config(config)
        assert (scheduler.config.teacher_type, scheduler.config.sigma_spacing) == ("flow_match", "shifted")
        assert scheduler.config.shift == 3.0 and scheduler.config.prediction_type in (None, "flow")
        scheduler.set_timesteps(4)
        u = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
        expected = 1e-3 + (1 - 1e-3) * 3 * u / (1 + 2 * u)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, rtol=1e-6, atol=1e-7)
    heun = TwoTimedFlowMapScheduler.from_config(FlowMatchHeunDiscreteScheduler().config)
    assert (heun.config.teacher_type, heun.config.sigma_spacing) == ("flow_match", "uniform")
    explicit = TwoTimedFlowMapScheduler.from_config(sd3.config, sigma_spacing="karras")
    assert explicit.config.sigma_spacing == "karras"
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        TwoTimedFlowMapScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)


def _saved(scheduler):
    import tempfile

    path = tempfile.mkdtemp()
    scheduler.save_config(path)
    return path


def test_numpy_config_values_are_accepted_and_saved_as_json(tmp_path):
    import json

    import numpy as np

    scheduler = TwoTimedFlowMapScheduler(
        num_train_timesteps=np.int64(1000),
        shift=np.float32(2.0),
        gamma=np.float64(0.25),
        sigma_max=np.float32(0.9),
        sigma_spacing="shifted",
    )
    scheduler.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert (saved["num_train_timesteps"], saved["shift"], saved["gamma"]) == (1000, 2.0, 0.25)
    assert saved["sigma_max"] == pytest.approx(0.9)
    reloaded = TwoTimedFlowMapScheduler.from_pretrained(tmp_path)
    scheduler.set_timesteps(4)
    reloaded.set_timesteps(4)
    torch.testing.assert_close(reloaded.sigmas, scheduler.sigmas)
    with pytest.raises(ValueError, match="shift"):
        TwoTimedFlowMapScheduler(shift=np.float32(-1.0))
