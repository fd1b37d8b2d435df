"""The diffusers scheduler contract of tests/test_scheduler_contract.py, for TwoTimedFlowMapScheduler (issue 11).

Both teacher types (VP / SD 1.5 and flow matching), every grid option and prediction type: config save/load and
``from_config`` round trips, step shapes, tuple vs dataclass output, ``set_timesteps`` / ``set_begin_index`` state,
``add_noise`` / ``scale_noise`` at the schedule nodes, fp16/bf16, switching to diffusers schedulers and back, and bad
arguments. The helpers (sample batch, toy model, full loop) are the contract module's own.
"""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils import DummyObject

from diffusers_distill import TwoTimedFlowMapScheduler
from tests.test_scheduler_contract import SD15, full_loop, public, sample_batch, toy_model

TEACHERS = ["vp", "flow_match"]


def option_configs(teacher_type):
    """Every grid, prediction type and gamma the scheduler supports for this teacher, as config overrides."""
    options = [
        {},
        {"sigma_spacing": "shifted", "shift": 3.0},
        {"sigma_spacing": "karras"},
        {"sigma_spacing": "karras", "karras_rho": 3.0, "sigma_min": 0.05},
        {"sigma_max": 0.8},
        {"gamma": 0.5},
        {"gamma": 1.0},
        {"num_train_timesteps": 500},
    ]
    if teacher_type == "vp":
        options += [{"prediction_type": p} for p in ("epsilon", "v_prediction", "flow")]
        options += [{"beta_schedule": b} for b in ("linear", "scaled_linear", "squaredcos_cap_v2")]
    return [{"teacher_type": teacher_type, **option} for option in options]


OPTIONS = [option for teacher in TEACHERS for option in option_configs(teacher)]
OPTION_IDS = [",".join(f"{k}={v}" for k, v in option.items()) for option in OPTIONS]


def seeded_loop(scheduler, seed=0, **kwargs):
    """``full_loop`` with a seeded global RNG, so that gamma > 0 (re-noising) runs repeat exactly."""
    torch.manual_seed(seed)
    return full_loop(scheduler, **kwargs)


# ------------------------------------------------------------------------------------------- config round trips
@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
def test_save_load_and_from_config_round_trips_give_identical_steps(option, tmp_path):
    scheduler = TwoTimedFlowMapScheduler(**option)
    scheduler.save_pretrained(tmp_path)
    loaded = TwoTimedFlowMapScheduler.from_pretrained(tmp_path)
    rebuilt = TwoTimedFlowMapScheduler.from_config(scheduler.config)
    expected = dict(scheduler.config)
    del expected["_use_default_values"]  # save_pretrained drops only this bookkeeping key
    assert dict(loaded.config) == expected
    assert public(rebuilt.config) == public(scheduler.config)
    reference = seeded_loop(scheduler, num_inference_steps=5)
    assert torch.isfinite(reference).all()
    for other in (loaded, rebuilt):
        torch.testing.assert_close(seeded_loop(other, num_inference_steps=5), reference, atol=0, rtol=0)


def test_trained_betas_round_trip(tmp_path):
    scheduler = TwoTimedFlowMapScheduler(trained_betas=[0.1, 0.3], num_train_timesteps=2)
    scheduler.save_pretrained(tmp_path)
    loaded = TwoTimedFlowMapScheduler.from_pretrained(tmp_path)
    assert loaded.betas.tolist() == scheduler.betas.tolist() == pytest.approx([0.1, 0.3])
    torch.testing.assert_close(loaded.alphas_cumprod, torch.tensor([0.9, 0.63], dtype=torch.float64))


@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_compatibles_build_from_our_config_and_back(teacher_type):
    """Whatever ``compatibles`` declares builds from our config and back; the diffusers schedulers a pipeline
    swaps in (DDIM / Euler for SD, FlowMatchEuler for SD3) keep our keys, so switching back is lossless."""
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type, sigma_spacing="karras", gamma=0.25, **SD15)
    declared = [c for c in scheduler.compatibles if not isinstance(c, DummyObject)]
    expected = {DDIMScheduler, EulerDiscreteScheduler} if teacher_type == "vp" else {FlowMatchEulerDiscreteScheduler}
    assert expected <= set(declared)
    assert all(("FlowMatch" in c.__name__) == (teacher_type == "flow_match") for c in declared)
    for other_cls in declared:
        other = other_cls.from_config(scheduler.config)
        assert torch.isfinite(full_loop(other, num_inference_steps=4)).all(), other_cls.__name__
        if teacher_type == "vp":
            torch.testing.assert_close(other.alphas_cumprod.double(), scheduler.alphas_cumprod)
        back = TwoTimedFlowMapScheduler.from_config(other.config)
        assert {k: v for k, v in public(back.config).items() if k in scheduler.config} == public(scheduler.config)
        torch.testing.assert_close(
            seeded_loop(back, num_inference_steps=4), seeded_loop(scheduler, num_inference_steps=4)
        )


# ------------------------------------------------------------------------------------------- step contract
@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
def test_step_shape_and_tuple_equals_dataclass(option):
    scheduler = TwoTimedFlowMapScheduler(**option)
    sample = sample_batch()
    scheduler.set_timesteps(10)
    first = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample).prev_sample
    second = scheduler.step(0.1 * sample, scheduler.timesteps[1], sample).prev_sample
    assert first.shape == second.shape == sample.shape
    outputs = []
    for return_dict in (True, False):
        scheduler.set_timesteps(10)
        outputs.append(
            scheduler.step(
                0.1 * sample, scheduler.timesteps[3], sample, generator=torch.manual_seed(0), return_dict=return_dict
            )
        )
    as_dict, as_tuple = outputs
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], as_dict.prev_sample, atol=0, rtol=0)
    assert as_dict.pred_original_sample.shape == sample.shape


@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_public_api(teacher_type):
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type)
    assert scheduler.order == 1 and len(scheduler) == scheduler.config.num_train_timesteps
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample_batch(), 999, sample_batch())
    scheduler.set_timesteps(4)
    sample = sample_batch()
    scaled = scheduler.scale_model_input(sample, scheduler.timesteps[0])
    if teacher_type == "flow_match":
        assert scheduler.init_noise_sigma == 1.0 and scaled is sample
    else:  # SD: x_T = eps in RF coordinates, UNet input (alpha + sigma) z
        s = scheduler.sigmas[0].item()
        assert scheduler.init_noise_sigma == pytest.approx(((1 - s) ** 2 + s**2) ** 0.5)
        torch.testing.assert_close(scaled * scheduler.init_noise_sigma, sample)


@pytest.mark.parametrize("teacher_type", TEACHERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 100, 1000])
def test_inference_step_counts(teacher_type, steps):
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type)
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == scheduler.num_inference_steps == steps
    assert len(scheduler.sigmas) == len(scheduler.jump_targets) + 1 == steps + 1
    # distinct (index_for_timestep is unambiguous) down to the teacher's smallest sigma; below it (uniform VP grids
    # past ~35 steps) the VP timestep is clamped at 0
    inside = scheduler.timesteps[scheduler.sigmas[:-1] >= scheduler.teacher_sigma_min - 1e-6]
    assert bool((inside[1:] < inside[:-1]).all())
    out = full_loop(scheduler, num_inference_steps=steps)
    assert out.shape == sample_batch().shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- grids and sigmas
@pytest.mark.parametrize("teacher_type", TEACHERS)
@pytest.mark.parametrize("spacing", ["uniform", "shifted", "karras"])
def test_custom_sigmas_equal_every_built_in_grid(teacher_type, spacing):
    """``set_timesteps(sigmas=grid)`` reproduces the built-in grid: same sigmas, timesteps, jumps and samples."""
    config = dict(teacher_type=teacher_type, sigma_spacing=spacing, shift=3.0, gamma=0.3)
    built_in = TwoTimedFlowMapScheduler(**config)
    default = seeded_loop(built_in, num_inference_steps=6)
    custom = TwoTimedFlowMapScheduler(**config)
    out = seeded_loop(custom, sigmas=built_in.sigmas[:-1].double().tolist())
    torch.testing.assert_close(custom.sigmas, built_in.sigmas)
    torch.testing.assert_close(custom.timesteps, built_in.timesteps)
    torch.testing.assert_close(torch.tensor(custom.jumps), torch.tensor(built_in.jumps), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out, default, atol=1e-6, rtol=1e-6)
    custom.set_timesteps(sigmas=torch.tensor([0.7, 0.3]))  # tensors work too; a final 0 is appended
    assert custom.sigmas.tolist() == pytest.approx([0.7, 0.3, 0.0])


def test_vp_timesteps_are_the_teachers_timesteps_of_the_grid():
    """VP timesteps follow the RF sigma through the SD schedule: at the top node the UNet sees t = 999."""
    scheduler = TwoTimedFlowMapScheduler(**SD15)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0].item() == pytest.approx(999.0, abs=1e-3)
    assert bool((scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all())
    flow = TwoTimedFlowMapScheduler(teacher_type="flow_match")
    flow.set_timesteps(4)
    # 1000 sigma on the grid sigma_min + (1 - sigma_min) u, sigma_min = 1 / 1000
    torch.testing.assert_close(flow.timesteps, torch.tensor([1000.0, 750.25, 500.5, 250.75]))


# ------------------------------------------------------------------------------------------- state machine
@pytest.mark.parametrize("option", [{"teacher_type": t, "gamma": g} for t in TEACHERS for g in (0.0, 0.5)])
def test_set_timesteps_resets_the_state(option):
    fresh = seeded_loop(TwoTimedFlowMapScheduler(**option), num_inference_steps=6)
    scheduler = TwoTimedFlowMapScheduler(**option)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2)
    sample = sample_batch()
    for t in scheduler.timesteps[2:4]:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
    assert scheduler.step_index == 4 and scheduler.begin_index == 2
    scheduler.set_timesteps(6)
    assert scheduler.step_index is None and scheduler.begin_index is None
    torch.testing.assert_close(seeded_loop(scheduler, num_inference_steps=6), fresh, atol=0, rtol=0)
    assert scheduler.step_index == 6


@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_img2img_with_begin_index_equals_the_tail_of_a_full_run(teacher_type):
    """img2img: ``set_begin_index(k)`` + ``add_noise`` at node k, then stepping the remaining timesteps, is the tail
    of a full run that reached node k with the same latent (deterministic at gamma = 0)."""
    x0, noise = sample_batch(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2)
    latent = scheduler.add_noise(x0, noise, scheduler.timesteps[2:3])
    sigma = scheduler.sigmas[2]
    torch.testing.assert_close(latent, (1 - sigma) * x0 + sigma * noise)
    tail = latent
    for t in scheduler.timesteps[2:]:
        tail = scheduler.step(toy_model(scheduler.scale_model_input(tail, t), t), t, tail).prev_sample
    reference = TwoTimedFlowMapScheduler(teacher_type=teacher_type)
    reference.set_timesteps(6)
    reference._step_index = 2  # jump straight to node 2 with the same latent
    expected = latent
    for t in reference.timesteps[2:]:
        expected = reference.step(toy_model(reference.scale_model_input(expected, t), t), t, expected).prev_sample
    torch.testing.assert_close(tail, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("teacher_type", TEACHERS)
def test_add_noise_and_scale_noise_are_the_rf_forward_process(teacher_type):
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type, sigma_spacing="shifted", shift=3.0)
    scheduler.set_timesteps(10)
    x0, noise = sample_batch(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for index in (0, 4, 9):
        t, sigma = scheduler.timesteps[index], scheduler.sigmas[index]
        expected = (1 - sigma) * x0 + sigma * noise
        torch.testing.assert_close(scheduler.add_noise(x0, noise, t[None]), expected)
        torch.testing.assert_close(scheduler.scale_noise(x0, t, noise), expected)
    # one timestep per sample, looked up in the schedule
    per_sample = scheduler.add_noise(x0, noise, scheduler.timesteps[[0, 3, 6, 9]])
    for row, index in enumerate((0, 3, 6, 9)):
        sigma = scheduler.sigmas[index]
        torch.testing.assert_close(per_sample[row], (1 - sigma) * x0[row] + sigma * noise[row])
    if teacher_type == "vp":  # at a node, RF (1 - s) x0 + s eps is SD's sqrt(a) x0 + sqrt(1 - a) eps, rescaled
        t = scheduler.timesteps[9]
        low, frac = int(float(t)), float(t) - int(float(t))  # continuous timestep: interpolate SD's table
        table = scheduler.alphas_cumprod
        alpha_bar = torch.tensor(((1 - frac) * table[low] + frac * table[min(low + 1, len(table) - 1)]).item())
        vp = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        rf = scheduler.add_noise(x0, noise, t[None])
        torch.testing.assert_close(scheduler.scale_model_input(rf, t), vp, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.add_noise(x0, noise, torch.tensor([123.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_keeps_the_sample_dtype(dtype):
    scheduler = TwoTimedFlowMapScheduler()
    scheduler.set_timesteps(4)
    x0 = sample_batch(dtype)
    assert scheduler.add_noise(x0, torch.randn_like(x0), scheduler.timesteps[1:2]).dtype == dtype


# ------------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("option", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(option, dtype):
    reference = seeded_loop(TwoTimedFlowMapScheduler(**option), num_inference_steps=6)
    half = seeded_loop(TwoTimedFlowMapScheduler(**option), sample=sample_batch(dtype), num_inference_steps=6)
    assert half.dtype == dtype
    tolerance = 0.02 if dtype == torch.float16 else 0.1  # the contract module's tolerances
    scale = float(reference.abs().max()) + 1.0
    torch.testing.assert_close(half.float(), reference, atol=tolerance * scale, rtol=tolerance)


# ------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("teacher_type", TEACHERS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigmas": [0.5, float("nan")]}, "`sigmas` must be"),
        ({"sigmas": [0.5, float("inf")]}, "`sigmas` must be"),
        ({"sigmas": [0.5, 0.5]}, "`sigmas` must be"),
        ({"sigmas": [0.5, -0.1]}, "`sigmas` must be"),
        ({"sigmas": [1.5, 0.5]}, "`sigmas` must be"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be an int >= 1"),
        ({"num_inference_steps": 2.0}, "`num_inference_steps` must be an int >= 1"),
        ({"num_inference_steps": True}, "`num_inference_steps` must be an int >= 1"),
        ({"num_inference_steps": 4, "gamma": float("nan")}, "`gamma` must be in"),
        ({}, "exactly one of"),
    ],
)
def test_bad_set_timesteps_arguments_are_named(teacher_type, kwargs, message):
    scheduler = TwoTimedFlowMapScheduler(teacher_type=teacher_type)
    with pytest.raises(ValueError, match=message):
        scheduler.set_timesteps(**kwargs)
    scheduler.set_timesteps(num_inference_steps=torch.tensor(5).numpy()[()])  # numpy integers are fine
    assert len(scheduler.timesteps) == 5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gamma": float("nan")}, "gamma"),
        ({"shift": float("inf")}, "shift"),
        ({"sigma_max": 0.0}, "sigma_max"),
        ({"teacher_type": "flow_match", "sigma_max": 1.01}, "sigma_max"),
        ({"teacher_type": "flow_match", "sigma_min": 0.0}, "sigma_min"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
        ({"prediction_type": "sample"}, "prediction_type"),
    ],
)
def test_bad_config_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        TwoTimedFlowMapScheduler(**kwargs)
