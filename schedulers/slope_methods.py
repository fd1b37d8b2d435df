"""Algorithm mixins of the momentum schedulers (how evaluations are combined), shared by VP and flow classes.

* GHVB-k ([P] §4.2, Eqs. 15-19, Alg. 2): EMA of the raw slopes, then an order-k Adams-like mixer. Order k for
  every beta; beta = 1 is PLMS-k (Adams-Bashforth).
* PLMS-k + Heavy Ball ([P] §4.1, Eqs. 12-14, Alg. 1): Adams-Bashforth combination, then an EMA. First order
  for beta < 1 ([P] Theorem 1).
* DPM-Solver++(1/2M) + Heavy Ball ([P] §4.1 applied to Eq. 3): EMA of the DPM-Solver++ data prediction.

Slope methods step x_{i+1} = A_i x_i + B_i ehat_i with (A_i, B_i) = ``noise_form_coefficients`` (VP: sigmabar grid
and epsilon slope; flow: sigma grid and velocity slope). ``coefficients="variable"`` uses weights exact on the
actual (non-uniform) grid; ``"fixed"`` uses the paper's constant tables, reproducing the reference code.
"""

from __future__ import annotations

from .momentum import (
    adams_bashforth_coefficients,
    adams_bashforth_table,
    data_form_coefficients,
    dpm_solver_2m_weight,
    ghvb_mixer_table,
    ghvb_variable_coefficients,
    noise_form_coefficients,
)
from .multistep_base import (
    COEFFICIENT_TYPES,
    FINAL_STEP_TYPES,
    check_choice,
    check_order_and_beta,
    linear_combination,
)


class _SlopeMethodMixin:
    """Common slope-form step; subclasses define ``_combined_slope``."""

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        # diffusers would silently drop an unknown override; the order key used to be called solver_order
        if "solver_order" in kwargs:
            raise ValueError(
                f"{cls.__name__} takes `multistep_order` (1-4), not `solver_order` (DPM-Solver's key), "
                f"got solver_order={kwargs['solver_order']!r}."
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _init_slope_method(self) -> None:
        check_order_and_beta(self, "multistep_order", max_order=4)
        check_choice("coefficients", self.config.coefficients, COEFFICIENT_TYPES)
        check_choice("final_step", self.config.final_step, FINAL_STEP_TYPES)

    def _reset_algorithm_state(self) -> None:
        self._slopes = []  # raw slopes (or GHVB-fixed velocities), newest first
        self._previous_combined = None  # the combined slope used by the previous step
        self._previous_data = None  # data prediction x0 of the previous node (for final_step="dpmsolver++")

    # fewer steps than this: the data-form final step is first order (DPM-Solver++(1) = DDIM), as DPM-Solver's
    # lower_order_final does below 15 steps; measured best threshold on the GMM benchmark (docs/schedulers.md)
    _SECOND_ORDER_FINAL_MIN_STEPS = 10

    def _data_form_final_step(self, data, sample, index):
        """DPM-Solver++(2M) step in the data form ([P] Eq. 3) from x0 of this and the previous node, no momentum.

        Near the data the noise/velocity slope changes fast while x0 barely moves, so an exponential-integrator last
        step is far more accurate than a polynomial extrapolation of the slope (measured: docs/schedulers.md).
        """
        steps = self.num_inference_steps
        first_order = steps < self._SECOND_ORDER_FINAL_MIN_STEPS or (self.config.lower_order_final and steps < 15)
        if self._previous_data is None or first_order:
            direction = data
        else:
            weight = dpm_solver_2m_weight(
                self._alpha[index - 1],
                self._sigma[index - 1],
                self._alpha[index],
                self._sigma[index],
                self._alpha[index + 1],
                self._sigma[index + 1],
            )
            direction = data + weight * (data - self._previous_data)
        scale, step = data_form_coefficients(
            self._alpha[index], self._sigma[index], self._alpha[index + 1], self._sigma[index + 1]
        )
        return scale * sample + step * direction

    def _current_order(self, index: int, available: int) -> int:
        if self._is_forced_first_order_final(index):
            return 1
        return min(self.config.multistep_order, available)

    def _advance(self, model_output, sample, index):
        slope = self._to_slope(model_output, sample, index)
        if self._grid[index + 1] == self._grid[index]:
            # zero-length step (Karras or custom timesteps ending at t = 0 with final_sigmas_type="sigma_min"): a no-op,
            # as in DPMSolverMultistep; it can only be the last step, so the history needs no update
            return sample.clone(), self._slope_to_data(slope, sample, index)
        data = self._slope_to_data(slope, sample, index)
        if self.config.final_step == "dpmsolver++" and index == self.num_inference_steps - 1:
            return self._data_form_final_step(data, sample, index), data
        self._previous_data = data
        combined = self._combined_slope(slope, index)
        self._previous_combined = combined
        scale, step = noise_form_coefficients(
            self._grid_alpha[index], self._grid[index], self._grid_alpha[index + 1], self._grid[index + 1]
        )
        prev_sample = linear_combination([step], [combined], sample, scale)
        return prev_sample, data


class GHVBMixin(_SlopeMethodMixin):
    """Generalized Heavy Ball: ehat_n = (1 - beta) ehat_{n-1} + sum_j c_j e_{n-j} (variable) or the paper's
    v_n = (1 - beta) v_{n-1} + beta e_n, ehat_n = (1/beta) sum_j m^(c)_j(beta) v_{n-j} (fixed)."""

    def _combined_slope(self, slope, index):
        beta = float(self.config.momentum_beta)
        if self.config.coefficients == "fixed":
            velocity = slope if not self._slopes else (1.0 - beta) * self._slopes[0] + beta * slope
            self._slopes = [velocity] + self._slopes[: self.config.multistep_order - 1]
            order = self._current_order(index, len(self._slopes))
            weights = [w / beta for w in ghvb_mixer_table(order, beta)]
            return linear_combination(weights, self._slopes)
        self._slopes = [slope] + self._slopes[: self.config.multistep_order - 1]
        if self._previous_combined is None:
            return slope  # first step: ehat_0 = e_0 (Euler / DDIM)
        order = self._current_order(index, len(self._slopes))
        nodes = [self._grid[index - j] for j in range(order)]
        weights = ghvb_variable_coefficients(nodes, self._grid[index + 1], beta)
        return linear_combination(weights, self._slopes, self._previous_combined, 1.0 - beta)


class PLMSHeavyBallMixin(_SlopeMethodMixin):
    """PLMS-k + Heavy Ball: ehat_n = (1 - beta) ehat_{n-1} + beta sum_j b_j e_{n-j}, ehat_0 = e_0."""

    def _combined_slope(self, slope, index):
        beta = float(self.config.momentum_beta)
        self._slopes = [slope] + self._slopes[: self.config.multistep_order - 1]
        order = self._current_order(index, len(self._slopes))
        if self.config.coefficients == "fixed":
            weights = adams_bashforth_table(order)
        else:
            nodes = [self._grid[index - j] for j in range(order)]
            weights = adams_bashforth_coefficients(nodes, self._grid[index + 1])
        if self._previous_combined is None:
            return linear_combination(weights, self._slopes)
        weights = [beta * w for w in weights]
        return linear_combination(weights, self._slopes, self._previous_combined, 1.0 - beta)


class DPMSolverHeavyBallMixin:
    """DPM-Solver++(1 / 2M, midpoint) + Heavy Ball on the data prediction.

    Order 1: v_i = (1 - beta) v_{i-1} + beta x0_i (v := x0 at the first step).
    Order 2: D_i = x0_i + (x0_i - x0_{i-1}) / (2 r_i); v_i = (1 - beta) v_{i-1} + beta D_i (v := D at the first 2M
    step). x_{i+1} = (sigma'/sigma) x_i + alpha' (1 - e^{-h}) v_i. First-order steps of the 2M schedule (the first
    one and the final one forced by lower_order_final / euler_at_final / final_sigmas_type="zero") use x0 without
    momentum, exactly like diffusers' DPMSolverMultistepScheduler (which is reproduced at beta = 1).
    """

    def _init_dpm_method(self) -> None:
        check_order_and_beta(self, "solver_order", max_order=2)

    def _reset_algorithm_state(self) -> None:
        self._previous_data = None
        self._velocity = None

    def _is_final_first_order(self, index: int) -> bool:
        last = index == self.num_inference_steps - 1
        return last and (
            bool(getattr(self.config, "euler_at_final", False))
            or self._is_forced_first_order_final(index)
            or self._sigma[index + 1] == 0.0  # final_sigmas_type="zero" (always for flow matching)
        )

    def _ema(self, value):
        beta = float(self.config.momentum_beta)
        self._velocity = value if self._velocity is None else (1.0 - beta) * self._velocity + beta * value
        return self._velocity

    def _advance(self, model_output, sample, index):
        data = self._to_data(model_output, sample, index)
        if self._is_final_first_order(index):
            direction = data
        elif self.config.solver_order == 1:
            direction = self._ema(data)
        elif self._previous_data is None:
            direction = data
        else:
            weight = dpm_solver_2m_weight(
                self._alpha[index - 1],
                self._sigma[index - 1],
                self._alpha[index],
                self._sigma[index],
                self._alpha[index + 1],
                self._sigma[index + 1],
            )
            direction = self._ema(data + weight * (data - self._previous_data))
        self._previous_data = data
        scale, step = data_form_coefficients(
            self._alpha[index], self._sigma[index], self._alpha[index + 1], self._sigma[index + 1]
        )
        return scale * sample + step * direction, data
