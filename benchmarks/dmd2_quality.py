"""DMD2 on the bundled SD 1.5 digits teacher: 1-, 2- and 4-step students vs the teacher, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/dmd2_quality.py [--max_train_steps 3000] [--ema_decay 0.999 | 0] \
        [--gan_loss_weight 0] [--teacher_regression_from_step 2 | none] [--output_dir outputs/benchmarks/dmd2_quality]

Trains the students two at a time (two processes, one thread each), then samples the teacher with DDIM at 25 steps
(the reference) and at the students' step counts (the no-distillation baseline; ``trailing`` spacing, so 1 step
samples t=999 and 4 steps t=999/749/499/249, the students' own timesteps), all at the guidance the students were
distilled with and from the same seeded noise (every generator seeded, see ``diffusers_distill.evaluation``). For
each multi-step student it also reports the FD after each of its steps: the exported pipeline run on the first k
trained timesteps (LCMScheduler returns its x0 prediction at the last step given). By default the 4-step student's
3rd and 4th steps regress onto the teacher (``--teacher_regression_from_step 2``, docs/dmd2.md); ``none`` trains
every step with DMD2.
Prints a markdown table (prompt accuracy, digits-FD, PSNR vs the teacher@25, training wall time) and writes
``dmd2_quality.md``, ``dmd2_quality.json`` and one sample grid per row
(rows = sample index, columns = digits 0..9) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

STUDENT_STEPS = (1, 2, 4)


def student_timesteps(student_dir: str) -> list[int]:
    import json

    with open(os.path.join(student_dir, "student_config.json"), encoding="utf-8") as f:
        return [int(t) for t in json.load(f)["timesteps"]]


def _train_student(kwargs: dict) -> dict:
    """Worker: one distillation with one thread (runs in a spawned process)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)
    from diffusers_distill.training.distill_digits import distill_digits_teacher

    return distill_digits_teacher(**kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--student_type", default="full", choices=["full", "lora"])
    parser.add_argument("--guidance", type=float, default=1.5, help="real-score CFG scale = teacher guidance")
    parser.add_argument("--student_steps", type=int, nargs="+", default=list(STUDENT_STEPS), help="students to train")
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument(
        "--fake_score_learning_rate", "--guidance_learning_rate", type=float, default=3e-4, help="fake-score lr"
    )
    parser.add_argument("--dfake_gen_update_ratio", type=int, default=5)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--n_per_digit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema_decay", type=float, default=0.999, help="generator EMA decay; 0 = no EMA")
    parser.add_argument("--gan_loss_weight", type=float, default=0.0, help="> 0: GAN losses on the real digits")
    parser.add_argument(
        "--dm_timesteps_below_input",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="N-step students: the DM loss of step k noises only up to t_k",
    )
    parser.add_argument(
        "--fake_score_step_conditioning",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="N-step students: the fake score is conditioned on the generator step",
    )
    parser.add_argument(
        "--teacher_regression_from_step",
        type=lambda value: None if value == "none" else int(value),
        default=2,
        help="students with more steps than K: steps k >= K (0-based) regress onto the teacher's CFG x0 (ours, "
        "sd15_4step.json's K=2); 'none': DMD2 at every step",
    )
    parser.add_argument("--sequential", action="store_true", help="train the students one after the other")
    parser.add_argument("--output_dir", default="outputs/benchmarks/dmd2_quality")
    args = parser.parse_args(argv)
    if args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.gan_loss_weight < 0:
        raise ValueError(f"--gan_loss_weight must be >= 0, got {args.gan_loss_weight}")
    regression = args.teacher_regression_from_step
    if regression is not None and regression < 1:
        raise ValueError(f"--teacher_regression_from_step must be >= 1, got {regression}")
    torch.set_num_threads(1)
    from diffusers_distill.evaluation import evaluate_pipeline
    from diffusers_distill.fileio import atomic_write_json, atomic_write_text
    from diffusers_distill.training.distill_digits import result_row, results_markdown, teacher_baselines

    os.makedirs(args.output_dir, exist_ok=True)
    jobs = [
        dict(
            output_dir=os.path.join(args.output_dir, f"student-{n}step"),
            num_student_steps=n,
            max_train_steps=args.max_train_steps,
            student_type=args.student_type,
            seed=args.seed,
            real_guidance_scale=args.guidance,
            learning_rate=args.learning_rate,
            fake_score_learning_rate=args.fake_score_learning_rate,
            dfake_gen_update_ratio=args.dfake_gen_update_ratio,
            train_batch_size=args.train_batch_size,
            n_per_digit=args.n_per_digit,
            gan_loss_weight=args.gan_loss_weight,
            use_ema=args.ema_decay > 0,
            ema_decay=args.ema_decay,
            dm_timesteps_below_input=args.dm_timesteps_below_input and n > 1,
            fake_score_step_conditioning=args.fake_score_step_conditioning and n > 1,
            teacher_regression_from_step=regression if regression is not None and n > regression else None,
        )
        for n in args.student_steps
    ]
    with ProcessPoolExecutor(max_workers=1 if args.sequential else 2, mp_context=get_context("spawn")) as pool:
        students = list(pool.map(_train_student, jobs))

    rows, reference = teacher_baselines(args.output_dir, args.student_steps, args.guidance, args.n_per_digit, args.seed)
    for job, result in zip(jobs, students):
        timesteps = student_timesteps(job["output_dir"])
        for k in range(1, len(timesteps)):  # the FD after each step but the last (the student row itself)
            m = evaluate_pipeline(
                job["output_dir"],
                scheduler="keep",
                steps=k,
                timesteps=timesteps[:k],
                n_per_digit=args.n_per_digit,
                seed=args.seed,
                reference=reference,
            )
            rows.append(result_row(f"DMD2 {len(timesteps)}-step student, after step {k} (t={timesteps[:k]})", m))
        cpu_seconds = result["train_cpu_seconds"]
        rows.append(
            result_row(f"DMD2 {args.student_type} student", result["student"], result["train_seconds"], cpu_seconds)
        )
    reference_fd = rows[0]["digits_fd"]
    table = results_markdown(rows, reference_fd)
    ema = f"EMA {args.ema_decay:g}" if args.ema_decay > 0 else "no EMA"
    header = (
        f"DMD2 on the bundled SD 1.5 digits teacher: {args.max_train_steps} iterations, batch "
        f"{args.train_batch_size}, lr {args.learning_rate:g} (fake score {args.fake_score_learning_rate:g}), "
        f"TTUR {args.dfake_gen_update_ratio}, real CFG {args.guidance:g}, GAN weight {args.gan_loss_weight:g}, "
        f"{ema}; N-step: DM timesteps below the step input {args.dm_timesteps_below_input}, step-conditioned "
        f"fake score {args.fake_score_step_conditioning}, teacher regression from step {regression}; "
        f"{10 * args.n_per_digit} images (seed {args.seed}); CPU, "
        "1 thread per training."
    )
    print(header + "\n\n" + table, end="")
    atomic_write_text(os.path.join(args.output_dir, "dmd2_quality.md"), header + "\n\n" + table)
    report = {"args": vars(args), "rows": rows, "students": students}
    atomic_write_json(os.path.join(args.output_dir, "dmd2_quality.json"), report, default=str, sort_keys=False)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
