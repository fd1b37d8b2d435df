"""Exact Gaussian-mixture benchmark: momentum schedulers vs diffusers solvers (method: docs/momentum_samplers.md).

Every scheduler is built from the same SD1.5 noise schedule (scaled_linear 0.00085-0.012), the same timestep spacing
and the same final sigma, driven through set_timesteps / scale_model_input / step like a pipeline, and scored against
a DOP853 (rtol = atol = 1e-10) solution of the classifier-free-guided PF-ODE from the same noise to the same final
time. Per cell: the median over samples of the endpoint error, and the fraction of blown-up samples (non-finite, or
farther than max(data radius, reference radius) + 5 s).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/samplers.py [--output-dir outputs/benchmarks] [--batch-size 512]
        [--problems ring,sphere16,sphere32]

Writes ``samplers_gmm.md`` (summary tables, beta < 1 vs beta = 1, full tables), ``samplers_gmm.json`` (every row)
and one plot per problem into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from diffusers_distill.fileio import atomic_write_text
from diffusers_distill.gaussian_mixture import (
    GaussianMixture,
    compare_samplers,
    default_base_config,
    plot_error_vs_nfe,
)

GUIDANCE_SCALES = (1.0, 7.5, 15.0, 25.0)
STEPS = (4, 5, 6, 8, 10, 12, 15, 20, 25)
DIFFUSERS = ("DDIM", "PLMS (PNDM)", "DPM++2M", "DPM++3M", "UniPC", "DEIS")
# the class defaults (GHVBScheduler = GHVB3.8, PLMSHeavyBallScheduler = PLMS4+HB0.8, DPMSolverHeavyBallScheduler =
# DPM++2M+HB0.8), then the settings docs/schedulers.md recommends; shown in the summary tables and the plots
DEFAULTS = ("GHVB3.8", "PLMS4+HB0.8", "DPM++2M+HB0.8")
SUMMARY = DEFAULTS + ("GHVB4.0", "DPM++2M+HB0.6", "PLMS4+HB0.6", "GHVB3.8 dpm-final", "PLMS4+HB0.8 dpm-final")
# (momentum setting, its beta = 1 base method) pairs for "where does beta < 1 pay"
# (GHVB4.0 is PLMS-4 with variable coefficients; DPM++2M+HB at beta = 1 is diffusers' DPM++2M, tested to 1e-5)
MOMENTUM_PAIRS = (
    ("GHVB3.8", "GHVB4.0"),
    ("GHVB3.5", "GHVB4.0"),
    ("PLMS4+HB0.8", "GHVB4.0"),
    ("PLMS4+HB0.6", "GHVB4.0"),
    ("DPM++2M+HB0.8", "DPM++2M"),
    ("DPM++2M+HB0.6", "DPM++2M"),
)


def diffusers_samplers(config: dict) -> dict:
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    return {
        "DDIM": lambda: DDIMScheduler.from_config(config),
        "PLMS (PNDM)": lambda: PNDMScheduler.from_config(config, skip_prk_steps=True),
        "DPM++2M": lambda: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        ),
        "DPM++3M": lambda: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=3
        ),
        "UniPC": lambda: UniPCMultistepScheduler.from_config(config),
        "DEIS": lambda: DEISMultistepScheduler.from_config(config),
    }


def momentum_samplers(config: dict) -> dict:
    """Our schedulers; GHVB names use the paper's momentum number (order - 1 + beta); "dpm-final" =
    ``final_step="dpmsolver++"`` (DPM-Solver++ data-form last step), otherwise the paper's multistep formula."""
    from diffusers_distill import (
        DPMSolverHeavyBallScheduler,
        GHVBScheduler,
        PLMSHeavyBallScheduler,
    )

    def plms(beta, coefficients="variable", final_step="multistep"):
        return lambda: PLMSHeavyBallScheduler.from_config(
            config, multistep_order=4, momentum_beta=beta, coefficients=coefficients, final_step=final_step
        )

    def ghvb(order, beta, coefficients="variable", final_step="multistep"):
        return lambda: GHVBScheduler.from_config(
            config, multistep_order=order, momentum_beta=beta, coefficients=coefficients, final_step=final_step
        )

    def dpm(beta):
        return lambda: DPMSolverHeavyBallScheduler.from_config(config, solver_order=2, momentum_beta=beta)

    samplers = {
        "GHVB3.8": ghvb(4, 0.8),
        "PLMS4+HB0.8": plms(0.8),
        "DPM++2M+HB0.8": dpm(0.8),
        "GHVB4.0": ghvb(4, 1.0),
        "GHVB3.5": ghvb(4, 0.5),
        "PLMS4+HB0.6": plms(0.6),
        "DPM++2M+HB0.6": dpm(0.6),
        "GHVB3.8 dpm-final": ghvb(4, 0.8, final_step="dpmsolver++"),
        "PLMS4+HB0.8 dpm-final": plms(0.8, final_step="dpmsolver++"),
        # the paper's constant coefficients (its reference code)
        "PLMS4 fixed": plms(1.0, "fixed"),
        "GHVB3.8 fixed": ghvb(4, 0.8, "fixed"),
    }
    return samplers


def problems() -> dict:
    """Three exact mixtures, each sample conditioned on one component (class):

    * ring: the doc's pilot, d = 2, 8 components on the unit circle, s = 0.05;
    * sphere16: d = 16, 16 components on the unit sphere, diagonal stds log-uniform in [0.02, 0.2];
    * sphere32 (harder): d = 32, 32 components (classes), stds log-uniform in [0.01, 0.1] (sharper, more classes,
      stiffer under CFG; d = 64 costs ~48 CPU minutes at batch 512, too much for this script).
    """
    return {
        "ring": ("ring d=2 K=8 s=0.05", GaussianMixture.ring(num_components=8, dim=2, std=0.05)),
        "sphere16": (
            "sphere d=16 K=16 s=0.02-0.2",
            GaussianMixture.sphere(num_components=16, dim=16, std=(0.02, 0.2), seed=0),
        ),
        "sphere32": (
            "sphere d=32 K=32 s=0.01-0.1",
            GaussianMixture.sphere(num_components=32, dim=32, std=(0.01, 0.1), seed=1),
        ),
    }


def _cell(row) -> str:
    value = row["median_error"]
    text = f"{value:.3g}" if math.isfinite(value) else "inf"
    if row["blowup_fraction"] > 0:
        text += f" ({100 * row['blowup_fraction']:.0f}%)"
    return text


def _lookup(rows):
    return {(r["sampler"], r["guidance"], r["steps"]): r for r in rows}


def best_diffusers(rows, guidance, steps):
    """(name, row) of the diffusers solver with the lowest median error at this guidance and step count."""
    table = _lookup(rows)
    name = min(DIFFUSERS, key=lambda n: table[(n, guidance, steps)]["median_error"])
    return name, table[(name, guidance, steps)]


def summary_table(rows, guidance, ours) -> str:
    """Best diffusers solver per step count, then each of ``ours`` as median error and ratio to that solver."""
    table = _lookup(rows)
    lines = ["| | " + " | ".join(str(n) for n in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    best = [best_diffusers(rows, guidance, n) for n in STEPS]
    lines.append("| best diffusers | " + " | ".join(f"{name}: {_cell(row)}" for name, row in best) + " |")
    for name in ours:
        cells = []
        for n, (_, reference) in zip(STEPS, best):
            row = table[(name, guidance, n)]
            ratio = row["median_error"] / reference["median_error"]
            cells.append(f"{_cell(row)}, **{ratio:.2f}x**" if ratio <= 1.0 else f"{_cell(row)}, {ratio:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best_ours = []
    for n, (_, reference) in zip(STEPS, best):
        name = min(ours, key=lambda s: table[(s, guidance, n)]["median_error"])
        best_ours.append(f"{name}: {table[(name, guidance, n)]['median_error'] / reference['median_error']:.2f}x")
    lines.append("| best of these / best diffusers | " + " | ".join(best_ours) + " |")
    return "\n".join(lines)


def full_table(rows, guidance, names) -> str:
    table = _lookup(rows)
    lines = ["| sampler | " + " | ".join(str(n) for n in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_cell(table[(name, guidance, n)]) for n in STEPS) + " |")
    return "\n".join(lines)


def momentum_wins(rows, margin: float = 0.05) -> list[str]:
    """Cells where a beta < 1 setting beats its beta = 1 base method by more than ``margin`` (median error)."""
    table = _lookup(rows)
    found = []
    for name, base in MOMENTUM_PAIRS:
        if (name, GUIDANCE_SCALES[0], STEPS[0]) not in table:
            continue
        cells = [
            f"w={w:g}/{n}: {table[(name, w, n)]['median_error'] / table[(base, w, n)]['median_error']:.2f}x"
            for w in GUIDANCE_SCALES
            for n in STEPS
            if table[(name, w, n)]["median_error"] < (1 - margin) * table[(base, w, n)]["median_error"]
        ]
        losses = sum(
            table[(name, w, n)]["median_error"] > (1 + margin) * table[(base, w, n)]["median_error"]
            for w in GUIDANCE_SCALES
            for n in STEPS
        )
        found.append(
            f"- {name} vs {base}: better in {len(cells)} / {len(GUIDANCE_SCALES) * len(STEPS)} cells, "
            f"worse in {losses}" + (f" (wins: {', '.join(cells)})" if cells else "")
        )
    return found


def report_problem(title: str, rows: list, ours: list, seconds: float, plot_path: str) -> str:
    parts = [
        f"\n## {title} ({seconds:.0f} s CPU)\n",
        (
            "\nMedian endpoint error (blow-up %), and ratio to the best diffusers solver at that step count "
            "(bold: at or below it).\n"
        ),
    ]
    for guidance in GUIDANCE_SCALES:
        parts.append(
            f"\n**w = {guidance:g}**\n\n" + summary_table(rows, guidance, [n for n in SUMMARY if n in ours]) + "\n"
        )
    parts.append("\n### Where beta < 1 beats beta = 1 (by > 5%)\n\n" + "\n".join(momentum_wins(rows)) + "\n")
    parts.append(f"\nPlot: `{plot_path}`\n")
    return "".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--spacing", default="trailing", choices=["linspace", "leading", "trailing"])
    parser.add_argument(
        "--final-sigmas",
        default="sigma_min",
        choices=["sigma_min", "zero"],
        help="final_sigmas_type of the sigma-based schedulers; sigma_min ends every sampler at "
        "sigmabar(t=0) = 0.029 like DDIM/PNDM/DEIS, zero adds one big last step to sigma = 0",
    )
    parser.add_argument("--problems", default="ring,sphere16,sphere32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from-json",
        default=None,
        help="rebuild the report and plots from a samplers_gmm.json of an earlier run instead of sampling again",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    selected = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = sorted(set(selected) - set(problems()))
    if unknown:
        raise SystemExit(f"--problems: unknown {unknown}; choose from {sorted(problems())}")

    config = dict(default_base_config(), timestep_spacing=args.spacing, final_sigmas_type=args.final_sigmas)
    theirs, ours = diffusers_samplers(config), momentum_samplers(config)
    samplers = {**theirs, **ours}
    header = [
        (
            f"# Exact GMM sampler benchmark\n\nSD1.5 scaled_linear schedule, `{args.spacing}` spacing, "
            f"final_sigmas_type `{args.final_sigmas}` for every sampler that has it, batch {args.batch_size}, "
            f"seed {args.seed}; reference DOP853 rtol=atol=1e-10. Momentum rows are diffusers_distill schedulers "
            "(variable coefficients unless 'fixed'; GHVBm = order ceil(m), beta = frac(m), GHVB4.0 = order 4 "
            "beta 1).\n"
        )
    ]
    summaries, fulls, all_rows = [], [], {}
    saved = None
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
    for key in selected:
        title, mixture = problems()[key]
        started = time.process_time()
        if saved is not None:
            rows = saved[key]
        else:
            rows = compare_samplers(samplers, GUIDANCE_SCALES, STEPS, mixture, args.batch_size, args.seed, config)
        if saved is not None:
            seconds = saved.get(f"{key}_cpu_seconds", math.nan)
        else:
            seconds = time.process_time() - started
        all_rows[key], all_rows[f"{key}_cpu_seconds"] = rows, seconds
        plot_path = os.path.join(args.output_dir, f"samplers_gmm_{key}.png")
        plot_error_vs_nfe(
            [r for r in rows if r["sampler"] in set(DIFFUSERS) | set(DEFAULTS) | {"DPM++2M+HB0.6"}],
            plot_path,
            title=title,
            dashed=ours,
            metric="median_error",
        )
        summaries.append(report_problem(title, rows, list(ours), seconds, plot_path))
        fulls.append(
            f"\n## {title}: all samplers\n"
            + "".join(
                f"\n**w = {w:g}** (median endpoint error; blow-up %)\n\n" + full_table(rows, w, list(samplers)) + "\n"
                for w in GUIDANCE_SCALES
            )
        )
        print(summaries[-1], flush=True)
        # written after every problem, so an interrupted run keeps what it measured (rebuild with --from-json)
        atomic_write_text(os.path.join(args.output_dir, "samplers_gmm.json"), json.dumps(all_rows, indent=0))
    atomic_write_text(os.path.join(args.output_dir, "samplers_gmm.md"), "".join(header + summaries + fulls))
    atomic_write_text(os.path.join(args.output_dir, "samplers_gmm.json"), json.dumps(all_rows, indent=0))
    print(f"\nwrote {os.path.join(args.output_dir, 'samplers_gmm.md')}")


if __name__ == "__main__":
    main()
