"""Options of flow-map distillation (:class:`FlowMapConfig`): the training core's options plus the flow map's own.

The losses, the time sampling and the EMA target follow docs/flow_maps.md ("Losses", "Which loss to use").
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, TrainingConfig, option

__all__ = ["FLOW_MAP_LOSSES", "FlowMapConfig"]

FLOW_MAP_LOSSES = ("itvm", "lfmd", "meanflow", "progressive")
SIGMA_SPACINGS = ("uniform", "shifted", "karras")
UNCONDITIONAL = ("auto", "empty", "zeros")


@dataclass
class FlowMapConfig(TrainingConfig):
    """All options of ``train_flow_map``; field names are the CLI flag names (``--field_name``)."""

    output_dir: str = option("flow-map-distilled", "Where checkpoints, logs and the exported student are written.")
    tracker_project_name: str = option("flow_map", "Project name for the trackers.")
    max_train_steps: int | None = option(1000, "Number of iterations; overrides --num_train_epochs when set.")
    learning_rate: float = option(1e-4, "Learning rate of the student.")
    use_ema: bool = option(True, "Keep an EMA of the student's weights (evaluation EMA); export and validation use it.")
    # ---- loss
    loss: str = option(
        "itvm",
        f"Flow-map loss: {', '.join(FLOW_MAP_LOSSES)} (itvm: JVP-free Picard target, the measured default of "
        "docs/flow_maps.md; lfmd: Lagrangian with a backpropagated JVP; meanflow and progressive: baselines).",
    )
    guidance_scale: float = option(4.5, "CFG scale of the teacher velocity that is distilled into the student.")
    unconditional: str = option("auto", "Unconditional embedding of CFG: empty prompt, zeros, or auto (SD1.5/SDXL).")
    target_ema_decay: float = option(
        0.99, "EMA decay of the target network of itvm/progressive (0: the online weights, without gradient)."
    )
    diagonal_fraction: float = option(
        0.25, "Fraction of (s, t) pairs with t = s: there the target is the teacher velocity (the initial term)."
    )
    itvm_num_nodes: int = option(3, "Gauss-Legendre nodes of the ITVM target (1, 2 or 3).")
    itvm_initial_weight: float = option(0.0, "Weight of ITVM's explicit initial-velocity term on every pair.")
    jump_embedding_dim: int = option(64, "time_cond_proj_dim of the student: size of the jump-length embedding.")
    # ---- sampling of the exported student
    default_num_inference_steps: int = option(4, "Default step count saved with the student (any step count works).")
    sigma_spacing: str = option("uniform", f"Sampling grid saved with the student: {', '.join(SIGMA_SPACINGS)}.")
    cache_text_embeddings: bool = option(False, "Encode each prompt once and keep its embedding.")

    @property
    def has_images(self) -> bool:
        return bool(self.train_data_dir or self.dataset_name)

    def fsdp_unsupported(self) -> str | None:
        """FSDP is not implemented for flow maps (docs/flow_maps.md, "How to distill")."""
        return "train_flow_map supports DDP (a multi-GPU accelerate config), not FSDP; use DDP"

    def validate(self) -> None:
        """Raise ``ConfigError`` (one line, naming the flag) on bad options, before any model loads."""
        self._check_choices(
            {
                "loss": FLOW_MAP_LOSSES,
                "sigma_spacing": SIGMA_SPACINGS,
                "unconditional": UNCONDITIONAL,
                "itvm_num_nodes": (1, 2, 3),
            }
        )
        self._check_at_least(1, ("default_num_inference_steps",))
        self._check_at_least(0, ("guidance_scale", "itvm_initial_weight"))
        if self.jump_embedding_dim < 2 or self.jump_embedding_dim % 2:
            raise ConfigError(f"--jump_embedding_dim must be an even number >= 2, got {self.jump_embedding_dim}")
        if not 0.0 <= self.target_ema_decay < 1.0:
            raise ConfigError(f"--target_ema_decay must be in [0, 1), got {self.target_ema_decay}")
        if not 0.0 <= self.diagonal_fraction < 1.0:
            raise ConfigError(f"--diagonal_fraction must be in [0, 1), got {self.diagonal_fraction}")
        if self.gradient_checkpointing and self.loss in ("lfmd", "meanflow"):
            raise ConfigError(f"--gradient_checkpointing does not support the JVP of --loss {self.loss}")
        super().validate()
