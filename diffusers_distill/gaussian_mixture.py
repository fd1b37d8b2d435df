"""Exact Gaussian-mixture denoiser: a CPU benchmark for diffusion samplers against a converged PF-ODE reference.

For data p0 = sum_k pi_k N(mu_k, diag(s_k^2)) and VP noising x_t = alpha_t x0 + sigma_t eps, every quantity a
diffusion model learns is available in closed form (docs/momentum_samplers.md, "The Gaussian-mixture benchmark"):

* marginal      p_t(x) = sum_k pi_k N(x; alpha mu_k, C_k),  C_k = alpha^2 diag(s_k^2) + sigma^2 I
* noise         eps_hat = E[eps | x_t] = -sigma grad log p_t = sigma sum_k r_k C_k^-1 (x - alpha mu_k)
* data (Tweedie) x0_hat = E[x0 | x_t] = sum_k r_k [mu_k + alpha diag(s_k^2) C_k^-1 (x - alpha mu_k)]
* v-prediction  v_hat = alpha eps_hat - sigma x0_hat;  flow matching (alpha = 1 - sigma): u = eps_hat - x0_hat

with responsibilities r_k = softmax_k(log pi_k + log N(x; alpha mu_k, C_k)). Classifier-free guidance uses exact
class-conditionals (the components of one class, renormalised) and the diffusers convention
eps_w = eps_u + w (eps_c - eps_u).

:class:`GaussianMixtureDenoiser` wraps this as a UNet-like ``(sample, timestep) -> model_output`` callable, so any
diffusers scheduler can be driven exactly like a pipeline loop (:func:`sample_with_scheduler`), and
:func:`solve_reference` integrates the probability-flow ODE dxbar/dsigmabar = eps_w (xbar = x / alpha,
sigmabar = sigma / alpha; paper Eq. 2 of arXiv 2307.11118) with scipy's DOP853 to tolerance 1e-10.
:func:`compare_samplers` puts both together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .fileio import atomic_path

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


# ------------------------------------------------------------------------------------------------------------------
# The mixture and its exact posterior moments
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class GaussianMixture:
    """A class-conditional Gaussian mixture with diagonal covariances (float64).

    Args:
        means: ``(K, d)`` component means mu_k.
        stds: ``(K,)`` isotropic or ``(K, d)`` diagonal standard deviations s_k.
        weights: ``(K,)`` mixture weights pi_k (normalised on construction); uniform when ``None``.
        component_classes: ``(K,)`` integer class of each component; each component is its own class when ``None``.
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor | None = None
    component_classes: torch.Tensor | None = None

    def __post_init__(self):
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"`means` must have shape (K, d), got {tuple(self.means.shape)}")
        num_components, dim = self.means.shape
        stds = torch.as_tensor(self.stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(num_components)
        if stds.ndim == 1:
            stds = stds[:, None].expand(num_components, dim)
        if stds.shape != (num_components, dim) or not bool((stds > 0).all()):
            raise ValueError(f"`stds` must be positive with shape (K,) or (K, d) = {(num_components, dim)}")
        self.stds = stds.contiguous()
        weights = torch.ones(num_components) if self.weights is None else self.weights
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (num_components,) or not bool((weights > 0).all()):
            raise ValueError(f"`weights` must be positive with shape (K,) = ({num_components},)")
        self.weights = weights / weights.sum()
        classes = torch.arange(num_components) if self.component_classes is None else self.component_classes
        self.component_classes = torch.as_tensor(classes, dtype=torch.long)
        if self.component_classes.shape != (num_components,):
            raise ValueError(f"`component_classes` must have shape (K,) = ({num_components},)")

    @classmethod
    def ring(cls, num_components: int = 8, dim: int = 2, std: float = 0.05, radius: float = 1.0) -> GaussianMixture:
        """Components equally spaced on a circle of ``radius`` in the first two coordinates (the doc's pilot)."""
        if dim < 2:
            raise ValueError(f"`dim` must be >= 2 for a ring, got {dim}")
        angles = 2 * math.pi * torch.arange(num_components, dtype=torch.float64) / num_components
        means = torch.zeros(num_components, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(angles), radius * torch.sin(angles)
        return cls(means, torch.full((num_components,), std, dtype=torch.float64))

    @classmethod
    def sphere(
        cls,
        num_components: int = 16,
        dim: int = 16,
        std: float | Sequence[float] = 0.05,
        radius: float = 1.0,
        seed: int = 0,
    ) -> GaussianMixture:
        """Random means on the sphere of ``radius``; ``std`` may be a range (lo, hi) giving log-uniform diagonal stds
        (anisotropic components give a spread of stiffness)."""
        generator = torch.Generator().manual_seed(seed)
        means = torch.randn(num_components, dim, generator=generator, dtype=torch.float64)
        means = radius * means / means.norm(dim=1, keepdim=True)
        if isinstance(std, (int, float)):
            stds = torch.full((num_components,), float(std), dtype=torch.float64)
        else:
            low, high = (math.log(float(v)) for v in std)
            stds = torch.exp(
                low + (high - low) * torch.rand(num_components, dim, generator=generator, dtype=torch.float64)
            )
        return cls(means, stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def data_radius(self) -> float:
        """Largest distance of a component mean from the origin."""
        return float(self.means.norm(dim=1).max())

    @property
    def max_std(self) -> float:
        return float(self.stds.max())

    def _log_weights(self, labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """``(B, K)`` log mixture weights; with ``labels`` each row is restricted to that class and renormalised."""
        log_weights = self.weights.log().expand(batch_size, -1)
        if labels is None:
            return log_weights
        in_class = self.component_classes[None, :] == torch.as_tensor(labels).reshape(-1, 1)
        if not bool(in_class.any(dim=1).all()):
            raise ValueError(f"`labels` must be among the component classes {self.component_classes.unique().tolist()}")
        masked = log_weights.masked_fill(~in_class, -math.inf)
        return masked - torch.logsumexp(masked, dim=1, keepdim=True)

    def _component_log_densities(self, x, alpha, sigma):
        """log N(x; alpha mu_k, C_k) for every sample and component, plus the residuals and variances."""
        variances = alpha[:, None, None] ** 2 * self.stds**2 + sigma[:, None, None] ** 2  # (B, K, d)
        residuals = x[:, None, :] - alpha[:, None, None] * self.means  # (B, K, d)
        log_density = -0.5 * (torch.log(2 * math.pi * variances) + residuals**2 / variances).sum(-1)
        return log_density, residuals, variances

    def log_prob(self, x, alpha, sigma, labels=None) -> torch.Tensor:
        """log p_t(x) of the noised marginal (class-conditional with ``labels``); ``x`` is ``(B, d)``."""
        x, alpha, sigma = _as_batch(x, alpha, sigma)
        log_density, _, _ = self._component_log_densities(x, alpha, sigma)
        return torch.logsumexp(self._log_weights(labels, x.shape[0]) + log_density, dim=1)

    def posterior(self, x, alpha, sigma, labels=None):
        """Exact ``(eps_hat, x0_hat)`` = (E[eps|x_t=x], E[x0|x_t=x]) under VP-type noising (doc section 7.1).

        ``alpha`` and ``sigma`` are scalars or ``(B,)``; alpha = 0 (pure noise, flow sigma = 1) is allowed.
        """
        x, alpha, sigma = _as_batch(x, alpha, sigma)
        log_density, residuals, variances = self._component_log_densities(x, alpha, sigma)
        responsibilities = torch.softmax(self._log_weights(labels, x.shape[0]) + log_density, dim=1)[..., None]
        whitened = residuals / variances  # C_k^-1 (x - alpha mu_k)
        eps_hat = sigma[:, None] * (responsibilities * whitened).sum(1)
        x0_hat = (responsibilities * (self.means + alpha[:, None, None] * self.stds**2 * whitened)).sum(1)
        return eps_hat, x0_hat


def _as_batch(x, alpha, sigma):
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"`x` must have shape (B, d), got {tuple(x.shape)}")
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    return x, alpha, sigma


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """diffusers' CFG combination ``uncond + w (cond - uncond)`` (w = 1: conditional only) [arXiv 2307.11118 Eq. 5]."""
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class GuidedGaussianMixture:
    """Exact classifier-free-guided predictions for a batch of class labels.

    Args:
        mixture: data distribution; the conditional of sample i uses the components of class ``labels[i]``.
        labels: ``(B,)`` class per sample, or ``None`` for the unconditional model only (guidance then ignored).
        guidance_scale: CFG scale w (diffusers convention).
        unconditional: the unconditional model; ``mixture`` itself (all classes) when ``None``.
    """

    mixture: GaussianMixture
    labels: torch.Tensor | None = None
    guidance_scale: float = 1.0
    unconditional: GaussianMixture | None = None

    def posterior(self, x, alpha, sigma):
        """Guided ``(eps_hat, x0_hat)``; both are combined with the same weights, so Tweedie stays consistent."""
        if self.labels is None:
            return self.mixture.posterior(x, alpha, sigma)
        cond = self.mixture.posterior(x, alpha, sigma, self.labels)
        if self.guidance_scale == 1.0:
            return cond
        uncond = (self.unconditional or self.mixture).posterior(x, alpha, sigma)
        return tuple(classifier_free_guidance(u, c, self.guidance_scale) for u, c in zip(uncond, cond))

    def eps(self, x, alpha, sigma) -> torch.Tensor:
        return self.posterior(x, alpha, sigma)[0]

    def x0(self, x, alpha, sigma) -> torch.Tensor:
        return self.posterior(x, alpha, sigma)[1]

    def v_prediction(self, x, alpha, sigma) -> torch.Tensor:
        """v = alpha eps_hat - sigma x0_hat (Salimans & Ho)."""
        x, alpha, sigma = _as_batch(x, alpha, sigma)
        eps_hat, x0_hat = self.posterior(x, alpha, sigma)
        return alpha[:, None] * eps_hat - sigma[:, None] * x0_hat

    def flow_velocity(self, x, sigma) -> torch.Tensor:
        """Rectified-flow velocity u = dx/dsigma = eps_hat - x0_hat at x = (1 - sigma) x0 + sigma eps."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        eps_hat, x0_hat = self.posterior(x, 1 - sigma, sigma)
        return eps_hat - x0_hat


# ------------------------------------------------------------------------------------------------------------------
# A UNet-like callable and the pipeline-style sampling loop
# ------------------------------------------------------------------------------------------------------------------


def sigma_bar_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """diffusers' VP ``sigmas`` sqrt((1 - abar) / abar) on the integer training-timestep grid (float64)."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu().numpy()
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


class GaussianMixtureDenoiser:
    """``(sample, timestep) -> model_output`` standing in for a UNet/transformer with exact predictions.

    Args:
        guided: the (guided) exact model.
        alphas_cumprod: the scheduler's training ``alphas_cumprod`` (VP); fractional timesteps (Euler-type
            schedulers) are mapped to sigmabar by linear interpolation in t, as ``EulerDiscreteScheduler`` does.
            Unused for ``"flow_prediction"``, where sigma = timestep / 1000 and alpha = 1 - sigma (SD3 convention).
        prediction_type: one of ``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow_prediction"``.

    Each call counts as one NFE in :attr:`num_evaluations` (a CFG pair is one network batch in a pipeline).
    """

    def __init__(self, guided: GuidedGaussianMixture, alphas_cumprod=None, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type != "flow_prediction" and alphas_cumprod is None:
            raise ValueError("`alphas_cumprod` is required unless `prediction_type` is 'flow_prediction'")
        self.guided = guided
        self.prediction_type = prediction_type
        self.sigma_bars = None if alphas_cumprod is None else sigma_bar_from_alphas_cumprod(alphas_cumprod)
        self.num_evaluations = 0

    def alpha_sigma(self, timestep) -> tuple:
        """(alpha_t, sigma_t) of a (possibly fractional) timestep."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        if self.prediction_type == "flow_prediction":
            sigma = t / 1000.0
            return 1.0 - sigma, sigma
        sigma_bar = float(np.interp(t, np.arange(len(self.sigma_bars)), self.sigma_bars))
        alpha = 1.0 / math.sqrt(1.0 + sigma_bar**2)
        return alpha, sigma_bar * alpha

    def __call__(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        self.num_evaluations += 1
        alpha, sigma = self.alpha_sigma(timestep)
        eps_hat, x0_hat = self.guided.posterior(sample.reshape(sample.shape[0], -1), alpha, sigma)
        if self.prediction_type == "epsilon":
            output = eps_hat
        elif self.prediction_type == "sample":
            output = x0_hat
        elif self.prediction_type == "v_prediction":
            output = alpha * eps_hat - sigma * x0_hat
        else:
            output = eps_hat - x0_hat
        return output.to(sample.dtype).reshape(sample.shape)


def sample_with_scheduler(scheduler, model: Callable, noise: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """The denoising loop of a diffusers pipeline: set_timesteps, init_noise_sigma, scale_model_input, step."""
    scheduler.set_timesteps(num_inference_steps)
    sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have none
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
        sample = scheduler.step(model(model_input, t), t, sample).prev_sample
    return sample


def scheduler_endpoints(scheduler, alphas_cumprod) -> tuple:
    """``(sigmabar_start, sigmabar_end, state_is_xbar)`` of a VP scheduler after ``set_timesteps``.

    The start is the first timestep; the end is ``sigmas[-1]`` for sigma-based schedulers (Euler, DPM-Solver, UniPC,
    DEIS, ...) or ``final_alpha_cumprod`` for DDIM/PNDM. Euler-type schedulers (``init_noise_sigma != 1``) keep their
    state in xbar = x / alpha coordinates; the others keep x_t.
    """
    sigma_bars = sigma_bar_from_alphas_cumprod(alphas_cumprod)
    start = float(np.interp(float(scheduler.timesteps[0]), np.arange(len(sigma_bars)), sigma_bars))
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
        end = float(sigmas[-1])
    elif hasattr(scheduler, "final_alpha_cumprod"):
        final = float(scheduler.final_alpha_cumprod)
        end = math.sqrt((1 - final) / final)
    else:
        raise ValueError(
            f"cannot tell where {type(scheduler).__name__} ends: it has neither `sigmas` nor `final_alpha_cumprod`"
        )
    return start, end, float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0


# ------------------------------------------------------------------------------------------------------------------
# Converged reference
# ------------------------------------------------------------------------------------------------------------------


def solve_reference(
    guided: GuidedGaussianMixture,
    start: torch.Tensor,
    t_start: float,
    t_end: float,
    parametrization: str = "vp",
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Integrate the probability-flow ODE with scipy DOP853, vectorised over the batch.

    ``parametrization="vp"``: dxbar/dsigmabar = eps_w(xbar; alpha = 1, sigma = sigmabar) from ``start`` = xbar at
    sigmabar = ``t_start`` to ``t_end`` (paper Eq. 2). ``"flow"``: dx/dsigma = eps_w - x0_w at x = (1-sigma) x0 +
    sigma eps, sigma from ``t_start`` to ``t_end``.
    """
    from scipy.integrate import solve_ivp

    if parametrization not in ("vp", "flow"):
        raise ValueError(f"`parametrization` must be 'vp' or 'flow', got {parametrization!r}")
    start = torch.as_tensor(start, dtype=torch.float64)
    shape = start.shape
    if t_start == t_end:
        return start.clone()

    def rhs(t, y):
        x = torch.from_numpy(y).reshape(shape)
        if parametrization == "vp":
            slope = guided.eps(x, 1.0, t)
        else:
            slope = guided.flow_velocity(x, t)
        return slope.reshape(-1).numpy()

    result = solve_ivp(rhs, (t_start, t_end), start.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
    if not result.success:
        raise RuntimeError(f"reference solver failed: {result.message}")
    return torch.from_numpy(result.y[:, -1]).reshape(shape)


# ------------------------------------------------------------------------------------------------------------------
# Comparison and plot
# ------------------------------------------------------------------------------------------------------------------


def default_base_config() -> dict:
    """Stable Diffusion 1.5's noise schedule (scaled_linear 0.00085-0.012, 1000 steps) with trailing spacing.

    Not "linspace": DDIM and PNDM step to ``timestep - num_train_timesteps // num_inference_steps`` rather than to
    the next listed timestep, so with linspace timesteps (999, 666, 333, 0 for 4 steps) their model is evaluated at
    timesteps that do not match the state (999 -> 749, then evaluated at 666). Trailing timesteps are spaced by that
    ratio (up to rounding), and start at t = 999 like every other scheduler's."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=0,
        set_alpha_to_one=False,
        clip_sample=False,
    )


def default_samplers(base_config: dict | None = None) -> dict[str, Callable[[], object]]:
    """A few diffusers baselines (DDIM, PLMS, DPM-Solver++(2M)), each a factory building a fresh scheduler."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    config = base_config or default_base_config()
    return {
        "DDIM": lambda: DDIMScheduler.from_config(config),
        "PLMS (PNDM)": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
        "DPM++2M": lambda: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        ),
    }


def demo_samplers(base_config: dict | None = None) -> dict[str, Callable[[], object]]:
    """diffusers' DDIM, PLMS, DPM-Solver++(2M), UniPC and DEIS next to this package's three VP momentum schedulers
    with their class defaults (``GHVBScheduler``, ``PLMSHeavyBallScheduler``, ``DPMSolverHeavyBallScheduler``) and
    the Heavy Ball setting the benchmark recommends at high guidance (docs/schedulers.md)."""
    from diffusers import DEISMultistepScheduler, UniPCMultistepScheduler

    from diffusers_distill.schedulers import DPMSolverHeavyBallScheduler, GHVBScheduler, PLMSHeavyBallScheduler

    config = base_config or default_base_config()
    samplers = dict(default_samplers(config))
    samplers["UniPC"] = lambda: UniPCMultistepScheduler.from_config(config)
    samplers["DEIS"] = lambda: DEISMultistepScheduler.from_config(config)
    samplers["GHVB (default)"] = lambda: GHVBScheduler.from_config(config)
    samplers["PLMS-HB (default)"] = lambda: PLMSHeavyBallScheduler.from_config(config)
    samplers["DPM++2M-HB (default)"] = lambda: DPMSolverHeavyBallScheduler.from_config(config)
    samplers["DPM++2M-HB 0.6"] = lambda: DPMSolverHeavyBallScheduler.from_config(config, momentum_beta=0.6)
    return samplers


def error_table_markdown(rows: Sequence[dict], metric: str = "median_error") -> str:
    """One markdown table per guidance scale: sampler x steps, the endpoint error (blow-up % in parentheses)."""
    steps = sorted({r["steps"] for r in rows})
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    table = {(r["sampler"], r["guidance"], r["steps"]): r for r in rows}
    lines = []
    for guidance in sorted({r["guidance"] for r in rows}):
        lines += [
            f"\n**guidance {guidance:g}** ({metric.replace('_', ' ')}; blow-up %)\n",
            "| sampler | " + " | ".join(str(n) for n in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for name in names:
            cells = []
            for n in steps:
                row = table[(name, guidance, n)]
                cell = f"{row[metric]:.3g}" if math.isfinite(row[metric]) else "inf"
                cells.append(cell + (f" ({100 * row['blowup_fraction']:.0f}%)" if row["blowup_fraction"] > 0 else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def blown_up(samples: torch.Tensor, mixture: GaussianMixture, reference: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` bool: non-finite, or farther from the origin than R + 5 max std (doc section 7.2).

    R is the data radius, or the largest reference endpoint norm when larger: strong CFG legitimately pushes exact
    endpoints past the data (about 1.3 at w = 15 on the unit ring), which must not count as divergence.
    """
    radius = mixture.data_radius
    if reference is not None:
        radius = max(radius, float(reference.norm(dim=1).max()))
    finite = torch.isfinite(samples).all(dim=1)
    return (~finite) | (samples.norm(dim=1) > radius + 5 * mixture.max_std)


def compare_samplers(
    samplers: Mapping[str, Callable[[], object]] | None = None,
    guidance_scales: Iterable[float] = (1.0, 7.5, 15.0),
    steps: Iterable[int] = (5, 10, 20),
    mixture: GaussianMixture | None = None,
    batch_size: int = 256,
    seed: int = 0,
    base_config: dict | None = None,
) -> list[dict]:
    """Endpoint error of each sampler against the converged PF-ODE solution from the same noise.

    Args:
        samplers: name -> zero-argument factory returning a fresh diffusers-API VP scheduler (epsilon prediction);
            :func:`default_samplers` when ``None``.
        guidance_scales: CFG scales w; steps: ``num_inference_steps`` values.
        mixture: data; the doc's pilot ring (d = 2, 8 components, s = 0.05) when ``None``. Each sample is
            conditioned on one class drawn uniformly.
        batch_size, seed: size and seed of the shared noise bank.
        base_config: the scheduler config used for the model's ``alphas_cumprod`` (SD1.5 schedule by default).

    Returns:
        rows ``{"sampler", "guidance", "steps", "nfe", "rmse", "median_error", "blowup_fraction"}``. ``rmse`` is the
        root mean square over samples of the Euclidean endpoint error in xbar = x / alpha coordinates (inf when any
        endpoint is non-finite); ``median_error`` is the median over samples of that error (robust to a few
        blown-up samples); ``blowup_fraction`` is the fraction of endpoints flagged by :func:`blown_up`.
    """
    guidance_scales, steps = [float(w) for w in guidance_scales], [int(n) for n in steps]
    if batch_size < 1 or any(n < 1 for n in steps):
        raise ValueError(f"`batch_size` and `steps` must be positive, got {batch_size} and {steps}")
    samplers = samplers if samplers is not None else default_samplers(base_config)
    mixture = mixture or GaussianMixture.ring()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, mixture.dim, generator=generator, dtype=torch.float64)
    classes = mixture.component_classes.unique()
    labels = classes[torch.randint(len(classes), (batch_size,), generator=generator)]

    references: dict[tuple, torch.Tensor] = {}
    rows = []
    for guidance in guidance_scales:
        guided = GuidedGaussianMixture(mixture, labels, guidance)
        for name, make_scheduler in samplers.items():
            for num_steps in steps:
                scheduler = make_scheduler()
                model = GaussianMixtureDenoiser(guided, scheduler.alphas_cumprod, "epsilon")
                with torch.no_grad():
                    final = sample_with_scheduler(scheduler, model, noise.float(), num_steps).double()
                start, end, state_is_xbar = scheduler_endpoints(scheduler, scheduler.alphas_cumprod)
                if not state_is_xbar:
                    final = final * math.sqrt(1 + end**2)
                key = (guidance, round(start, 9), round(end, 9))
                if key not in references:
                    references[key] = solve_reference(guided, noise * math.sqrt(1 + start**2), start, end)
                error = (final - references[key]).norm(dim=1)
                blown = blown_up(final, mixture, references[key])
                finite = torch.isfinite(final).all(dim=1)
                rmse = float(error.pow(2).mean().sqrt()) if bool(finite.all()) else math.inf
                median = float(torch.where(finite, error, torch.full_like(error, math.inf)).median())
                rows.append(
                    dict(
                        sampler=name,
                        guidance=guidance,
                        steps=num_steps,
                        nfe=model.num_evaluations,
                        rmse=rmse,
                        median_error=median,
                        blowup_fraction=float(blown.double().mean()),
                    )
                )
    return rows


def plot_error_vs_nfe(
    rows: Sequence[dict], path: str, title: str | None = None, dashed: Iterable[str] = (), metric: str = "rmse"
) -> str:
    """Log-log endpoint error (``metric``: "rmse" or "median_error") vs NFE, one panel per guidance scale; blown-up
    points are circled, samplers named in ``dashed`` are drawn dashed. The PNG is written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidance_scales = sorted({row["guidance"] for row in rows})
    names = list(dict.fromkeys(row["sampler"] for row in rows))
    colors = dict(zip(names, plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))))
    dashed = set(dashed)
    figure, axes = plt.subplots(1, len(guidance_scales), figsize=(5.5 * len(guidance_scales), 4.5), squeeze=False)
    for axis, guidance in zip(axes[0], guidance_scales):
        for name in names:
            points = sorted(
                (r["nfe"], r[metric], r["blowup_fraction"])
                for r in rows
                if r["sampler"] == name and r["guidance"] == guidance and math.isfinite(r[metric])
            )
            if not points:
                continue
            nfe, rmse, blown = zip(*points)
            (line,) = axis.plot(
                nfe, rmse, marker=".", label=name, color=colors[name], linestyle="--" if name in dashed else "-"
            )
            bad = [(n, e) for n, e, b in points if b > 0]
            if bad:
                axis.scatter(*zip(*bad), s=60, facecolors="none", edgecolors=line.get_color())
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("NFE")
        axis.set_ylabel(("endpoint RMSE" if metric == "rmse" else "median endpoint error") + " vs DOP853 reference")
        axis.set_title(f"guidance w = {guidance:g}")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)
    return path
