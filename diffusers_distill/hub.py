"""Model card and Hub upload for exported DMD2 students (see :mod:`diffusers_distill.export`).

The card states exactly how to sample the student (scheduler, timesteps, guidance), since sampling a distilled
model with its base model's defaults is the most common way to get bad images from it.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil

from .export import LORA_WEIGHT_NAME, STUDENT_CONFIG_NAME, StudentConfig
from .fileio import atomic_path, atomic_write_text

SAMPLE_IMAGE_PATH = "images/sample_grid.png"
# training leftovers that must not be uploaded
UPLOAD_IGNORE_PATTERNS = ("checkpoint-*", "checkpoint-*/*", "logs/*", "validation/*", ".tmp*", ".old-*", "*.jsonl")

_ARCH_INFO = {
    "sd15": {
        "native": "StableDiffusionPipeline",
        "ours": "DMD2StableDiffusionPipeline",
        "tags": ["stable-diffusion", "stable-diffusion-diffusers"],
    },
    "sdxl": {
        "native": "StableDiffusionXLPipeline",
        "ours": "DMD2StableDiffusionXLPipeline",
        "tags": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
    },
}
_METHOD_INFO = {"dmd2": ("DMD2 (Improved Distribution Matching Distillation)", "2405.14867")}


def model_card_tags(config: StudentConfig) -> list[str]:
    """Hub tags: diffusers/text-to-image, the base-model family, distillation + method, and lora when it applies."""
    tags = ["diffusers", "text-to-image", "diffusers-training", *_ARCH_INFO[config.arch]["tags"]]
    tags += ["distillation", "few-step", config.method]
    if config.student_type == "lora":
        tags += ["lora", "template:sd-lora"]
    return tags


def _usage_snippets(config: StudentConfig, repo_id: str) -> str:
    info = _ARCH_INFO[config.arch]
    base = config.base_model or "<base model id>"
    call = (
        f'pipe("a photo of a cat", num_inference_steps={config.num_inference_steps}, '
        f"timesteps={config.timesteps}, guidance_scale={config.guidance_scale}).images[0]"
    )
    if config.student_type == "lora":
        plain_load = (
            f'pipe = {info["native"]}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")\n'
            f'pipe.load_lora_weights("{repo_id}")\n'
            "pipe.fuse_lora(lora_scale=1.0)  # optional: merge the student into the base weights\n"
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
        )
        ours_load = f'pipe = {info["ours"]}.from_pretrained("{base}", student="{repo_id}", torch_dtype=torch.float16)'
    else:
        plain_load = f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", torch_dtype=torch.float16).to("cuda")\n'
        ours_load = f'pipe = {info["ours"]}.from_pretrained("{repo_id}", torch_dtype=torch.float16)'
    imports = "LCMScheduler, " + info["native"] if config.student_type == "lora" else "DiffusionPipeline"
    return (
        "### With plain diffusers\n\n```python\nimport torch\n"
        f"from diffusers import {imports}\n\n{plain_load}image = {call}\n```\n\n"
        "### With diffusers-distill (steps, timesteps and guidance default to the student's)\n\n"
        "```python\nimport torch\n"
        f'from diffusers_distill import {info["ours"]}\n\n{ours_load}.to("cuda")\n'
        'image = pipe("a photo of a cat").images[0]\n```\n'
    )


def model_card_text(config: StudentConfig, repo_id: str, sample_image: str | None = None) -> str:
    """The README.md content (YAML front matter via ``ModelCardData`` + markdown body)."""
    from huggingface_hub import ModelCardData

    method_name, arxiv = _METHOD_INFO.get(config.method, (config.method, None))
    tags = model_card_tags(config) + ([f"arxiv:{arxiv}"] if arxiv else [])
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", base_model=config.base_model, tags=tags
    )
    kind = "LoRA adapter" if config.student_type == "lora" else "full UNet (complete pipeline folder)"
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {config.num_inference_steps}-step {kind} distilled from `{config.base_model}` with {method_name}"
        + (f" ([arXiv:{arxiv}](https://arxiv.org/abs/{arxiv}))." if arxiv else "."),
        "",
    ]
    if sample_image:
        lines += [f"![samples]({sample_image})", ""]
    lines += [
        "## Sampling settings (use exactly these)",
        "",
        "| setting | value |",
        "|---|---|",
        "| scheduler | `LCMScheduler` (predict x0, re-noise with fresh noise to the next timestep) |",
        f"| num_inference_steps | {config.num_inference_steps} |",
        f"| timesteps | `{config.timesteps}` |",
        f"| guidance_scale | {config.guidance_scale} (guidance is distilled in; no negative prompt) |",
        f"| prediction_type | `{config.prediction_type}` |",
        "",
        "Other schedulers or step counts (e.g. 20-step DPM++ or CFG 7.5) are outside what the student was trained for.",
        "",
        "## How to use",
        "",
        _usage_snippets(config, repo_id),
        "## Files",
        "",
        f"- `{LORA_WEIGHT_NAME}`: diffusers-format LoRA; rank/alpha are stored in the safetensors metadata."
        if config.student_type == "lora"
        else "- a native diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, text encoders, `scheduler/`).",
        f"- `{STUDENT_CONFIG_NAME}`: the sampling settings above, read by diffusers-distill's pipelines.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def _latest_validation_image(output_dir: str) -> str | None:
    def step(path):
        match = re.search(r"step-(\d+)", os.path.basename(path))
        return int(match.group(1)) if match else -1

    images = glob.glob(os.path.join(output_dir, "validation", "*.png"))
    return max(images, key=step) if images else None


def write_model_card(output_dir, repo_id: str | None = None, sample_image: str | None = None) -> str:
    """Write ``README.md`` for the student in ``output_dir`` (atomically); returns its path.

    ``sample_image`` (default: the latest ``validation/step-*.png``) is copied to ``images/sample_grid.png`` and shown.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isfile(os.path.join(output_dir, STUDENT_CONFIG_NAME)):
        raise ValueError(f"output_dir must contain {STUDENT_CONFIG_NAME} (an exported student), got {output_dir!r}")
    config = StudentConfig.load(output_dir)
    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    sample_image = sample_image or _latest_validation_image(output_dir)
    shown = None
    if sample_image:
        target = os.path.join(output_dir, SAMPLE_IMAGE_PATH)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.abspath(sample_image) != os.path.abspath(target):
            with atomic_path(target) as tmp:
                shutil.copyfile(sample_image, tmp)
        shown = SAMPLE_IMAGE_PATH
    return atomic_write_text(os.path.join(output_dir, "README.md"), model_card_text(config, repo_id, shown))


def check_repo_id(repo_id, flag: str = "repo_id") -> str:
    """Raise ValueError unless ``repo_id`` looks like ``name`` or ``user/name``."""
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/") or " " in repo_id:
        raise ValueError(f"{flag} must look like 'name' or 'user/name', got {repo_id!r}")
    return repo_id


def prepare_hub_repo(repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Check the token and create ``repo_id`` (if missing) BEFORE training, so a bad token or repo name fails in
    seconds rather than after the run; returns the full repo id (``user/name``) that the final upload uses.

    Raises ValueError with one line saying what to fix.
    """
    from huggingface_hub import create_repo

    check_repo_id(repo_id, "hub_model_id")
    try:
        url = create_repo(repo_id, token=token, private=private, exist_ok=True)
    except Exception as error:  # noqa: BLE001 - any Hub failure: report it in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--push_to_hub: cannot create or access the Hub repo {repo_id!r} ({reason}); log in with `hf auth "
            "login` or pass --hub_token, or pick another --hub_model_id"
        ) from error
    return getattr(url, "repo_id", None) or repo_id


def retry_command(output_dir: str, repo_id: str, private: bool = False) -> str:
    """The ``hf upload`` shell command that repeats :func:`push_student_to_hub` (resumable)."""
    parts = ["hf", "upload", repo_id, os.path.abspath(output_dir), "."]
    parts += ["--private"] if private else []
    for pattern in UPLOAD_IGNORE_PATTERNS:
        parts += ["--exclude", pattern]
    return shlex.join(parts)


def push_student_to_hub(
    output_dir,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload DMD2 student",
    write_card: bool = True,
    required_file: str = STUDENT_CONFIG_NAME,
):
    """Upload an exported student folder to ``repo_id`` (created if missing) with a model card.

    ``required_file`` marks an exported student (``student_config.json`` for DMD2; the flow-map trainer passes
    ``flow_map_config.json`` or ``model_index.json`` and writes its own card).
    Training leftovers (``checkpoint-*``, ``logs``, ``validation``, temp files) are not uploaded. If the upload fails,
    the local folder is untouched and a ``RuntimeError`` tells the exact command to retry.
    Returns ``upload_folder``'s commit info.
    """
    from huggingface_hub import create_repo, upload_folder

    output_dir = os.fspath(output_dir)
    if not os.path.isfile(os.path.join(output_dir, required_file)):
        raise ValueError(f"output_dir must contain {required_file} (an exported student), got {output_dir!r}")
    check_repo_id(repo_id)
    if write_card and not os.path.isfile(os.path.join(output_dir, "README.md")):
        write_model_card(output_dir, repo_id)
    try:
        create_repo(repo_id, token=token, private=private, exist_ok=True)
        return upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            token=token,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),  # the client extends the list in place
        )
    except Exception as error:
        raise RuntimeError(
            f"Uploading {output_dir!r} to the Hub repo {repo_id!r} failed: {error}\n"
            f"The local files are intact. Retry (resumable) with:\n  {retry_command(output_dir, repo_id, private)}"
        ) from error
