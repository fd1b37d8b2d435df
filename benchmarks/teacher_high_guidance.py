"""Digits teacher at high guidance: momentum schedulers vs diffusers' solvers (prompt accuracy, digits-FD).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/teacher_high_guidance.py [--arch sd15] [--n_per_digit 10]
        [--guidances 7.5,15,25] [--steps 6,10,20] [--samplers ddim,dpmpp_2m,...]
        [--output_dir outputs/teacher_high_guidance]

One command: samples the bundled digits teacher (``diffusers_distill.digits_teacher_path``) with every sampler x steps
x guidance from the same noise, and writes ``teacher_high_guidance.md`` (one table per guidance: prompt accuracy and
digits-FD per step count, best diffusers solver marked), ``teacher_high_guidance.json`` and
``teacher_high_guidance.png``. Each sampler is built with ``from_config`` on the teacher's own scheduler config (its
spacing and final sigma), exactly as a user swaps schedulers in a pipeline.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from diffusers_distill.digits import digits_teacher_path
from diffusers_distill.evaluation import evaluate_pipeline
from diffusers_distill.fileio import atomic_path, atomic_write_text

DIFFUSERS = ("ddim", "pndm", "dpmpp_2m", "unipc", "deis")


def sampler_factories(config) -> dict:
    """name -> zero-argument factory of a scheduler built from the teacher's scheduler ``config``."""
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    from diffusers_distill import (
        DPMSolverHeavyBallScheduler,
        GHVBScheduler,
        PLMSHeavyBallScheduler,
    )

    return {
        "ddim": lambda: DDIMScheduler.from_config(config),
        "pndm": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        ),
        "unipc": lambda: UniPCMultistepScheduler.from_config(config),
        "deis": lambda: DEISMultistepScheduler.from_config(config),
        # the class defaults (docs/schedulers.md) and the momentum settings the GMM benchmark singles out
        "ghvb_default": lambda: GHVBScheduler.from_config(config),
        "ghvb_4.0": lambda: GHVBScheduler.from_config(config, multistep_order=4, momentum_beta=1.0),
        "plms_hb_default": lambda: PLMSHeavyBallScheduler.from_config(config),
        "plms4_hb0.6": lambda: PLMSHeavyBallScheduler.from_config(config, multistep_order=4, momentum_beta=0.6),
        "dpmpp_hb_default": lambda: DPMSolverHeavyBallScheduler.from_config(config),
        "dpmpp_hb0.6": lambda: DPMSolverHeavyBallScheduler.from_config(config, momentum_beta=0.6),
    }


def markdown(rows, steps, guidances) -> str:
    lines = []
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    table = {(r["sampler"], r["guidance"], r["steps"]): r for r in rows}
    for w in guidances:
        lines += [
            (
                f"\n**guidance {w:g}** (prompt accuracy / digits-FD; lower FD is better; "
                "`*` = best diffusers solver by FD at that step count)\n"
            ),
            "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        best = {
            n: min((s for s in names if s in DIFFUSERS), key=lambda s: table[(s, w, n)]["digits_fd"]) for n in steps
        }
        for name in names:
            cells = [
                f"{table[(name, w, n)]['prompt_accuracy']:.2f} / {table[(name, w, n)]['digits_fd']:.2f}"
                + ("*" if best[n] == name else "")
                for n in steps
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, guidances, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(guidances), figsize=(4.5 * len(guidances), 7), squeeze=False)
    for k, w in enumerate(guidances):
        for name in dict.fromkeys(r["sampler"] for r in rows):
            points = [r for r in rows if r["sampler"] == name and r["guidance"] == w]
            style = "-" if name in DIFFUSERS else "--"
            axes[0][k].plot(
                [r["steps"] for r in points], [r["prompt_accuracy"] for r in points], style, marker=".", label=name
            )
            axes[1][k].plot(
                [r["steps"] for r in points], [r["digits_fd"] for r in points], style, marker=".", label=name
            )
        axes[0][k].set_title(f"guidance {w:g}")
        for axis in axes[:, k]:
            axis.set_xlabel("steps")
        axes[0][k].set_ylabel("prompt accuracy")
        axes[1][k].set_ylabel("digits-FD")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--n_per_digit", type=int, default=10)
    parser.add_argument("--samplers", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--steps", default="6,10,20")
    parser.add_argument("--guidances", default="7.5,15,25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timestep_spacing",
        default="trailing",
        choices=["trailing", "leading", "linspace"],
        help="spacing of every sampler (trailing, as in docs/evaluation.md; the teacher saves leading)",
    )
    parser.add_argument("--output_dir", default="outputs/teacher_high_guidance")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    steps = [int(x) for x in args.steps.split(",")]
    guidances = [float(x) for x in args.guidances.split(",")]
    pipe = DiffusionPipeline.from_pretrained(digits_teacher_path(args.arch), local_files_only=True)
    factories = sampler_factories({**pipe.scheduler.config, "timestep_spacing": args.timestep_spacing})
    names = args.samplers.split(",") if args.samplers else list(factories)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise SystemExit(f"--samplers: unknown {unknown}; choose from {list(factories)}")
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for w in guidances:
        for name in names:
            for n in steps:
                pipe.scheduler = factories[name]()
                m = evaluate_pipeline(
                    pipe, scheduler=None, steps=n, guidance=w, n_per_digit=args.n_per_digit, seed=args.seed
                )
                m.pop("images")
                m["sampler"] = name
                rows.append(m)
                print(
                    f"w={w:g} {name:16s} steps={n:3d} acc={m['prompt_accuracy']:.3f} FD={m['digits_fd']:.2f}",
                    flush=True,
                )
    header = (
        f"# Digits teacher ({args.arch}) at high guidance\n\n{args.n_per_digit} images per digit, seed "
        f"{args.seed}, samplers built with from_config on the teacher's scheduler config "
        f"(`{args.timestep_spacing}` spacing).\n"
    )
    atomic_write_text(
        os.path.join(args.output_dir, "teacher_high_guidance.md"), header + markdown(rows, steps, guidances)
    )
    atomic_write_text(os.path.join(args.output_dir, "teacher_high_guidance.json"), json.dumps(rows, indent=1))
    plot(rows, guidances, os.path.join(args.output_dir, "teacher_high_guidance.png"))
    print(markdown(rows, steps, guidances))
    print(f"wrote {os.path.join(args.output_dir, 'teacher_high_guidance.md')}")


if __name__ == "__main__":
    main()
