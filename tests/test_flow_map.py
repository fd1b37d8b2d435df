"""Flow maps: exact VP -> RF teacher velocity, the UNet student (init = teacher = DDIM, JVP, save/load), losses."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from diffusers_distill import TwoTimedFlowMapScheduler, testing
from diffusers_distill.flow_map import (
    FlowMapUNet,
    build_flow_map_student,
    flow_match_teacher_velocity,
    forward_ad_attention,
    merge_flow_map_student,
    rf_sigma_to_vp_timestep,
    sd_teacher_velocity,
    vp_input_scale,
    vp_log_kappa,
    vp_timestep_to_rf_sigma,
)
from diffusers_distill.gaussian_mixture import GaussianMixture, GuidedGaussianMixture
from diffusers_distill.losses import (
    GAUSS_LEGENDRE_NODES,
    itvm_loss,
    lagrangian_flow_map_loss,
    mean_flow_loss,
    progressive_flow_map_loss,
)

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ALPHAS_CUMPROD = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod.double()


# ------------------------------------------------------------------------------------------------ teacher velocity
class ExactVPTeacher:
    """A 'UNet' that is the exact epsilon (or v) predictor of a GMM under SD 1.5's abar table. Its time input is a
    VP timestep; between integer timesteps it interpolates log(sigma/alpha) linearly (the conversion's own rule).
    ``encoder_hidden_states`` carries each sample's class label; -1 means unconditional."""

    dtype = torch.float64

    def __init__(self, mixture, prediction_type="epsilon"):
        self.mixture, self.prediction_type = mixture, prediction_type
        self.timesteps_seen = []

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False):
        self.timesteps_seen.append(timestep.clone())
        kappa = torch.exp(
            torch.from_numpy(np.interp(timestep.numpy(), range(1000), vp_log_kappa(ALPHAS_CUMPROD).numpy()))
        )
        alpha, sigma = torch.rsqrt(1 + kappa**2), kappa * torch.rsqrt(1 + kappa**2)
        outputs = []
        for i, label in enumerate(encoder_hidden_states.tolist()):
            labels = None if label < 0 else torch.tensor([label])
            eps, x0 = self.mixture.posterior(sample[i : i + 1], alpha[i], sigma[i], labels)
            outputs.append(eps if self.prediction_type == "epsilon" else alpha[i] * eps - sigma[i] * x0)
        return (torch.cat(outputs),)


def _mixture():
    means = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.0, -2.0, -1.0], [1.0, 1.0, 1.0]])
    return GaussianMixture(
        means,
        torch.tensor([0.3, 0.5, 0.2, 0.4]),
        torch.tensor([1.0, 2.0, 1.5, 0.5]),
        component_classes=torch.tensor([0, 0, 1, 1]),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_vp_conversion_reproduces_the_analytic_rf_velocity(prediction_type, guidance_scale):
    """Eq. VP2RF: an exact SD-schedule epsilon/v teacher, converted, is the exact RF velocity E[eps - x0 | z] of
    the (CFG-guided) mixture, to 1e-10 in float64, including at SD's integer timesteps and its range ends."""
    mixture = _mixture()
    generator = torch.Generator().manual_seed(0)
    endpoints = vp_timestep_to_rf_sigma(torch.tensor([999.0, 500.0, 100.0, 10.0, 0.0]), ALPHAS_CUMPROD)
    sigma = torch.cat([endpoints, 0.03 + 0.9 * torch.rand(7, generator=generator, dtype=torch.float64)])
    z = 2 * torch.randn(len(sigma), 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (len(sigma),), generator=generator)
    teacher = ExactVPTeacher(mixture, prediction_type)
    velocity = sd_teacher_velocity(
        teacher,
        z,
        sigma,
        ALPHAS_CUMPROD,
        {"encoder_hidden_states": labels},
        {"encoder_hidden_states": torch.full_like(labels, -1)},
        guidance_scale,
        prediction_type,
    )
    expected = GuidedGaussianMixture(mixture, labels, guidance_scale).flow_velocity(z, sigma)
    torch.testing.assert_close(velocity, expected, rtol=0, atol=1e-10)
    first_times = teacher.timesteps_seen[0][: len(endpoints)]  # integer VP timesteps are recovered exactly
    torch.testing.assert_close(
        first_times, torch.tensor([999.0, 500.0, 100.0, 10.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-9
    )


def test_flow_match_teacher_velocity_with_cfg():
    mixture = _mixture()
    guided = GuidedGaussianMixture(mixture)

    def transformer(hidden_states, timestep, encoder_hidden_states, return_dict=False):
        sigma = timestep / 1000
        rows = [
            GuidedGaussianMixture(mixture, None if c < 0 else torch.tensor([c])).flow_velocity(
                hidden_states[i : i + 1], sigma[i]
            )
            for i, c in enumerate(encoder_hidden_states.tolist())
        ]
        return (torch.cat(rows),)

    transformer.dtype = torch.float64
    z = torch.randn(6, 3, dtype=torch.float64)
    sigma = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    velocity = flow_match_teacher_velocity(
        transformer,
        z,
        sigma,
        {"encoder_hidden_states": labels},
        {"encoder_hidden_states": -torch.ones_like(labels)},
        3.0,
    )
    torch.testing.assert_close(
        velocity, GuidedGaussianMixture(mixture, labels, 3.0).flow_velocity(z, sigma), rtol=0, atol=1e-12
    )
    assert not torch.allclose(velocity, guided.flow_velocity(z, sigma))


def test_time_maps_are_inverse_and_clamped():
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.5, 999.0], dtype=torch.float64)
    torch.testing.assert_close(
        rf_sigma_to_vp_timestep(vp_timestep_to_rf_sigma(t, ALPHAS_CUMPROD), ALPHAS_CUMPROD), t, rtol=0, atol=1e-9
    )
    clamped = rf_sigma_to_vp_timestep(torch.tensor([1e-4, 0.999], dtype=torch.float64), ALPHAS_CUMPROD)
    assert clamped.tolist() == [0.0, 999.0]


# ------------------------------------------------------------------------------------------------ student
def _conditioning(sdxl: bool, batch: int, generator):
    embeds = torch.randn(batch, 77, 64 if sdxl else 32, generator=generator)
    added = None
    if sdxl:
        added = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return embeds, added


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("student_type", ["lora", "full"])
def test_untrained_student_equals_teacher_and_samples_like_ddim(sdxl, student_type):
    """Zero-initialised second-time pathway: the student's output is the teacher's for every jump, and the
    scheduler at gamma 0 on DDIM's grid reproduces diffusers' DDIMScheduler (docs/flow_maps.md Eq. DDIM)."""
    torch.manual_seed(0)
    teacher = testing.tiny_unet(sdxl=sdxl).eval()
    student = build_flow_map_student(teacher, student_type, jump_embedding_dim=8, lora_rank=4).eval()
    assert student.config.time_cond_proj_dim == 8 and teacher.config.time_cond_proj_dim is None
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert "time_embedding.cond_proj.weight" in trainable
    if student_type == "lora":
        assert all("lora_" in n or n.startswith("time_embedding.cond_proj") for n in trainable)
    model = FlowMapUNet(student, ALPHAS_CUMPROD)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 16, 16, generator=generator)
    embeds, added = _conditioning(sdxl, 2, generator)
    with torch.no_grad():
        s, t = torch.tensor([0.8, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.5], dtype=torch.float64)
        x_vp = noise * vp_input_scale(s).float().reshape(-1, 1, 1, 1)  # (alpha + sigma) z at t*(s)
        expected = teacher(x_vp, rf_sigma_to_vp_timestep(s, ALPHAS_CUMPROD), embeds, added_cond_kwargs=added).sample
        torch.testing.assert_close(model.model_output(noise, s, t, embeds, added), expected)

        ddim = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        ddim.set_timesteps(4)
        x = noise
        for step_t in ddim.timesteps:
            x = ddim.step(teacher(x, step_t, embeds, added_cond_kwargs=added).sample, step_t, x).prev_sample
        scheduler = TwoTimedFlowMapScheduler.from_config(ddim.config)
        scheduler.set_timesteps(sigmas=vp_timestep_to_rf_sigma(ddim.timesteps.double(), ALPHAS_CUMPROD).tolist())
        z = noise * scheduler.init_noise_sigma
        for step_t in scheduler.timesteps:
            s_i, t_i = scheduler.jump_for_timestep(step_t)
            z = scheduler.step(model.model_output(z, s_i, t_i, embeds, added), step_t, z).prev_sample
    torch.testing.assert_close(z, x, rtol=1e-5, atol=1e-4)


def _perturbed_student(dtype=torch.float32, student_type="lora"):
    """A tiny SD 1.5 student whose new pathway and LoRA weights are nonzero (as after training)."""
    torch.manual_seed(0)
    teacher = testing.tiny_unet().to(dtype)
    student = build_flow_map_student(teacher, student_type, jump_embedding_dim=8, lora_rank=4)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name or "cond_proj" in name:
                param.normal_(0, 0.3)
    return student.eval()


def test_jvp_in_the_terminal_time_matches_finite_differences():
    """d/dt u(z, s, t) by torch.func.jvp (through the classic attention processor) = central differences."""
    student = _perturbed_student(torch.float64)
    model = FlowMapUNet(student, ALPHAS_CUMPROD)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=generator, dtype=torch.float64)
    embeds = torch.randn(2, 77, 32, generator=generator, dtype=torch.float64)
    s, t = torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.3, 0.2], dtype=torch.float64)
    processors = {k: type(v) for k, v in student.attn_processors.items()}
    with torch.no_grad(), forward_ad_attention(student):
        _, du_dt = torch.func.jvp(lambda time: model(z, s, time, embeds), (t,), (torch.ones_like(t),))
        h = 1e-5
        finite = (model(z, s, t + h, embeds) - model(z, s, t - h, embeds)) / (2 * h)
    assert {k: type(v) for k, v in student.attn_processors.items()} == processors  # restored
    assert du_dt.abs().max() > 1e-3
    torch.testing.assert_close(du_dt, finite, rtol=1e-6, atol=1e-6 * finite.abs().max().item())


def test_lfmd_backpropagates_through_the_unet_jvp():
    student = _perturbed_student()
    model = FlowMapUNet(student, ALPHAS_CUMPROD)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=generator)
    embeds = torch.randn(2, 77, 32, generator=generator)
    s, t = torch.tensor([0.9, 0.6]), torch.tensor([0.3, 0.6])
    with forward_ad_attention(student):
        loss = lagrangian_flow_map_loss(lambda x, a, b: model(x, a, b, embeds), lambda x, time: -x, z, s, t)
        loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["time_embedding.cond_proj.weight"].abs().sum() > 0
    assert sum(g.abs().sum() for n, g in grads.items() if "lora_" in n) > 0


def test_zero_length_jump_is_the_identity():
    student = _perturbed_student()
    model = FlowMapUNet(student, ALPHAS_CUMPROD)
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        jumped = model.jump(z, torch.tensor([0.7, 0.3]), torch.tensor([0.7, 0.3]), torch.randn(2, 77, 32))
    torch.testing.assert_close(jumped, z, rtol=0, atol=0)


def test_saved_student_loads_with_plain_diffusers_in_a_fresh_process(tmp_path):
    student = _perturbed_student()
    merged = merge_flow_map_student(student)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "unet")
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(1, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 77, 32, generator=generator),
        "timestep_cond": torch.randn(1, 8, generator=generator),
    }
    from safetensors.torch import save_file

    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(f"""
        import torch
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file, save_file
        unet = UNet2DConditionModel.from_pretrained({str(tmp_path / "unet")!r})
        assert unet.config.time_cond_proj_dim == 8
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        with torch.no_grad():
            save_file({{"out": unet(**inputs).sample}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    from safetensors.torch import load_file

    with torch.no_grad():
        expected = student(**inputs).sample  # the LoRA student before merging
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], expected, rtol=1e-4, atol=1e-5)
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path / "unet"), UNet2DConditionModel)


def test_student_argument_errors():
    teacher = testing.tiny_unet()
    with pytest.raises(ValueError, match="student_type"):
        build_flow_map_student(teacher, "dora")
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        build_flow_map_student(teacher, jump_embedding_dim=7)
    student = build_flow_map_student(teacher, "full", jump_embedding_dim=8)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        build_flow_map_student(student)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        FlowMapUNet(teacher, ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="prediction_type"):
        FlowMapUNet(student, ALPHAS_CUMPROD, "sample")


# ------------------------------------------------------------------------------------------------ losses
DATA_STD = 0.5


def _std(sigma):
    return torch.sqrt((1 - sigma) ** 2 * DATA_STD**2 + sigma**2)


def _gaussian_velocity(x, sigma):
    """Exact v_sigma for N(0, DATA_STD^2) data: x d/dsigma log std(sigma)."""
    sigma = sigma.reshape(-1, 1)
    return x * (sigma - (1 - sigma) * DATA_STD**2) / _std(sigma) ** 2


def _exact_average_velocity(x, s, t, error=0.0):
    """Exact u(x, s, t) = x (std(t)/std(s) - 1) / (t - s) (the velocity itself when t = s), plus ``error`` t^2."""
    s, t = s.reshape(-1, 1), t.reshape(-1, 1)
    gap = t - s
    safe = torch.where(gap == 0, torch.ones_like(gap), gap)
    u = torch.where(gap == 0, _gaussian_velocity(x, s.reshape(-1)), x * (_std(t) / _std(s) - 1) / safe)
    return u + error * t**2


def test_flow_map_losses_vanish_at_the_exact_map_only():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=generator, dtype=torch.float64)
    pair = torch.rand(256, 2, generator=generator, dtype=torch.float64)
    s, t = pair.max(1).values, pair.min(1).values
    t[:64] = s[:64]  # diagonal pairs

    def exact(a, b, c):
        return _exact_average_velocity(a, b, c)

    def wrong(a, b, c):
        return _exact_average_velocity(a, b, c, error=0.3)

    losses = {
        "lfmd": lambda u: lagrangian_flow_map_loss(u, _gaussian_velocity, x, s, t),
        "itvm": lambda u: itvm_loss(u, u, _gaussian_velocity, x, s, t),
        "meanflow": lambda u: mean_flow_loss(u, _gaussian_velocity, x, s, t),
        "progressive": lambda u: progressive_flow_map_loss(u, u, _gaussian_velocity, x, s, t),
    }
    tolerance = {"lfmd": 1e-20, "itvm": 1e-6, "meanflow": 1e-20, "progressive": 1e-20}  # itvm: 3-point quadrature
    for name, loss in losses.items():
        assert loss(exact).item() < tolerance[name], name
        assert loss(wrong).item() > 1e-4, name


def test_lfmd_matches_a_finite_difference_residual_and_trains_through_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()

    def u(x, s, t):
        return net(torch.cat([x, s[:, None], t[:, None]], 1))

    x = torch.randn(16, 2, dtype=torch.float64)
    s, t = torch.full((16,), 0.9, dtype=torch.float64), torch.linspace(0.0, 0.9, 16, dtype=torch.float64)
    h = 1e-6

    def phi(time):
        return x + (time - s)[:, None] * u(x, s, time)

    d_phi = (phi(t + h) - phi(t - h)) / (2 * h)
    expected = ((d_phi - _gaussian_velocity(phi(t), t)) ** 2).mean()
    loss = lagrangian_flow_map_loss(u, _gaussian_velocity, x, s, t)
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_itvm_quadrature_and_argument_checks():
    assert all(abs(sum(w) - 1) < 1e-12 for _, w in GAUSS_LEGENDRE_NODES.values())
    x, s, t = torch.zeros(2, 2), torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError, match="num_nodes"):
        itvm_loss(_exact_average_velocity, _exact_average_velocity, _gaussian_velocity, x, s, t, num_nodes=4)
    with pytest.raises(ValueError, match="initial_weight"):
        itvm_loss(_exact_average_velocity, _exact_average_velocity, _gaussian_velocity, x, s, t, initial_weight=-1)


@pytest.mark.parametrize("sdxl", [False, True])
def test_one_training_step_of_every_loss_on_a_tiny_sd_student(sdxl):
    """Each loss runs end to end on a LoRA student against the CFG teacher velocity (Eq. VP2RF) and moves only the
    trainable weights (adapter + new pathway). The JVP losses run inside forward_ad_attention."""
    import copy

    torch.manual_seed(0)
    teacher = testing.tiny_unet(sdxl=sdxl).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    embeds, added = _conditioning(sdxl, 2, generator)
    cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": added}
    uncond = {"encoder_hidden_states": torch.zeros_like(embeds), "added_cond_kwargs": added}

    def teacher_velocity(z, sigma):
        return sd_teacher_velocity(teacher, z, sigma, ALPHAS_CUMPROD, cond, uncond, guidance_scale=4.0)

    for name in ("itvm", "lfmd", "meanflow", "progressive"):
        student = build_flow_map_student(teacher, "lora", jump_embedding_dim=8, lora_rank=4)
        model = FlowMapUNet(student, ALPHAS_CUMPROD)
        ema = copy.deepcopy(model).requires_grad_(False)

        def u(z, s, t, network=model):
            return network(z, s, t, embeds, added)

        def u_ema(z, s, t, network=ema):
            return network(z, s, t, embeds, added)

        x_s = torch.randn(2, 4, 16, 16, generator=generator)
        s, t = torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.5])
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        with forward_ad_attention(student):
            if name == "itvm":
                loss = itvm_loss(u, u_ema, teacher_velocity, x_s, s, t)
            elif name == "lfmd":
                loss = lagrangian_flow_map_loss(u, teacher_velocity, x_s, s, t)
            elif name == "meanflow":
                loss = mean_flow_loss(u, teacher_velocity, x_s, s, t)
            else:
                loss = progressive_flow_map_loss(u, u_ema, teacher_velocity, x_s, s, t)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and loss > 0, name
        changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
        assert "time_embedding.cond_proj.weight" in changed, name
        assert changed and all("lora_" in n or "cond_proj" in n for n in changed), name


def test_itvm_initial_weight_adds_the_initial_velocity_term():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=generator, dtype=torch.float64)
    s, t = torch.full((64,), 0.8, dtype=torch.float64), torch.full((64,), 0.3, dtype=torch.float64)

    def wrong(a, b, c):  # the exact map plus an error 0.3 t^2
        return _exact_average_velocity(a, b, c, error=0.3)

    plain = itvm_loss(wrong, _exact_average_velocity, _gaussian_velocity, x, s, t)
    extra = itvm_loss(wrong, _exact_average_velocity, _gaussian_velocity, x, s, t, initial_weight=2.0)
    initial = ((wrong(x, s, s) - _gaussian_velocity(x, s)) ** 2).mean()
    torch.testing.assert_close(extra, plain + 2.0 * initial)
