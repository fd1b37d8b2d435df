"""DMD2 loss functions (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis",
NeurIPS 2024, arXiv 2405.14867).

Each function takes already-computed network outputs, so it is independent of the networks and easy to test.
All losses are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "distribution_matching_gradient",
    "distribution_matching_loss",
    "fake_score_loss",
    "gan_generator_loss",
    "gan_discriminator_loss",
]


def distribution_matching_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The normalised distribution-matching gradient w.r.t. the generator sample ``x0``.

    DMD2 eq. (2) approximates the gradient of KL(p_fake || p_real) by the score difference
    ``s_fake - s_real``; in x0 terms (DMD eq. 7-8) this is ``x0_fake - x0_real``, the difference of the fake and
    real denoisers' x0-predictions at a noised copy of ``x0``. DMD eq. 8 divides it by the per-sample weight
    ``mean_{C,H,W} |x0 - x0_real|``. Non-finite values (a zero normaliser) are replaced by 0, so such a sample
    gets no update (the reference code's ``nan_to_num`` would turn inf into +-3.4e38 instead).
    """
    p_real = (x0 - x0_real).float()
    p_fake = (x0 - x0_fake).float()
    normaliser = p_real.abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / normaliser, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Surrogate loss whose gradient w.r.t. ``x0`` is the DM gradient / numel (DMD2 eq. 2, DMD eq. 8).

    ``0.5 * mean((x0 - stopgrad(x0 - g))**2)`` has ``d/dx0 = g / x0.numel()``. ``x0_real`` / ``x0_fake``
    must come from networks evaluated without gradient.
    """
    grad = distribution_matching_gradient(x0.detach(), x0_real.detach(), x0_fake.detach())
    target = (x0.detach().float() - grad).detach()
    return 0.5 * F.mse_loss(x0.float(), target, reduction="mean")


def fake_score_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score on detached generator samples (DMD2 Sec. 4.1, "fake score" update):
    plain MSE between the fake UNet's output and its target (eps, or v for v-prediction teachers)."""
    return F.mse_loss(model_output.float(), target.float(), reduction="mean")


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator GAN loss ``E[softplus(-D(G(z)))]`` = -log sigmoid(D) (DMD2 eq. 4)."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss ``E[softplus(D(fake))] + E[softplus(-D(real))]`` (DMD2 eq. 3)."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()
