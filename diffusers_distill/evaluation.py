"""Built-in, download-free evaluation of text-to-image pipelines on the digits task.

Metrics for generated images given the digit each prompt asked for:

* **prompt accuracy** - fraction of images the bundled digit classifier labels as the prompted digit;
* **digits-FD** - the Frechet distance
  (Heusel et al. 2017, eq. 6: ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``) between Gaussians fitted to
  the classifier's penultimate features of generated and held-out real digits, i.e. FID with a digits classifier
  in place of Inception;
* **MSE / PSNR** between teacher and student images made from the same noise (agreement);
* the **real-data floor** (:func:`real_data_fd`): the digits-FD that real digits, not in the reference set, score at
  the same sample count - what a perfect generator would reach.

For real models (any diffusers text-to-image pipeline, :func:`evaluate_prompts`): **FID** (Inception-v3 pool
features, torch-fidelity's port of the TF-FID network) against a folder of real images, and **CLIP score**
(``100 * max(cos(E_image, E_text), 0)``, Hessel et al. 2021 with w = 100, as torchmetrics). Both need weights that
are downloaded once; without them (offline, not cached) :class:`MetricUnavailableError` says what is missing.
The feature networks can be injected, which is how the tests run offline.

Distilled students are evaluated the way they must be sampled: :func:`read_student_sampling` reads the sampling
settings a student folder records (DMD2's ``student_config.json``; :data:`STUDENT_CONFIG_READERS` takes more
formats), and ``scheduler="keep"`` samples with the pipeline's own scheduler on those timesteps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .digits import IMAGE_SIZE, digit_prompt, digits_classifier_path, load_digits_split
from .fileio import atomic_path, atomic_write_json

__all__ = [
    "DigitClassifier",
    "train_digit_classifier",
    "load_digit_classifier",
    "prompt_accuracy",
    "digits_fd",
    "real_data_fd",
    "frechet_distance",
    "image_mse",
    "image_psnr",
    "generate_digits",
    "evaluate_pipeline",
    "save_image_grid",
    "SCHEDULERS",
    "make_scheduler",
    "StudentSampling",
    "STUDENT_CONFIG_READERS",
    "read_student_sampling",
    "load_pipeline",
    "evaluate_prompts",
    "load_reference_images",
    "read_prompts",
    "fid_from_features",
    "clip_score_from_embeddings",
    "inception_fid_features",
    "CLIPEmbedder",
    "MetricUnavailableError",
]


class DigitClassifier(nn.Module):
    """A small CNN on grey ``32x32`` digits in ``[-1, 1]``; ``features`` is the penultimate layer used for digits-FD."""

    def __init__(self, channels: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim}
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
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
    """Train :class:`DigitClassifier` on the ``train`` split (random 2-pixel shifts).

    Returns ``(model, held-out accuracy)``."""
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

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    config_path = os.path.splitext(path)[0] + ".json"
    atomic_write_json(config_path, {**model.config, **(extra or {})}, indent=1, sort_keys=False)


_CLASSIFIER_CACHE: dict = {}


def load_digit_classifier(path: str | None = None) -> DigitClassifier:
    """Load the bundled classifier (or one at ``path``), in eval mode; cached per path."""
    from safetensors.torch import load_file

    path = path or digits_classifier_path()
    if path not in _CLASSIFIER_CACHE:
        if not os.path.isfile(path):
            raise ValueError(
                f"classifier path {path!r} does not exist; train it with "
                "`python -m diffusers_distill.training.train_digits_classifier`"
            )
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


def digits_fd(
    images: torch.Tensor, classifier: DigitClassifier | None = None, reference: torch.Tensor | None = None
) -> float:
    """Frechet distance between classifier features of ``images`` and of the held-out real digits, or of
    ``reference`` images when given (e.g. the teacher's 25-step samples: how close the distribution of a student's
    samples is to its teacher's rather than to the data)."""
    classifier = classifier or load_digit_classifier()
    key = id(classifier)
    with torch.no_grad():
        if reference is not None:
            reference_stats = _feature_stats(classifier.features(reference))
        else:
            if key not in _REFERENCE_STATS:
                real, _ = load_digits_split("held_out", channels=1)
                _REFERENCE_STATS[key] = _feature_stats(classifier.features(real))
            reference_stats = _REFERENCE_STATS[key]
        mu_g, sigma_g = _feature_stats(classifier.features(images))
    return frechet_distance(mu_g, sigma_g, *reference_stats)


def real_data_fd(n_per_digit: int = 10, seed: int = 0, classifier: DigitClassifier | None = None) -> float:
    """The real-data floor of :func:`digits_fd` at ``10 * n_per_digit`` images.

    ``n_per_digit`` real digits of each class are drawn (seeded, without replacement) from the ``train`` split -
    real images that are not in the held-out reference set - and measured exactly as generated images are. FD is
    biased upwards at small sample counts, so a generator can only be judged against this floor at the same count.
    """
    if not isinstance(n_per_digit, int) or n_per_digit < 2:
        raise ValueError(f"n_per_digit must be an integer >= 2 (FD needs a covariance), got {n_per_digit!r}")
    classifier = classifier or load_digit_classifier()
    key = (n_per_digit, seed, id(classifier))
    if key not in _REAL_DATA_FD:
        _REAL_DATA_FD[key] = _real_data_fd(n_per_digit, seed, classifier)
    return _REAL_DATA_FD[key]


_REAL_DATA_FD: dict = {}


def _real_data_fd(n_per_digit, seed, classifier):
    images, labels = load_digits_split("train")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for digit in range(10):
        candidates = torch.nonzero(labels == digit).flatten()
        if n_per_digit > len(candidates):
            raise ValueError(
                f"n_per_digit must be <= {len(candidates)} (train images of digit {digit}), got {n_per_digit}"
            )
        picks.append(candidates[torch.randperm(len(candidates), generator=g)[:n_per_digit]])
    return digits_fd(images[torch.cat(picks)], classifier)


def image_mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error between two image batches in ``[-1, 1]``."""
    if images.shape != reference.shape:
        raise ValueError(
            f"images and reference must have the same shape: {tuple(images.shape)} vs {tuple(reference.shape)}"
        )
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
    "dpmpp_hb": (
        "diffusers_distill.schedulers",
        "DPMSolverHeavyBallScheduler",
        {"solver_order": 2, "momentum_beta": 0.8},
    ),
}


TIMESTEP_SPACING = "trailing"


def make_scheduler(name: str, base_config, **overrides):
    """A scheduler from :data:`SCHEDULERS` built with ``from_config`` on a pipeline's scheduler config.

    Timesteps use ``"trailing"`` spacing unless ``overrides`` say otherwise: the first step starts at t = 999, the
    pure-noise end that the sampler's initial latents represent (Lin et al. 2024, sec. 3.3). ``"leading"`` starts
    few-step runs far below it (t = 751 at 4 steps), which handicaps few-step baselines.
    """
    import importlib

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    module, cls_name, kwargs = SCHEDULERS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_config(base_config, **{"timestep_spacing": TIMESTEP_SPACING, **kwargs, **overrides})


def _check_generation_args(steps, guidance, n_per_digit):
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance!r}")
    if not isinstance(n_per_digit, int) or n_per_digit <= 0:
        raise ValueError(f"n_per_digit must be a positive integer, got {n_per_digit!r}")


def _sample(pipe, prompts, steps, guidance, latents, seed, timesteps=None, **kwargs):
    """One pipeline call; ``generator`` seeds every random draw inside it (e.g. the noise that multi-step LCM /
    DDPM-type schedulers re-inject), so the same seed always gives the same images. Pipelines without a
    ``guidance_scale`` argument (flow-map students: CFG is distilled in) are sampled only at guidance 0."""
    import inspect

    call = dict(
        num_inference_steps=steps,
        latents=latents,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    )
    if "guidance_scale" in inspect.signature(pipe.__call__).parameters:
        call["guidance_scale"] = guidance
    elif guidance != 0:
        raise ValueError(
            f"guidance must be 0 for {type(pipe).__name__}: it takes no guidance_scale (CFG is distilled into the "
            f"student), got {guidance!r}"
        )
    if timesteps is not None:
        call["timesteps"] = list(timesteps)
    with torch.no_grad():
        return pipe(prompts, **call).images * 2 - 1


def generate_digits(
    pipe,
    steps: int = 25,
    guidance: float = 4.0,
    n_per_digit: int = 4,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    timesteps=None,
):
    """Sample ``n_per_digit`` images of each digit; returns ``(images (N, 3, H, W) in [-1, 1], labels)``.

    The initial noise is drawn from one seeded generator, so two pipelines called with the same seed
    start from the same noise (teacher/student agreement); the pipeline call gets a generator with the same seed.
    ``timesteps`` (optional) are passed to the pipeline instead of letting the scheduler space ``steps`` itself.
    """
    _check_generation_args(steps, guidance, n_per_digit)
    labels = torch.arange(10).repeat_interleave(n_per_digit)
    prompts = [digit_prompt(int(y)) for y in labels]
    if latents is None:
        channels = pipe.unet.config.in_channels
        size = pipe.unet.config.sample_size
        latents = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(seed))
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = _sample(pipe, prompts, steps, guidance, latents.clone(), seed, timesteps, height=height, width=width)
    return images, labels


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
    with atomic_path(path) as tmp:
        image.save(tmp)


@dataclasses.dataclass(frozen=True)
class StudentSampling:
    """How a distilled student must be sampled, as its folder records it.

    ``method`` names the distillation method (``"dmd2"``); ``timesteps`` are the generator's fixed timesteps (None:
    let the pipeline's scheduler choose for ``steps``); ``guidance`` is the CFG scale to sample with (0 for students
    with guidance baked in); ``config_file`` is the file it was read from.
    """

    method: str
    steps: int
    timesteps: tuple | None
    guidance: float
    config_file: str


def _read_dmd2_student_config(path: str) -> StudentSampling:
    from .export import StudentConfig

    config = StudentConfig.load(os.path.dirname(path))
    return StudentSampling(
        method=config.method,
        steps=config.num_inference_steps,
        timesteps=tuple(config.timesteps),
        guidance=float(config.guidance_scale),
        config_file=path,
    )


FLOW_MAP_PIPELINES = ("FlowMapStableDiffusionPipeline", "FlowMapStableDiffusionXLPipeline")


def _flow_map_sampling(default_steps: int, config_file: str) -> StudentSampling:
    # the scheduler places the steps itself (no fixed timesteps); CFG is distilled in
    return StudentSampling("flow_map", int(default_steps), None, 0.0, config_file)


def _flow_map_pipeline_index(path: str) -> dict | None:
    """A ``model_index.json`` that names one of our flow-map pipeline classes, read; None for any other."""
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    return index if index.get("_class_name") in FLOW_MAP_PIPELINES else None


def _read_flow_map_pipeline_index(path: str) -> StudentSampling | None:
    """A saved flow-map pipeline folder: its ``model_index.json`` names the pipeline class and the default steps."""
    index = _flow_map_pipeline_index(path)
    return None if index is None else _flow_map_sampling(index["default_num_inference_steps"], path)


def _read_flow_map_lora_config(path: str) -> StudentSampling:
    """A LoRA flow-map student folder (``save_flow_map_lora_student``): ``flow_map_config.json``."""
    with open(path, encoding="utf-8") as f:
        return _flow_map_sampling(json.load(f)["default_num_inference_steps"], path)


# file name in a student folder -> reader returning StudentSampling, or None when the file is not that student's.
# DMD2 students (diffusers_distill.export) write student_config.json; flow-map pipelines record their default step
# count in model_index.json, LoRA flow-map students in flow_map_config.json.
STUDENT_CONFIG_READERS = {
    "student_config.json": _read_dmd2_student_config,
    "model_index.json": _read_flow_map_pipeline_index,
    "flow_map_config.json": _read_flow_map_lora_config,
}


def _pipeline_folder(pipe_or_path) -> str | None:
    if isinstance(pipe_or_path, (str, os.PathLike)):
        path = os.fspath(pipe_or_path)
    else:
        path = getattr(getattr(pipe_or_path, "config", None), "_name_or_path", None)
    return path if path and os.path.isdir(path) else None


def read_student_sampling(pipe_or_path) -> StudentSampling | None:
    """The sampling settings of a distilled student (a folder or a pipeline loaded from one); None for other models.

    Pipelines that carry a ``student_config`` attribute (the DMD2 pipelines, also for a LoRA student on a base
    model) are read from it, flow-map pipelines from their config (default steps, guidance 0); otherwise the folder
    is searched for a file of :data:`STUDENT_CONFIG_READERS`.
    """
    config = getattr(pipe_or_path, "student_config", None)
    if config is not None:
        return StudentSampling(
            method=config.method,
            steps=config.num_inference_steps,
            timesteps=tuple(config.timesteps),
            guidance=float(config.guidance_scale),
            config_file="student_config.json",
        )
    if type(pipe_or_path).__name__ in FLOW_MAP_PIPELINES:
        return _flow_map_sampling(pipe_or_path.config.default_num_inference_steps, "model_index.json")
    folder = _pipeline_folder(pipe_or_path)
    if folder is None:
        return None
    for name, reader in STUDENT_CONFIG_READERS.items():
        sampling = reader(os.path.join(folder, name)) if os.path.isfile(os.path.join(folder, name)) else None
        if sampling is not None:
            return sampling
    return None


class MetricUnavailableError(RuntimeError):
    """A model or metric's weights are neither local nor cached and cannot be downloaded here."""


def load_pipeline(pipe_or_path, base_model: str | None = None):
    """A pipeline object from a pipeline, a local folder, a saved student folder or a Hub id.

    A LoRA student folder (no ``model_index.json``) is loaded onto ``base_model`` (default: the ``base_model`` its
    config records): a DMD2 one (``student_config.json``) with the DMD2 pipeline, a flow-map one
    (``flow_map_config.json``) with the flow-map pipeline of its architecture. A Hub id is loaded with
    ``DiffusionPipeline.from_pretrained``; when it is not cached and cannot be downloaded this raises
    :class:`MetricUnavailableError` with a one-line explanation.
    """
    if not isinstance(pipe_or_path, (str, os.PathLike)):
        return pipe_or_path
    from diffusers import DiffusionPipeline

    path = os.fspath(pipe_or_path)
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if os.path.isfile(index):
            flow_map_index = _flow_map_pipeline_index(index)
            if flow_map_index is not None:  # our class, which diffusers cannot resolve by name
                from diffusers_distill.pipelines import pipeline_flow_map

                cls = getattr(pipeline_flow_map, flow_map_index["_class_name"])
                return cls.from_pretrained(path, local_files_only=True)
            return DiffusionPipeline.from_pretrained(path, local_files_only=True)
        if os.path.isfile(os.path.join(path, "student_config.json")):
            from .export import StudentConfig

            config = StudentConfig.load(path)
            base = base_model or config.base_model
            if base is None:
                raise ValueError(f"the LoRA student in {path!r} records no base_model; pass base_model")
            from diffusers_distill.pipelines.pipeline_dmd2 import (
                DMD2StableDiffusionPipeline,
                DMD2StableDiffusionXLPipeline,
            )

            cls = DMD2StableDiffusionXLPipeline if config.arch == "sdxl" else DMD2StableDiffusionPipeline
            return _load_lora_student(cls, base, path)
        if os.path.isfile(os.path.join(path, "flow_map_config.json")):
            from diffusers_distill.pipelines.pipeline_flow_map import (
                FlowMapStableDiffusionPipeline,
                FlowMapStableDiffusionXLPipeline,
            )

            with open(os.path.join(path, "flow_map_config.json"), encoding="utf-8") as f:
                config = json.load(f)
            base = base_model or config.get("base_model")
            if base is None:
                raise ValueError(f"the LoRA flow-map student in {path!r} records no base_model; pass base_model")
            sdxl = config.get("arch") == "sdxl"
            cls = FlowMapStableDiffusionXLPipeline if sdxl else FlowMapStableDiffusionPipeline
            return _load_lora_student(cls, base, path)
        raise ValueError(f"pipeline path {path!r} is not a diffusers pipeline folder (no model_index.json)")
    if not _looks_like_hub_id(path):
        raise ValueError(f"pipeline path {path!r} is not a diffusers pipeline folder (no model_index.json)")
    try:
        return DiffusionPipeline.from_pretrained(path)
    except (OSError, ValueError) as error:  # huggingface_hub's offline / not-found errors are OSErrors
        raise MetricUnavailableError(
            f"cannot load pipeline {path!r}: it is not a local folder and is not in the Hugging Face cache, and it "
            f"could not be downloaded ({type(error).__name__}); download it first, e.g. `hf download {path}`"
        ) from error


def _looks_like_hub_id(value: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", value) is not None


def _load_lora_student(cls, base: str, student_dir: str):
    kwargs = {"local_files_only": True} if os.path.isdir(base) else {}
    return cls.from_pretrained(base, student=student_dir, **kwargs)


def _resolve_sampling(pipe, scheduler, steps, guidance, timesteps, default_guidance):
    """Scheduler choice and sampling settings: a student's recorded settings fill whatever was not given."""
    student = read_student_sampling(pipe)
    if scheduler == "auto":
        scheduler = "keep" if student is not None else "ddim"
    if scheduler is None:
        scheduler = "keep"
    if scheduler != "keep" and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be 'keep', 'auto' or one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    if student is not None:
        steps = student.steps if steps is None else steps
        guidance = student.guidance if guidance is None else guidance
        if scheduler == "keep" and timesteps is None and steps == student.steps:
            timesteps = student.timesteps
    steps = 25 if steps is None else steps
    guidance = default_guidance if guidance is None else guidance
    if timesteps is not None:
        import inspect

        timesteps = [int(t) for t in timesteps]
        if len(timesteps) != steps:
            raise ValueError(f"timesteps must have steps={steps} entries, got {timesteps}")
        if scheduler == "keep" and "timesteps" not in inspect.signature(pipe.scheduler.set_timesteps).parameters:
            raise ValueError(
                f"timesteps: the pipeline's {type(pipe.scheduler).__name__} does not take custom "
                f"timesteps; pass scheduler='ddim' (or another key) or no timesteps"
            )
    return student, scheduler, steps, guidance, timesteps


def evaluate_pipeline(
    pipe_or_path,
    scheduler: str | None = "auto",
    steps: int | None = None,
    guidance: float | None = None,
    n_per_digit: int = 10,
    seed: int = 0,
    reference=None,
    grid_path: str | None = None,
    scheduler_kwargs: dict | None = None,
    timesteps=None,
    base_model: str | None = None,
) -> dict:
    """Generate ``n_per_digit`` images per digit and measure them.

    Args:
        pipe_or_path: a Stable Diffusion (1.5/XL) pipeline, a local pipeline folder or a saved student folder.
        scheduler: a key of :data:`SCHEDULERS` (built from the pipeline's scheduler config, trailing spacing),
            ``"keep"`` (or ``None``) to sample with the pipeline's own scheduler, or ``"auto"``: ``"keep"`` for a
            distilled student (:func:`read_student_sampling` finds its config), ``"ddim"`` otherwise.
        steps, guidance: sampling steps and classifier-free guidance scale. ``None``: a student's recorded
            settings, else 25 steps and the bundled teacher's recommended
            guidance (:data:`diffusers_distill.digits.RECOMMENDED_GUIDANCE`, SDXL's for SDXL pipelines).
        timesteps: explicit timesteps for the pipeline call; a kept student's recorded timesteps by default.
        reference: optional images ``(N, 3, H, W)`` in ``[-1, 1]`` made from the same seed (e.g. by the teacher);
            adds ``mse`` and ``psnr`` against them, and ``fd_to_reference``, the digits-FD to them
            (:func:`digits_fd` with ``reference``).
        grid_path: optional PNG path for a sample grid: one column per digit, one row per sample index.

    Returns:
        ``{"prompt_accuracy", "digits_fd", "real_data_fd", "scheduler", "steps", "guidance", "timesteps",
        "n_images", "seed", "seconds", ...}``; the images are under key ``"images"`` (a tensor, dropped before JSON
        writing). Identical arguments give identical metrics (all noise is seeded), except ``seconds``.
    """
    import time

    from .digits import RECOMMENDED_GUIDANCE

    if scheduler not in (None, "auto", "keep") and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be 'keep', 'auto' or one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    _check_generation_args(1 if steps is None else steps, 0.0 if guidance is None else guidance, n_per_digit)
    pipe = load_pipeline(pipe_or_path, base_model)
    arch = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
    student, scheduler, steps, guidance, timesteps = _resolve_sampling(
        pipe, scheduler, steps, guidance, timesteps, RECOMMENDED_GUIDANCE[arch]
    )
    _check_generation_args(steps, guidance, n_per_digit)
    pipe.set_progress_bar_config(disable=True)
    if scheduler != "keep":
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config, **(scheduler_kwargs or {}))
    start = time.perf_counter()
    images, labels = generate_digits(pipe, steps, guidance, n_per_digit, seed, timesteps=timesteps)
    seconds = time.perf_counter() - start
    metrics = {
        "scheduler": scheduler if scheduler != "keep" else type(pipe.scheduler).__name__,
        "timestep_spacing": pipe.scheduler.config.get("timestep_spacing") if timesteps is None else "explicit",
        "steps": steps,
        "timesteps": timesteps,
        "guidance": guidance,
        "student": None if student is None else student.method,
        "n_images": len(labels),
        "seed": seed,
        "prompt_accuracy": prompt_accuracy(images, labels),
        "digits_fd": digits_fd(images),
        "real_data_fd": real_data_fd(n_per_digit, seed) if n_per_digit >= 2 else None,
        "seconds": round(seconds, 3),
    }
    if reference is not None:
        metrics["mse"] = image_mse(images, reference)
        metrics["psnr"] = image_psnr(images, reference)
        metrics["fd_to_reference"] = digits_fd(images, reference=reference)
    if grid_path is not None:
        # column = digit, row = sample index
        order = torch.arange(len(labels)).reshape(10, n_per_digit).T.flatten()
        save_image_grid(images[order], grid_path, nrow=10)
    metrics["images"] = images
    return metrics


# ------------------------------------------------------------------------------------------------ real models
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics CLIPScore's default


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with ``#`` are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts file {path!r} contains no prompts")
    return prompts


def load_reference_images(folder: str, size: int | None = None) -> list[torch.Tensor]:
    """Real images of ``folder`` (sorted; png/jpg/jpeg/webp/bmp) as uint8 ``(3, H, W)`` tensors, RGB.

    ``size`` resizes each image (bicubic, PIL) to ``size x size``; None keeps the original size (the FID feature
    network resizes to its own input size).
    """
    from PIL import Image

    if not os.path.isdir(folder):
        raise ValueError(f"--reference_dir {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if len(names) < 2:
        raise ValueError(f"--reference_dir {folder!r} must contain at least 2 images ({'/'.join(IMAGE_EXTENSIONS)})")
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            image = image.convert("RGB")
            if size is not None:
                image = image.resize((size, size), Image.BICUBIC)
            images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> uint8 in ``[0, 255]`` (round to nearest), as saved to PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _features_by_size(feature_fn, images) -> torch.Tensor:
    """``feature_fn`` on a list/batch of uint8 images, batching images of equal size (reference sets vary)."""
    if isinstance(images, torch.Tensor):
        images = list(images)
    out: list = [None] * len(images)
    groups: dict = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    with torch.no_grad():
        for indices in groups.values():
            for k in range(0, len(indices), 32):
                chunk = indices[k : k + 32]
                features = feature_fn(torch.stack([images[i] for i in chunk])).double().reshape(len(chunk), -1)
                for i, f in zip(chunk, features):
                    out[i] = f
    return torch.stack(out)


def fid_from_features(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` (FID when they are Inception
    pool3 features)."""
    if len(generated) < 2 or len(real) < 2:
        raise ValueError("FID needs at least 2 generated and 2 real images")
    return frechet_distance(*_feature_stats(generated), *_feature_stats(real))


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """CLIP score ``mean_i 100 * max(cos(E_I_i, E_T_i), 0)`` (Hessel et al. 2021, w = 100, as torchmetrics)."""
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


def inception_fid_features(weights_path: str | None = None):
    """Standard FID features: torch-fidelity's Inception-v3 (TF-FID weights), 2048-d pool3, on uint8 images.

    torch-fidelity is the ``eval`` extra. Its weights file comes from torch-fidelity's GitHub release into the
    torch hub cache; ``weights_path`` points at a local copy instead. Raises :class:`MetricUnavailableError` when
    the package or the weights are missing and the weights cannot be downloaded.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            URL_INCEPTION_V3,
            FeatureExtractorInceptionV3,
        )
    except ImportError as error:
        raise MetricUnavailableError("FID needs torch-fidelity: pip install 'diffusers-distill[eval]'") from error
    if weights_path is None:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", URL_INCEPTION_V3.rsplit("/", 1)[-1])
        if not os.path.isfile(cached) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise MetricUnavailableError(
                f"FID needs the Inception weights {cached!r}, which are not cached and "
                "cannot be downloaded offline; pass their local path (--fid_weights)"
            )
    elif not os.path.isfile(weights_path):
        raise MetricUnavailableError(f"FID Inception weights {weights_path!r} do not exist")
    else:
        # torch-fidelity unpickles a given file without restriction; accept only a plain tensor state dict
        torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path)
    except (OSError, RuntimeError) as error:  # urllib errors are OSErrors
        raise MetricUnavailableError(
            f"FID Inception weights could not be downloaded ({error}); pass their local path (--fid_weights)"
        ) from error
    return lambda images: net(images)[0]


class CLIPEmbedder:
    """CLIP image and text embeddings for the CLIP score, from a transformers ``CLIPModel`` (local or cached).

    ``model`` is a Hub id or folder (default ``openai/clip-vit-large-patch14``, torchmetrics' choice). Loading
    uses only local files; raises :class:`MetricUnavailableError` when they are not there.
    """

    def __init__(self, model: str = CLIP_SCORE_MODEL):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
        except OSError as error:
            raise MetricUnavailableError(
                f"CLIP score needs the CLIP model {model!r}, which is not local or cached "
                f"(no network for weights here); download it first or pass --clip_model "
                f"PATH"
            ) from error

    def __call__(self, images: torch.Tensor, prompts: list[str]):
        """uint8 ``(N, 3, H, W)`` images and ``N`` prompts -> ``(image_embeds, text_embeds)``."""
        with torch.no_grad():
            inputs = self.processor(
                text=prompts,
                images=list(images.permute(0, 2, 3, 1).numpy()),
                return_tensors="pt",
                padding=True,
                truncation=True,
            )
            image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text_embeds = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            )
        return image_embeds, text_embeds


def _check_prompt_args(prompts, scheduler, steps, guidance, n_per_prompt, batch_size) -> None:
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if scheduler not in (None, "auto", "keep") and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be 'keep', 'auto' or one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    for name, value in (("n_per_prompt", n_per_prompt), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    _check_generation_args(1 if steps is None else steps, 0.0 if guidance is None else guidance, 1)


def _batched_clip_score(clip_embedder, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> float:
    """CLIP score of uint8 ``images`` against their ``prompts``, embedding ``batch_size`` pairs at a time."""
    image_embeds, text_embeds = [], []
    for i in range(0, len(prompts), batch_size):
        e_img, e_txt = clip_embedder(images[i : i + batch_size], prompts[i : i + batch_size])
        image_embeds.append(e_img)
        text_embeds.append(e_txt)
    return clip_score_from_embeddings(torch.cat(image_embeds), torch.cat(text_embeds))


def _sample_in_batches(pipe, prompts, steps, guidance, seed, timesteps, batch_size, **size_kwargs) -> torch.Tensor:
    """Images for ``prompts``, ``batch_size`` prompts per pipeline call, batch ``b`` seeded with ``seed + b``."""
    batches = range(0, len(prompts), batch_size)
    return torch.cat(
        [
            _sample(pipe, prompts[i : i + batch_size], steps, guidance, None, seed + b, timesteps, **size_kwargs).cpu()
            for b, i in enumerate(batches)
        ]
    )


def evaluate_prompts(
    pipe_or_path,
    prompts: list[str],
    *,
    reference_dir: str | None = None,
    clip: bool = True,
    scheduler: str | None = "auto",
    steps: int | None = None,
    guidance: float | None = None,
    n_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    grid_path: str | None = None,
    fid_features=None,
    clip_embedder=None,
    timesteps=None,
    base_model: str | None = None,
    clip_model: str = CLIP_SCORE_MODEL,
    fid_weights: str | None = None,
) -> dict:
    """FID (against ``reference_dir``) and CLIP score of any diffusers text-to-image pipeline on ``prompts``.

    Generates ``n_per_prompt`` images per prompt, in batches of ``batch_size`` prompts, each batch from a generator
    seeded with ``seed + batch index`` (identical runs give identical images). The metric networks are built
    *before* any image is generated, so missing weights fail fast with :class:`MetricUnavailableError`.

    Args:
        fid_features: callable uint8 ``(N, 3, H, W)`` -> ``(N, D)`` features; default :func:`inception_fid_features`.
        clip_embedder: callable ``(uint8 images, prompts) -> (image_embeds, text_embeds)``; default
            :class:`CLIPEmbedder` on ``clip_model``. ``clip=False`` skips the CLIP score.
        fid_weights: local path of the Inception weights for the default FID features.
        scheduler, steps, guidance, timesteps: as in :func:`evaluate_pipeline` (``None`` guidance: the student's, or
            the pipeline's default of 7.5 for other models).
    """
    import time

    _check_prompt_args(prompts, scheduler, steps, guidance, n_per_prompt, batch_size)
    real = load_reference_images(reference_dir) if reference_dir is not None else None
    if real is not None and fid_features is None:
        fid_features = inception_fid_features(fid_weights)
    if clip and clip_embedder is None:
        clip_embedder = CLIPEmbedder(clip_model)
    pipe = load_pipeline(pipe_or_path, base_model)
    student, scheduler, steps, guidance, timesteps = _resolve_sampling(pipe, scheduler, steps, guidance, timesteps, 7.5)
    _check_generation_args(steps, guidance, 1)
    pipe.set_progress_bar_config(disable=True)
    if scheduler != "keep":
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
    size_kwargs = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    start = time.perf_counter()
    images = _sample_in_batches(pipe, all_prompts, steps, guidance, seed, timesteps, batch_size, **size_kwargs)
    seconds = time.perf_counter() - start
    generated = to_uint8(images)
    metrics = {
        "scheduler": scheduler if scheduler != "keep" else type(pipe.scheduler).__name__,
        "steps": steps,
        "timesteps": timesteps,
        "guidance": guidance,
        "student": None if student is None else student.method,
        "n_prompts": len(prompts),
        "n_images": len(all_prompts),
        "seed": seed,
        "seconds": round(seconds, 3),
    }
    if real is not None:
        metrics["fid"] = fid_from_features(
            _features_by_size(fid_features, generated), _features_by_size(fid_features, real)
        )
        metrics["n_reference_images"] = len(real)
    if clip:
        metrics["clip_score"] = _batched_clip_score(clip_embedder, generated, all_prompts)
    if grid_path is not None:
        save_image_grid(images, grid_path, nrow=min(len(all_prompts), 8))
    metrics["images"] = images
    return metrics
