"""Built-in, download-free evaluation of text-to-image pipelines on the digits task.

Metrics for generated images given the digit each prompt asked for:

* **prompt accuracy** - fraction of images the bundled digit classifier labels as the prompted digit;
* **digits-FD** - the Frechet distance (Heusel et al. 2017, eq. 6: ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``)
  between Gaussians fitted to the classifier's penultimate features of generated and held-out real digits,
  i.e. FID with a digits classifier in place of Inception;
* **MSE / PSNR** between teacher and student images made from the same noise (agreement).
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import IMAGE_SIZE, digit_prompt, digits_classifier_path, load_digits_split

__all__ = [
    "DigitClassifier",
    "train_digit_classifier",
    "load_digit_classifier",
    "prompt_accuracy",
    "digits_fd",
    "frechet_distance",
    "image_mse",
    "image_psnr",
    "generate_digits",
    "evaluate_pipeline",
    "save_image_grid",
    "SCHEDULERS",
    "make_scheduler",
]


class DigitClassifier(nn.Module):
    """A small CNN on grey ``32x32`` digits in ``[-1, 1]``; ``features`` is the penultimate layer used for digits-FD."""

    def __init__(self, channels: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim}
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(2 * channels * 16, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    @staticmethod
    def to_grey(images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in ``[-1, 1]`` -> grey ``(N, 1, 32, 32)``."""
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(self.to_grey(images)).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_digit_classifier(epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0):
    """Train :class:`DigitClassifier` on the ``train`` split (random 2-pixel shifts); returns ``(model, held-out acc)``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train", channels=1)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(_random_shift(images[idx], g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    held_images, held_labels = load_digits_split("held_out", channels=1)
    with torch.no_grad():
        accuracy = float((model(held_images).argmax(1) == held_labels).float().mean())
    return model, accuracy


def save_digit_classifier(model: DigitClassifier, path: str, extra: dict | None = None) -> None:
    """Write weights (safetensors) and ``<path>.json`` config atomically."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; shipped assets must be world-readable
    os.replace(tmp, path)
    config_path = os.path.splitext(path)[0] + ".json"
    with open(config_path + ".tmp", "w") as f:
        json.dump({**model.config, **(extra or {})}, f, indent=1)
    os.replace(config_path + ".tmp", config_path)


_CLASSIFIER_CACHE: dict = {}


def load_digit_classifier(path: str | None = None) -> DigitClassifier:
    """Load the bundled classifier (or one at ``path``), in eval mode; cached per path."""
    from safetensors.torch import load_file

    path = path or digits_classifier_path()
    if path not in _CLASSIFIER_CACHE:
        if not os.path.isfile(path):
            raise ValueError(f"classifier path {path!r} does not exist; train it with "
                             "`python -m diffusers_distill.training.train_digits_classifier`")
        with open(os.path.splitext(path)[0] + ".json") as f:
            config = json.load(f)
        model = DigitClassifier(channels=config["channels"], feature_dim=config["feature_dim"])
        model.load_state_dict(load_file(path))
        _CLASSIFIER_CACHE[path] = model.eval().requires_grad_(False)
    return _CLASSIFIER_CACHE[path]


def prompt_accuracy(images: torch.Tensor, labels, classifier: DigitClassifier | None = None) -> float:
    """Fraction of ``images`` (``(N, C, H, W)`` in ``[-1, 1]``) classified as the digit their prompt named."""
    classifier = classifier or load_digit_classifier()
    labels = torch.as_tensor(labels).long()
    if len(labels) != len(images):
        raise ValueError(f"labels must have one entry per image: {len(labels)} != {len(images)}")
    with torch.no_grad():
        return float((classifier(images).argmax(1) == labels).float().mean())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` (Heusel et al. 2017, eq. 6)."""
    # Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}); the right side is symmetric PSD, so it is the sum of the
    # square roots of its eigenvalues - stabler on rank-deficient covariances than a general matrix sqrtm.
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _feature_stats(features: torch.Tensor):
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


_REFERENCE_STATS: dict = {}


def digits_fd(images: torch.Tensor, classifier: DigitClassifier | None = None) -> float:
    """Frechet distance between classifier features of ``images`` and of the held-out real digits."""
    classifier = classifier or load_digit_classifier()
    key = id(classifier)
    with torch.no_grad():
        if key not in _REFERENCE_STATS:
            real, _ = load_digits_split("held_out", channels=1)
            _REFERENCE_STATS[key] = _feature_stats(classifier.features(real))
        mu_g, sigma_g = _feature_stats(classifier.features(images))
    return frechet_distance(mu_g, sigma_g, *_REFERENCE_STATS[key])


def image_mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error between two image batches in ``[-1, 1]``."""
    if images.shape != reference.shape:
        raise ValueError(f"images and reference must have the same shape: {tuple(images.shape)} vs {tuple(reference.shape)}")
    return float(F.mse_loss(images.float(), reference.float()))


def image_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB for images in ``[-1, 1]`` (peak-to-peak 2): ``10 log10(2^2 / MSE)``."""
    mse = image_mse(images, reference)
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


# scheduler name -> (module, class, extra from_config kwargs)
SCHEDULERS = {
    "ddim": ("diffusers", "DDIMScheduler", {}),
    "dpmpp_2m": ("diffusers", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("diffusers", "UniPCMultistepScheduler", {}),
    "euler": ("diffusers", "EulerDiscreteScheduler", {}),
    "pndm": ("diffusers", "PNDMScheduler", {"skip_prk_steps": True}),
    "ghvb": ("diffusers_distill.schedulers", "GHVBScheduler", {"multistep_order": 2, "momentum_beta": 0.8}),
    "plms_hb": ("diffusers_distill.schedulers", "PLMSHeavyBallScheduler", {"multistep_order": 2, "momentum_beta": 0.8}),
    "dpmpp_hb": ("diffusers_distill.schedulers", "DPMSolverHeavyBallScheduler", {"solver_order": 2, "momentum_beta": 0.8}),
}


def make_scheduler(name: str, base_config, **overrides):
    """A scheduler from :data:`SCHEDULERS` built with ``from_config`` on a pipeline's scheduler config."""
    import importlib

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    module, cls_name, kwargs = SCHEDULERS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_config(base_config, **{**kwargs, **overrides})


def _check_generation_args(steps, guidance, n_per_digit):
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance!r}")
    if not isinstance(n_per_digit, int) or n_per_digit <= 0:
        raise ValueError(f"n_per_digit must be a positive integer, got {n_per_digit!r}")


def generate_digits(pipe, steps: int = 25, guidance: float = 4.0, n_per_digit: int = 4, seed: int = 0,
                    latents: torch.Tensor | None = None):
    """Sample ``n_per_digit`` images of each digit; returns ``(images (N, 3, H, W) in [-1, 1], labels)``.

    The initial noise is drawn from one seeded generator, so two pipelines called with the same seed
    start from the same noise (teacher/student agreement).
    """
    _check_generation_args(steps, guidance, n_per_digit)
    labels = torch.arange(10).repeat_interleave(n_per_digit)
    prompts = [digit_prompt(int(y)) for y in labels]
    if latents is None:
        channels = pipe.unet.config.in_channels
        size = pipe.unet.config.sample_size
        latents = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(seed))
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                   height=height, width=width, output_type="pt")
    return out.images * 2 - 1, labels


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 10) -> None:
    """Write images in ``[-1, 1]`` as one PNG grid (``nrow`` columns), atomically."""
    from PIL import Image

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    n, c, h, w = x.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = torch.zeros(c, nrows * h, ncol * w, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = x[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def _load_pipeline(pipe_or_path):
    if not isinstance(pipe_or_path, (str, os.PathLike)):
        return pipe_or_path
    path = os.fspath(pipe_or_path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"pipeline path {path!r} is not a diffusers pipeline folder (no model_index.json)")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True)


def evaluate_pipeline(pipe_or_path, scheduler: str | None = "ddim", steps: int = 25, guidance: float = 4.0,
                      n_per_digit: int = 10, seed: int = 0, reference=None, grid_path: str | None = None,
                      scheduler_kwargs: dict | None = None) -> dict:
    """Generate ``n_per_digit`` images per digit and measure them.

    Args:
        pipe_or_path: a Stable Diffusion (1.5/XL) pipeline or a local pipeline folder.
        scheduler: a key of :data:`SCHEDULERS` (built from the pipeline's scheduler config) or ``None`` to keep it.
        steps, guidance: sampling steps and classifier-free guidance scale.
        reference: optional images ``(N, 3, H, W)`` in ``[-1, 1]`` made from the same seed (e.g. by the teacher);
            adds ``mse`` and ``psnr`` against them.
        grid_path: optional PNG path for a sample grid: one column per digit, one row per sample index.

    Returns:
        ``{"prompt_accuracy", "digits_fd", "scheduler", "steps", "guidance", "n_images", "seconds", ...}``;
        the images are under key ``"images"`` (a tensor, dropped before JSON writing).
    """
    import time

    _check_generation_args(steps, guidance, n_per_digit)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)} or None, got {scheduler!r}")
    pipe = _load_pipeline(pipe_or_path)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, **(scheduler_kwargs or {}))
    start = time.perf_counter()
    images, labels = generate_digits(pipe, steps, guidance, n_per_digit, seed)
    seconds = time.perf_counter() - start
    metrics = {
        "scheduler": scheduler or type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance": guidance,
        "n_images": len(labels),
        "seed": seed,
        "prompt_accuracy": prompt_accuracy(images, labels),
        "digits_fd": digits_fd(images),
        "seconds": round(seconds, 3),
    }
    if reference is not None:
        metrics["mse"] = image_mse(images, reference)
        metrics["psnr"] = image_psnr(images, reference)
    if grid_path is not None:
        # column = digit, row = sample index
        order = torch.arange(len(labels)).reshape(10, n_per_digit).T.flatten()
        save_image_grid(images[order], grid_path, nrow=10)
    metrics["images"] = images
    return metrics
