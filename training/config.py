"""Options shared by every distillation script: a dataclass, read from a preset file and/or flags, validated before
any model loads (the config part of the training core).

A method subclasses :class:`TrainingConfig`, adds its own fields (each with ``metadata={"help": ...}``) and extends
:meth:`TrainingConfig.validate`. :func:`build_parser` turns any such dataclass into an ``argparse`` parser with a
description for every flag; :func:`parse_config` applies the precedence *defaults < --config file < flags*.
This module imports no torch/diffusers, so ``--help`` and config errors are fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field

from diffusers_distill.constants import ARCHITECTURES, LAYOUTS

__all__ = ["ConfigError", "TrainingConfig", "build_parser", "parse_config", "option", "resolve_teacher"]

MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffusers_distill", "assets")


class ConfigError(ValueError):
    """A bad option or data source, found before any model is loaded; the message names the flag."""


def option(default, help: str, **metadata):
    """A dataclass field with its ``--help`` text (``help`` may use ``%(default)s``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def bundled_teacher_path(name: str) -> str:
    """Folder of the bundled digits teacher ``"sd15"`` / ``"sdxl"`` (see ``diffusers_distill.digits``)."""
    return os.path.join(_ASSETS, f"digits-{name}")


def resolve_teacher(name_or_path: str) -> str:
    """``sd15``/``sdxl`` -> the bundled digits teacher folder; anything else unchanged (Hub id or folder)."""
    return bundled_teacher_path(name_or_path) if name_or_path in ARCHITECTURES else name_or_path


def teacher_resolution(path: str) -> int | None:
    """The teacher's native image size (``unet.sample_size * vae scale``) read from a local pipeline folder's
    configs, without loading weights; None for a Hub id (it is read after loading instead)."""
    unet_config, vae_config = os.path.join(path, "unet", "config.json"), os.path.join(path, "vae", "config.json")
    if not (os.path.isfile(unet_config) and os.path.isfile(vae_config)):
        return None
    with open(unet_config, encoding="utf-8") as f:
        sample_size = json.load(f)["sample_size"]
    with open(vae_config, encoding="utf-8") as f:
        levels = len(json.load(f)["block_out_channels"])
    return int(sample_size) * 2 ** (levels - 1)


@dataclass
class TrainingConfig:
    """Options of the training core (model, data, optimisation, checkpoints, logging, Hub), diffusers' names."""

    # ---- model
    pretrained_teacher_model: str = option(
        "", "Teacher pipeline: a Hub id, a local folder, or sd15/sdxl for the bundled digits teachers (required)."
    )
    revision: str | None = option(None, "Revision (branch, tag or commit) of the teacher on the Hub.")
    variant: str | None = option(None, "Weights variant of the teacher, e.g. fp16 (diffusers' `variant`).")
    cache_dir: str | None = option(None, "Where downloaded models and datasets are cached.")
    # ---- output
    output_dir: str = option("distilled-student", "Where checkpoints, logs and the exported student are written.")
    logging_dir: str = option("logs", "Tracker log folder, relative to --output_dir.")
    # ---- data
    prompt_file: str | None = option(None, "Training prompts: .txt (one per line) or .jsonl (text/prompt/caption).")
    train_data_dir: str | None = option(
        None, "Folder of captioned images (metadata.jsonl or <image>.txt sidecars); their captions are prompts too."
    )
    dataset_name: str | None = option(None, "A datasets name or local path with an image and a caption column.")
    dataset_config_name: str | None = option(None, "Config name of --dataset_name.")
    image_column: str = option("image", "Image column of --dataset_name.")
    caption_column: str = option("text", "Caption column of --dataset_name / key in metadata.jsonl.")
    max_train_samples: int | None = option(None, "Use only the first N prompts/images (debugging).")
    resolution: int | None = option(
        None, "Training image size in pixels; default: the teacher's native size (a warning if it differs)."
    )
    dataloader_num_workers: int = option(0, "Threads that decode real images in parallel (0: in the main thread).")
    # ---- student
    student_type: str = option("lora", f"Generator layout: {' or '.join(LAYOUTS)}.")
    lora_rank: int = option(64, "LoRA rank of the student.")
    lora_alpha: float | None = option(8.0, "LoRA alpha of the student (None: equal to the rank).")
    lora_target_modules: list[str] | None = option(
        None, "Module names that get LoRA adapters (default: diffusers' LCM-LoRA list of 14 names)."
    )
    # ---- optimisation
    train_batch_size: int = option(1, "Batch size per process.")
    max_train_steps: int | None = option(
        None, "Number of optimizer steps; overrides --num_train_epochs (default: from --num_train_epochs)."
    )
    num_train_epochs: int = option(1, "Passes over the prompts (steps = epochs x prompts / global batch).")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step (through accelerate).")
    learning_rate: float = option(1e-5, "Learning rate of the student.")
    scale_lr: bool = option(False, "Multiply the learning rates by accumulation steps x batch size x processes.")
    lr_scheduler: str = option("constant_with_warmup", f"Learning-rate schedule: {', '.join(LR_SCHEDULERS)}.")
    lr_warmup_steps: int = option(500, "Warm-up steps of the learning-rate schedule.")
    lr_num_cycles: int = option(1, "Hard restarts of the cosine_with_restarts schedule.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(0.01, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(10.0, "Gradient-norm clipping threshold.")
    use_8bit_adam: bool = option(False, "Use bitsandbytes' 8-bit AdamW.")
    use_ema: bool = option(False, "Keep an EMA of the student's weights; the export and validation use it.")
    ema_decay: float = option(0.999, "EMA decay, in [0, 1).")
    mixed_precision: str = option("no", f"Mixed precision: {', '.join(MIXED_PRECISIONS)}.")
    allow_tf32: bool = option(False, "Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less exact).")
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNets.")
    enable_xformers_memory_efficient_attention: bool = option(False, "Use xformers' attention (needs xformers).")
    seed: int = option(0, "Seed of every random draw (a resumed run repeats the uninterrupted one).")
    # ---- checkpoints, validation, logging, Hub
    checkpointing_steps: int = option(500, "Save an accelerate checkpoint every N steps.")
    checkpoints_total_limit: int | None = option(None, "Keep at most N checkpoints (oldest deleted first).")
    resume_from_checkpoint: str | None = option(None, "A checkpoint folder, or 'latest' in --output_dir.")
    validation_prompts: list[str] | None = option(None, "Prompts sampled into a grid every --validation_steps.")
    validation_steps: int = option(200, "Validation grid every N steps.")
    report_to: str = option("tensorboard", f"Tracker: {', '.join(REPORT_TO)}.")
    tracker_project_name: str = option("distillation", "Project name for the trackers.")
    push_to_hub: bool = option(False, "Upload the exported student (checked at start: token and repo).")
    hub_model_id: str | None = option(
        None, "Hub repo (name or user/name); default: the name of --output_dir, as in diffusers' scripts."
    )
    hub_token: str | None = option(None, "Hub token (default: the logged-in token).")

    # ------------------------------------------------------------------ files
    @classmethod
    def aliases(cls) -> dict[str, str]:
        """Other accepted names of fields (e.g. the reference code's), mapped to the field name."""
        return {}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        """Build from a dict, accepting :meth:`aliases`; unknown keys raise ``ConfigError``."""
        values = {cls.aliases().get(k, k): v for k, v in values.items()}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown keys in {source}: {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str, **overrides):
        """Load a preset (``.json``, or ``.yaml``/``.yml``), then apply ``overrides``."""
        if not path.endswith((".json", ".yaml", ".yml")):
            raise ConfigError(f"--config must be a .json, .yaml or .yml file, got {path!r}")
        if not os.path.isfile(path):
            raise ConfigError(f"--config file not found: {path!r}")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                values = json.load(f)
            else:
                import yaml  # accelerate depends on pyyaml

                values = yaml.safe_load(f) or {}
        values.update({cls.aliases().get(k, k): v for k, v in overrides.items()})
        return cls.from_dict(values, source=f"config {path}")

    # ------------------------------------------------------------------ validation
    def _check_choices(self, choices: dict[str, tuple]) -> None:
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def _check_at_least(self, minimum: float, names: tuple[str, ...]) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"--{name} must be >= {minimum}, got {value}")

    def _check_paths(self) -> None:
        if self.prompt_file and not self.prompt_file.endswith((".txt", ".jsonl")):
            raise ConfigError(f"--prompt_file must end with .txt or .jsonl, got {self.prompt_file!r}")
        if self.prompt_file and not os.path.isfile(self.prompt_file):
            raise ConfigError(f"--prompt_file not found: {self.prompt_file!r}")
        if self.train_data_dir and not os.path.isdir(self.train_data_dir):
            raise ConfigError(f"--train_data_dir is not a folder: {self.train_data_dir!r}")
        if self.train_data_dir and self.dataset_name:
            raise ConfigError("give only one of --train_data_dir or --dataset_name")
        if not (self.prompt_file or self.train_data_dir or self.dataset_name):
            raise ConfigError("give --prompt_file, --train_data_dir or --dataset_name")
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest") and not os.path.isdir(resume):
            raise ConfigError(f"--resume_from_checkpoint must be 'latest' or an existing folder, got {resume!r}")
        for flag, module in (
            ("enable_xformers_memory_efficient_attention", "xformers"),
            ("use_8bit_adam", "bitsandbytes"),
        ):
            if getattr(self, flag) and importlib.util.find_spec(module) is None:
                raise ConfigError(f"--{flag} needs the {module} package: `pip install {module}`")

    def _check_teacher(self) -> None:
        if not self.pretrained_teacher_model:
            raise ConfigError(
                "--pretrained_teacher_model is required (a Hub id, a local pipeline folder, sd15 or sdxl)"
            )
        path = resolve_teacher(self.pretrained_teacher_model)
        looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path)
        if looks_local and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ConfigError(
                f"--pretrained_teacher_model {path!r} is not a diffusers pipeline folder (no model_index.json)"
            )

    def validate(self) -> None:
        """Raise ``ConfigError`` (one line, naming the flag) on bad options, before any model loads."""
        self._check_choices(
            {
                "student_type": LAYOUTS,
                "mixed_precision": MIXED_PRECISIONS,
                "report_to": REPORT_TO,
                "lr_scheduler": LR_SCHEDULERS,
            }
        )
        self._check_teacher()
        self._check_at_least(
            1, ("train_batch_size", "max_train_steps", "num_train_epochs", "gradient_accumulation_steps")
        )
        self._check_at_least(
            1, ("checkpointing_steps", "validation_steps", "lora_rank", "lr_num_cycles", "max_train_samples")
        )
        self._check_at_least(1, ("checkpoints_total_limit", "resolution"))
        self._check_at_least(0, ("lr_warmup_steps", "dataloader_num_workers", "learning_rate", "max_grad_norm"))
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"--resolution must be a multiple of 8, got {self.resolution}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.report_to == "wandb" and self.hub_token is not None:
            raise ConfigError("do not combine --report_to wandb with --hub_token (the token would be logged)")
        if self.push_to_hub and self.hub_model_id is not None:
            from diffusers_distill.hub import check_repo_id

            try:
                check_repo_id(self.hub_model_id, "--hub_model_id")
            except ValueError as error:
                raise ConfigError(str(error)) from None
        self._check_paths()

    def fsdp_unsupported(self) -> str | None:
        """Why this run cannot be sharded by an FSDP accelerate config (the error message), or None if it can."""
        return "this trainer supports DDP (a multi-GPU accelerate config), not FSDP; use DDP"

    # ------------------------------------------------------------------ derived values
    @property
    def teacher_path(self) -> str:
        return resolve_teacher(self.pretrained_teacher_model)

    def hub_repo_name(self) -> str:
        """The Hub repo to push to: --hub_model_id, else the name of --output_dir (diffusers' scripts' rule)."""
        return self.hub_model_id or os.path.basename(os.path.normpath(self.output_dir))

    def tracker_config(self) -> dict:
        """Flat, secret-free values for the trackers' hyper-parameter tables."""
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(self).items()
        }
        flat.pop("hub_token", None)
        return flat


# ---------------------------------------------------------------------- command line
def _unwrap_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def build_parser(config_class: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``config_class`` (plus ``--config``), each with its help."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", default=None, help="Preset file (.json/.yaml) with config fields; flags override it."
    )
    hints = typing.get_type_hints(config_class)
    aliases: dict[str, list[str]] = {}
    for alias, name in config_class.aliases().items():
        aliases.setdefault(name, []).append(f"--{alias}")
    for f in dataclasses.fields(config_class):
        hint = _unwrap_optional(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = {"default": argparse.SUPPRESS, "dest": f.name, "help": f"{f.metadata['help']} (default: {default!r})"}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0])
        else:
            kwargs["type"] = hint
        parser.add_argument(f"--{f.name}", *aliases.get(f.name, []), **kwargs)
    return parser


def parse_config(config_class: type, argv: list[str] | None = None, description: str = ""):
    """Flags (and ``--config``) -> a ``config_class`` instance, not yet validated."""
    args = vars(build_parser(config_class, description).parse_args(argv))
    preset = args.pop("config")
    return config_class.from_file(preset, **args) if preset else config_class.from_dict(args, "flags")


def run_cli(config_class: type, argv: list[str] | None, description: str, prog: str, trainer: str, summary) -> int:
    """The body of a ``train_*.py`` script's ``main``: parse and validate the flags, then import ``trainer``
    (``"module:function"``, imported only now so that ``--help`` and flag errors stay fast) and run it on the
    config. A :class:`ConfigError` is printed as one ``prog: error: ...`` line (exit status 2); on success
    ``summary(config, result)`` is printed."""
    import importlib
    import sys

    try:
        config = parse_config(config_class, argv, description)
        config.validate()
        module, function = trainer.split(":")
        result = getattr(importlib.import_module(module), function)(config)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(summary(config, result))
    return 0
