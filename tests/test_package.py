import ast
import importlib
import pathlib

import numpy as np
import torch

import diffusers_distill


def test_every_export_resolves():
    for name in diffusers_distill.__all__:
        assert getattr(diffusers_distill, name) is not None, name


def test_subpackages_share_one_namespace():
    for sub in ("schedulers", "pipelines", "training"):
        module = importlib.import_module(f"diffusers_distill.{sub}")
        assert module.__name__ == f"diffusers_distill.{sub}"


def test_tiny_pipelines_generate(sd15_pipeline, sdxl_pipeline, sd3_pipeline):
    for pipe in (sd15_pipeline, sdxl_pipeline, sd3_pipeline):
        image = pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert image.shape == (1, 32, 32, 3)
        assert np.isfinite(image).all()


def test_tiny_pipeline_round_trips_through_disk(sd15_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from diffusers_distill import testing

    pipe = StableDiffusionPipeline.from_pretrained(sd15_pipeline_dir, local_files_only=True)
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids == testing.tiny_clip_tokenizer()("a photo of a cat").input_ids  # the saved tokenizer is the same
    vocab = pipe.tokenizer.get_vocab()
    words = [vocab["<|startoftext|>"], *(vocab[w + "</w>"] for w in ("a", "photo", "of", "a", "cat"))]
    assert ids == [*words, vocab["<|endoftext|>"]]  # bos + 5 whole-word tokens + eos
    reference = testing.tiny_sd15_pipeline()
    for name, param in reference.unet.state_dict().items():  # the weights survive the disk round trip exactly
        assert torch.equal(pipe.unet.state_dict()[name], param), name


REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def _python_files(*folders):
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _python_files("training", "diffusers_distill", "pipelines"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], long


def test_no_fmt_skip_markers():
    marker = "# fmt: " + "skip"  # split so this file does not match itself
    folders = ("training", "diffusers_distill", "pipelines", "schedulers", "benchmarks", "tests")
    found = {str(p.relative_to(REPO)) for p in _python_files(*folders) if marker in p.read_text(encoding="utf-8")}
    assert not found, sorted(found)


def test_import_registers_scheduler_modules_without_importing_torch():
    """`import diffusers_distill` must make every scheduler module resolvable through sys.modules (diffusers' loader
    looks saved scheduler modules up there) while importing neither torch nor diffusers."""
    import subprocess
    import sys

    probe = (
        "import sys, diffusers_distill\n"
        "names = sorted(n for n in sys.modules if n.startswith('diffusers_distill.schedulers.scheduling_'))\n"
        "heavy = [m for m in ('torch', 'diffusers') if m in sys.modules]\n"
        "library = sys.modules['diffusers_distill.schedulers.scheduling_ghvb']\n"
        "cls, mixin = library.GHVBScheduler, library.SchedulerMixin\n"
        "print(names, heavy, cls.__module__, issubclass(cls, mixin))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    expected = sorted(f"diffusers_distill.schedulers.{p.stem}" for p in (REPO / "schedulers").glob("scheduling_*.py"))
    assert out == f"{expected} [] diffusers_distill.schedulers.scheduling_ghvb True"
