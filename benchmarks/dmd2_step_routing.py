"""Which steps of a multi-step DMD2 digits student help? Route some of its steps to the teacher and measure FD.

    OMP_NUM_THREADS=1 python benchmarks/dmd2_step_routing.py outputs/benchmarks/dmd2_quality/student-4step \
        [--n_per_digit 10] [--seed 0]

Samples the exported student with its own pipeline and trained timesteps (LCMScheduler: x0 prediction, re-noised
with fresh seeded noise to the next timestep), while the UNet call at chosen timesteps is answered by the teacher's
CFG x0 prediction instead (same scheduler, same noise, guidance = the student's distillation guidance). Rows: the
student alone, the teacher at the last steps, the teacher at the first steps, the teacher at every step. If the
teacher at the last steps beats the student, the student's late steps made its samples worse. Prints a markdown
table of digits-FD and FD / teacher DDIM@25 on the same noise.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def route_to_teacher(student_unet, teacher_unet, uncond: torch.Tensor, guidance: float, teacher_timesteps: set):
    """Replace ``student_unet.forward`` by one that answers ``teacher_timesteps`` with the teacher's CFG output
    (written by hand: diffusers pipelines take one UNet). Returns a function that restores the original forward."""
    original = student_unet.forward

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        t = int(torch.as_tensor(timestep).flatten()[0])
        if t not in teacher_timesteps:
            return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
        negative = uncond.expand(sample.shape[0], -1, -1)
        both = teacher_unet(
            torch.cat([sample, sample]), timestep, torch.cat([negative, encoder_hidden_states]), return_dict=False
        )[0]
        eps_uncond, eps_cond = both.chunk(2)
        return (eps_uncond + guidance * (eps_cond - eps_uncond),)

    student_unet.forward = forward

    def restore():
        student_unet.forward = original

    return restore


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student_dir", help="a DMD2 digits student folder (full or LoRA) with student_config.json")
    parser.add_argument("--n_per_digit", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_per_digit < 2:
        parser.error(f"--n_per_digit must be >= 2 (FD needs a covariance), got {args.n_per_digit}")
    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline

    from diffusers_distill.digits import digits_teacher_path
    from diffusers_distill.evaluation import evaluate_pipeline, load_pipeline, read_student_sampling
    from diffusers_distill.training.distill_digits import TEACHER_SCHEDULER, TEACHER_STEPS

    student = load_pipeline(args.student_dir)
    sampling = read_student_sampling(args.student_dir)
    if sampling is None:
        parser.error(f"{args.student_dir} has no student config (student_config.json)")
    guidance = float(_distillation_guidance(args.student_dir))
    timesteps = [int(t) for t in sampling.timesteps]
    if len(timesteps) < 2:
        parser.error(f"the student has {len(timesteps)} step; routing needs a multi-step student")
    teacher = StableDiffusionPipeline.from_pretrained(digits_teacher_path("sd15"), safety_checker=None)
    common = dict(n_per_digit=args.n_per_digit, seed=args.seed)
    reference = evaluate_pipeline(
        teacher, scheduler=TEACHER_SCHEDULER, steps=TEACHER_STEPS, guidance=guidance, **common
    )
    uncond = teacher.encode_prompt([""], "cpu", 1, False)[0]
    half = len(timesteps) // 2
    routes = {
        "student at every step": set(),
        f"teacher at the last {len(timesteps) - half} steps": set(timesteps[half:]),
        "teacher at the last step": {timesteps[-1]},
        f"teacher at the first {half} steps": set(timesteps[:half]),
        "teacher at every step": set(timesteps),
    }
    rows = []
    print(f"{args.student_dir}: timesteps {timesteps}, teacher CFG {guidance:g}, {10 * args.n_per_digit} images\n")
    print("| sampler | digits-FD | FD / teacher DDIM@25 |\n|---|---|---|")
    print(f"| teacher DDIM, {TEACHER_STEPS} steps | {reference['digits_fd']:.2f} | 1.00x |")
    for name, routed in routes.items():
        restore = route_to_teacher(student.unet, teacher.unet, uncond, guidance, routed)
        try:
            m = evaluate_pipeline(
                student, scheduler="keep", steps=len(timesteps), timesteps=timesteps, guidance=0.0, **common
            )
        finally:
            restore()
        ratio = m["digits_fd"] / reference["digits_fd"]
        print(f"| {name} | {m['digits_fd']:.2f} | {ratio:.2f}x |", flush=True)
        rows.append({"sampler": name, "digits_fd": m["digits_fd"], "ratio": ratio})
    return rows


def _distillation_guidance(student_dir: str) -> float:
    """The real-score CFG the student was distilled with (``metrics.json`` of distill_digits, else 1.5)."""
    import json

    path = os.path.join(student_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)["config"]["real_guidance_scale"]
    return 1.5


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
