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
from typing import Any

from .constants import ARCHITECTURES, LAYOUTS, NUM_TRAIN_TIMESTEPS, PREDICTION_TYPES, validate_timesteps
from .fileio import atomic_directory, atomic_write_json

STUDENT_CONFIG_NAME = "student_config.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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
        for name, value, allowed in (
            ("arch", self.arch, ARCHITECTURES),
            ("student_type", self.student_type, LAYOUTS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {self.num_inference_steps!r}")
        if len(self.timesteps) != self.num_inference_steps:
            raise ValueError(
                f"timesteps must have num_inference_steps={self.num_inference_steps} entries, got {self.timesteps}"
            )
        self.timesteps = validate_timesteps(self.timesteps, "timesteps")
        validate_timesteps([self.conditioning_timestep], "conditioning_timestep")
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
        return atomic_write_json(os.path.join(directory, STUDENT_CONFIG_NAME), self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> StudentConfig:
        with open(os.path.join(directory, STUDENT_CONFIG_NAME), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def lora_adapter_metadata(unet, adapter_name: str) -> dict[str, Any]:
    """The adapter's peft ``LoraConfig`` as a JSON-able dict (carries rank, alpha, target modules)."""
    config = unet.peft_config[adapter_name].to_dict()
    # sets are not JSON-serialisable; peft stores target_modules as a set
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora_adapter(folder, unet, adapter_name: str, pipeline_class) -> None:
    """THE LoRA save path (training checkpoints and the exported student): the adapter ``adapter_name`` of ``unet``
    as ``pytorch_lora_weights.safetensors`` in diffusers' key format, with its ``LoraConfig`` in the metadata (without
    it a LoRA with ``alpha != rank`` reloads with the wrong scale). ``pipeline_class.save_lora_weights`` picks the
    SD 1.5 / SDXL layout."""
    from peft.utils import get_peft_model_state_dict

    # peft's own key names (``lora_A``/``lora_B``) for every module, which diffusers' loaders read as they are.
    # Not ``convert_state_dict_to_diffusers``: it renames only the attention projections (``lora.down``/``lora.up``),
    # and a file mixing both formats is detected as peft, so ``load_lora_weights`` drops every attention LoRA.
    pipeline_class.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=adapter_name),
        unet_lora_adapter_metadata=lora_adapter_metadata(unet, adapter_name),
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )


def load_lora_adapter(folder, unet, adapter_name: str) -> None:
    """Load a file written by :func:`save_lora_adapter` into the existing adapter ``adapter_name`` of ``unet``."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, LORA_WEIGHT_NAME))
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected LoRA keys in {folder}: {result.unexpected_keys[:5]}")


def save_lora_student(output_dir, unet, adapter_name: str, pipeline_class, student_config: StudentConfig) -> str:
    """Save the LoRA student ``adapter_name`` of ``unet`` so ``pipe.load_lora_weights(output_dir)`` reproduces it.

    Writes :func:`save_lora_adapter`'s file and ``student_config.json``. ``pipeline_class`` is the base pipeline
    class (e.g. ``StableDiffusionXLPipeline``). Returns ``output_dir``.
    """
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
    with atomic_directory(output_dir) as staging:
        save_lora_adapter(staging, unet, adapter_name, pipeline_class)
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
    with atomic_directory(output_dir) as staging:
        student_pipeline.save_pretrained(staging, safe_serialization=True)
        student_config.save(staging)
    return os.fspath(output_dir)
