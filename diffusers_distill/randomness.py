"""Device-correct random tensors (one helper for training, validation, export and pipelines).

``torch.randn(..., generator=g, device=d)`` fails when ``g`` lives on another device than ``d`` (a CPU generator with
CUDA tensors). diffusers' ``randn_tensor`` draws on the generator's device and moves the result, so a seeded CPU
generator gives the same numbers on every device; we use it, and add the integer counterpart it lacks.
"""

from __future__ import annotations

import torch

__all__ = ["rand", "randn", "randint"]


def randn(shape, generator: torch.Generator | None, device, dtype=None) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on ``device``, drawn on ``generator``'s device."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def randint(low: int, high: int, size: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """``(size,)`` integers in ``[low, high)`` on ``device``, drawn on ``generator``'s device (written by hand:
    diffusers has no ``randint_tensor``)."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(low, high, (size,), generator=generator, device=draw_device).to(device)


def rand(size: int, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """``(size,)`` uniforms in ``[0, 1)`` on ``device``, drawn on ``generator``'s device (written by hand: diffusers
    has no ``rand_tensor``)."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand((size,), generator=generator, device=draw_device, dtype=dtype).to(device)
