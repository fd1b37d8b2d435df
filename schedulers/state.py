"""The diffusers scheduler state machine shared by every scheduler of this package: ``step_index`` (advanced by
``step``), ``begin_index`` (set by img2img pipelines through ``set_begin_index``) and ``len()`` (the training
timesteps), with the same semantics as diffusers' own schedulers."""

from __future__ import annotations

import numbers


class StepIndexState:
    """``step_index`` / ``begin_index`` / ``set_begin_index`` / ``__len__``; the scheduler sets ``_step_index``,
    ``_begin_index`` and ``num_inference_steps`` (None before ``set_timesteps``)."""

    @property
    def step_index(self):
        """Index of the current step; increases by one after each ``step``."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by img2img pipelines through ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at step ``begin_index`` (an int >= 0, at most the number of steps once ``set_timesteps`` ran)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral) or begin_index < 0:
            raise ValueError(f"`begin_index` must be an int >= 0, got {begin_index!r}.")
        if self.num_inference_steps is not None and begin_index > self.num_inference_steps:
            raise ValueError(
                f"`begin_index` must be <= num_inference_steps={self.num_inference_steps}, got {begin_index!r}."
            )
        self._begin_index = int(begin_index)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
