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
    "teacher_regression_loss",
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


def teacher_regression_loss(x0: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """MSE of the generator's x0 to the teacher's (CFG) x0 prediction at the same input: guidance distillation of
    one sampling step (ours; used for the late steps of N-step students, docs/dmd2.md)."""
    return F.mse_loss(x0.float(), x0_teacher.detach().float(), reduction="mean")


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


# ==================================================================================================================
# Flow-map (two-timed flow model) distillation losses
# ==================================================================================================================
#
# A two-timed flow model (TTFM) phi(x, s, t) moves a point of an ODE trajectory from time s to time t in one call.
# Every loss below uses the average-velocity parameterisation
#
#     phi(x, s, t) = x + (t - s) u(x, s, t)                                              (docs/flow_maps.md Eq. FM1)
#
# and a teacher velocity v_t(x) = dx/dt of the same ODE. The formulas only use calculus of that ODE, so they hold in
# any time convention as long as u and v use the same one: diffusers' rectified-flow sigma (1 = noise, 0 = data,
# which is what diffusers_distill.flow_map uses) or the ITVM paper's tau = 1 - sigma.
#
# Callables: ``average_velocity(x, s, t) -> u`` (the network being trained), ``target_average_velocity`` (its EMA
# copy, called without gradient), ``teacher_velocity(x, t) -> v`` (called without gradient). ``s`` and ``t`` are
# ``(B,)`` tensors. Each loss returns the batch mean of the per-sample squared error (sum over the other
# dimensions divided by their number, i.e. plain MSE), computed in float32 or higher.

__all__ += [
    "GAUSS_LEGENDRE_NODES",
    "itvm_loss",
    "lagrangian_flow_map_loss",
    "mean_flow_loss",
    "progressive_flow_map_loss",
]


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` times reshaped to broadcast against ``like`` (B, ...)."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    return F.mse_loss(prediction.to(dtype), target.to(dtype), reduction="mean")


def lagrangian_flow_map_loss(average_velocity, teacher_velocity, x_s, s, t) -> torch.Tensor:
    """LFMD, the Lagrangian map distillation loss of Boffi, Albergo & Vanden-Eijnden (arXiv 2406.07507, "LMD").

        L = E || d/dt phi(x_s, s, t) - v_t( sg[phi(x_s, s, t)] ) ||^2,   d/dt phi = u + (t - s) d/dt u

    The derivative in the terminal time is a forward-mode JVP (``torch.func.jvp``, tangent 1 on ``t`` only) and the
    loss is backpropagated through it (second order). The teacher is evaluated once, at the detached terminal point,
    so no teacher Jacobian is needed. For a diffusers UNet run this inside
    :func:`diffusers_distill.flow_map.forward_ad_attention` (fused SDPA has no forward-mode AD).
    """
    u, du_dt = torch.func.jvp(lambda time: average_velocity(x_s, s, time), (t,), (torch.ones_like(t),))
    tau = _per_sample(t - s, u)
    with torch.no_grad():
        v_end = teacher_velocity((x_s + tau * u).detach(), t)
    return _mse(u + tau * du_dt, v_end)


# Gauss-Legendre nodes c_i and weights w_i on [0, 1] (exact for polynomials of degree 2M - 1).
GAUSS_LEGENDRE_NODES = {
    1: ((0.5,), (1.0,)),
    2: ((0.5 - 3**0.5 / 6, 0.5 + 3**0.5 / 6), (0.5, 0.5)),
    3: ((0.5 - 0.15**0.5, 0.5, 0.5 + 0.15**0.5), (5 / 18, 8 / 18, 5 / 18)),
}


def itvm_loss(
    average_velocity,
    target_average_velocity,
    teacher_velocity,
    x_s,
    s,
    t,
    num_nodes: int = 3,
    initial_weight: float = 0.0,
) -> torch.Tensor:
    """ITVM (Khungurn et al., arXiv 2505.01169), "Picard / average-velocity target" reading (R4 of
    docs/flow_maps.md; the paper's full text was not available, so this is a reconstruction from its abstract).

    The abstract's three changes to LFMD, as implemented here:

    1. *a target terminal average velocity computed by the EMA model*: the exact average velocity satisfies
       u(x, s, t) = 1/(t - s) int_s^t v_r(phi(x, s, r)) dr. The target replaces phi by the EMA model's map and the
       integral by M-point Gauss-Legendre quadrature on the nodes t_i = s + c_i (t - s):

           u_tgt = sg[ sum_i w_i v_{t_i}( x_s + (t_i - s) u_ema(x_s, s, t_i) ) ]

    2. *no derivative in the terminal term*: L_term = E || u(x_s, s, t) - u_tgt ||^2 is a plain regression (no JVP,
       no double backward);
    3. *redundant initial-velocity terms*: on the pairs with t = s the target above is exactly v_s(x_s), so sampling
       some diagonal pairs (25 % in benchmarks/flow_map_gmm.py) makes L_term contain the initial-velocity term
       E || u(x_s, s, s) - v_s(x_s) ||^2 (the tangent condition, which also holds at the fixed point, hence
       "redundant"). ``initial_weight > 0`` adds it again on every pair; that cost 1-step quality on the GMM
       benchmark (docs/flow_maps.md), so it is off by default.

    Why not the literal reading (EMA copy of LFMD's target v_t(phi_ema) - (t - s) d/dt u_ema): the lagged
    -(t - s) d/dt operator is unbounded, and an EMA lag turns its rotations into exponential growth; it diverged
    in every setting tried (docs/flow_maps.md, "Which ITVM reading is implemented, and why"). The quadrature
    target's linearisation is a Volterra operator in t (spectral radius 0), so an EMA-lagged copy contracts for any
    decay.
    """
    if num_nodes not in GAUSS_LEGENDRE_NODES:
        raise ValueError(f"`num_nodes` must be one of {sorted(GAUSS_LEGENDRE_NODES)}, got {num_nodes!r}")
    if initial_weight < 0:
        raise ValueError(f"`initial_weight` must be >= 0, got {initial_weight!r}")
    nodes, weights = GAUSS_LEGENDRE_NODES[num_nodes]
    with torch.no_grad():
        u_target = 0.0
        for c, w in zip(nodes, weights):
            t_i = s + c * (t - s)
            x_i = x_s + _per_sample(t_i - s, x_s) * target_average_velocity(x_s, s, t_i)
            u_target = u_target + w * teacher_velocity(x_i, t_i)
    loss = _mse(average_velocity(x_s, s, t), u_target)
    if initial_weight > 0:
        with torch.no_grad():
            v_start = teacher_velocity(x_s, s)
        loss = loss + initial_weight * _mse(average_velocity(x_s, s, s), v_start)
    return loss


def mean_flow_loss(average_velocity, teacher_velocity, x_s, s, t) -> torch.Tensor:
    """MeanFlow-style Eulerian loss (Geng et al., arXiv 2505.13447, Eq. 9-10, distilled from a teacher).

    Differentiating (t - s) u(x_s, s, t) = int_s^t v along a trajectory in its *initial* time gives
    u(x_s, s, t) = v_s(x_s) + (t - s) d/ds u(x_s, s, t), with the total derivative d/ds = v_s . grad_x + partial_s
    (a JVP with tangent (v_s, 1, 0) on (x, s, t)). The right side is detached, so there is no double backward:

        L = E || u(x_s, s, t) - sg[ v_s(x_s) + (t - s) (v_s . grad_x + partial_s) u(x_s, s, t) ] ||^2
    """
    with torch.no_grad():
        v_start = teacher_velocity(x_s, s)
    u, du_ds = torch.func.jvp(lambda x, time: average_velocity(x, time, t), (x_s, s), (v_start, torch.ones_like(s)))
    target = (v_start + _per_sample(t - s, u) * du_ds).detach()
    return _mse(u, target)


def progressive_flow_map_loss(average_velocity, target_average_velocity, teacher_velocity, x_s, s, t) -> torch.Tensor:
    """Progressive (JVP-free) flow-map distillation (Boffi et al. arXiv 2505.18825 "PSD"; Frans et al. arXiv
    2410.12557 shortcut models): one jump must equal two half jumps of the EMA model.

        m = (s + t) / 2,  x_m = x_s + (m - s) u_ema(x_s, s, m)
        u_tgt = sg[ ((m - s) u_ema(x_s, s, m) + (t - m) u_ema(x_m, m, t)) / (t - s) ]     (t != s)
        u_tgt = sg[ v_s(x_s) ]                                                            (t == s: the teacher)
        L = E || u(x_s, s, t) - u_tgt ||^2

    (the 1/(t - s)^2 weighting of the map residual is absorbed by regressing average velocities).
    """
    with torch.no_grad():
        m = 0.5 * (s + t)
        u_first = target_average_velocity(x_s, s, m)
        x_m = x_s + _per_sample(m - s, x_s) * u_first
        u_second = target_average_velocity(x_m, m, t)
        # (m - s) = (t - m) = (t - s)/2, so the composite average velocity is the mean of the two halves
        u_target = 0.5 * (u_first + u_second)
        diagonal = _per_sample(t == s, x_s)
        if bool(diagonal.any()):
            u_target = torch.where(diagonal.bool(), teacher_velocity(x_s, s), u_target)
    return _mse(average_velocity(x_s, s, t), u_target)
