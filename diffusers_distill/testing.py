"""Tiny, randomly initialised SD 1.5, SDXL and SD3 pipelines built from configs, fully offline.

These use the real diffusers/transformers architecture classes with tiny sizes, so every code path a
user's Stable Diffusion pipeline takes (text encoding, CFG, SDXL added conditions, SD3 flow matching,
VAE decoding) runs in milliseconds on a CPU. They back the test-suite fixtures and the benchmarks that
only need the right shapes; nothing here downloads anything.
"""

from __future__ import annotations

import json
import os

import torch

from .constants import SD_NOISE_SCHEDULE

__all__ = [
    "add_random_lora",
    "momentum_scheduler_classes",
    "tiny_clip_tokenizer",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_sd3_pipeline",
    "tiny_unet",
    "tiny_vae",
]

TINY_WORDS = ("a", "photo", "of", "cat", "dog", "handwritten", "digit")


def _byte_alphabet() -> list[str]:
    # The printable-byte alphabet that GPT-2/CLIP byte-level BPE uses (bytes that are printable map to
    # themselves, the rest to code points from 256 on).
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def tiny_clip_tokenizer(words=TINY_WORDS, folder: str | None = None, model_max_length: int = 77):
    """A character-level CLIP BPE tokenizer with merges that make each of ``words`` a single token.

    Built from an in-memory vocabulary (no download). With ``folder`` it is written as
    ``vocab.json``/``merges.txt`` and loaded back, the way a Hub tokenizer folder is.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in words:
        current = word[0] if len(word) > 1 else word + "</w>"
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if i == len(word) - 1 else "")
            if (current, piece) not in merges:
                merges.append((current, piece))
            current = current + piece
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if folder is None:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    else:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = model_max_length
    return tokenizer


def tiny_text_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32, intermediate_size: int = 37):
    """A 2-layer CLIP text config sized to ``tokenizer`` (shared by the test fixtures and the digits teachers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(latent_channels: int = 4, sample_size: int = 32, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        **config,
    )


def tiny_unet(sdxl: bool = False, text_hidden_size: int = 32, projection_dim: int = 32):
    """A 2-level UNet2DConditionModel with cross-attention; SDXL variant has ``text_time`` added conditions."""
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=text_hidden_size, attention_head_dim=4, **common)
    time_dim = 8
    return UNet2DConditionModel(
        cross_attention_dim=2 * text_hidden_size,  # both SDXL text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # 6 micro-conditions (original size, crop top-left, target size) + pooled text embedding
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        **common,
    )


def sd_ddim_scheduler(**overrides):
    """SD 1.5's noise schedule (scaled_linear 0.00085-0.012, epsilon) on a DDIM sampler."""
    from diffusers import DDIMScheduler

    config = dict(SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    return DDIMScheduler(**config)


def tiny_sd15_pipeline(seed: int = 0, scheduler=None):
    """A randomly initialised StableDiffusionPipeline with SD 1.5's classes and noise schedule."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    if scheduler is None:  # SD 1.5's stock scheduler config
        scheduler = PNDMScheduler(**SD_NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=tiny_unet(sdxl=False),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, scheduler=None):
    """A randomly initialised StableDiffusionXLPipeline (two text encoders, pooled + ``text_time`` conditions)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    if scheduler is None:  # SDXL's stock scheduler config
        scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_unet(sdxl=True),
        scheduler=scheduler,
    )


def tiny_sd3_pipeline(seed: int = 0, scheduler=None):
    """A randomly initialised StableDiffusion3Pipeline (flow matching, SD3Transformer2DModel).

    The T5 encoder is left out (``text_encoder_3=None``), which SD3 supports: its embeddings become zeros.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    if scheduler is None:  # SD3's stock scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=64,  # both CLIP encoders' projections, concatenated
        out_channels=4,
        pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),  # SD3's VAE latent normalisation
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def add_random_lora(
    unet,
    rank: int = 4,
    alpha: float = 16,
    target_modules=("to_q", "to_k", "to_v", "to_out.0"),
    adapter_name: str = "generator",
    seed: int = 0,
    scale: float = 0.3,
):
    """Add a peft LoRA adapter with random (non-zero) A and B weights, as a trained student would have.

    The default ``alpha != rank`` only reloads correctly when the adapter's ``LoraConfig`` is saved with the weights.
    """
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules)), adapter_name=adapter_name
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name and f".{adapter_name}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return unet


def momentum_scheduler_classes(kind: str = "all") -> list:
    """The package's momentum schedulers, for tests that run on each: ``"vp"``, ``"flow"`` or ``"all"``."""
    from . import schedulers

    vp = [schedulers.GHVBScheduler, schedulers.PLMSHeavyBallScheduler, schedulers.DPMSolverHeavyBallScheduler]
    flow = [
        schedulers.FlowMatchGHVBScheduler,
        schedulers.FlowMatchPLMSHeavyBallScheduler,
        schedulers.FlowMatchDPMSolverHeavyBallScheduler,
    ]
    choices = {"vp": vp, "flow": flow, "all": vp + flow}
    if kind not in choices:
        raise ValueError(f"kind must be one of {sorted(choices)}, got {kind!r}")
    return choices[kind]
