"""The diffusers scheduler contract, for all six momentum schedulers.

Written from what diffusers' own ``tests/schedulers`` check (``SchedulerCommonTest``, the DPM-Solver multistep
per-scheduler tests) and what FlowMatchEulerDiscreteScheduler does: config save/load and ``from_config`` round trips
both ways through ``compatibles``, step shapes, tuple vs dataclass output, every spacing / prediction type / sigma
option, ``add_noise`` / ``scale_noise``, ``set_timesteps`` resets, custom timesteps and sigmas, fp16/bf16, and the
edge cases of issue 8 (zero-length final step, bad schedules, numeric argument checks).
"""

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers.utils import DummyObject

from diffusers_distill import GHVBScheduler, TwoTimedFlowMapScheduler
from diffusers_distill.testing import momentum_scheduler_classes

VP_CLASSES = momentum_scheduler_classes("vp")
FLOW_CLASSES = momentum_scheduler_classes("flow")
ALL_CLASSES = VP_CLASSES + FLOW_CLASSES
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def order_key(cls) -> str:
    return "solver_order" if "DPMSolver" in cls.__name__ else "multistep_order"


def max_order(cls) -> int:
    return 2 if "DPMSolver" in cls.__name__ else 4


def is_flow(cls) -> bool:
    return cls in FLOW_CLASSES


def sample_batch(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 8, 8, generator=generator).to(dtype)


def toy_model(sample, t):
    """A smooth, timestep-dependent model output (same role as diffusers' dummy model)."""
    t = float(t) / 1000.0
    return (0.3 + 0.5 * t) * sample - 0.1 * t


def full_loop(scheduler, sample=None, **set_timesteps_kwargs):
    sample = sample_batch() if sample is None else sample
    scheduler.set_timesteps(**set_timesteps_kwargs)
    sample = sample * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have neither
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        sample = scheduler.step(toy_model(model_input, t).to(sample.dtype), t, sample).prev_sample
    return sample


def option_configs(cls):
    """Every spacing, prediction type and sigma option the class supports, each as a config override."""
    options = [{}, {"momentum_beta": 0.6}, {"momentum_beta": 1.0}, {"num_train_timesteps": 500}]
    options += [{order_key(cls): order} for order in range(1, max_order(cls) + 1)]
    if "DPMSolver" not in cls.__name__:
        options += [{"coefficients": "fixed"}, {"final_step": "dpmsolver++"}, {"final_step": "multistep"}]
    options += [{"lower_order_final": True}, {"lower_order_final": False}]
    if is_flow(cls):
        options += [
            {"shift": 3.0},
            {"use_karras_sigmas": True},
            {"use_exponential_sigmas": True},
            {"use_beta_sigmas": True},
            {"shift_terminal": 0.1},
            {"time_shift_type": "linear"},
        ]
    else:
        options += [{"prediction_type": p} for p in ("epsilon", "v_prediction", "sample")]
        options += [
            {"timestep_spacing": s, "steps_offset": o} for s in ("linspace", "leading", "trailing") for o in (0, 1)
        ]
        options += [{"use_karras_sigmas": True, "final_sigmas_type": f} for f in ("zero", "sigma_min")]
        options += [{"final_sigmas_type": f} for f in ("zero", "sigma_min")]
        options += [{"beta_schedule": b} for b in ("linear", "scaled_linear", "squaredcos_cap_v2")]
        options += [{"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}]
    return options


def config_ids(cls):
    return [",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in option_configs(cls)]


CLASS_OPTIONS = [(cls, option) for cls in ALL_CLASSES for option in option_configs(cls)]
CLASS_OPTION_IDS = [f"{cls.__name__}-{i}" for cls in ALL_CLASSES for i in config_ids(cls)]


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------- config round trips
@pytest.mark.parametrize(("cls", "option"), CLASS_OPTIONS, ids=CLASS_OPTION_IDS)
def test_save_load_round_trip_gives_identical_steps(cls, option, tmp_path):
    scheduler = cls(**option)
    scheduler.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert public(loaded.config) == public(scheduler.config)
    first, second = full_loop(scheduler, num_inference_steps=7), full_loop(loaded, num_inference_steps=7)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_save_pretrained_drops_only_use_default_values(cls, tmp_path):
    scheduler = cls()
    scheduler.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    expected = dict(scheduler.config)
    del expected["_use_default_values"]
    assert dict(loaded.config) == expected


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_compatibles_accept_our_config_and_switch_back(cls):
    """Every listed compatible class builds from our config with the same noise schedule and runs; switching back
    restores our config exactly (diffusers keeps our keys as hidden config entries)."""
    scheduler = cls(**({} if is_flow(cls) else SD15), momentum_beta=0.7)
    compatibles = [c for c in scheduler.compatibles if not isinstance(c, DummyObject)]
    assert compatibles, "no compatible diffusers scheduler listed"
    for other_cls in compatibles:
        other = other_cls.from_config(scheduler.config)
        if is_flow(cls):
            other.set_timesteps(6)
            ours = cls.from_config(scheduler.config)
            ours.set_timesteps(6)
            # same flow schedule (Heun repeats each interior sigma for its second stage)
            torch.testing.assert_close(torch.unique_consecutive(other.sigmas.float()), ours.sigmas.float())
        else:
            torch.testing.assert_close(other.alphas_cumprod.float(), scheduler.alphas_cumprod.float())
        assert torch.isfinite(full_loop(other, num_inference_steps=6)).all(), other_cls.__name__
        back = cls.from_config(other.config)
        assert {k: v for k, v in public(back.config).items() if k in scheduler.config} == public(scheduler.config)
        extra = set(public(back.config)) - set(public(scheduler.config))
        assert not extra & set(inspect.signature(cls.__init__).parameters), other_cls.__name__


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_from_compatible_default_configs(cls):
    """The other direction: our class from each compatible class's own default config runs a full loop."""
    for other_cls in [c for c in cls().compatibles if not isinstance(c, DummyObject)]:
        ours = cls.from_config(other_cls().config)
        assert torch.isfinite(full_loop(ours, num_inference_steps=6)).all(), other_cls.__name__


def test_order_keys_do_not_clash_with_dpm_solver():
    """GHVB's order 4 must not reach DPM-Solver/UniPC/DEIS (range 1-3), and their order must not reach GHVB."""
    from diffusers import (
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        UniPCMultistepScheduler,
    )

    ghvb = GHVBScheduler(**SD15, multistep_order=4)
    for other_cls in (
        DPMSolverSinglestepScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        DEISMultistepScheduler,
    ):
        other = other_cls.from_config(ghvb.config)
        assert other.config.solver_order == other_cls().config.solver_order
        assert torch.isfinite(full_loop(other, num_inference_steps=6)).all()
        assert GHVBScheduler.from_config(other.config).config.multistep_order == 4
    with pytest.raises(ValueError, match="takes `multistep_order`"):
        GHVBScheduler.from_config(ghvb.config, solver_order=2)  # an override diffusers would silently drop
    dpm = DPMSolverMultistepScheduler(**SD15, solver_order=3)
    assert GHVBScheduler.from_config(dpm.config).config.multistep_order == 4
    back = DPMSolverMultistepScheduler.from_config(GHVBScheduler.from_config(dpm.config).config)
    assert back.config.solver_order == 3


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_trained_betas_round_trip(cls, tmp_path):
    scheduler = cls(trained_betas=np.array([0.1, 0.3]), num_train_timesteps=2)
    scheduler.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).betas.tolist() == scheduler.betas.tolist()


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_config_attribute_access_and_no_kwargs(cls):
    scheduler = cls()
    assert "kwargs" not in inspect.signature(cls.__init__).parameters and cls._deprecated_kwargs == []
    scheduler.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match=f"'{cls.__name__}' object has no attribute 'does_not_exist'"):
        scheduler.does_not_exist  # noqa: B018


# ------------------------------------------------------------------------------------------- step contract
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_step_shape_and_tuple_equals_dataclass(cls):
    scheduler = cls()
    scheduler.set_timesteps(25)
    sample = sample_batch()
    out_0 = scheduler.step(0.1 * sample, scheduler.timesteps[5], sample).prev_sample
    out_1 = scheduler.step(0.1 * sample, scheduler.timesteps[6], sample).prev_sample
    assert out_0.shape == out_1.shape == sample.shape
    scheduler.set_timesteps(25)
    as_dict = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample)
    scheduler.set_timesteps(25)
    as_tuple = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], as_dict.prev_sample, atol=0, rtol=0)
    assert as_dict.pred_original_sample.shape == sample.shape


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_public_api(cls):
    scheduler = cls()
    sample = sample_batch()
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    assert scheduler.scale_model_input(sample, 0.0) is sample
    assert len(scheduler) == scheduler.config.num_train_timesteps
    with pytest.raises(ValueError, match="set_timesteps"):
        cls().step(sample, 999, sample)


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50, 100, 999, 1000])
def test_inference_step_counts(cls, steps):
    scheduler = cls()
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == scheduler.num_inference_steps == steps  # no duplicates, even at 1000
    assert len(scheduler.sigmas) == steps + 1
    sample = sample_batch()
    out = scheduler.step(0.1 * sample, scheduler.timesteps[0], sample).prev_sample
    assert out.shape == sample.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_add_noise_matches_the_vp_forward_process(cls):
    scheduler = cls(**SD15)
    scheduler.set_timesteps(10)
    x0, noise = sample_batch(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[5]
    alpha_bar = scheduler.alphas_cumprod[int(t)]
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t[None]), expected, atol=1e-5, rtol=1e-5)
    # begin_index (img2img) is honoured
    scheduler.set_begin_index(5)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t[None]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_scale_noise_matches_the_flow_forward_process(cls):
    scheduler = cls(shift=3.0)
    scheduler.set_timesteps(10)
    x0, noise = sample_batch(), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = scheduler.sigmas[4]
    expected = sigma * noise + (1 - sigma) * x0
    torch.testing.assert_close(scheduler.scale_noise(x0, scheduler.timesteps[4], noise), expected)


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_set_timesteps_resets_history_momentum_and_indices(cls):
    scheduler = cls(momentum_beta=0.7)
    fresh = full_loop(cls(momentum_beta=0.7), num_inference_steps=8)
    scheduler.set_timesteps(8)
    sample = sample_batch()
    for t in scheduler.timesteps[:3]:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
    assert scheduler.step_index == 3
    torch.testing.assert_close(full_loop(scheduler, num_inference_steps=8), fresh, atol=0, rtol=0)
    assert scheduler.step_index == 8 and scheduler.begin_index is None


@pytest.mark.parametrize("cls", [*ALL_CLASSES, TwoTimedFlowMapScheduler])
def test_set_begin_index_rejects_what_no_schedule_has(cls):
    """A bad begin_index fails at once with the allowed range, not as an IndexError in the middle of sampling
    (schedulers/state.py, shared by every scheduler of the package)."""
    scheduler = cls()
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="`begin_index` must be an int >= 0"):
            scheduler.set_begin_index(bad)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="`begin_index` must be <= num_inference_steps=4"):
        scheduler.set_begin_index(5)
    scheduler.set_begin_index(np.int64(2))
    assert scheduler.begin_index == 2 and type(scheduler.begin_index) is int
    scheduler.set_begin_index(4)  # strength ~ 0 in img2img: nothing left to denoise, still a valid state
    assert scheduler.begin_index == 4


@pytest.mark.parametrize(("cls", "option"), CLASS_OPTIONS, ids=CLASS_OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(cls, option, dtype):
    reference = full_loop(cls(**option), num_inference_steps=6)
    half = full_loop(cls(**option), sample=sample_batch(dtype), num_inference_steps=6)
    assert half.dtype == dtype
    # bf16 keeps 8 mantissa bits: diffusers' own DPMSolverMultistep is 0.16 off on this loop (Karras, 6 steps)
    tolerance = 0.02 if dtype == torch.float16 else 0.1
    scale = float(reference.abs().max()) + 1.0
    torch.testing.assert_close(half.float(), reference, atol=tolerance * scale, rtol=tolerance)


# ------------------------------------------------------------------------------------------- custom schedules
@pytest.mark.parametrize("cls", VP_CLASSES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("final_sigmas_type", ["sigma_min", "zero"])
def test_custom_timesteps_equal_the_default_schedule(cls, prediction_type, final_sigmas_type):
    config = dict(SD15, prediction_type=prediction_type, final_sigmas_type=final_sigmas_type)
    scheduler = cls(**config)
    scheduler.set_timesteps(10)
    default = full_loop(cls(**config), num_inference_steps=10)
    custom = full_loop(cls(**config), num_inference_steps=None, timesteps=scheduler.timesteps.tolist())
    torch.testing.assert_close(custom, default, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_custom_sigmas_equal_the_default_schedule(cls):
    scheduler = cls(**SD15, use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    default = full_loop(cls(**SD15, use_karras_sigmas=True), num_inference_steps=10)
    custom = cls(**SD15)
    out = full_loop(custom, sigmas=scheduler.sigmas[:-1].tolist())
    torch.testing.assert_close(custom.sigmas, scheduler.sigmas)
    # timesteps come back from the sigmas as floats (diffusers' _sigma_to_t) instead of rounded integers
    torch.testing.assert_close(custom.timesteps.float(), scheduler.timesteps.float(), atol=0.5, rtol=0)
    torch.testing.assert_close(out, default, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_flow_custom_sigmas_timesteps_and_mu(cls):
    steps = 6
    reference = cls()
    default = full_loop(reference, num_inference_steps=steps)
    torch.testing.assert_close(full_loop(cls(), sigmas=reference.sigmas[:-1].tolist()), default, atol=1e-6, rtol=1e-6)
    sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
    scheduler = cls()
    scheduler.set_timesteps(sigmas=sigmas, timesteps=[1000 * s for s in sigmas])  # both, as FlowMatchEuler allows
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(sigmas) * 1000)
    scheduler.set_timesteps(steps, sigmas=sigmas)  # matching num_inference_steps is fine
    with pytest.raises(ValueError, match="agree in length"):
        scheduler.set_timesteps(sigmas=sigmas, timesteps=[900.0, 500.0])
    dynamic = cls(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        dynamic.set_timesteps(steps)
    dynamic.set_timesteps(sigmas=sigmas, mu=0.8)
    assert dynamic.sigmas[0] == 1.0 and dynamic.sigmas[1] > sigmas[1]  # exp-shift with mu > 0 raises sigmas


@pytest.mark.parametrize("cls", FLOW_CLASSES)
def test_flow_index_for_unknown_timestep_raises(cls):
    scheduler = cls()
    scheduler.set_timesteps(4)
    assert scheduler.index_for_timestep(scheduler.timesteps[2]) == 2
    with pytest.raises(ValueError, match=r"`timestep` 123.0 is not in the schedule"):
        scheduler.index_for_timestep(123.0)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(1), 123.0, torch.zeros(1))


@pytest.mark.parametrize("cls", VP_CLASSES)
def test_zero_length_final_step_is_a_no_op(cls):
    """Karras + sigma_min, or custom timesteps ending at 0 with sigma_min, end with sigma_N = sigma_{N+1}."""
    for kwargs, schedule in (
        ({"use_karras_sigmas": True}, {"num_inference_steps": 8}),
        ({}, {"timesteps": [900, 500, 100, 0]}),
    ):
        scheduler = cls(**SD15, final_sigmas_type="sigma_min", momentum_beta=0.8, **kwargs)
        scheduler.set_timesteps(**schedule)
        assert scheduler.sigmas[-1] == scheduler.sigmas[-2]
        sample = sample_batch()
        for t in scheduler.timesteps[:-1]:
            sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
        last = scheduler.timesteps[-1]
        out = scheduler.step(toy_model(sample, last), last, sample).prev_sample
        torch.testing.assert_close(out, sample, atol=0, rtol=0)


@pytest.mark.parametrize("cls", VP_CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timesteps": [900, 500, 500]}, "strictly decreasing"),
        ({"timesteps": [900, 450.5, 10]}, "must be integers"),
        ({"timesteps": [1000, 500]}, r"\[0, num_train_timesteps=1000\)"),
        ({"timesteps": [900, float("nan")]}, "finite"),
        ({"timesteps": []}, "non-empty"),
        ({"sigmas": [5.0, 1.0, -0.1]}, "positive"),
        ({"sigmas": [5.0, float("inf")]}, "finite"),
        ({"num_inference_steps": 0}, r"`num_inference_steps` must be an integer in \[1, 1000\]"),
        ({"num_inference_steps": 2.5}, "`num_inference_steps` must be an integer"),
        ({"num_inference_steps": True}, "`num_inference_steps` must be an integer"),
        ({"num_inference_steps": 5, "timesteps": [900, 100]}, "exactly one"),
    ],
)
def test_vp_bad_schedules_are_rejected_in_set_timesteps(cls, kwargs, message):
    scheduler = cls()
    with pytest.raises(ValueError, match=message):
        scheduler.set_timesteps(**kwargs)
    scheduler.set_timesteps(num_inference_steps=np.int64(5))  # numpy integers are fine
    assert len(scheduler.timesteps) == 5


@pytest.mark.parametrize("cls", FLOW_CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigmas": [1.0, 0.5, 0.5]}, "strictly decreasing"),
        ({"sigmas": [1.5, 0.5]}, r"\(0, 1\]"),
        ({"sigmas": [1.0, 0.0]}, r"\(0, 1\]"),
        ({"timesteps": [1000.0, float("nan")]}, "finite"),
        ({"num_inference_steps": 1.0}, "`num_inference_steps` must be an integer"),
        ({}, "Pass one of"),
    ],
)
def test_flow_bad_schedules_are_rejected_in_set_timesteps(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls().set_timesteps(**kwargs)


# ------------------------------------------------------------------------------------------- numeric arguments
@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_numeric_arguments_are_checked_as_numbers(cls, tmp_path):
    key = order_key(cls)
    scheduler = cls(momentum_beta=np.float32(0.8), **{key: np.int64(2)})
    assert type(scheduler.config.momentum_beta) is float and math.isclose(
        scheduler.config.momentum_beta, 0.8, rel_tol=1e-6
    )
    assert type(scheduler.config[key]) is int and scheduler.config[key] == 2
    scheduler.save_config(tmp_path)  # JSON-serialisable after the conversion
    for bad in (True, "0.8", None, float("nan")):
        with pytest.raises(ValueError, match=r"`momentum_beta` must be a real number in \(0, 1\]"):
            cls(momentum_beta=bad)
    for bad in (2.0, True, np.float64(2), "2"):
        with pytest.raises(ValueError, match=rf"`{key}` must be an integer in \[1, {max_order(cls)}\]"):
            cls(**{key: bad})


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_full_loops_are_finite_for_every_order(cls):
    for order in range(1, max_order(cls) + 1):
        out = full_loop(cls(**{order_key(cls): order}, momentum_beta=0.8), num_inference_steps=10)
        assert torch.isfinite(out).all()
