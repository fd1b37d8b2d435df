"""Model card and Hub push of exported students (huggingface_hub mocked: no network)."""

import os
import shlex
from unittest import mock

import numpy as np
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from diffusers_distill.export import LORA_WEIGHT_NAME, StudentConfig
from diffusers_distill.hub import (
    SAMPLE_IMAGE_PATH,
    UPLOAD_IGNORE_PATTERNS,
    model_card_tags,
    push_student_to_hub,
    retry_command,
    write_model_card,
)


@pytest.fixture
def lora_output_dir(tmp_path):
    """What a finished training run leaves: the exported LoRA student plus training leftovers."""
    StudentConfig("sdxl", "lora", 4, [999, 749, 499, 249], base_model="stabilityai/stable-diffusion-xl-base-1.0").save(
        tmp_path
    )
    (tmp_path / LORA_WEIGHT_NAME).write_bytes(b"weights")
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "optimizer.bin").write_bytes(b"x")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events").write_bytes(b"x")
    (tmp_path / "validation").mkdir()
    for step in (100, 1000, 200):
        grid = Image.fromarray(np.full((8, 16, 3), step % 255, dtype=np.uint8))
        grid.save(tmp_path / "validation" / f"step-{step}.png")
    (tmp_path / "losses.jsonl").write_text("{}\n")
    return tmp_path


def test_model_card_content(lora_output_dir):
    path = write_model_card(lora_output_dir, "user/dmd2-sdxl-4step")
    card = ModelCard.load(path)
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    expected_tags = (
        "diffusers",
        "text-to-image",
        "dmd2",
        "lora",
        "distillation",
        "stable-diffusion-xl",
        "arxiv:2405.14867",
    )
    for tag in expected_tags:
        assert tag in card.data.tags
    text = card.text
    assert "timesteps | `[999, 749, 499, 249]`" in text and "guidance_scale | 0.0" in text
    assert 'pipe.load_lora_weights("user/dmd2-sdxl-4step")' in text and "LCMScheduler" in text
    assert 'DMD2StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", student=' in text
    assert f"![samples]({SAMPLE_IMAGE_PATH})" in text
    # the latest validation grid (step 1000, not the last file written) is the sample image
    shown = np.asarray(Image.open(lora_output_dir / SAMPLE_IMAGE_PATH))
    assert shown[0, 0, 0] == 1000 % 255


def test_model_card_full_student_uses_plain_diffusion_pipeline(tmp_path):
    StudentConfig("sd15", "full", 1, [999], base_model="base").save(tmp_path)
    text = ModelCard.load(write_model_card(tmp_path, "user/one-step")).text
    assert 'DiffusionPipeline.from_pretrained("user/one-step"' in text and "load_lora_weights" not in text
    assert "![samples]" not in text
    assert "lora" not in model_card_tags(StudentConfig.load(tmp_path))


def test_push_uploads_student_without_training_leftovers(lora_output_dir):
    with (
        mock.patch("huggingface_hub.create_repo") as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload,
    ):
        push_student_to_hub(lora_output_dir, "user/dmd2", token="tok", private=True, commit_message="msg")
    create_repo.assert_called_once_with("user/dmd2", token="tok", private=True, exist_ok=True)
    kwargs = upload.call_args.kwargs
    assert kwargs["repo_id"] == "user/dmd2" and kwargs["folder_path"] == os.fspath(lora_output_dir)
    assert kwargs["commit_message"] == "msg" and kwargs["token"] == "tok"
    # which files the Hub client would upload with these patterns
    files = sorted(
        os.path.relpath(os.path.join(root, name), lora_output_dir).replace(os.sep, "/")
        for root, _, names in os.walk(lora_output_dir)
        for name in names
    )
    uploaded = sorted(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
    assert uploaded == sorted(["README.md", SAMPLE_IMAGE_PATH, LORA_WEIGHT_NAME, "student_config.json"])


def test_failed_upload_keeps_files_and_says_how_to_retry(lora_output_dir):
    before = sorted(os.listdir(lora_output_dir))
    with (
        mock.patch("huggingface_hub.create_repo"),
        mock.patch("huggingface_hub.upload_folder", side_effect=ConnectionError("network down")),
    ):
        with pytest.raises(RuntimeError, match="network down") as info:
            push_student_to_hub(lora_output_dir, "user/dmd2")
    message = str(info.value)
    command = retry_command(os.fspath(lora_output_dir), "user/dmd2")
    assert command in message and "local files are intact" in message
    argv = shlex.split(command)
    assert argv[:5] == ["hf", "upload", "user/dmd2", os.path.abspath(lora_output_dir), "."]
    assert argv.count("--exclude") == len(UPLOAD_IGNORE_PATTERNS)
    assert sorted(os.listdir(lora_output_dir)) == sorted(before + ["README.md", "images"])
    assert (lora_output_dir / LORA_WEIGHT_NAME).read_bytes() == b"weights"


def test_push_rejects_bad_arguments(tmp_path, lora_output_dir):
    with mock.patch("huggingface_hub.create_repo") as create_repo:
        with pytest.raises(ValueError, match="output_dir must contain student_config.json"):
            push_student_to_hub(tmp_path / "empty", "user/x")
        with pytest.raises(ValueError, match="repo_id must look like"):
            push_student_to_hub(lora_output_dir, "a/b/c")
    create_repo.assert_not_called()
