"""``diffusers-distill`` console entry point.

    diffusers-distill evaluate [--pipeline sd15|sdxl|FOLDER|HUB_ID] [--scheduler auto|keep|ddim|...] [--steps N]
                               [--guidance W] [--n_per_digit 10] [--seed 0] [--output_dir outputs/eval]
                               [--prompts FILE [--reference_dir DIR] [--n_per_prompt 1] [--no_clip]]
    diffusers-distill demo [--output_dir outputs/demo] [--stages gaussian_mixture,teacher,distill[,flow_map]]

``evaluate`` writes ``grid.png`` and ``metrics.json``; ``demo`` is the README's main command: a stage list
(Gaussian-mixture sampler comparison, the bundled digits teacher under momentum schedulers and diffusers
baselines, then DMD2 distillation of that teacher into a 1-step student; opt-in, a flow-map student of it at 1-8
steps) writing grids, ``metrics.json`` and ``metrics.md`` into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .fileio import atomic_write_json, atomic_write_text

DEMO_SCHEDULERS = ("ddim", "dpmpp_2m", "unipc", "ghvb", "plms_hb", "dpmpp_hb")
DEMO_STEPS = (4, 8, 15)
# the teacher stage runs each scheduler at the bundled teacher's recommended guidance (digits.RECOMMENDED_GUIDANCE)
# and at this high guidance, to show the accuracy / digits-FD trade-off of strong classifier-free guidance
DEMO_HIGH_GUIDANCE = 4.0


def _resolve_pipeline(value: str) -> str:
    """'sd15' / 'sdxl' -> the bundled teacher; a local folder must hold a pipeline or a saved student; anything
    else must look like a Hub id (loaded, from the cache only when offline, by the evaluation)."""
    from .digits import digits_teacher_path
    from .evaluation import STUDENT_CONFIG_READERS, _looks_like_hub_id

    if value in ("sd15", "sdxl"):
        return digits_teacher_path(value)
    if os.path.isdir(value):
        if not any(os.path.isfile(os.path.join(value, n)) for n in STUDENT_CONFIG_READERS):  # model_index.json too
            raise ValueError(f"--pipeline folder {value!r} has none of {', '.join(STUDENT_CONFIG_READERS)}")
        return value
    if not _looks_like_hub_id(value):
        raise ValueError(
            f"--pipeline must be 'sd15', 'sdxl', a local diffusers pipeline folder or a Hub id; "
            f"{value!r} has no model_index.json"
        )
    return value


def _write_json(path: str, obj) -> None:
    """``metrics.json`` as the CLI has always written it: indent 1, keys in insertion order."""
    atomic_write_json(path, obj, indent=1, sort_keys=False)


def metrics_markdown(rows) -> str:
    """A markdown table of evaluation rows (scheduler, steps, guidance, prompt accuracy, digits-FD, seconds)."""
    lines = ["| scheduler | steps | guidance | prompt acc. | digits-FD | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['scheduler']} | {r['steps']} | {r['guidance']:g} | {r['prompt_accuracy']:.3f} | "
            f"{r['digits_fd']:.2f} | {r['seconds']:.2f} |"
        )
    floors = {(r["n_images"], r["real_data_fd"]) for r in rows if r.get("real_data_fd") is not None}
    for n, floor in sorted(floors):
        lines.append(f"\nReal-data floor: digits-FD {floor:.2f} for {n} real digits (what a perfect generator scores).")
    return "\n".join(lines) + "\n"


def run_evaluate(args) -> dict:
    from .evaluation import evaluate_pipeline, evaluate_prompts, read_prompts

    path = _resolve_pipeline(args.pipeline)
    scheduler = args.scheduler
    if args.prompts is not None:
        metrics = evaluate_prompts(
            path,
            read_prompts(args.prompts),
            reference_dir=args.reference_dir,
            clip=not args.no_clip,
            scheduler=scheduler,
            steps=args.steps,
            guidance=args.guidance,
            n_per_prompt=args.n_per_prompt,
            seed=args.seed,
            base_model=args.base_model,
            clip_model=args.clip_model,
            fid_weights=args.fid_weights,
            grid_path=os.path.join(args.output_dir, "grid.png"),
        )
    else:
        metrics = evaluate_pipeline(
            path,
            scheduler=scheduler,
            steps=args.steps,
            guidance=args.guidance,
            n_per_digit=args.n_per_digit,
            seed=args.seed,
            base_model=args.base_model,
            grid_path=os.path.join(args.output_dir, "grid.png"),
        )
    metrics.pop("images")
    metrics["pipeline"] = path
    _write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    print(json.dumps(metrics, indent=1))
    return metrics


def stage_gaussian_mixture(output_dir: str) -> dict | None:
    """Stage 1: endpoint error of diffusers' solvers and this package's momentum schedulers on the analytic
    Gaussian mixture (table ``gaussian_mixture_metrics.md`` and plot; full benchmark: benchmarks/samplers.py)."""
    from .gaussian_mixture import compare_samplers, demo_samplers, error_table_markdown, plot_error_vs_nfe

    samplers = demo_samplers()
    rows = compare_samplers(samplers, guidance_scales=(1.0, 7.5, 15.0), steps=(5, 10, 20), batch_size=128)
    ours = [name for name in samplers if "HB" in name or "GHVB" in name]
    plot_error_vs_nfe(
        rows, os.path.join(output_dir, "gaussian_mixture_error_vs_nfe.png"), dashed=ours, metric="median_error"
    )
    table = error_table_markdown(rows)
    atomic_write_text(os.path.join(output_dir, "gaussian_mixture_metrics.md"), table)
    print(table, flush=True)
    return {"gaussian_mixture": rows}


def stage_teacher(
    output_dir: str,
    arch: str = "sd15",
    schedulers=DEMO_SCHEDULERS,
    steps=DEMO_STEPS,
    guidances=None,
    n_per_digit: int = 4,
    seed: int = 0,
) -> dict:
    """Stage 2: the bundled digits teacher under each scheduler x steps x guidance; one grid per run.

    ``guidances`` defaults to the teacher's recommended guidance and ``DEMO_HIGH_GUIDANCE``.
    """
    from diffusers import DiffusionPipeline

    from .digits import RECOMMENDED_GUIDANCE, digits_teacher_path
    from .evaluation import evaluate_pipeline

    if guidances is None:
        guidances = (RECOMMENDED_GUIDANCE[arch], DEMO_HIGH_GUIDANCE)

    pipe = DiffusionPipeline.from_pretrained(digits_teacher_path(arch), local_files_only=True)
    base_scheduler = pipe.scheduler
    rows = []
    for name in schedulers:
        for n in steps:
            for w in guidances:
                pipe.scheduler = base_scheduler
                m = evaluate_pipeline(
                    pipe,
                    scheduler=name,
                    steps=n,
                    guidance=w,
                    n_per_digit=n_per_digit,
                    seed=seed,
                    grid_path=os.path.join(output_dir, "grids", f"{arch}_{name}_{n}steps_w{w:g}.png"),
                )
                m.pop("images")
                rows.append(m)
                print(
                    f"[demo] {arch} {name:9s} steps={n:3d} w={w:g}: acc={m['prompt_accuracy']:.3f} "
                    f"FD={m['digits_fd']:.2f}",
                    flush=True,
                )
    pipe.scheduler = base_scheduler
    atomic_write_text(os.path.join(output_dir, f"teacher_{arch}_metrics.md"), metrics_markdown(rows))
    return {f"teacher_{arch}": rows}


# The demo's DMD2 run: the measured 1-step recipe of docs/dmd2.md ("Results on the bundled digits teacher",
# benchmarks/dmd2_quality.py's defaults), a full student with an EMA, at the teacher's recommended CFG 1.5.
DEMO_DISTILL = dict(
    num_student_steps=1,
    max_train_steps=3000,
    student_type="full",
    learning_rate=3e-5,
    guidance_learning_rate=3e-4,
    real_guidance_scale=1.5,
    use_ema=True,
    ema_decay=0.999,
)


def distill_markdown(summary: dict) -> str:
    """A markdown table: the DMD2 student next to the teacher it was distilled from (same noise, same guidance)."""
    from .training.distill_digits import result_row, results_markdown

    teacher, student = summary["teacher"], summary["student"]
    rows = [
        result_row(f"teacher DDIM (CFG {teacher['guidance']:g})", teacher),
        result_row(
            f"DMD2 student ({summary['student_type']}, {summary['global_step']} it.)", student, summary["train_seconds"]
        ),
    ]
    return results_markdown(rows, teacher["digits_fd"])


def stage_distill(output_dir: str, n_per_digit: int = 10, seed: int = 0, **overrides) -> dict:
    """Stage 3: DMD2-distil the bundled SD 1.5 digits teacher into a 1-step student and evaluate it.

    The student is a native ``StableDiffusionPipeline`` folder in ``<output_dir>/dmd2_1step`` (with ``samples.png``
    and ``metrics.json``); ``dmd2_metrics.md`` compares it with the 25-step teacher.
    """
    from .training.distill_digits import distill_digits_teacher

    return _distill_stage(
        output_dir,
        "dmd2_1step",
        distill_digits_teacher,
        DEMO_DISTILL,
        distill_markdown,
        "dmd2_metrics.md",
        n_per_digit,
        seed,
        overrides,
    )


def _distill_stage(output_dir, key, distill, defaults, markdown, table_name, n_per_digit, seed, overrides) -> dict:
    """Run ``distill(<output_dir>/<key>, ...)`` with the stage's ``defaults`` updated by ``overrides``, write and
    print its ``markdown`` table as ``table_name``; returns ``{key: summary}``."""
    options = {**defaults, **overrides}
    summary = distill(os.path.join(output_dir, key), n_per_digit=n_per_digit, seed=seed, **options)
    table = markdown(summary)
    atomic_write_text(os.path.join(output_dir, table_name), table)
    print(table, flush=True)
    return {key: summary}


# The flow-map run (docs/flow_maps.md, "Measured: the bundled SD 1.5 digits teacher"): one full ITVM student,
# sampled at 1, 2, 4 and 8 steps. About 13 CPU-minutes, as long as the rest of the demo, so it is opt-in.
DEMO_FLOW_MAP = dict(loss="itvm", max_train_steps=1500, train_batch_size=16, learning_rate=2e-4, guidance=1.5)


def stage_flow_map(output_dir: str, n_per_digit: int = 10, seed: int = 0, **overrides) -> dict:
    """Stage 4 (opt-in, ``--stages ...,flow_map``): distil the bundled SD 1.5 digits teacher into one flow-map
    student and evaluate it at 1, 2, 4 and 8 steps against the teacher.

    The student is a ``FlowMapStableDiffusionPipeline`` folder in ``<output_dir>/flow_map/student``;
    ``flow_map_metrics.md`` holds the table.
    """
    from .training.distill_digits import distill_digits_flow_map

    return _distill_stage(
        output_dir,
        "flow_map",
        distill_digits_flow_map,
        DEMO_FLOW_MAP,
        flow_map_markdown,
        "flow_map_metrics.md",
        n_per_digit,
        seed,
        overrides,
    )


def flow_map_markdown(summary: dict) -> str:
    """The flow-map student's rows next to the teacher's (``distill_digits_flow_map``'s table)."""
    from .training.distill_digits import results_markdown

    return results_markdown(summary["rows"], summary["rows"][0]["digits_fd"])


DEMO_STAGES = {
    "gaussian_mixture": stage_gaussian_mixture,
    "teacher": stage_teacher,
    "distill": stage_distill,
    "flow_map": stage_flow_map,
}
DEFAULT_DEMO_STAGES = ("gaussian_mixture", "teacher", "distill")  # flow_map would double the demo's time


def run_demo(args) -> dict:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in DEMO_STAGES]
    if unknown:
        raise ValueError(f"--stages must be a comma list of {sorted(DEMO_STAGES)}, got unknown {unknown}")
    os.makedirs(args.output_dir, exist_ok=True)
    results: dict = {}
    for stage in stages:
        start = time.time()
        out = DEMO_STAGES[stage](args.output_dir)
        if out:
            results.update(out)
        print(f"[demo] stage {stage} done in {time.time() - start:.0f}s", flush=True)
    _write_json(os.path.join(args.output_dir, "metrics.json"), results)
    sections = []
    if "teacher_sd15" in results:
        sections.append("## Bundled SD 1.5 digits teacher\n\n" + metrics_markdown(results["teacher_sd15"]))
    if "dmd2_1step" in results:
        sections.append("## DMD2 1-step student\n\n" + distill_markdown(results["dmd2_1step"]))
    if "flow_map" in results:
        sections.append("## Flow-map student (1, 2, 4, 8 steps)\n\n" + flow_map_markdown(results["flow_map"]))
    if sections:
        atomic_write_text(os.path.join(args.output_dir, "metrics.md"), "\n".join(sections))
    return results


def build_parser() -> argparse.ArgumentParser:
    from .evaluation import SCHEDULERS

    parser = argparse.ArgumentParser(prog="diffusers-distill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser(
        "evaluate",
        help="digits metrics (or FID / CLIP score with --prompts) of a pipeline, with a sample grid and metrics.json",
    )
    ev.add_argument(
        "--pipeline",
        default="sd15",
        help="'sd15', 'sdxl' (bundled teachers), a pipeline or saved-student folder, or a Hub id",
    )
    ev.add_argument(
        "--scheduler",
        default="auto",
        choices=["auto", "keep", *sorted(SCHEDULERS)],
        help="'keep': the pipeline's own scheduler (and a student's timesteps); 'auto' (default): keep "
        "for distilled students, ddim (trailing spacing) otherwise",
    )
    ev.add_argument("--steps", type=int, default=None, help="default: the student's steps, else 25")
    ev.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="default: the student's guidance, else the bundled teacher's recommended one (digits) or 7.5 (--prompts)",
    )
    ev.add_argument("--n_per_digit", type=int, default=10)
    ev.add_argument("--base_model", default=None, help="base pipeline of a LoRA student (default: its config's)")
    ev.add_argument("--prompts", default=None, help="text file, one prompt per line: FID / CLIP score mode")
    ev.add_argument("--reference_dir", default=None, help="folder of real images for FID (with --prompts)")
    ev.add_argument("--n_per_prompt", type=int, default=1)
    ev.add_argument("--no_clip", action="store_true", help="skip the CLIP score (with --prompts)")
    ev.add_argument(
        "--clip_model",
        default="openai/clip-vit-large-patch14",
        help="CLIP model (Hub id in the local cache, or folder) for the CLIP score",
    )
    ev.add_argument("--fid_weights", default=None, help="local path of torch-fidelity's Inception weights for FID")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output_dir", default="outputs/eval")
    demo = sub.add_parser("demo", help="the README's main command")
    demo.add_argument("--output_dir", default="outputs/demo")
    demo.add_argument(
        "--stages",
        default=",".join(DEFAULT_DEMO_STAGES),
        help=f"comma list of {','.join(DEMO_STAGES)} (default: all but flow_map, which takes another 13 CPU-min)",
    )
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from .evaluation import MetricUnavailableError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            if args.steps is not None and args.steps <= 0:
                raise ValueError(f"--steps must be a positive integer, got {args.steps}")
            if args.guidance is not None and args.guidance < 0:
                raise ValueError(f"--guidance must be >= 0, got {args.guidance}")
            if args.n_per_digit <= 0 or args.n_per_prompt <= 0:
                raise ValueError("--n_per_digit and --n_per_prompt must be positive integers")
            if args.reference_dir is not None and args.prompts is None:
                raise ValueError("--reference_dir needs --prompts (FID mode); the digits mode has its own reference")
            _resolve_pipeline(args.pipeline)
            run_evaluate(args)
        else:
            run_demo(args)
    except ValueError as error:
        print(f"diffusers-distill: error: {error}", file=sys.stderr)
        return 2
    except MetricUnavailableError as error:
        print(f"diffusers-distill: unavailable: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
