"""Export DMD2 students in formats that plain diffusers can load.

Two layouts are written, both alongside a ``student_config.json`` that records how the student must be sampled
(DMD2, Yin et al. 2024, Sec. 4.4: the few-step generator is trained on a *fixed* timestep list, e.g.
``[999, 749, 499, 249]`` for 4 steps, and without classifier-free guidance):

* LoRA student (:func:`save_lora_student`): ``pytorch_lora_weights.safetensors`` in the diffusers LoRA format, with the
  peft ``LoraConfig`` stored in the safetensors metadata so rank *and* alpha survive ``load_lora_weights``.
* Full student (:func:`save_full_student`): a complete pipeline folder whose ``model_index.json`` names only native
  diffusers classes, with an ``LCMScheduler`` configured so that its *default* schedule is the training schedule.
  The student samples like a consistency model (predict x0, re-noise with fresh noise to the next timestep), which
  is exactly what ``LCMScheduler.step`` does.

Every artefact is first written to a temporary folder next to its destination and then moved in with ``os.replace``,
so an interrupted export never leaves half-written files.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import tempfile
from typing import Any

STUDENT_CONFIG_NAME = "student_config.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ARCH_CHOICES = ("sd15", "sdxl")
STUDENT_TYPE_CHOICES = ("lora", "full")
PREDICTION_TYPE_CHOICES = ("epsilon", "v_prediction", "sample")
NUM_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass
class StudentConfig:
    """How a distilled student was trained and therefore how it must be sampled.

    Args:
        arch: ``"sd15"`` or ``"sdxl"`` (selects the pipeline class).
        student_type: ``"lora"`` (adapter on ``base_model``) or ``"full"`` (complete UNet).
        num_inference_steps: number of generator steps used in training.
        timesteps: the generator's fixed timesteps, strictly decreasing, in ``[0, 999]``, one per step.
        guidance_scale: CFG scale to sample with; DMD2 bakes guidance into the student, so 0.0 (no unconditional pass).
        base_model: Hub id or path of the teacher / base pipeline.
        method: distillation method tag (``"dmd2"``).
        conditioning_timestep: the timestep of a 1-step generator (DMD2 uses 999; 399 for its 1-step SDXL model).
        prediction_type: output parameterisation of the UNet.
    """

    arch: str
    student_type: str
    num_inference_steps: int
    timesteps: list[int]
    guidance_scale: float = 0.0
    base_model: str | None = None
    method: str = "dmd2"
    conditioning_timestep: int = 999
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.arch not in ARCH_CHOICES:
            raise ValueError(f"arch must be one of {ARCH_CHOICES}, got {self.arch!r}")
        if self.student_type not in STUDENT_TYPE_CHOICES:
            raise ValueError(f"student_type must be one of {STUDENT_TYPE_CHOICES}, got {self.student_type!r}")
        if self.prediction_type not in PREDICTION_TYPE_CHOICES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPE_CHOICES}, got {self.prediction_type!r}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {self.num_inference_steps!r}")
        self.timesteps = [int(t) for t in self.timesteps]
        if len(self.timesteps) != self.num_inference_steps:
            raise ValueError(
                f"timesteps must have num_inference_steps={self.num_inference_steps} entries, got {self.timesteps}"
            )
        if any(not 0 <= t < NUM_TRAIN_TIMESTEPS for t in self.timesteps):
            raise ValueError(f"timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {self.timesteps}")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {self.timesteps}")
        if not 0 <= self.conditioning_timestep < NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"conditioning_timestep must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {self.conditioning_timestep}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        """Build from a dict; unknown keys (written by a newer version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``student_config.json`` into ``directory`` atomically; returns the file path."""
        path = os.path.join(directory, STUDENT_CONFIG_NAME)
        _atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> StudentConfig:
        with open(os.path.join(directory, STUDENT_CONFIG_NAME), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _move_entries_into(staging: str, output_dir: str) -> None:
    """Move every top-level entry of ``staging`` into ``output_dir``, replacing entries of the same name.

    Files are moved with one ``os.replace``; an existing folder is first renamed aside, then the new one renamed in,
    then the old one deleted, so a reader never sees a half-written folder. Other entries of ``output_dir``
    (training checkpoints, logs) are left alone.
    """
    for name in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        if os.path.isdir(source) and os.path.isdir(target):
            old = tempfile.mkdtemp(dir=output_dir, prefix=f".old-{name}-")
            os.rmdir(old)
            os.replace(target, old)
            os.replace(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)


class _Staging:
    """Context manager: a temporary folder inside ``output_dir`` that is moved into place only on success."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = os.fspath(output_dir)

    def __enter__(self) -> str:
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = tempfile.mkdtemp(dir=self.output_dir, prefix=".tmp-export-")
        return self.path

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                _move_entries_into(self.path, self.output_dir)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def lora_adapter_metadata(unet, adapter_name: str) -> dict[str, Any]:
    """The adapter's peft ``LoraConfig`` as a JSON-able dict (carries rank, alpha, target modules)."""
    config = unet.peft_config[adapter_name].to_dict()
    # sets are not JSON-serialisable; peft stores target_modules as a set
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora_student(output_dir, unet, adapter_name: str, pipeline_class, student_config: StudentConfig) -> str:
    """Save the LoRA student ``adapter_name`` of ``unet`` so ``pipe.load_lora_weights(output_dir)`` reproduces it.

    Writes ``pytorch_lora_weights.safetensors`` (diffusers key format, ``unet.*.lora.down/up``) with the adapter's
    ``LoraConfig`` in the metadata (without it a LoRA with ``alpha != rank`` reloads with the wrong scale), and
    ``student_config.json``. ``pipeline_class`` is the base pipeline class (e.g. ``StableDiffusionXLPipeline``),
    whose ``save_lora_weights`` picks the right format. Returns ``output_dir``.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if student_config.student_type != "lora":
        raise ValueError(
            f"student_config.student_type must be 'lora' for save_lora_student, got {student_config.student_type!r}"
        )
    if adapter_name not in getattr(unet, "peft_config", {}):
        adapters = sorted(getattr(unet, "peft_config", {}))
        raise ValueError(f"adapter_name must be one of {adapters}, got {adapter_name!r}")
    if not hasattr(pipeline_class, "save_lora_weights"):
        raise ValueError(
            f"pipeline_class must have save_lora_weights (a diffusers LoRA pipeline), got {pipeline_class!r}"
        )

    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    lora_layers = convert_state_dict_to_diffusers(state_dict)
    with _Staging(output_dir) as staging:
        pipeline_class.save_lora_weights(
            staging,
            unet_lora_layers=lora_layers,
            unet_lora_adapter_metadata=lora_adapter_metadata(unet, adapter_name),
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        student_config.save(staging)
    return os.fspath(output_dir)


def lcm_original_steps_for(timesteps: list[int], num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int | None:
    """``original_inference_steps`` for which ``LCMScheduler`` (default call, ``len(timesteps)`` steps) yields
    exactly ``timesteps``, or None if no value does.

    LCMScheduler's schedule (Luo et al. 2023, skipping-step DDIM grid): ``c = T // K``, grid ``{k c - 1}_{k=1..K}``
    reversed and sub-sampled every ``K // N`` entries, truncated to N. DMD2's ``[999, 749, 499, 249]`` is K = 4.
    """
    n = len(timesteps)
    for original in range(n, num_train_timesteps + 1):
        c = num_train_timesteps // original
        grid = [k * c - 1 for k in range(original, 0, -1)]
        if grid[:: original // n][:n] == list(timesteps):
            return original
    return None


def student_scheduler(scheduler_config, student_config: StudentConfig):
    """A native ``LCMScheduler`` built from the teacher's noise schedule whose default schedule is the student's.

    If no ``original_inference_steps`` reproduces ``student_config.timesteps`` (e.g. DMD2's 1-step SDXL at t=399),
    the scheduler keeps the teacher's default and callers must pass ``timesteps=`` (our pipelines do it automatically;
    the model card shows it).
    """
    from diffusers import LCMScheduler

    overrides: dict[str, Any] = {"prediction_type": student_config.prediction_type}
    original = lcm_original_steps_for(student_config.timesteps)
    if original is not None:
        overrides["original_inference_steps"] = original
    return LCMScheduler.from_config(dict(scheduler_config), **overrides)


def save_full_student(output_dir, teacher_pipeline, student_unet, student_config: StudentConfig) -> str:
    """Save a full student as a native diffusers pipeline folder (teacher's VAE/text encoders + student UNet).

    ``model_index.json`` names the teacher's native class (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``)
    and an ``LCMScheduler`` set up by :func:`student_scheduler`, so ``DiffusionPipeline.from_pretrained(output_dir)``
    works without this package and, with no arguments, samples on the training timesteps. Returns ``output_dir``.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if student_config.student_type != "full":
        raise ValueError(
            f"student_config.student_type must be 'full' for save_full_student, got {student_config.student_type!r}"
        )
    native = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}[student_config.arch]
    if not isinstance(teacher_pipeline, native):
        raise ValueError(
            f"teacher_pipeline must be a {native.__name__} for arch={student_config.arch!r}, "
            f"got {type(teacher_pipeline).__name__}"
        )
    components = dict(teacher_pipeline.components)
    components["unet"] = student_unet
    components["scheduler"] = student_scheduler(teacher_pipeline.scheduler.config, student_config)
    init_params = inspect.signature(native.__init__).parameters
    extra_config = {  # non-module init args such as requires_safety_checker / force_zeros_for_empty_prompt
        k: v for k, v in teacher_pipeline.config.items() if k in init_params and k not in components
    }
    student_pipeline = native(**components, **extra_config)  # always the native class, even for a subclass teacher
    with _Staging(output_dir) as staging:
        student_pipeline.save_pretrained(staging, safe_serialization=True)
        student_config.save(staging)
    return os.fspath(output_dir)
