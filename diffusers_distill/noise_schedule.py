"""Noise and prediction algebra of a VP (DDPM) teacher: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.

Eq. (4) of Ho et al. 2020 with ``a_t = alphas_cumprod[t]`` of the teacher's own schedule; conversions between the
UNet output (``epsilon`` or ``v_prediction``, Salimans & Ho 2022), eps and x0 are done in float32 from float64
alphas. Separate from prompt encoding (:mod:`diffusers_distill.teacher`): these are pure tensor functions.
"""

from __future__ import annotations

import torch

from .constants import TEACHER_PREDICTION_TYPES

__all__ = ["NoiseSchedule"]


class NoiseSchedule:
    """``add_noise`` and the x0 / eps / v conversions for one teacher schedule.

    Args:
        alphas_cumprod: ``(T,)`` cumulative alphas of the DDPM forward process.
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (the UNet's output).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in TEACHER_PREDICTION_TYPES:
            raise ValueError(
                f"teacher prediction_type must be one of {TEACHER_PREDICTION_TYPES}, got {prediction_type!r}"
            )
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_scheduler_config(cls, scheduler_config) -> NoiseSchedule:
        """From any diffusers VP scheduler config (the teacher pipeline's ``scheduler.config``)."""
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(scheduler_config)
        return cls(ddpm.alphas_cumprod, ddpm.config.prediction_type)

    def _alpha_sigma(self, timesteps: torch.Tensor, ndim: int):
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha_bar.sqrt().float().view(shape), (1 - alpha_bar).sqrt().float().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0): ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (float32)."""
        a, s = self._alpha_sigma(timesteps, x0.ndim)
        return a * x0.float() + s * noise.float()

    def x0_from_eps(self, x_t, eps, timesteps) -> torch.Tensor:
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return (x_t.float() - s * eps.float()) / a

    def eps_from_x0(self, x_t, x0, timesteps) -> torch.Tensor:
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return (x_t.float() - a * x0.float()) / s

    def output_to_eps(self, x_t, model_output, timesteps) -> torch.Tensor:
        """UNet output -> eps; v-prediction: ``eps = sqrt(a) v + sqrt(1-a) x_t``."""
        if self.prediction_type == "epsilon":
            return model_output.float()
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return a * model_output.float() + s * x_t.float()

    def output_to_x0(self, x_t, model_output, timesteps) -> torch.Tensor:
        """UNet output -> x0; v-prediction: ``x0 = sqrt(a) x_t - sqrt(1-a) v``."""
        if self.prediction_type == "epsilon":
            return self.x0_from_eps(x_t, model_output, timesteps)
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return a * x_t.float() - s * model_output.float()

    def denoising_target(self, x0, noise, timesteps) -> torch.Tensor:
        """Regression target of the plain denoising loss: eps, or ``v = sqrt(a) eps - sqrt(1-a) x0``."""
        if self.prediction_type == "epsilon":
            return noise.float()
        a, s = self._alpha_sigma(timesteps, x0.ndim)
        return a * noise.float() - s * x0.float()
