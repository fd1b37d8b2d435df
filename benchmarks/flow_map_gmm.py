"""Flow-map distillation losses on an exact 2-D Gaussian mixture (docs/flow_maps.md, "GMM benchmark").

Teacher: the exact rectified-flow velocity v_sigma(x) = eps_hat - x0_hat of an 8-mode ring (radius 4, std 0.25,
unequal weights), from :class:`diffusers_distill.GuidedGaussianMixture` (sigma = 1 noise, 0 data). Student: a small
MLP average velocity u(x, s, t) on [x, ff(s), ff(t), ff(s - t)] with Fourier features up to 16 pi, so the flow map is
phi(x, s, t) = x + (t - s) u. Every loss (ITVM, LFMD, MeanFlow, progressive; diffusers_distill.losses) gets the same
budget: the same number of Adam steps (lr 1e-3, cosine decay, grad-norm clip 1), batch, time pairs (sorted uniform
pairs, 25 % diagonal) and x_s drawn from the exact marginal; several training seeds.

Evaluation (the EMA of the weights, decay 0.999 with warm-up): K = 1, 2, 4, 8 uniform jumps from 5000 fixed noises;
* ED: unbiased energy distance to 5000 exact mixture samples (the noise floor is measured from independent exact
  sets and printed);
* RMSE: pathwise RMSE to the exact flow map from the same noise (scipy DOP853, tolerance 1e-9).
Teacher Euler with the exact velocity at the same NFE is the baseline. Prints a markdown table, saves a plot and a
JSON file (both written atomically).

    nice -n 10 python benchmarks/flow_map_gmm.py [--iterations 2000] [--seeds 0 1 2] [--output-dir outputs/benchmarks]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
from torch import nn

from diffusers_distill.fileio import atomic_path, atomic_write_json
from diffusers_distill.gaussian_mixture import GaussianMixture, GuidedGaussianMixture, solve_reference
from diffusers_distill.losses import itvm_loss, lagrangian_flow_map_loss, mean_flow_loss, progressive_flow_map_loss

LOSSES = ("itvm", "lfmd", "meanflow", "progressive")
STEPS = (1, 2, 4, 8)


def ring_mixture(seed: int = 0) -> GaussianMixture:
    """8 modes on a circle of radius 4, std 0.25, weights proportional to 0.5 + U[0, 1] (docs/flow_maps.md)."""
    base = GaussianMixture.ring(num_components=8, dim=2, std=0.25, radius=4.0)
    weights = 0.5 + torch.rand(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return GaussianMixture(base.means, base.stds[:, 0], weights)


def sample_mixture(mixture: GaussianMixture, n: int, generator: torch.Generator) -> torch.Tensor:
    components = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    noise = torch.randn(n, mixture.dim, generator=generator, dtype=torch.float64)
    return mixture.means[components] + mixture.stds[components] * noise


def fourier_features(time: torch.Tensor) -> torch.Tensor:
    """[tau, sin(pi k tau), cos(pi k tau)] for k = 1, 2, 4, 8, 16 (maximum frequency 16 pi)."""
    angles = math.pi * time[:, None] * torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=time.dtype)
    return torch.cat([time[:, None], angles.sin(), angles.cos()], dim=1)


class AverageVelocityMLP(nn.Module):
    """u(x, s, t): 4 x 256 SiLU MLP on [x, ff(s), ff(t), ff(s - t)]."""

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4):
        super().__init__()
        layers, size = [], dim + 3 * 11
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.SiLU()]
            size = width
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x, s, t):
        return self.net(torch.cat([x, fourier_features(s), fourier_features(t), fourier_features(s - t)], dim=1))


class ExactTeacher:
    """v_sigma(x) of the mixture, evaluated in float64 and returned in the sample's dtype."""

    def __init__(self, mixture: GaussianMixture):
        self.guided = GuidedGaussianMixture(mixture)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return self.guided.flow_velocity(x.double(), sigma).to(x.dtype)


def flow_map_sample(model, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """K uniform jumps sigma: 1 -> 0 with phi(x, s, t) = x + (t - s) u(x, s, t)."""
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=noise.dtype)
    x = noise
    for s, t in zip(grid[:-1], grid[1:]):
        x = x + (t - s) * model(x, s.expand(x.shape[0]), t.expand(x.shape[0]))
    return x


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased (U-statistic) energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'|."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def train(
    loss_name: str,
    mixture: GaussianMixture,
    seed: int,
    iterations: int,
    batch_size: int,
    target_decay: float = 0.99,
    eval_decay: float = 0.999,
    lr: float = 1e-3,
    itvm_initial_weight: float = 0.0,
) -> tuple:
    """Train one student; returns (EMA model, seconds, diverged)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    model = AverageVelocityMLP()
    target = AverageVelocityMLP().requires_grad_(False)  # EMA target of ITVM / progressive (decay target_decay)
    target.load_state_dict(model.state_dict())
    evaluation = AverageVelocityMLP().requires_grad_(False)
    evaluation.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    teacher = ExactTeacher(mixture)
    params, target_params, eval_params = (list(m.parameters()) for m in (model, target, evaluation))
    diverged, start = False, time.process_time()
    for step in range(iterations):
        pair = torch.rand(batch_size, 2, generator=generator)
        s, t = pair.max(dim=1).values, pair.min(dim=1).values
        diagonal = torch.rand(batch_size, generator=generator) < 0.25
        t = torch.where(diagonal, s, t)
        data = sample_mixture(mixture, batch_size, generator).float()
        noise = torch.randn(batch_size, 2, generator=generator)
        x_s = (1 - s[:, None]) * data + s[:, None] * noise
        if loss_name == "lfmd":
            loss = lagrangian_flow_map_loss(model, teacher, x_s, s, t)
        elif loss_name == "itvm":
            loss = itvm_loss(model, target, teacher, x_s, s, t, initial_weight=itvm_initial_weight)
        elif loss_name == "meanflow":
            loss = mean_flow_loss(model, teacher, x_s, s, t)
        else:
            loss = progressive_flow_map_loss(model, target, teacher, x_s, s, t)
        if not math.isfinite(loss.item()) or loss.item() > 1e4:
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, params, 1 - target_decay)
            decay = min(eval_decay, (1 + step) / (10 + step))  # warm-up: without it the EMA keeps the init weights
            torch._foreach_lerp_(eval_params, params, 1 - decay)
    return evaluation, time.process_time() - start, diverged


def mean_std(values) -> tuple:
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def cell(values_ed, values_rmse) -> str:
    (ed, ed_std), (rmse, rmse_std) = mean_std(values_ed), mean_std(values_rmse)
    return f"{ed:.4f}±{ed_std:.4f} / {rmse:.3f}±{rmse_std:.3f}"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results.items():
        for axis, metric in zip(axes, ("ed", "rmse")):
            means = [mean_std(rows[str(k)][metric])[0] for k in STEPS]
            stds = [mean_std(rows[str(k)][metric])[1] for k in STEPS]
            axis.errorbar(
                STEPS,
                [max(m, 1e-5) for m in means],
                yerr=stds,
                marker="o",
                capsize=3,
                label=name,
                linestyle="--" if name.startswith("teacher") else "-",
            )
    for axis, label in zip(axes, ("energy distance (clipped at 1e-5)", "pathwise RMSE to the exact map")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sampling steps (NFE)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle("Flow-map distillation on an exact 2-D GMM (mean ± std over training seeds)")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--eval-size", type=int, default=5000)
    parser.add_argument(
        "--itvm-initial-weight",
        type=float,
        default=0.0,
        help="weight of ITVM's explicit initial-velocity term (0: only through the diagonal pairs)",
    )
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 2 or args.eval_size < 2:
        parser.error("--iterations must be >= 1, --batch-size and --eval-size >= 2")
    torch.set_num_threads(1)

    mixture = ring_mixture()
    guided = GuidedGaussianMixture(mixture)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(args.eval_size, 2, generator=generator, dtype=torch.float64)
    exact_samples = sample_mixture(mixture, args.eval_size, generator)
    exact_map = solve_reference(guided, noise, 1.0, 0.0, "flow", rtol=1e-9, atol=1e-9)
    floor = [energy_distance(sample_mixture(mixture, args.eval_size, generator), exact_samples) for _ in range(3)]
    teacher = ExactTeacher(mixture)

    def evaluate(sampler) -> dict:
        rows = {}
        for k in STEPS:
            with torch.no_grad():
                final = sampler(k).double()
            finite = bool(torch.isfinite(final).all())
            rows[str(k)] = {
                "ed": energy_distance(final, exact_samples) if finite else math.inf,
                "rmse": float((final - exact_map).norm(dim=1).pow(2).mean().sqrt()) if finite else math.inf,
            }
        return rows

    def teacher_euler(k):
        return flow_map_sample(lambda x, s, t: teacher(x, s), noise, k)

    results = {
        "teacher Euler (exact v)": {
            str(k): {"ed": [v["ed"]], "rmse": [v["rmse"]]} for k, v in evaluate(teacher_euler).items()
        }
    }
    timings = {name: [] for name in args.losses}
    divergences = {name: 0 for name in args.losses}
    for name in args.losses:
        results[name] = {str(k): {"ed": [], "rmse": []} for k in STEPS}
    for seed in args.seeds:  # seed-major, so an interrupted run still has every loss for its first seeds
        for name in args.losses:
            model, seconds, diverged = train(
                name, mixture, seed, args.iterations, args.batch_size, itvm_initial_weight=args.itvm_initial_weight
            )
            metrics = evaluate(lambda k, model=model: flow_map_sample(model, noise.float(), k))
            for k in STEPS:
                results[name][str(k)]["ed"].append(metrics[str(k)]["ed"])
                results[name][str(k)]["rmse"].append(metrics[str(k)]["rmse"])
            timings[name].append(seconds)
            divergences[name] += int(diverged)
            print(
                f"# {name} seed {seed}: {seconds:.0f} s CPU, diverged={diverged}, "
                + ", ".join(f"K={k} {metrics[str(k)]['ed']:.4f}/{metrics[str(k)]['rmse']:.3f}" for k in STEPS),
                file=sys.stderr,
                flush=True,
            )

    floor_mean, floor_std = mean_std(floor)
    print(
        f"\nExact 2-D GMM (8-mode ring, radius 4, std 0.25); {args.iterations} Adam steps x batch {args.batch_size} "
        f"per run, seeds {args.seeds}; evaluation on {args.eval_size} points. "
        f"Cells: energy distance / pathwise RMSE, mean ± std over training seeds. "
        f"ED noise floor (exact vs exact): {floor_mean:.4f} ± {floor_std:.4f} "
        "(three independent exact sets against the reference set).\n"
    )
    print("| method | " + " | ".join(f"K={k}" for k in STEPS) + " | CPU s / run | diverged |")
    print("|---|" + "---|" * (len(STEPS) + 2))
    for name, rows in results.items():
        cells = " | ".join(cell(rows[str(k)]["ed"], rows[str(k)]["rmse"]) for k in STEPS)
        cpu = f"{mean_std(timings[name])[0]:.0f}" if name in timings else "-"
        div = f"{divergences[name]}/{len(args.seeds)}" if name in divergences else "-"
        print(f"| {name} | {cells} | {cpu} | {div} |")

    payload = {
        "args": vars(args),
        "noise_floor_ed": floor,
        "results": results,
        "cpu_seconds": timings,
        "diverged": divergences,
    }
    atomic_write_json(os.path.join(args.output_dir, "flow_map_gmm.json"), payload, indent=1, sort_keys=False)
    plot(results, os.path.join(args.output_dir, "flow_map_gmm.png"))
    print(f"\nsaved {os.path.join(args.output_dir, 'flow_map_gmm.png')} and flow_map_gmm.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
