"""Pure coefficient math for the momentum samplers (Heavy Ball and Generalized Heavy Ball).

Reference: Wizadwongsa et al., "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts"
(arXiv 2307.11118), cited below as [P]. Every sampler in this package advances the state as

    x_{i+1} = A_i * x_i + B_i * s_i,

where ``s_i`` is a combined slope (noise/velocity form) or a combined data prediction (DPM-Solver++ form) and
(A_i, B_i) only depend on the noise schedule. The functions here compute those scalars as python floats on the
CPU so that ``step()`` never synchronises with the accelerator.

diffusers has no variable-step Adams or GHVB coefficients, so they are written here (float64, tiny systems).
"""

from __future__ import annotations

import math

import numpy as np

# Adams-Bashforth coefficients on a uniform grid, newest evaluation first ([P] Alg. 1).
_ADAMS_BASHFORTH_TABLE = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


def adams_bashforth_table(order: int) -> tuple[float, ...]:
    """Constant (uniform-step) Adams-Bashforth coefficients of ``order`` 1-4, newest first (PLMS-k)."""
    if order not in _ADAMS_BASHFORTH_TABLE:
        raise ValueError(f"`order` must be one of 1, 2, 3, 4, got {order}.")
    return _ADAMS_BASHFORTH_TABLE[order]


def ghvb_mixer_table(order: int, beta: float) -> tuple[float, ...]:
    """The paper's GHVB mixer m^(order)(beta), newest first ([P] Eqs. 15-19, Alg. 2; rows sum to beta).

    The combined slope is (1/beta) * sum_j m_j v_{n-j}, with v the EMA of the raw slopes. beta=1 gives AB_order.
    """
    b = float(beta)
    rows = {
        1: (b,),
        2: ((2.0 + b) / 2.0, -(2.0 - b) / 2.0),
        3: ((18.0 + 5.0 * b) / 12.0, -(24.0 - 8.0 * b) / 12.0, (6.0 - b) / 12.0),
        4: ((46.0 + 9.0 * b) / 24.0, -(78.0 - 19.0 * b) / 24.0, (42.0 - 5.0 * b) / 24.0, -(10.0 - b) / 24.0),
    }
    if order not in rows:
        raise ValueError(f"`order` must be one of 1, 2, 3, 4, got {order}.")
    return rows[order]


def _scaled_nodes(grid_history, grid_next) -> tuple[np.ndarray, float]:
    """Nodes u_j = (s_{n-j} - s_n) / h_n with h_n = s_{n+1} - s_n (newest first, u_0 = 0)."""
    nodes = np.asarray(grid_history, dtype=np.float64)
    step = float(grid_next) - float(nodes[0])
    if step == 0.0:
        raise ValueError("`grid_next` must differ from the current grid point.")
    return (nodes - nodes[0]) / step, step


def adams_bashforth_coefficients(grid_history, grid_next) -> tuple[float, ...]:
    """Variable-step Adams-Bashforth weights b_j such that x_{n+1} = x_n + h_n * sum_j b_j f_{n-j}.

    ``grid_history`` holds s_n, s_{n-1}, ... (newest first, its length is the order c) and ``grid_next`` is s_{n+1}.
    The weights integrate every polynomial of degree < c exactly over [s_n, s_{n+1}]:
    sum_j b_j u_j^m = 1 / (m + 1), m = 0..c-1. On a uniform grid they are the PLMS table.
    """
    nodes, _ = _scaled_nodes(grid_history, grid_next)
    powers = np.arange(len(nodes))
    vandermonde = nodes[None, :] ** powers[:, None]
    moments = 1.0 / (powers + 1.0)
    return tuple(float(c) for c in np.linalg.solve(vandermonde, moments))


def ghvb_variable_coefficients(grid_history, grid_next, beta: float) -> tuple[float, ...]:
    """Variable-step GHVB weights c_j for ehat_n = (1 - beta) ehat_{n-1} + sum_j c_j f_{n-j}.

    GHVB-k is the two-step method (x_{n+1} - x_n)/h_n - (1 - beta)(x_n - x_{n-1})/h_{n-1} = sum_j c_j f_{n-j}
    ([P] Eq. 60 form of Eqs. 15-19). The weights make it exact for f polynomial of degree < c:
    sum_j c_j P(s_{n-j}) = mean_{[s_n, s_{n+1}]} P - (1 - beta) mean_{[s_{n-1}, s_n]} P.
    With u_1 = (s_{n-1} - s_n)/h_n the right-hand side for P = u^m is (1 - (1 - beta) u_1^m) / (m + 1).
    On a uniform grid this is the paper's mixer m^(c)(beta); beta = 1 gives variable-step Adams-Bashforth.
    For c = 1 only s_n is needed (c_0 = beta, Heavy Ball on Euler).
    """
    nodes, _ = _scaled_nodes(grid_history, grid_next)
    powers = np.arange(len(nodes))
    # mean of u^m over the previous interval [u_1, 0] is u_1^m / (m + 1); for m = 0 it is 1 whatever u_1 is.
    previous_node = nodes[1] if len(nodes) > 1 else 0.0
    previous_means = np.where(powers == 0, 1.0, previous_node**powers / (powers + 1.0))
    moments = 1.0 / (powers + 1.0) - (1.0 - beta) * previous_means
    vandermonde = nodes[None, :] ** powers[:, None]
    return tuple(float(c) for c in np.linalg.solve(vandermonde, moments))


def noise_form_coefficients(alpha: float, sigma_bar: float, alpha_next: float, sigma_bar_next: float):
    """(A, B) of one step in the epsilon form ([P] Eq. 2): x' = alpha' (x/alpha + (sigmabar' - sigmabar) eps).

    For flow matching pass alpha = alpha_next = 1 and the flow sigmas: x' = x + (sigma' - sigma) v.
    """
    return alpha_next / alpha, alpha_next * (sigma_bar_next - sigma_bar)


def data_form_coefficients(alpha: float, sigma: float, alpha_next: float, sigma_next: float):
    """(A, B) of one DPM-Solver++ step in the data form ([P] Eq. 3): x' = (sigma'/sigma) x + alpha'(1 - e^{-h}) x0.

    e^{-h} = (sigma' alpha) / (alpha' sigma) is formed as a ratio so sigma' = 0 (h = inf, x' = x0) and alpha = 0
    (flow matching at sigma = 1, lambda = -inf) stay finite.
    """
    exp_neg_h = 0.0 if sigma_next == 0.0 else (sigma_next * alpha) / (alpha_next * sigma)
    return sigma_next / sigma, alpha_next * (1.0 - exp_neg_h)


def log_snr(alpha: float, sigma: float) -> float:
    """Half log-SNR lambda = log(alpha / sigma), +-inf at the ends of the schedule."""
    if sigma == 0.0:
        return math.inf
    if alpha == 0.0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def dpm_solver_2m_weight(alpha_prev, sigma_prev, alpha, sigma, alpha_next, sigma_next) -> float:
    """Weight w of D = x0_i + w (x0_i - x0_{i-1}) in DPM-Solver++(2M) (midpoint): w = 1 / (2 r_i), r_i = h_{i-1}/h_i.

    Returns 0 when h_{i-1} is infinite (previous node at lambda = -inf) and matches diffusers'
    ``multistep_dpm_solver_second_order_update``.
    """
    lam_prev, lam, lam_next = log_snr(alpha_prev, sigma_prev), log_snr(alpha, sigma), log_snr(alpha_next, sigma_next)
    h_prev = lam - lam_prev
    h = lam_next - lam
    if not math.isfinite(h_prev):
        return 0.0
    return 0.5 * h / h_prev if math.isfinite(h) else 0.0
