"""Distil the bundled SD 1.5 digits teacher with DMD2 and measure the student, in one call.

``distill_digits_teacher`` writes a prompt file of the ten digit prompts, runs :func:`train_dmd2` in-process on
``digits_teacher_path("sd15")`` (optionally with the real bundled digits as the GAN's real images, DMD2 Sec. 4.3),
then evaluates the saved student with :mod:`diffusers_distill.evaluation`: prompt accuracy, digits-FD, and
teacher-student MSE/PSNR on the same initial noise against the teacher sampled with DDIM at 25 steps and the
guidance scale the student was distilled with (the "real" score's CFG scale, DMD2 eq. 2 + CFG).

Example::

    from diffusers_distill.training.distill_digits import distill_digits_teacher

    metrics = distill_digits_teacher("outputs/digits-dmd2-1step", num_student_steps=1, max_train_steps=300)
    print(metrics["student"]["digits_fd"], metrics["teacher"]["digits_fd"])
"""

from __future__ import annotations

import json
import os
import time

from diffusers_distill.constants import LAYOUTS
from diffusers_distill.fileio import atomic_path, atomic_write_json, atomic_write_text

__all__ = [
    "distill_digits_teacher",
    "write_digit_prompts",
    "write_digit_images",
    "load_digits_student",
    "result_row",
    "results_markdown",
    "teacher_baselines",
    "distill_digits_flow_map",
    "evaluate_digits_flow_map",
]

TEACHER_STEPS = 25
_FIXED_OPTIONS = {"cache_text_embeddings": True, "checkpointing_steps": 10**9, "report_to": "none"}
TEACHER_SCHEDULER = "ddim"


def write_digit_prompts(path: str) -> str:
    """Write the ten prompts ``"a handwritten digit zero" .. "nine"`` (one per line) atomically; returns ``path``."""
    from diffusers_distill.digits import digit_prompt

    return atomic_write_text(path, "\n".join(digit_prompt(label) for label in range(10)) + "\n")


def write_digit_images(folder: str) -> str:
    """The ``train`` split of the bundled digits as a captioned image folder (PNG + ``metadata.jsonl``).

    These are the "real" images of the GAN loss; the held-out split (digits-FD reference) is never written.
    """
    from PIL import Image

    from diffusers_distill.digits import digit_prompt, load_digits_split

    images, labels = load_digits_split("train", channels=1)
    os.makedirs(folder, exist_ok=True)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    lines = []
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        name = f"{i:04d}.png"
        with atomic_path(os.path.join(folder, name)) as tmp:
            Image.fromarray(image).convert("RGB").save(tmp)
        lines.append(json.dumps({"file_name": name, "text": digit_prompt(label)}))
    atomic_write_text(os.path.join(folder, "metadata.jsonl"), "\n".join(lines) + "\n")
    return folder


def load_digits_student(student_dir: str, teacher_path: str | None = None):
    """A ``DMD2StableDiffusionPipeline`` for a saved student (full folder, or LoRA on the teacher)."""
    from diffusers_distill.digits import digits_teacher_path
    from diffusers_distill.export import StudentConfig
    from diffusers_distill.pipelines.pipeline_dmd2 import DMD2StableDiffusionPipeline

    config = StudentConfig.load(student_dir)
    if config.student_type == "full":
        pipe = DMD2StableDiffusionPipeline.from_pretrained(student_dir, local_files_only=True)
    else:
        base = teacher_path or digits_teacher_path("sd15")
        pipe = DMD2StableDiffusionPipeline.from_pretrained(base, student=student_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_args(num_student_steps, max_train_steps, student_type, real_guidance_scale, n_per_digit) -> None:
    if num_student_steps not in (1, 2, 4):
        raise ValueError(f"num_student_steps must be one of (1, 2, 4), got {num_student_steps!r}")
    if not isinstance(max_train_steps, int) or max_train_steps < 1:
        raise ValueError(f"max_train_steps must be a positive integer, got {max_train_steps!r}")
    if student_type not in LAYOUTS:
        raise ValueError(f"student_type must be one of {LAYOUTS}, got {student_type!r}")
    if real_guidance_scale < 1.0:
        raise ValueError(f"real_guidance_scale must be >= 1, got {real_guidance_scale!r}")
    if not isinstance(n_per_digit, int) or n_per_digit < 2:
        raise ValueError(f"n_per_digit must be an integer >= 2 (digits-FD needs a covariance), got {n_per_digit!r}")


def result_row(
    name: str, metrics: dict, train_seconds: float | None = None, train_cpu_seconds: float | None = None
) -> dict:
    """One row of :func:`results_markdown` from :func:`evaluate_pipeline`-style metrics (training wall/CPU time)."""
    return {
        "model": name,
        "steps": metrics["steps"],
        "prompt_accuracy": metrics["prompt_accuracy"],
        "digits_fd": metrics["digits_fd"],
        "psnr": metrics.get("psnr"),
        "fd_to_teacher": metrics.get("fd_to_reference"),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
    }


def teacher_baselines(output_dir: str, steps: list[int], guidance: float, n_per_digit: int, seed: int):
    """The teacher rows of the digits benchmarks: the bundled SD 1.5 teacher with DDIM (trailing spacing, so that
    few steps sample the students' timesteps 999, 749, ...) at 25 steps, the reference, and at each of ``steps``,
    at CFG ``guidance`` on the seeded evaluation noise, with a sample grid each in ``output_dir``.

    Returns ``(rows, reference_images)``: :func:`result_row` rows (PSNR against the 25-step images) and those images.
    """
    from diffusers_distill.digits import digits_teacher_path
    from diffusers_distill.evaluation import evaluate_pipeline

    rows, reference = [], None
    for count in (TEACHER_STEPS, *steps):
        m = evaluate_pipeline(
            digits_teacher_path("sd15"),
            scheduler=TEACHER_SCHEDULER,
            steps=count,
            guidance=guidance,
            n_per_digit=n_per_digit,
            seed=seed,
            scheduler_kwargs={"timestep_spacing": "trailing"},
            grid_path=os.path.join(output_dir, f"teacher-ddim-{count}.png"),
            reference=reference,
        )
        reference = m["images"] if count == TEACHER_STEPS else reference
        rows.append(result_row(f"teacher DDIM trailing (CFG {guidance:g})", m))
    return rows, reference


def results_markdown(rows: list[dict], reference_fd: float) -> str:
    """Rows -> a markdown table; ``FD / teacher@25`` is relative to ``reference_fd`` (the 25-step teacher's);
    ``FD to teacher@25 images`` is the digits-FD to the 25-step teacher's samples from the same noise."""
    lines = [
        "| model | steps | prompt acc. | digits-FD | FD / teacher@25 | FD to teacher@25 images "
        "| PSNR vs teacher@25 (dB) | training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.1f}"
        to_teacher = "-" if r.get("fd_to_teacher") is None else f"{r['fd_to_teacher']:.2f}"
        train = "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f} min"
        if r.get("train_cpu_seconds") is not None:
            train += f" ({r['train_cpu_seconds'] / 60:.1f} CPU-min)"
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['prompt_accuracy']:.3f} | {r['digits_fd']:.2f} | "
            f"{r['digits_fd'] / reference_fd:.2f}x | {to_teacher} | {psnr} | {train} |"
        )
    return "\n".join(lines) + "\n"


def _public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "images"}


def evaluate_digits_student(
    student_dir: str,
    guidance: float,
    n_per_digit: int = 10,
    seed: int = 0,
    teacher_path: str | None = None,
    teacher_metrics: dict | None = None,
    grid_path: str | None = None,
) -> dict:
    """Metrics of a saved student next to the teacher (DDIM, 25 steps, ``guidance``) on the same seeded noise.

    Returns ``{"student": {...}, "teacher": {...}}`` (each as :func:`evaluate_pipeline` without the images).
    Pass ``teacher_metrics`` (with its ``"images"``) to reuse an earlier teacher evaluation.
    """
    from diffusers_distill.digits import digits_teacher_path
    from diffusers_distill.evaluation import evaluate_pipeline

    if teacher_metrics is None:
        teacher_metrics = evaluate_pipeline(
            teacher_path or digits_teacher_path("sd15"),
            scheduler=TEACHER_SCHEDULER,
            steps=TEACHER_STEPS,
            guidance=guidance,
            n_per_digit=n_per_digit,
            seed=seed,
        )
    pipe = load_digits_student(student_dir, teacher_path)
    steps = pipe.student_config.num_inference_steps
    # scheduler=None keeps the student's LCMScheduler on its training timesteps; CFG is baked in (guidance 0)
    student = evaluate_pipeline(
        pipe,
        scheduler=None,
        steps=steps,
        guidance=0.0,
        n_per_digit=n_per_digit,
        seed=seed,
        reference=teacher_metrics["images"],
        grid_path=grid_path,
    )
    return {"student": _public(student), "teacher": _public(teacher_metrics)}


def _write_training_data(output_dir: str, with_images: bool) -> tuple[str, str | None]:
    """The prompt file (and, for the GAN, the train-split images) under ``<output_dir>/data``."""
    data_dir = os.path.join(output_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    prompt_file = write_digit_prompts(os.path.join(data_dir, "prompts.txt"))
    return prompt_file, write_digit_images(os.path.join(data_dir, "images")) if with_images else None


def _training_summary(result: dict, options: dict, train_seconds: float, train_cpu_seconds: float) -> dict:
    last = result["losses"][-1] if result["losses"] else {}
    dm_losses = [r["loss_dm"] for r in result["losses"] if "loss_dm" in r]
    return {
        "num_student_steps": options["num_inference_steps"],
        "student_type": options["student_type"],
        "global_step": result["global_step"],
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),  # this process's CPU time (all its threads)
        "final_losses": {"loss_fake": last.get("loss_fake"), "loss_dm": dm_losses[-1] if dm_losses else None},
        "config": {k: v for k, v in options.items() if k not in ("pretrained_teacher_model", "output_dir")},
    }


def distill_digits_teacher(
    output_dir: str,
    num_student_steps: int = 1,
    max_train_steps: int = 300,
    student_type: str = "full",
    seed: int = 0,
    *,
    real_guidance_scale: float = 2.0,
    learning_rate: float = 1e-4,
    fake_score_learning_rate: float | None = None,
    dfake_gen_update_ratio: int = 5,
    train_batch_size: int = 16,
    fake_score_type: str = "full",
    lora_rank: int = 16,
    fake_lora_rank: int = 16,
    lr_warmup_steps: int = 0,
    gan_loss_weight: float = 0.0,
    n_per_digit: int = 10,
    teacher_path: str | None = None,
    evaluate: bool = True,
    **config_overrides,
) -> dict:
    """Distil the bundled digits teacher into a ``num_student_steps``-step DMD2 student and evaluate it.

    ``output_dir`` receives the student, ``metrics.json`` and ``samples.png``; ``num_student_steps`` is 1, 2 or 4;
    ``max_train_steps`` counts fake-score updates (the generator's come every ``dfake_gen_update_ratio``);
    ``gan_loss_weight > 0`` adds both GAN losses with the train-split digits as real images (DMD2 Sec. 4.3);
    ``config_overrides`` are any other :class:`DMD2Config` fields. The student is compared with the teacher at
    ``real_guidance_scale``. Returns ``{"student", "teacher", "train_seconds", "train_cpu_seconds", "global_step",
    "final_losses", "config"}``, also written to ``metrics.json``.
    """
    from diffusers_distill.digits import IMAGE_SIZE, digits_teacher_path
    from diffusers_distill.training.dmd2 import DMD2Config, train_dmd2

    _check_args(num_student_steps, max_train_steps, student_type, real_guidance_scale, n_per_digit)
    if gan_loss_weight < 0:
        raise ValueError(f"gan_loss_weight must be >= 0, got {gan_loss_weight!r}")
    teacher_path = teacher_path or digits_teacher_path("sd15")
    prompt_file, train_data_dir = _write_training_data(output_dir, with_images=gan_loss_weight > 0)

    options = dict(
        pretrained_teacher_model=teacher_path,
        output_dir=output_dir,
        prompt_file=prompt_file,
        train_data_dir=train_data_dir,
        resolution=IMAGE_SIZE,
        student_type=student_type,
        fake_score_type=fake_score_type,
        num_inference_steps=num_student_steps,
        lora_rank=lora_rank,
        lora_alpha=float(lora_rank),
        fake_lora_rank=fake_lora_rank,
        real_guidance_scale=real_guidance_scale,
        dfake_gen_update_ratio=dfake_gen_update_ratio,
        generator_gan_loss_weight=gan_loss_weight,
        fake_score_gan_loss_weight=gan_loss_weight,
        train_batch_size=train_batch_size,
        max_train_steps=max_train_steps,
        learning_rate=learning_rate,
        fake_score_learning_rate=fake_score_learning_rate,
        lr_warmup_steps=lr_warmup_steps,
        seed=seed,
        **_FIXED_OPTIONS,
    )
    options.update({DMD2Config.aliases().get(k, k): v for k, v in config_overrides.items()})
    config = DMD2Config.from_dict(options, "distill_digits_teacher arguments")
    config.validate()  # bad overrides fail before the teacher is loaded

    start, start_cpu = time.perf_counter(), time.process_time()
    result = train_dmd2(config)
    summary = _training_summary(result, options, time.perf_counter() - start, time.process_time() - start_cpu)
    if evaluate:
        grid = os.path.join(output_dir, "samples.png")
        args = (real_guidance_scale, n_per_digit, seed, teacher_path)
        summary.update(evaluate_digits_student(output_dir, *args, grid_path=grid))
    atomic_write_json(os.path.join(output_dir, "metrics.json"), summary)
    return summary


FLOW_MAP_STEPS = (1, 2, 4, 8)


def distill_digits_flow_map(
    output_dir: str,
    loss: str = "itvm",
    max_train_steps: int = 1500,
    train_batch_size: int = 16,
    learning_rate: float = 2e-4,
    guidance: float = 1.5,
    ema_decay: float = 0.999,
    target_ema_decay: float = 0.99,
    seed: int = 0,
    n_per_digit: int = 10,
    steps: tuple[int, ...] = FLOW_MAP_STEPS,
    evaluate: bool = True,
) -> dict:
    """Distil the bundled SD 1.5 digits teacher into one full flow-map student and measure it at every step count.

    Trains with :func:`~diffusers_distill.training.flow_map.train_flow_map` on the real train-split digits (noised
    to x_s; teacher velocity with CFG ``guidance`` distilled in) into ``<output_dir>/student``, a pipeline folder
    that ``FlowMapStableDiffusionPipeline.from_pretrained`` loads. With ``evaluate``, it then samples that folder at
    each of ``steps`` from the same seeded noise as the teacher rows of :func:`teacher_baselines` (DDIM trailing at
    25 steps and at ``steps``, same guidance), and writes ``metrics.json`` and ``metrics.md`` (the
    :func:`results_markdown` table) to ``output_dir``, with a sample grid per row. The defaults are the
    1500-iteration recipe of docs/flow_maps.md ("Measured: the bundled SD 1.5 digits teacher"), about 13
    CPU-minutes, which the demo runs; that page's best row trains twice as long (``max_train_steps=3000``, about 21
    CPU-minutes, the benchmark's default). Returns the summary:
    ``training`` (wall/CPU seconds, global step, final loss) and, with ``evaluate``, ``rows``.
    """
    from diffusers_distill.digits import IMAGE_SIZE, digits_teacher_path

    from .flow_map import FlowMapConfig, train_flow_map

    if isinstance(n_per_digit, bool) or not isinstance(n_per_digit, int) or n_per_digit < 2:
        raise ValueError(f"n_per_digit must be an integer >= 2 (digits-FD needs a covariance), got {n_per_digit!r}")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"steps must be a non-empty sequence of ints >= 1, got {steps!r}")
    data = os.path.join(output_dir, "data")
    student_dir = os.path.join(output_dir, "student")
    config = FlowMapConfig(
        pretrained_teacher_model=digits_teacher_path("sd15"),
        output_dir=student_dir,
        prompt_file=os.path.join(data, "prompts.txt"),
        train_data_dir=os.path.join(data, "images"),
        resolution=IMAGE_SIZE,
        loss=loss,
        guidance_scale=guidance,
        student_type="full",
        train_batch_size=train_batch_size,
        max_train_steps=max_train_steps,
        learning_rate=learning_rate,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=min(100, max_train_steps // 10),
        max_grad_norm=1.0,
        use_ema=True,
        ema_decay=ema_decay,
        target_ema_decay=target_ema_decay,
        default_num_inference_steps=4,
        seed=seed,
        **_FIXED_OPTIONS,
    )
    write_digit_prompts(config.prompt_file)
    write_digit_images(config.train_data_dir)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = train_flow_map(config)
    training = {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - start_cpu, 1),  # this process's CPU time (all its threads)
        "global_step": result["global_step"],
        "final_loss": result["losses"][-1]["loss"] if result["losses"] else None,
    }
    summary = {"loss": loss, "training": training}
    if evaluate:
        summary["rows"] = evaluate_digits_flow_map(output_dir, loss, training, steps, guidance, n_per_digit, seed)
        atomic_write_json(os.path.join(output_dir, "metrics.json"), summary)
        rows = summary["rows"]
        atomic_write_text(os.path.join(output_dir, "metrics.md"), results_markdown(rows, rows[0]["digits_fd"]))
    return summary


def evaluate_digits_flow_map(
    output_dir, loss, training, steps, guidance, n_per_digit, seed, compare: tuple = ()
) -> list[dict]:
    """:func:`teacher_baselines`, then the flow-map student folder ``<output_dir>/student`` (loaded by evaluation
    with its own pipeline class) at each of ``steps`` from the same noise, with grids alongside; ``training``
    (``wall_seconds``, ``cpu_seconds``) goes on the first student row. ``compare``: other saved student folders
    (e.g. DMD2 students), sampled from the same noise at their recorded settings (flow maps: at each of ``steps``).
    Returns :func:`result_row` rows."""
    from diffusers_distill.evaluation import evaluate_pipeline, read_student_sampling

    rows, reference = teacher_baselines(output_dir, list(steps), guidance, n_per_digit, seed)
    for count in steps:
        m = evaluate_pipeline(
            os.path.join(output_dir, "student"),
            steps=count,
            n_per_digit=n_per_digit,
            seed=seed,
            reference=reference,
            grid_path=os.path.join(output_dir, f"student-{count}.png"),
        )
        first = count == steps[0]  # one student for every step count: its training time once
        wall, cpu = (training["wall_seconds"], training["cpu_seconds"]) if first else (None, None)
        rows.append(result_row(f"flow-map student ({loss})", m, wall, cpu))
    for folder in compare:
        sampling = read_student_sampling(folder)
        method = {"flow_map": "flow-map", "dmd2": "DMD2"}.get(sampling.method, sampling.method) if sampling else "saved"
        name = f"{method} student `{'/'.join(os.path.normpath(folder).split(os.sep)[-2:])}`"  # parent/folder
        # a flow map samples at any step count; other students at their recorded one
        for count in steps if sampling and sampling.method == "flow_map" else [None]:
            m = evaluate_pipeline(folder, steps=count, n_per_digit=n_per_digit, seed=seed, reference=reference)
            rows.append(result_row(name, m))
    return rows
