"""Flow-map distillation of the bundled SD 1.5 digits teacher, on CPU: one student, evaluated at 1, 2, 4 and 8 steps.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/flow_map_digits.py [--loss itvm] [--max_train_steps 3000] \
        [--guidance 1.5] [--output_dir outputs/benchmarks/flow_map_digits]

Trains one full student with ``train_flow_map`` (real train-split digits, noised to x_s; teacher velocity with CFG
``--guidance`` distilled in), then loads the exported folder with ``FlowMapStableDiffusionPipeline.from_pretrained``
as a user would and samples it at 1, 2, 4 and 8 steps from the same seeded noise as the teacher. The teacher is
sampled with DDIM (trailing spacing) at 25 steps (the reference) and at the student's step counts (the
no-distillation baseline), at the same guidance. The real-data floor is the digits-FD of as many train-split digits
as generated images (the FD reference is the held-out split). Prints a markdown table (prompt accuracy, digits-FD,
PSNR vs teacher@25, CPU training time) and writes ``flow_map_digits.md``/``.json``, one sample grid per row and
``flow_map_digits.png`` (FD against steps) to ``--output_dir``. ``--skip_training`` re-evaluates an existing export.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

STEPS = (1, 2, 4, 8)
TEACHER_STEPS = 25


def _train(args) -> dict:
    from diffusers_distill.digits import IMAGE_SIZE, digits_teacher_path
    from diffusers_distill.training.distill_digits import write_digit_images, write_digit_prompts
    from diffusers_distill.training.flow_map import FlowMapConfig, train_flow_map

    data = os.path.join(args.output_dir, "data")
    config = FlowMapConfig(
        pretrained_teacher_model=digits_teacher_path("sd15"),
        output_dir=os.path.join(args.output_dir, "student"),
        prompt_file=write_digit_prompts(os.path.join(data, "prompts.txt")),
        train_data_dir=write_digit_images(os.path.join(data, "images")),
        resolution=IMAGE_SIZE,
        loss=args.loss,
        guidance_scale=args.guidance,
        student_type="full",
        train_batch_size=args.train_batch_size,
        max_train_steps=args.max_train_steps,
        learning_rate=args.learning_rate,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=min(100, args.max_train_steps // 10),
        max_grad_norm=1.0,
        use_ema=True,
        ema_decay=args.ema_decay,
        target_ema_decay=args.target_ema_decay,
        default_num_inference_steps=4,
        cache_text_embeddings=True,
        checkpointing_steps=10**9,
        report_to="none",
        seed=args.seed,
    )
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = train_flow_map(config)
    return {
        "wall_seconds": time.perf_counter() - start_wall,
        "cpu_seconds": time.process_time() - start_cpu,
        "global_step": result["global_step"],
        "final_loss": result["losses"][-1]["loss"] if result["losses"] else None,
    }


@torch.no_grad()
def _evaluate_student(pipe, steps: int, n_per_digit: int, seed: int, reference, grid_path: str) -> dict:
    """The student's images from the same seeded noise as ``evaluation.generate_digits`` (its pipeline distils
    guidance in, so it takes no ``guidance_scale``)."""
    from diffusers_distill.digits import digit_prompt
    from diffusers_distill.evaluation import digits_fd, image_psnr, prompt_accuracy, save_image_grid

    labels = torch.arange(10).repeat_interleave(n_per_digit)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.randn(len(labels), channels, size, size, generator=torch.Generator().manual_seed(seed))
    images = (
        pipe(
            [digit_prompt(int(y)) for y in labels], num_inference_steps=steps, latents=latents, output_type="pt"
        ).images
        * 2
        - 1
    )
    order = torch.arange(len(labels)).reshape(10, n_per_digit).T.flatten()
    save_image_grid(images[order], grid_path, nrow=10)
    return {
        "steps": steps,
        "prompt_accuracy": prompt_accuracy(images, labels),
        "digits_fd": digits_fd(images),
        "psnr": image_psnr(images, reference),
    }


def _real_data_floor(n_per_digit: int) -> dict:
    """digits-FD and accuracy of ``n_per_digit`` train-split digits per class (the held-out split is the FD
    reference): what a perfect generator scores with this many images."""
    from diffusers_distill.digits import load_digits_split
    from diffusers_distill.evaluation import digits_fd, prompt_accuracy

    images, labels = load_digits_split("train")
    picked = torch.cat([torch.nonzero(labels == d).flatten()[:n_per_digit] for d in range(10)])
    return {
        "steps": "-",
        "prompt_accuracy": prompt_accuracy(images[picked], labels[picked]),
        "digits_fd": digits_fd(images[picked]),
        "psnr": None,
    }


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_distill.fileio import atomic_path

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name in ("teacher DDIM", "flow-map student"):
        points = [(r["steps"], r["digits_fd"]) for r in rows if r["model"].startswith(name) and r["steps"] != 25]
        axis.plot(*zip(*points), marker="o", label=name)
    reference = next(r["digits_fd"] for r in rows if r["steps"] == TEACHER_STEPS)
    floor = next(r["digits_fd"] for r in rows if r["model"].startswith("real"))
    axis.axhline(reference, color="k", linestyle="--", label="teacher DDIM 25 steps")
    axis.axhline(floor, color="g", linestyle=":", label="real-data floor")
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="steps",
        ylabel="digits-FD",
        xticks=list(STEPS),
        xticklabels=[str(s) for s in STEPS],
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)


def _markdown(rows: list[dict], reference_fd: float) -> str:
    lines = [
        "| model | steps | prompt acc. | digits-FD | FD / teacher@25 | PSNR vs teacher@25 (dB) | training |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "-" if r.get("psnr") is None else f"{r['psnr']:.1f}"
        train = r.get("training", "-")
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['prompt_accuracy']:.3f} | {r['digits_fd']:.2f} | "
            f"{r['digits_fd'] / reference_fd:.2f}x | {psnr} | {train} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="itvm", choices=["itvm", "lfmd", "meanflow", "progressive"])
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--guidance", type=float, default=1.5, help="teacher CFG distilled into the student")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="evaluation EMA (exported)")
    parser.add_argument("--target_ema_decay", type=float, default=0.99, help="target network of itvm/progressive")
    parser.add_argument("--n_per_digit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_training", action="store_true", help="evaluate an existing <output_dir>/student")
    parser.add_argument("--output_dir", default="outputs/benchmarks/flow_map_digits")
    args = parser.parse_args(argv)
    if args.max_train_steps < 1 or args.n_per_digit < 1:
        parser.error("--max_train_steps and --n_per_digit must be >= 1")
    torch.set_num_threads(1)
    from diffusers_distill.fileio import atomic_write_json, atomic_write_text
    from diffusers_distill.pipelines.pipeline_flow_map import FlowMapStableDiffusionPipeline
    from diffusers_distill.training.distill_digits import teacher_baselines

    os.makedirs(args.output_dir, exist_ok=True)
    training_path = os.path.join(args.output_dir, "training.json")
    if args.skip_training:
        with open(training_path, encoding="utf-8") as f:
            training = json.load(f)
    else:
        training = _train(args)
        atomic_write_json(training_path, training)

    rows, reference = teacher_baselines(args.output_dir, STEPS, args.guidance, args.n_per_digit, args.seed)
    pipe = FlowMapStableDiffusionPipeline.from_pretrained(
        os.path.join(args.output_dir, "student"), local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    minutes = f"{training['cpu_seconds'] / 60:.1f} CPU min ({training['wall_seconds'] / 60:.1f} min wall)"
    for steps in STEPS:
        grid = os.path.join(args.output_dir, f"student-{steps}.png")
        row = _evaluate_student(pipe, steps, args.n_per_digit, args.seed, reference, grid)
        rows.append({"model": f"flow-map student ({args.loss})", **row, "training": minutes})
    rows.append({"model": "real digits (train split), the floor", **_real_data_floor(args.n_per_digit)})
    reference_fd = rows[0]["digits_fd"]
    table = _markdown(rows, reference_fd)
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
