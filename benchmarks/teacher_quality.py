"""Digits-teacher quality vs sampling steps, guidance and scheduler (prompt accuracy, digits-FD).

    OMP_NUM_THREADS=1 python benchmarks/teacher_quality.py [--arch sd15] [--pipeline FOLDER] [--n_per_digit 10]
                                                           [--output_dir outputs/teacher_quality]

Prints a markdown table (schedulers x steps x guidance; trailing spacing, seeded) and the real-data floor (digits-FD
of real digits at the same sample count), and writes ``teacher_quality.json`` + ``teacher_quality.png``.
``--pipeline`` measures another teacher folder (e.g. an older teacher) instead of the bundled one.
"""

from __future__ import annotations

import argparse
import os

import torch

from diffusers_distill.cli import metrics_markdown
from diffusers_distill.digits import digits_teacher_path
from diffusers_distill.evaluation import evaluate_pipeline, real_data_fd
from diffusers_distill.fileio import atomic_path, atomic_write_json

SCHEDULERS = ("ddim", "dpmpp_2m", "unipc", "ghvb", "plms_hb", "dpmpp_hb")
STEPS = (4, 8, 15, 25, 50)
GUIDANCES = (1.0, 4.0, 7.5)


def pivot_markdown(rows, floor: float) -> str:
    """One table per guidance: schedulers x steps, cells ``prompt accuracy / digits-FD``, with the floor below."""
    out = []
    for w in sorted({r["guidance"] for r in rows}):
        sub = [r for r in rows if r["guidance"] == w]
        steps = sorted({r["steps"] for r in sub})
        out.append(f"**guidance {w:g}** (cells: prompt accuracy / digits-FD)\n")
        out.append("| scheduler | " + " | ".join(f"{n} steps" for n in steps) + " |")
        out.append("|---|" + "---|" * len(steps))
        for name in dict.fromkeys(r["scheduler"] for r in sub):
            cells = {
                r["steps"]: f"{r['prompt_accuracy']:.2f} / {r['digits_fd']:.0f}" for r in sub if r["scheduler"] == name
            }
            out.append(f"| {name} | " + " | ".join(cells.get(n, "-") for n in steps) + " |")
        out.append("")
    out.append(f"Real-data floor at {rows[0]['n_images']} images: digits-FD {floor:.1f}.")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--pipeline", default=None, help="teacher folder (default: the bundled --arch teacher)")
    parser.add_argument("--n_per_digit", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS))
    parser.add_argument("--steps", default=",".join(map(str, STEPS)))
    parser.add_argument("--guidances", default=",".join(map(str, GUIDANCES)))
    parser.add_argument("--output_dir", default="outputs/teacher_quality")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline or digits_teacher_path(args.arch), local_files_only=True)
    base = pipe.scheduler
    rows = []
    for w in [float(x) for x in args.guidances.split(",")]:
        for name in args.schedulers.split(","):
            for n in [int(x) for x in args.steps.split(",")]:
                pipe.scheduler = base
                m = evaluate_pipeline(
                    pipe, scheduler=name, steps=n, guidance=w, n_per_digit=args.n_per_digit, seed=args.seed
                )
                m.pop("images")
                rows.append(m)
                print(
                    f"w={w:g} {name:9s} steps={n:3d} acc={m['prompt_accuracy']:.3f} FD={m['digits_fd']:.2f}", flush=True
                )
    floor = real_data_fd(args.n_per_digit, args.seed)
    report = {"rows": rows, "real_data_fd": floor, "n_images": 10 * args.n_per_digit}
    atomic_write_json(os.path.join(args.output_dir, "teacher_quality.json"), report, indent=1, sort_keys=False)
    print(metrics_markdown(rows))
    print(pivot_markdown(rows, floor))
    print(
        f"real-data floor (digits-FD of {10 * args.n_per_digit} real train digits vs the held-out reference, "
        f"seed {args.seed}): {floor:.2f}"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidances = sorted({r["guidance"] for r in rows})
    fig, axes = plt.subplots(2, len(guidances), figsize=(4.5 * len(guidances), 7), squeeze=False)
    for k, w in enumerate(guidances):
        for name in dict.fromkeys(r["scheduler"] for r in rows):
            pts = [r for r in rows if r["scheduler"] == name and r["guidance"] == w]
            axes[0][k].plot([r["steps"] for r in pts], [r["prompt_accuracy"] for r in pts], marker=".", label=name)
            axes[1][k].plot([r["steps"] for r in pts], [r["digits_fd"] for r in pts], marker=".", label=name)
        axes[0][k].set_title(f"guidance {w:g}")
        for ax in axes[:, k]:
            ax.set_xscale("log")
            ax.set_xlabel("steps")
        axes[0][k].set_ylabel("prompt accuracy")
        axes[1][k].set_ylabel("digits-FD")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(os.path.join(args.output_dir, "teacher_quality.png")) as temporary:
        fig.savefig(temporary, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
