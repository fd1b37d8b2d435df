"""Checkpoints of the training core: ``accelerator.save_state`` into ``checkpoint-N``, written atomically, pruned,
found again by ``--resume_from_checkpoint latest``.

A checkpoint is first written to ``checkpoint-N.tmp`` and renamed when complete, so "latest" never picks a
half-written one; if saving fails (e.g. a full disk) the ``.tmp`` folder is removed and the error re-raised.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from diffusers_distill.fileio import normalize_modes

__all__ = [
    "CHECKPOINT_PATTERN",
    "checkpoint_step",
    "checkpoint_steps",
    "find_latest_checkpoint",
    "prune_checkpoints",
    "resolve_resume_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the complete checkpoints in ``output_dir``, ascending."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if m)


def checkpoint_step(path: str) -> int:
    """The N of a ``checkpoint-N`` folder."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise ValueError(f"--resume_from_checkpoint must be a folder named checkpoint-N, got {path!r}")
    return int(match.group(1))


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-N`` with the largest N (``*.tmp`` folders are half-written and ignored)."""
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete the oldest checkpoints so that at most ``keep`` remain."""
    steps = checkpoint_steps(output_dir)
    for step in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint`` -> a checkpoint folder, or None to start fresh ("latest" with none saved)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        checkpoint_step(resume_from_checkpoint)  # a clear error for a folder that is not checkpoint-N
        return resume_from_checkpoint
    path = find_latest_checkpoint(output_dir)
    if path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from step 0", output_dir)
    return path


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """``accelerator.save_state`` into ``checkpoint-{step}`` atomically (all processes call this); returns its path.

    Pruning (to ``total_limit - 1`` older ones) happens first, as in diffusers' scripts.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        if total_limit is not None:
            prune_checkpoints(output_dir, total_limit - 1)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        normalize_modes(partial)  # safetensors writes 0600 files
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)  # atomic on POSIX
    accelerator.wait_for_everyone()
    return final
