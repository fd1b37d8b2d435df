"""Teacher wrapper for DMD2 distillation of Stable Diffusion 1.5 and SDXL pipelines.

The wrapper owns everything the distillation loop needs from a text-to-image teacher pipeline except the UNet
weights themselves (the UNet is passed to each call, so one frozen base UNet can serve as teacher, LoRA generator
and LoRA fake score, see :mod:`diffusers_distill.students`):

* prompt encoding through the pipeline's own ``encode_prompt`` (SDXL: penultimate hidden states of both CLIP
  encoders, pooled embedding of encoder 2 and the ``text_time`` micro-conditions ``add_time_ids``);
* the unconditional embedding used for classifier-free guidance: the empty prompt ``""`` (DMD2's SD 1.5 choice)
  or all-zero embeddings (DMD2's SDXL choice), configurable;
* conversions between the UNet output (``epsilon`` or ``v_prediction``), eps and x0 in float32, using the
  alphas of the pipeline's own noise schedule (DDPM forward process, eq. (4) of Ho et al. 2020):
  ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DiffusionTeacher", "PromptEmbeddings", "UNCONDITIONAL_CHOICES"]

UNCONDITIONAL_CHOICES = ("auto", "empty", "zeros")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class PromptEmbeddings:
    """Text conditioning for a batch: ``prompt_embeds`` (B, L, D) plus the SDXL added conditions."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "PromptEmbeddings":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return PromptEmbeddings(move(self.prompt_embeds), move(self.pooled_prompt_embeds), move(self.add_time_ids))

    def index(self, idx) -> "PromptEmbeddings":
        def pick(t):
            return None if t is None else t[idx]

        return PromptEmbeddings(pick(self.prompt_embeds), pick(self.pooled_prompt_embeds), pick(self.add_time_ids))

    @staticmethod
    def cat(items: list["PromptEmbeddings"]) -> "PromptEmbeddings":
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


class DiffusionTeacher:
    """Prompt encoding, CFG and eps/x0 algebra of an SD 1.5 or SDXL teacher pipeline.

    Args:
        pipeline: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (its text encoders, tokenizers
            and scheduler config are used; its UNet is not called by this class).
        resolution: training image size in pixels (SDXL micro-conditions ``(res, res, 0, 0, res, res)``).
        unconditional: ``"empty"`` (encode ``""``), ``"zeros"`` (all-zero embeddings) or ``"auto"``
            (SD 1.5 -> ``"empty"``, SDXL -> ``"zeros"``, as DMD2 does).
    """

    def __init__(self, pipeline, resolution: int = 512, unconditional: str = "auto"):
        from diffusers import DDPMScheduler

        if unconditional not in UNCONDITIONAL_CHOICES:
            raise ValueError(f"unconditional must be one of {UNCONDITIONAL_CHOICES}, got {unconditional!r}")
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        self.pipeline = pipeline
        self.is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
        self.arch = "sdxl" if self.is_sdxl else "sd15"
        self.resolution = resolution
        self.unconditional = ("zeros" if self.is_sdxl else "empty") if unconditional == "auto" else unconditional
        # DDPM forward-process alphas of the teacher's own schedule (any diffusers scheduler config works here).
        schedule = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.prediction_type = schedule.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"teacher prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        self.alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = int(schedule.config.num_train_timesteps)
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self._empty_embeddings: PromptEmbeddings | None = None

    # ------------------------------------------------------------------ text
    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def micro_conditions(self, batch_size: int, device=None) -> torch.Tensor:
        """SDXL ``add_time_ids`` = (original H, W, crop top, left, target H, W), fixed as in DMD2."""
        r = float(self.resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=device).repeat(batch_size, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device=None) -> PromptEmbeddings:
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
            self._empty_embeddings = self.encode_prompts([""], device=like.prompt_embeds.device)
        empty = self._empty_embeddings.to(device=like.prompt_embeds.device, dtype=like.prompt_embeds.dtype)
        return PromptEmbeddings.cat([empty] * batch) if batch > 1 else empty

    # ------------------------------------------------------------------ noise algebra
    def _alpha_sigma(self, timesteps: torch.Tensor, ndim: int):
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha_bar.sqrt().float().view(shape), (1 - alpha_bar).sqrt().float().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0): ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (float32)."""
        a, s = self._alpha_sigma(timesteps, x0.ndim)
        return a * x0.float() + s * noise.float()

    def x0_from_eps(self, x_t, eps, timesteps) -> torch.Tensor:
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return (x_t.float() - s * eps.float()) / a

    def eps_from_x0(self, x_t, x0, timesteps) -> torch.Tensor:
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return (x_t.float() - a * x0.float()) / s

    def output_to_eps(self, x_t, model_output, timesteps) -> torch.Tensor:
        """UNet output -> eps; v-prediction: ``eps = sqrt(a) v + sqrt(1-a) x_t`` (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return model_output.float()
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return a * model_output.float() + s * x_t.float()

    def output_to_x0(self, x_t, model_output, timesteps) -> torch.Tensor:
        """UNet output -> x0; v-prediction: ``x0 = sqrt(a) x_t - sqrt(1-a) v``."""
        if self.prediction_type == "epsilon":
            return self.x0_from_eps(x_t, model_output, timesteps)
        a, s = self._alpha_sigma(timesteps, x_t.ndim)
        return a * x_t.float() - s * model_output.float()

    def denoising_target(self, x0, noise, timesteps) -> torch.Tensor:
        """Regression target of the plain denoising loss: eps, or v = sqrt(a) eps - sqrt(1-a) x0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        a, s = self._alpha_sigma(timesteps, x0.ndim)
        return a * noise.float() - s * x0.float()

    # ------------------------------------------------------------------ UNet calls
    def predict(self, unet, x_t, timesteps, embeddings: PromptEmbeddings) -> torch.Tensor:
        """Raw UNet output (in the UNet's own parameterisation)."""
        dtype = unet.dtype
        cond = embeddings.to(dtype=dtype)
        return unet(x_t.to(dtype), timesteps, **cond.unet_kwargs(), return_dict=False)[0]

    def predict_x0(self, unet, x_t, timesteps, embeddings: PromptEmbeddings) -> torch.Tensor:
        return self.output_to_x0(x_t, self.predict(unet, x_t, timesteps, embeddings), timesteps)

    def guided_x0(self, unet, x_t, timesteps, cond: PromptEmbeddings, uncond: PromptEmbeddings, guidance_scale):
        """x0 from the CFG eps ``eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022), one batched UNet call."""
        if guidance_scale == 1.0:
            return self.predict_x0(unet, x_t, timesteps, cond)
        both = PromptEmbeddings.cat([uncond, cond])
        out = self.predict(unet, torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), both)
        eps_u, eps_c = self.output_to_eps(
            torch.cat([x_t, x_t]), out, torch.cat([timesteps, timesteps])
        ).chunk(2)
        return self.x0_from_eps(x_t, eps_u + guidance_scale * (eps_c - eps_u), timesteps)
