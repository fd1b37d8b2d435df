"""Real handwritten digits, bundled with the package, as a tiny text-to-image dataset.

``assets/digits-8x8.safetensors`` holds the 1797 grey 8x8 scans of the UCI "Optical Recognition of Handwritten
Digits" test set (CC BY 4.0; the same arrays, in the same order, as ``sklearn.datasets.load_digits``), so a
trained teacher and its evaluation need no download and no extra dependency. Images are upsampled to ``32x32``
RGB in ``[-1, 1]`` (the range SD's VAE expects) and paired with prompts ``"a handwritten digit seven"``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = [
    "DIGIT_NAMES",
    "IMAGE_SIZE",
    "digit_prompt",
    "load_digits_split",
    "upsample_digits",
    "digits_teacher_path",
    "digits_classifier_path",
    "ASSETS_DIR",
    "RECOMMENDED_GUIDANCE",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_WORDS = ("a", "handwritten", "digit", *DIGIT_NAMES)
IMAGE_SIZE = 32
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
# Classifier-free guidance scale to sample the bundled teachers with (25 DDIM steps); measured in
# docs/digits_teacher.md ("Quality"): the scale with the best prompt accuracy at a digits-FD near the real-data floor.
RECOMMENDED_GUIDANCE = {"sd15": 1.5, "sdxl": 3.0}
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_FILE = os.path.join(ASSETS_DIR, "digits-8x8.safetensors")


def digit_prompt(label: int) -> str:
    """The prompt for class ``label`` (0-9), e.g. ``"a handwritten digit seven"``."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label must be an integer in 0..9, got {label!r}")
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def upsample_digits(images_8x8: torch.Tensor, size: int = IMAGE_SIZE, channels: int = 3) -> torch.Tensor:
    """Raw ``(N, 8, 8)`` digit scans with values 0..16 -> ``(N, channels, size, size)`` in ``[-1, 1]``.

    Bilinear upsampling keeps strokes smooth (nearest neighbour would give blocky 4x4 pixels).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    x = images_8x8.float().reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return (x * 2 - 1).expand(-1, channels, -1, -1).contiguous()


def load_digits_split(split: str = "train", size: int = IMAGE_SIZE, channels: int = 3):
    """Images and labels of one fixed, seeded split of the bundled digits.

    ``split="train"`` (80%, 1438 images) trains the teachers and the classifier; ``split="held_out"`` (20%,
    359 images) is never trained on: it measures classifier accuracy and is the digits-FD reference set.
    Returns ``(images (N, channels, size, size) in [-1, 1], labels (N,) int64)``.
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be one of 'train', 'held_out', 'all', got {split!r}")
    from safetensors.torch import load_file

    data = load_file(DIGITS_FILE)
    images = data["images"].float()
    labels = data["labels"].long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_held_out = int(round(HELD_OUT_FRACTION * len(labels)))
    if split == "train":
        order = order[n_held_out:]
    elif split == "held_out":
        order = order[:n_held_out]
    return upsample_digits(images[order], size=size, channels=channels), labels[order]


def digits_teacher_path(arch: str = "sd15") -> str:
    """Folder of the bundled trained digits teacher, loadable with ``from_pretrained``.

    ``arch="sd15"`` -> a ``StableDiffusionPipeline``; ``arch="sdxl"`` -> a ``StableDiffusionXLPipeline``.
    """
    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"arch must be 'sd15' or 'sdxl', got {arch!r}")
    return os.path.join(ASSETS_DIR, f"digits-{arch}")


def digits_classifier_path() -> str:
    """Path of the bundled digit classifier weights (``.safetensors``; config in the ``.json`` beside it)."""
    return os.path.join(ASSETS_DIR, "digits-classifier.safetensors")
