"""Flow-map distillation of SD 1.5 / SDXL teachers: ``accelerate launch training/train_flow_map.py [--config preset]``.

Every ``FlowMapConfig`` field is a flag of the same name (``--help`` lists them). Precedence: built-in defaults <
``--config`` file (JSON or YAML, e.g. ``training/configs/sd15_flow_map.json``) < flags. Example::

    accelerate launch training/train_flow_map.py --config training/configs/sd15_flow_map.json \\
        --pretrained_teacher_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir my-captioned-images --output_dir sd15-flow-map

The student samples at any step count (``FlowMapStableDiffusionPipeline``, docs/flow_maps.md). Option and data
errors are reported in one line naming the flag, before any model loads. Only the config module is imported before
the flags are parsed, so ``--help`` is fast.
"""

from __future__ import annotations

import sys

from diffusers_distill.training.config import parse_config as _parse
from diffusers_distill.training.config import run_cli
from diffusers_distill.training.flow_map_config import FlowMapConfig

DESCRIPTION = (
    "Two-timed flow-map distillation (ITVM, Khungurn et al. arXiv 2505.01169, as read in docs/flow_maps.md; LFMD; "
    "MeanFlow; progressive) of an SD 1.5 / SDXL teacher into an any-step student. Run it with `accelerate launch`."
)
PROG = "train_flow_map.py"


def parse_config(argv: list[str] | None = None) -> FlowMapConfig:
    return _parse(FlowMapConfig, argv, DESCRIPTION)


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        FlowMapConfig,
        argv,
        DESCRIPTION,
        PROG,
        "diffusers_distill.training.flow_map:train_flow_map",
        lambda config, result: (
            f"flow-map distillation ({config.loss}) finished at step {result['global_step']} on "
            f"{result['num_processes']} process(es); outputs in {result['output_dir']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
