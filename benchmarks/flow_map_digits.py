"""Flow-map distillation of the bundled SD 1.5 digits teacher, on CPU: one student, evaluated at 1, 2, 4 and 8 steps.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/flow_map_digits.py [--loss itvm] [--max_train_steps 3000] \
        [--train_batch_size 16] [--guidance 1.5] [--output_dir outputs/benchmarks/flow_map_digits]

The defaults are the recipe of docs/flow_maps.md's main ITVM row (3000 iterations x batch 16, about 21 CPU-minutes).

Trains one full student with ``train_flow_map`` (real train-split digits, noised to x_s; teacher velocity with CFG
``--guidance`` distilled in), then loads the exported folder with ``FlowMapStableDiffusionPipeline.from_pretrained``
as a user would and samples it at 1, 2, 4 and 8 steps from the same seeded noise as the teacher. The teacher is
sampled with DDIM (trailing spacing) at 25 steps (the reference) and at the student's step counts (the
no-distillation baseline), at the same guidance. The real-data floor is the digits-FD of as many train-split digits
as generated images (the FD reference is the held-out split). Prints a markdown table (prompt accuracy, digits-FD,
digits-FD to the teacher's 25-step images, PSNR vs teacher@25, CPU training time) and writes
``flow_map_digits.md``/``.json``, one sample grid per row and ``flow_map_digits.png`` (FD against steps) to
``--output_dir``. ``--skip_training`` re-evaluates an existing export.
``--compare DIR ...`` adds rows for other saved students (e.g. the DMD2 students of ``benchmarks/dmd2_quality.py``),
sampled from the same noise with their recorded settings (flow-map students at 1, 2, 4 and 8 steps).

The default is 1000 images (100 per digit). FD is biased and noisy at small counts: the teacher's 25-step FD is
36.2 / 52.0 at evaluation seeds 0 / 1 with 200 images, 31.3 / 36.3 with 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from diffusers_distill.training.distill_digits import FLOW_MAP_STEPS as STEPS
from diffusers_distill.training.distill_digits import TEACHER_STEPS


def _real_data_floor(n_per_digit: int) -> dict:
    """digits-FD and accuracy of ``n_per_digit`` train-split digits per class (the held-out split is the FD
    reference): what a perfect generator scores with this many images."""
    from diffusers_distill.digits import load_digits_split
    from diffusers_distill.evaluation import digits_fd, prompt_accuracy
    from diffusers_distill.training.distill_digits import result_row

    images, labels = load_digits_split("train")
    picked = torch.cat([torch.nonzero(labels == d).flatten()[:n_per_digit] for d in range(10)])
    metrics = {
        "steps": "-",
        "prompt_accuracy": prompt_accuracy(images[picked], labels[picked]),
        "digits_fd": digits_fd(images[picked]),
    }
    return result_row("real digits (train split), the floor", metrics)


def _plot(rows: list[dict], path: str) -> None:
    """Two panels against steps: digits-FD (to real digits) and FD to the teacher's 25-step images; one line per
    model (one marker for a fixed-step student), the 25-step teacher and the real-data floor as horizontal lines."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_distill.fileio import atomic_path

    series: dict[str, list[dict]] = {}
    for r in rows:
        if isinstance(r["steps"], int) and not (r["model"].startswith("teacher") and r["steps"] == TEACHER_STEPS):
            series.setdefault(r["model"], []).append(r)
    reference = next(r["digits_fd"] for r in rows if r["steps"] == TEACHER_STEPS)
    floor = next(r["digits_fd"] for r in rows if r["model"].startswith("real"))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((axes[0], "digits_fd", "digits-FD"), (axes[1], "fd_to_teacher", "FD to teacher@25")):
        for model, points in series.items():
            axis.plot([p["steps"] for p in points], [p[key] for p in points], marker="o", label=model)
        if key == "digits_fd":
            axis.axhline(reference, color="k", linestyle="--", label="teacher DDIM 25 steps")
            axis.axhline(floor, color="g", linestyle=":", label="real-data floor")
        axis.set(xscale="log", yscale="linear" if key == "digits_fd" else "log", xlabel="steps", ylabel=label)
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticks(list(STEPS), [str(s) for s in STEPS])
    figure.tight_layout(rect=(0, 0.22, 1, 1))
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="itvm", choices=["itvm", "lfmd", "meanflow", "progressive"])
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--guidance", type=float, default=1.5, help="teacher CFG distilled into the student")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="evaluation EMA (exported)")
    parser.add_argument("--target_ema_decay", type=float, default=0.99, help="target network of itvm/progressive")
    parser.add_argument("--n_per_digit", type=int, default=100)
    parser.add_argument("--compare", nargs="*", default=[], metavar="DIR", help="other saved students to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_training", action="store_true", help="evaluate an existing <output_dir>/student")
    parser.add_argument("--output_dir", default="outputs/benchmarks/flow_map_digits")
    args = parser.parse_args(argv)
    if args.max_train_steps < 1 or args.n_per_digit < 2:
        parser.error("--max_train_steps must be >= 1 and --n_per_digit >= 2 (FD needs a covariance)")
    missing = [d for d in args.compare if not os.path.isdir(d)]
    if missing:
        parser.error(f"--compare takes saved student folders; not a folder: {', '.join(missing)}")
    torch.set_num_threads(1)
    from diffusers_distill.fileio import atomic_write_json, atomic_write_text
    from diffusers_distill.training.distill_digits import (
        distill_digits_flow_map,
        evaluate_digits_flow_map,
        results_markdown,
    )

    os.makedirs(args.output_dir, exist_ok=True)
    training_path = os.path.join(args.output_dir, "training.json")
    recipe_keys = ("loss", "train_batch_size", "learning_rate", "guidance", "ema_decay", "target_ema_decay")
    if args.skip_training:
        with open(training_path, encoding="utf-8") as f:
            training = json.load(f)
        if "recipe" not in training:
            parser.error(
                f"--skip_training needs the training recipe, {list(recipe_keys)}, under 'recipe' in {training_path}"
            )
        # the header and the teacher rows follow the recipe the student was trained with, not this call's defaults
        for key in recipe_keys:
            setattr(args, key, training["recipe"][key])
    else:
        training = distill_digits_flow_map(
            args.output_dir,
            args.loss,
            args.max_train_steps,
            args.train_batch_size,
            args.learning_rate,
            args.guidance,
            args.ema_decay,
            args.target_ema_decay,
            args.seed,
            evaluate=False,
        )["training"]
        training["recipe"] = {key: getattr(args, key) for key in recipe_keys}
        atomic_write_json(training_path, training)

    rows = evaluate_digits_flow_map(
        args.output_dir, args.loss, training, STEPS, args.guidance, args.n_per_digit, args.seed, args.compare
    )
    rows.append(_real_data_floor(args.n_per_digit))
    reference_fd = rows[0]["digits_fd"]
    table = results_markdown(rows, reference_fd)
    header = (
        f"Flow-map ({args.loss}) student of the bundled SD 1.5 digits teacher: {training['global_step']} iterations, "
        f"batch {args.train_batch_size}, lr {args.learning_rate:g}, teacher CFG {args.guidance:g}, target EMA "
        f"{args.target_ema_decay:g}, evaluation EMA {args.ema_decay:g}; {10 * args.n_per_digit} images (seed "
        f"{args.seed}); CPU, 1 torch thread; training {training['cpu_seconds'] / 60:.1f} CPU min, "
        f"{training['wall_seconds'] / 60:.1f} min wall."
    )
    print(header + "\n\n" + table, end="")
    atomic_write_text(os.path.join(args.output_dir, "flow_map_digits.md"), header + "\n\n" + table)
    atomic_write_json(
        os.path.join(args.output_dir, "flow_map_digits.json"),
        {"args": vars(args), "training": training, "rows": rows},
        sort_keys=False,
    )
    _plot(rows, os.path.join(args.output_dir, "flow_map_digits.png"))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
