"""What the distillation loops need from an SD 1.5 / SDXL teacher pipeline, besides the noise algebra
(:mod:`diffusers_distill.noise_schedule`):

* prompt encoding through the pipeline's own ``encode_prompt`` (SDXL: penultimate hidden states of both CLIP
  encoders, pooled embedding of encoder 2 and the ``text_time`` micro-conditions ``add_time_ids``), in
  :class:`PromptEncoder`;
* the unconditional embedding used for classifier-free guidance: the empty prompt ``""`` (DMD2's SD 1.5 choice)
  or all-zero embeddings (DMD2's SDXL choice);
* UNet calls with those embeddings: :func:`unet_output`, :func:`predict_x0` and the CFG :func:`guided_x0`. The UNet
  is an argument, so one frozen base UNet can serve as real score, LoRA generator and LoRA fake score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise_schedule import NoiseSchedule

__all__ = [
    "PromptEmbeddings",
    "PromptEncoder",
    "UNCONDITIONAL_CHOICES",
    "pipeline_arch",
    "unet_output",
    "predict_x0",
    "guided_x0",
]

UNCONDITIONAL_CHOICES = ("auto", "empty", "zeros")


def pipeline_arch(pipeline) -> str:
    """``"sdxl"`` for a pipeline with a second text encoder (or a pipeline class that takes one), else ``"sd15"``."""
    if isinstance(pipeline, type):
        import inspect

        return "sdxl" if "text_encoder_2" in inspect.signature(pipeline.__init__).parameters else "sd15"
    return "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd15"


@dataclass
class PromptEmbeddings:
    """Text conditioning for a batch: ``prompt_embeds`` (B, L, D) plus the SDXL added conditions."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> PromptEmbeddings:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return PromptEmbeddings(move(self.prompt_embeds), move(self.pooled_prompt_embeds), move(self.add_time_ids))

    def index(self, idx) -> PromptEmbeddings:
        def pick(t):
            return None if t is None else t[idx]

        return PromptEmbeddings(pick(self.prompt_embeds), pick(self.pooled_prompt_embeds), pick(self.add_time_ids))

    @staticmethod
    def cat(items: list[PromptEmbeddings]) -> PromptEmbeddings:
        def join(name):
            values = [getattr(item, name) for item in items]
            return None if values[0] is None else torch.cat(values)

        return PromptEmbeddings(join("prompt_embeds"), join("pooled_prompt_embeds"), join("add_time_ids"))

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kwargs = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids}
        return kwargs


class PromptEncoder:
    """Prompt encoding and the unconditional embedding of an SD 1.5 or SDXL pipeline.

    Args:
        pipeline: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (text encoders and tokenizers).
        resolution: training image size in pixels (SDXL micro-conditions ``(res, res, 0, 0, res, res)``).
        unconditional: ``"empty"`` (encode ``""``), ``"zeros"`` (all-zero embeddings) or ``"auto"``
            (SD 1.5 -> ``"empty"``, SDXL -> ``"zeros"``, as DMD2 does).
    """

    def __init__(self, pipeline, resolution: int = 512, unconditional: str = "auto"):
        if unconditional not in UNCONDITIONAL_CHOICES:
            raise ValueError(f"unconditional must be one of {UNCONDITIONAL_CHOICES}, got {unconditional!r}")
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        self.pipeline = pipeline
        self.arch = pipeline_arch(pipeline)
        self.is_sdxl = self.arch == "sdxl"
        self.resolution = resolution
        self.unconditional = ("zeros" if self.is_sdxl else "empty") if unconditional == "auto" else unconditional
        self._empty_embeddings: PromptEmbeddings | None = None

    def micro_conditions(self, batch_size: int, device=None) -> torch.Tensor:
        """SDXL ``add_time_ids`` = (original H, W, crop top, left, target H, W), fixed as in DMD2."""
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=device).repeat(batch_size, 1)

    @torch.no_grad()
    def __call__(self, prompts: list[str], device=None) -> PromptEmbeddings:
        """Encode a list of prompts with the pipeline's ``encode_prompt`` (no CFG duplication)."""
        device = device or self.pipeline.text_encoder.device
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return PromptEmbeddings(embeds, pooled, self.micro_conditions(len(prompts), device).to(embeds.dtype))
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts), device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return PromptEmbeddings(embeds)

    def unconditional_embeddings(self, like: PromptEmbeddings) -> PromptEmbeddings:
        """Unconditional conditioning with the batch size/shape of ``like`` (empty prompt or zeros)."""
        batch = like.prompt_embeds.shape[0]
        if self.unconditional == "zeros":
            pooled = None if like.pooled_prompt_embeds is None else torch.zeros_like(like.pooled_prompt_embeds)
            return PromptEmbeddings(torch.zeros_like(like.prompt_embeds), pooled, like.add_time_ids)
        if self._empty_embeddings is None:  # the empty prompt is encoded once
            self._empty_embeddings = self([""], device=like.prompt_embeds.device)
        empty = self._empty_embeddings.to(device=like.prompt_embeds.device, dtype=like.prompt_embeds.dtype)
        return PromptEmbeddings.cat([empty] * batch) if batch > 1 else empty


def unet_output(unet, x_t, timesteps, embeddings: PromptEmbeddings) -> torch.Tensor:
    """Raw UNet output (in the UNet's own parameterisation), computed in the UNet's dtype."""
    dtype = unet.dtype
    cond = embeddings.to(dtype=dtype)
    return unet(x_t.to(dtype), timesteps, **cond.unet_kwargs(), return_dict=False)[0]


def predict_x0(unet, schedule: NoiseSchedule, x_t, timesteps, embeddings: PromptEmbeddings) -> torch.Tensor:
    """The UNet's x0 prediction (float32)."""
    return schedule.output_to_x0(x_t, unet_output(unet, x_t, timesteps, embeddings), timesteps)


def guided_x0(unet, schedule: NoiseSchedule, x_t, timesteps, cond, uncond, guidance_scale) -> torch.Tensor:
    """x0 from the CFG eps ``eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022), one batched UNet call."""
    if guidance_scale == 1.0:
        return predict_x0(unet, schedule, x_t, timesteps, cond)
    both = PromptEmbeddings.cat([uncond, cond])
    x_both, t_both = torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps])
    eps_u, eps_c = schedule.output_to_eps(x_both, unet_output(unet, x_both, t_both, both), t_both).chunk(2)
    return schedule.x0_from_eps(x_t, eps_u + guidance_scale * (eps_c - eps_u), timesteps)
