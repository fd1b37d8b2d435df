"""Stable Diffusion (1.5 / XL) pipelines for DMD2 few-step students.

A DMD2 generator (Yin et al. 2024) is trained on a fixed list of timesteps and with guidance baked in, so it must be
sampled with exactly those timesteps and ``guidance_scale=0`` (no unconditional UNet pass). The most common user
complaint about distilled students is sampling them with the base model's defaults (50 steps, CFG 7.5). These
pipelines read ``student_config.json`` (written by :mod:`diffusers_distill.export`) and make the student's settings the
defaults of ``__call__``; any argument passed explicitly still wins.

Loading::

    pipe = DMD2StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                                         student="user/dmd2-sdxl-4step-lora")  # LoRA on a base
    pipe = DMD2StableDiffusionXLPipeline.from_pretrained("user/dmd2-sdxl-4step")  # full student folder
    image = pipe("a photo of a cat").images[0]   # 4 steps, [999, 749, 499, 249], guidance 0

``save_pretrained`` writes the *native* class name into ``model_index.json``, so saved folders also load with plain
``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import os

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import logging

from diffusers_distill.export import STUDENT_CONFIG_NAME, StudentConfig, student_scheduler
from diffusers_distill.fileio import atomic_write_json

from .execution_device import SinglePassDeviceMixin

logger = logging.get_logger(__name__)

DEFAULT_ADAPTER_NAME = "dmd2"
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "proxies", "force_download")


def resolve_student_config(path_or_repo_id, **hub_kwargs) -> StudentConfig | None:
    """Read ``student_config.json`` from a local folder or a Hub repo; None if the location has none."""
    path_or_repo_id = os.fspath(path_or_repo_id)
    if os.path.isdir(path_or_repo_id):
        path = os.path.join(path_or_repo_id, STUDENT_CONFIG_NAME)
        if not os.path.isfile(path):
            return None
    else:
        # the stock pipeline download only fetches component folders, not root files such as this one
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(path_or_repo_id, STUDENT_CONFIG_NAME, **hub_kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    with open(path, encoding="utf-8") as f:
        return StudentConfig.from_dict(json.load(f))


class DMD2PipelineMixin(SinglePassDeviceMixin):
    """Student-aware defaults, student loading and native saving, shared by the SD 1.5 and SDXL pipelines (and
    diffusers' device lookups in one pass: a 1-step call is mostly fixed Python cost)."""

    _native_class: type
    _arch: str
    student_config: StudentConfig | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        student=None,
        student_adapter_name: str = DEFAULT_ADAPTER_NAME,
        fuse_student: bool = False,
        **kwargs,
    ):
        """Load a pipeline; ``student=`` (folder or Hub id of a saved student) is added with :meth:`load_student`.

        Without ``student=``, a ``student_config.json`` in ``pretrained_model_name_or_path`` (a full student folder)
        sets the sampling defaults.
        """
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if student is not None:
            pipe.load_student(student, adapter_name=student_adapter_name, fuse=fuse_student, **hub_kwargs)
        else:
            config = resolve_student_config(pretrained_model_name_or_path, **hub_kwargs)
            if config is not None:
                pipe._set_student_config(config)
        return pipe

    def _check_arch(self, config: StudentConfig) -> None:
        if config.arch != self._arch:
            raise ValueError(
                f"student arch must be {self._arch!r} for {type(self).__name__}, got {config.arch!r} "
                f"(use the {'SDXL' if config.arch == 'sdxl' else 'SD 1.5'} pipeline)"
            )

    def _set_student_config(self, config: StudentConfig) -> None:
        self._check_arch(config)
        self.student_config = config
        self.scheduler = student_scheduler(self.scheduler.config, config)

    def load_student(
        self,
        student,
        adapter_name: str = DEFAULT_ADAPTER_NAME,
        fuse: bool = False,
        lora_scale: float = 1.0,
        **hub_kwargs,
    ):
        """Load a saved student (local folder or Hub id) into this (base) pipeline.

        LoRA students are loaded with ``load_lora_weights(adapter_name=...)`` (optionally fused at ``lora_scale``);
        full students replace the UNet. The scheduler is switched to the student's ``LCMScheduler`` and the
        ``__call__`` defaults to its steps/timesteps/guidance.
        """
        config = resolve_student_config(student, **hub_kwargs)
        if config is None:
            raise ValueError(f"student must be a folder or Hub repo containing {STUDENT_CONFIG_NAME}, got {student!r}")
        self._check_arch(config)  # before touching any weights
        if config.student_type == "lora":
            self.load_lora_weights(student, adapter_name=adapter_name, **hub_kwargs)
            if fuse:
                self.fuse_lora(lora_scale=lora_scale, adapter_names=[adapter_name])
            elif lora_scale != 1.0:
                self.set_adapters([adapter_name], adapter_weights=[lora_scale])
        else:
            unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet", **hub_kwargs)
            self.register_modules(unet=unet.to(self.device, self.unet.dtype))
        self._set_student_config(config)
        return self

    def student_call_defaults(self, num_inference_steps=None, timesteps=None, guidance_scale=None) -> dict:
        """The ``__call__`` arguments after filling unset ones from the student config.

        The training ``timesteps`` are used unless the caller asks for another step count or passes its own.
        """
        config = self.student_config
        if config is not None:
            if timesteps is None and num_inference_steps in (None, config.num_inference_steps):
                timesteps = list(config.timesteps)
            if guidance_scale is None:
                guidance_scale = config.guidance_scale
            if num_inference_steps is None and timesteps is not None:
                num_inference_steps = len(timesteps)
        values = {"num_inference_steps": num_inference_steps, "timesteps": timesteps, "guidance_scale": guidance_scale}
        return {name: value for name, value in values.items() if value is not None}

    def __call__(self, prompt=None, *, num_inference_steps=None, timesteps=None, guidance_scale=None, **kwargs):
        """Same as the parent pipeline's ``__call__``; unset steps/timesteps/guidance come from the student config."""
        call = self.student_call_defaults(num_inference_steps, timesteps, guidance_scale)
        return super().__call__(prompt, **call, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as the native diffusers pipeline (loads without this package) plus ``student_config.json``.

        Upload with :func:`diffusers_distill.hub.push_student_to_hub` afterwards (it also writes the model card).
        """
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "push_to_hub=True is not supported (it would upload before model_index.json is made native); "
                f"call diffusers_distill.hub.push_student_to_hub({os.fspath(save_directory)!r}, repo_id) after saving"
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = self._native_class.__name__
        atomic_write_json(index_path, index)
        if self.student_config is not None:
            self.student_config.save(save_directory)


class DMD2StableDiffusionPipeline(DMD2PipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` that samples a DMD2 SD 1.5 student with its training schedule by default."""

    _native_class = StableDiffusionPipeline
    _arch = "sd15"


class DMD2StableDiffusionXLPipeline(DMD2PipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` that samples a DMD2 SDXL student with its training schedule by default."""

    _native_class = StableDiffusionXLPipeline
    _arch = "sdxl"
