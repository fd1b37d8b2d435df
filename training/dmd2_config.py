"""Options of DMD2 distillation (:class:`DMD2Config`): the training core's options plus DMD2's own.

Field names follow diffusers' scripts and the DMD2 paper's roles (generator, fake score, real score). The reference
code's names (``guidance_*`` for the fake score, ``gen_cls_*``) are accepted as aliases in preset files and flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers_distill.constants import LAYOUTS, NUM_TRAIN_TIMESTEPS, dmd2_timesteps, validate_timesteps

from .config import ConfigError, TrainingConfig, option

__all__ = ["DMD2Config"]

UNCONDITIONAL = ("auto", "empty", "zeros")


@dataclass
class DMD2Config(TrainingConfig):
    """All options of ``train_dmd2``; field names are the CLI flag names (``--field_name``)."""

    output_dir: str = option("dmd2-distilled", "Where checkpoints, logs and the exported student are written.")
    tracker_project_name: str = option("dmd2", "Project name for the trackers.")
    max_train_steps: int | None = option(1000, "Number of iterations; overrides --num_train_epochs when set.")
    # ---- student sampling
    num_inference_steps: int = option(1, "Student steps (1: from pure noise; N: DMD2's fixed timesteps).")
    conditioning_timestep: int = option(999, "Timestep of a 1-step student (DMD2: 999; 399 for its SDXL model).")
    denoising_timesteps: list[int] | None = option(
        None, "Explicit decreasing student timesteps (overrides the default)."
    )
    backward_simulation: bool = option(
        True, "N-step: the generator's input is its own sample re-noised (DMD2 Sec. 4.4), else noised real images."
    )
    # ---- fake score
    fake_score_type: str = option("lora", f"Fake-score layout: {' or '.join(LAYOUTS)}.")
    fake_lora_rank: int = option(64, "LoRA rank of the fake score.")
    fake_lora_alpha: float | None = option(None, "LoRA alpha of the fake score (None: equal to its rank).")
    fake_score_learning_rate: float | None = option(None, "Learning rate of the fake score (None: --learning_rate).")
    fake_score_step_conditioning: bool = option(
        False, "N-step: condition the fake score on the generator step that made the sample (one p_k per step)."
    )
    # ---- DMD2 losses
    real_guidance_scale: float = option(1.75, "CFG scale of the real score in the distribution-matching loss.")
    unconditional: str = option("auto", "Unconditional embedding of CFG: empty prompt, zeros, or auto (SD1.5/SDXL).")
    dfake_gen_update_ratio: int = option(10, "Fake-score updates per generator update (two time-scale rule).")
    min_step_percent: float = option(0.02, "Lowest DM-loss timestep, as a fraction of the training timesteps.")
    max_step_percent: float = option(0.98, "Highest DM-loss timestep, as a fraction of the training timesteps.")
    dm_timesteps_below_input: bool = option(
        False, "N-step: the DM loss of step k noises its sample only up to the step's own input timestep t_k."
    )
    teacher_regression_from_step: int | None = option(
        None,
        "N-step: steps k >= this (0-based) regress their x0 onto the teacher's CFG x0 at the same input instead of "
        "the DM/GAN losses (ours, docs/dmd2.md; None: every step is trained by DMD2).",
    )
    dm_loss_weight: float = option(1.0, "Weight of the distribution-matching loss.")
    generator_gan_loss_weight: float = option(0.0, "Weight of the generator's GAN loss (needs real images).")
    fake_score_gan_loss_weight: float = option(0.0, "Weight of the discriminator loss of the fake score's GAN head.")
    diffusion_gan_max_timestep: int = option(1000, "Largest timestep at which GAN inputs are noised.")
    cache_text_embeddings: bool = option(False, "Encode each prompt once and keep its embedding.")

    @classmethod
    def aliases(cls) -> dict[str, str]:
        return {
            "guidance_learning_rate": "fake_score_learning_rate",
            "gen_cls_loss_weight": "generator_gan_loss_weight",
            "guidance_cls_loss_weight": "fake_score_gan_loss_weight",
        }

    @property
    def uses_gan(self) -> bool:
        return self.generator_gan_loss_weight > 0 or self.fake_score_gan_loss_weight > 0

    @property
    def has_images(self) -> bool:
        return bool(self.train_data_dir or self.dataset_name)

    def fsdp_unsupported(self) -> str | None:
        """FSDP takes the full layouts only (one sharded root per role; the shared-base LoRA layout keeps both
        adapters on one UNet)."""
        if self.student_type == "full" and self.fake_score_type == "full":
            return None
        return (
            "FSDP (an accelerate FSDP config) needs the full layouts, --student_type full --fake_score_type full; "
            f"got --student_type {self.student_type} --fake_score_type {self.fake_score_type}. "
            "LoRA layouts train with DDP (a multi-GPU accelerate config)."
        )

    def timesteps(self) -> list[int]:
        """The student's timesteps: ``--denoising_timesteps``, else DMD2's default for the step count."""
        if self.denoising_timesteps:
            return list(self.denoising_timesteps)
        return dmd2_timesteps(self.num_inference_steps, self.conditioning_timestep)

    def validate(self) -> None:
        """Raise ``ConfigError`` (one line, naming the flag) on bad options, before any model loads."""
        self._check_choices({"fake_score_type": LAYOUTS, "unconditional": UNCONDITIONAL})
        self._check_at_least(1, ("num_inference_steps", "dfake_gen_update_ratio", "fake_lora_rank"))
        super().validate()
        if not 0.0 <= self.min_step_percent < self.max_step_percent <= 1.0:
            raise ConfigError("need 0 <= --min_step_percent < --max_step_percent <= 1")
        try:
            validate_timesteps([self.conditioning_timestep], "--conditioning_timestep", NUM_TRAIN_TIMESTEPS)
            validate_timesteps(self.timesteps(), "--denoising_timesteps", NUM_TRAIN_TIMESTEPS, self.num_inference_steps)
        except ValueError as error:
            raise ConfigError(f"{error} (num_inference_steps={self.num_inference_steps})") from None
        first = self.teacher_regression_from_step
        if first is not None and self.num_inference_steps == 1:
            raise ConfigError("--teacher_regression_from_step needs a multi-step student (--num_inference_steps >= 2)")
        if first is not None and not 1 <= first < self.num_inference_steps:
            raise ConfigError(
                f"--teacher_regression_from_step must be in [1, {self.num_inference_steps - 1}] (a step after the "
                f"first of the --num_inference_steps {self.num_inference_steps} student), got {first}"
            )
        if self.uses_gan and not self.has_images:
            raise ConfigError(
                "the GAN losses (--generator_gan_loss_weight/--fake_score_gan_loss_weight > 0) need real images: "
                "pass --train_data_dir or --dataset_name, or set both weights to 0"
            )
        if self.num_inference_steps > 1 and not self.backward_simulation and not self.has_images:
            raise ConfigError(
                "--no-backward_simulation (noised real latents as input) needs --train_data_dir or --dataset_name"
            )
