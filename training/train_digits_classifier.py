"""Train the bundled digit classifier used by :mod:`diffusers_distill.evaluation` (seeded, ~1 min on 1 CPU thread).

python -m diffusers_distill.training.train_digits_classifier [--output PATH] [--seed 0] [--epochs 15]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_distill.digits import digits_classifier_path
from diffusers_distill.evaluation import save_digit_classifier, train_digit_classifier


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the digits-FD / prompt-accuracy classifier.")
    parser.add_argument("--output", default=digits_classifier_path())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    if args.epochs <= 0:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs}")
    torch.set_num_threads(1)
    start = time.time()
    model, accuracy = train_digit_classifier(epochs=args.epochs, seed=args.seed)
    seconds = time.time() - start
    save_digit_classifier(
        model,
        args.output,
        extra={
            "held_out_accuracy": accuracy,
            "seed": args.seed,
            "epochs": args.epochs,
            "train_seconds": round(seconds, 1),
        },
    )
    print(f"held-out accuracy {accuracy:.4f} in {seconds:.0f}s -> {args.output}")


if __name__ == "__main__":
    main()
