"""Stable Diffusion (1.5 / XL) pipelines for two-timed flow-map students (docs/flow_maps.md).

A flow-map student (:func:`diffusers_distill.flow_map.build_flow_map_student`) is a ``UNet2DConditionModel`` with
``time_cond_proj_dim``: the jump length s - t enters through ``timestep_cond``. The stock SD pipelines read that
pathway as LCM's guidance embedding (one fixed vector, CFG switched off), so these subclasses replace the denoising
loop: each step asks the :class:`~diffusers_distill.TwoTimedFlowMapScheduler` for its jump (s, t') and calls the
student with both times,

    unet(scheduler.scale_model_input(z, t), t, timestep_cond=jump_embedding(s - t'), ...)  ->  scheduler.step(...)

Defaults come from the saved folder: the step count from ``model_index.json`` (``default_num_inference_steps``), the
grid (``sigma_spacing``, ``shift``, ...) and ``gamma`` from ``scheduler/scheduler_config.json``. Guidance is distilled
into the student, so sampling makes one UNet call per step (no CFG).

    pipe = FlowMapStableDiffusionPipeline.from_teacher(teacher_pipe, merged_student, default_num_inference_steps=4)
    pipe.save_pretrained("sd15-flow-map")
    pipe = FlowMapStableDiffusionPipeline.from_pretrained("sd15-flow-map")
    image = pipe("a photo of a cat").images[0]                   # 4 steps
    image = pipe("a photo of a cat", num_inference_steps=1).images[0]
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from diffusers_distill.flow_map import (
    FLOW_MAP_CONFIG_NAME,
    FLOW_MAP_PATHWAY_NAME,
    JUMP_PATHWAY,
    build_flow_map_student,
    jump_embedding,
)
from diffusers_distill.schedulers import TwoTimedFlowMapScheduler

from .execution_device import SinglePassDeviceMixin

__all__ = ["FlowMapStableDiffusionPipeline", "FlowMapStableDiffusionXLPipeline"]


def _check_steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`default_num_inference_steps` must be an int >= 1, got {value!r}")
    return value


class FlowMapPipelineMixin(SinglePassDeviceMixin):
    """The flow-map denoising loop shared by the SD 1.5 and SDXL pipelines (diffusers' device lookups in one
    pass)."""

    @classmethod
    def from_teacher(cls, teacher_pipeline, student_unet, default_num_inference_steps: int = 4, **scheduler_kwargs):
        """A flow-map pipeline from the teacher's components, a (merged) student UNet and a
        ``TwoTimedFlowMapScheduler`` built from the teacher's noise schedule (``scheduler_kwargs`` override it:
        ``sigma_spacing``, ``shift``, ``gamma``, ...)."""
        components = {k: v for k, v in teacher_pipeline.components.items() if k in cls._component_names()}
        components["unet"] = student_unet
        components["scheduler"] = TwoTimedFlowMapScheduler.from_config(
            teacher_pipeline.scheduler.config, **scheduler_kwargs
        )
        return cls(**components, default_num_inference_steps=default_num_inference_steps)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, student=None, student_adapter_name="flow_map", **kwargs
    ):
        """Load a pipeline. With ``student=`` (a folder or Hub id written by
        :func:`diffusers_distill.flow_map.save_flow_map_lora_student`), ``pretrained_model_name_or_path`` is the
        *teacher* (e.g. ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``) and the LoRA student is loaded into it
        with :meth:`load_flow_map_student`."""
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if student is not None:
            pipe.load_flow_map_student(student, adapter_name=student_adapter_name, **hub_kwargs)
        return pipe

    def load_flow_map_student(self, student, adapter_name: str = "flow_map", **hub_kwargs):
        """Turn this teacher pipeline into the LoRA flow-map student saved in ``student``: the teacher UNet gains the
        second-time pathway (its saved weight), the adapter is loaded with ``load_lora_weights`` (as the DMD2 LoRA
        students are), and the scheduler and default step count come from ``flow_map_config.json``."""
        import json
        import os

        from safetensors.torch import load_file

        def fetch(name):
            if os.path.isdir(os.fspath(student)):
                path = os.path.join(os.fspath(student), name)
                if not os.path.isfile(path):
                    raise ValueError(
                        f"`student` must be a folder written by save_flow_map_lora_student; {path} is missing"
                    )
                return path
            from huggingface_hub import hf_hub_download

            return hf_hub_download(os.fspath(student), name, **hub_kwargs)

        with open(fetch(FLOW_MAP_CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        pathway = load_file(fetch(FLOW_MAP_PATHWAY_NAME))[f"{JUMP_PATHWAY}.weight"]
        dimension = int(config["time_cond_proj_dim"])
        current = self.unet.config.get("time_cond_proj_dim")
        if current is None:
            unet = build_flow_map_student(self.unet, "full", jump_embedding_dim=dimension).requires_grad_(False)
            self.register_modules(unet=unet)
        elif current != dimension:
            raise ValueError(f"the pipeline's UNet has time_cond_proj_dim={current}, the student needs {dimension}")
        with torch.no_grad():
            self.unet.time_embedding.cond_proj.weight.copy_(pathway)
        self.load_lora_weights(student, adapter_name=adapter_name, **hub_kwargs)
        self.scheduler = TwoTimedFlowMapScheduler.from_config(self.scheduler.config, **config["scheduler"])
        self.register_to_config(default_num_inference_steps=_check_steps(config["default_num_inference_steps"]))
        return self

    @classmethod
    def _component_names(cls):
        import inspect

        return set(inspect.signature(cls.__init__).parameters) - {"self", "default_num_inference_steps"}

    def _check_flow_map_components(self) -> None:
        if self.unet.config.get("time_cond_proj_dim") is None:
            raise ValueError(
                "`unet` must be a flow-map student with `time_cond_proj_dim` "
                "(diffusers_distill.flow_map.build_flow_map_student)"
            )
        if not isinstance(self.scheduler, TwoTimedFlowMapScheduler):
            raise ValueError(f"`scheduler` must be a TwoTimedFlowMapScheduler, got {type(self.scheduler).__name__}")

    def _unet_conditioning(self, prompt, device, num_images_per_prompt, prompt_embeds, height, width) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        gamma: float | None = None,
        num_images_per_prompt: int = 1,
        generator=None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **encode_kwargs,
    ):
        """Sample the student: ``num_inference_steps`` jumps (default: the saved ``default_num_inference_steps``)
        on the scheduler's grid, or a custom RF grid ``sigmas``; ``gamma`` overrides the saved re-noising.
        SDXL accepts ``pooled_prompt_embeds`` with ``prompt_embeds``."""
        self._check_flow_map_components()
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` or `prompt_embeds`.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt!r}")
        if sigmas is None and num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"`height` and `width` must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, gamma=gamma)
        conditioning = self._unet_conditioning(
            prompt, device, num_images_per_prompt, prompt_embeds, height, width, **encode_kwargs
        )
        batch = conditioning["encoder_hidden_states"].shape[0]
        latents = self.prepare_latents(
            batch,
            self.unet.config.in_channels,
            height,
            width,
            conditioning["encoder_hidden_states"].dtype,
            device,
            generator,
            latents,
        )
        dimension = self.unet.config.time_cond_proj_dim
        for t in self.progress_bar(self.scheduler.timesteps):
            s, target = self.scheduler.jump_for_timestep(t)
            delta = torch.full((batch,), s - target, device=device, dtype=torch.float64)
            output = self.unet(
                self.scheduler.scale_model_input(latents, t),
                t,
                timestep_cond=jump_embedding(delta, dimension).to(latents.dtype),
                **conditioning,
                return_dict=False,
            )[0]
            latents = self.scheduler.step(output, t, latents, generator=generator).prev_sample
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self._make_output(image)


class FlowMapStableDiffusionPipeline(FlowMapPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` for an SD 1.5 flow-map student (loop above; no safety checker is run)."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        default_num_inference_steps: int = 4,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder,
            requires_safety_checker,
        )
        self.register_to_config(default_num_inference_steps=_check_steps(default_num_inference_steps))

    def _make_output(self, images):
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    def _unet_conditioning(self, prompt, device, num_images_per_prompt, prompt_embeds, height, width, **kwargs):
        embeds, _ = self.encode_prompt(
            prompt, device, num_images_per_prompt, False, prompt_embeds=prompt_embeds, **kwargs
        )
        return {"encoder_hidden_states": embeds}


class FlowMapStableDiffusionXLPipeline(FlowMapPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` for an SDXL flow-map student (micro-conditions: original = target = output size,
    crop (0, 0); the VAE decodes in its own dtype, so use an fp16-fixed VAE for fp16)."""

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker=False,
        default_num_inference_steps: int = 4,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self.register_to_config(default_num_inference_steps=_check_steps(default_num_inference_steps))

    def _make_output(self, images):
        return StableDiffusionXLPipelineOutput(images=images)

    def _unet_conditioning(
        self, prompt, device, num_images_per_prompt, prompt_embeds, height, width, pooled_prompt_embeds=None, **kwargs
    ):
        embeds, _, pooled, _ = self.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=False,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            **kwargs,
        )
        time_ids = self._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=self.text_encoder_2.config.projection_dim,
        )
        time_ids = time_ids.to(device).repeat(embeds.shape[0], 1)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
