"""DMD2 distillation of SD 1.5 / SDXL teachers: ``accelerate launch training/train_dmd2.py [--config preset] ...``.

Every ``DMD2Config`` field is a flag of the same name. Precedence: built-in defaults < ``--config`` file (JSON or
YAML, e.g. ``training/configs/sdxl_4step.json``) < flags given on the command line. Example::

    accelerate launch training/train_dmd2.py --config training/configs/sd15_1step.json \\
        --pretrained_teacher_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompt_file prompts.txt --output_dir sd15-dmd2-1step
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from diffusers_distill.training.dmd2 import DMD2Config, config_field_types, train_dmd2


def _unwrap_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DMD2 distillation (arXiv 2405.14867) for SD 1.5 / SDXL.")
    parser.add_argument("--config", default=None, help="preset file (.json/.yaml) with DMD2Config fields")
    hints = config_field_types()
    for f in dataclasses.fields(DMD2Config):
        hint = _unwrap_optional(hints[f.name])
        kwargs = {"default": argparse.SUPPRESS, "help": f"(default: {f.default!r})"}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0])
        else:
            kwargs["type"] = hint
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(argv: list[str] | None = None) -> DMD2Config:
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("config")
    return DMD2Config.from_file(preset, **args) if preset else DMD2Config(**args)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    result = train_dmd2(config)
    print(f"DMD2 finished at step {result['global_step']} on {result['num_processes']} process(es); "
          f"outputs in {result['output_dir']}; generator checksum {result['generator_checksum']:.10e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
