"""DMD2 distillation of SD 1.5 / SDXL teachers: ``accelerate launch training/train_dmd2.py [--config preset] ...``.

Every ``DMD2Config`` field is a flag of the same name (``--help`` lists them). Precedence: built-in defaults <
``--config`` file (JSON or YAML, e.g. ``training/configs/sdxl_4step.json``) < flags. Example::

    accelerate launch training/train_dmd2.py --config training/configs/sd15_1step.json \\
        --pretrained_teacher_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompt_file prompts.txt --output_dir sd15-dmd2-1step

Option and data errors are reported in one line naming the flag, before any model loads. Only the config module
is imported before the flags are parsed, so ``--help`` is fast.
"""

from __future__ import annotations

import sys

from diffusers_distill.training.config import parse_config as _parse
from diffusers_distill.training.config import run_cli
from diffusers_distill.training.dmd2_config import DMD2Config

DESCRIPTION = (
    "DMD2 distillation (Yin et al. 2024, arXiv 2405.14867) of an SD 1.5 / SDXL teacher into a 1- or N-step student. "
    "Run it with `accelerate launch`."
)
PROG = "train_dmd2.py"


def parse_config(argv: list[str] | None = None) -> DMD2Config:
    return _parse(DMD2Config, argv, DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        DMD2Config,
        argv,
        DESCRIPTION,
        PROG,
        "diffusers_distill.training.dmd2:train_dmd2",
        lambda config, result: (
            f"DMD2 finished at step {result['global_step']} on {result['num_processes']} process(es); "
            f"outputs in {result['output_dir']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
