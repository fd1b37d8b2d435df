"""Saved pipelines with a momentum scheduler reload in a fresh process (SD 1.5, SDXL, SD3 fixtures, all six classes).

The child process loads with plain diffusers: first *without* ``import diffusers_distill`` (what a user without the
package sees: diffusers' error naming our module, and the ``scheduler=None`` escape hatch), then after
``import diffusers_distill`` through ``DiffusionPipeline.from_pretrained`` and the specific pipeline class. It must
get the same scheduler class and config, and the same images as the pipeline that was saved.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_distill import testing

CASES = {
    "sd15": (testing.tiny_sd15_pipeline, testing.momentum_scheduler_classes("vp")),
    "sdxl": (testing.tiny_sdxl_pipeline, testing.momentum_scheduler_classes("vp")),
    "sd3": (testing.tiny_sd3_pipeline, testing.momentum_scheduler_classes("flow")),
}
CALL = dict(num_inference_steps=4, height=32, width=32, output_type="np", guidance_scale=7.5)

CHILD = r"""
import json, sys
import numpy as np
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
import diffusers

folders = json.loads(sys.argv[1])
call = json.loads(sys.argv[2])
report = {}


def absent(folder):  # components saved as null (the tiny SD3 has no T5) must be passed as None, as for real SD3
    with open(folder + "/model_index.json") as f:
        return {k: None for k, v in json.load(f).items() if isinstance(v, list) and v[0] is None}


for folder in folders:
    entry = report.setdefault(folder, {})
    # 1. without the package: diffusers refuses to import the module named in model_index.json
    assert "diffusers_distill" not in sys.modules
    try:
        DiffusionPipeline.from_pretrained(folder, **absent(folder))
        entry["error_without_package"] = None
    except ValueError as error:
        entry["error_without_package"] = str(error)
    pipe = DiffusionPipeline.from_pretrained(folder, scheduler=None, **absent(folder))
    entry["scheduler_none_ok"] = pipe.scheduler is None

import diffusers_distill  # noqa: E402,F401  (the only thing a user adds)

for folder in folders:
    entry = report[folder]
    pipe = DiffusionPipeline.from_pretrained(folder, **absent(folder))
    specific = getattr(diffusers, type(pipe).__name__).from_pretrained(folder, **absent(folder))
    entry["classes"] = [type(pipe.scheduler).__module__ + "." + type(pipe.scheduler).__name__,
                        type(specific.scheduler).__name__]
    entry["config"] = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **call).images
    np.save(folder + "/reloaded.npy", images)
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload")
    saved = {}
    for arch, (build, classes) in CASES.items():
        pipe = build()
        for cls in classes:
            pipe.scheduler = cls.from_config(pipe.scheduler.config, momentum_beta=0.8)
            folder = str(root / f"{arch}-{cls.__name__}")
            pipe.save_pretrained(folder)
            images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **CALL).images
            saved[folder] = (cls, dict(pipe.scheduler.config), images)
    return saved


@pytest.fixture(scope="module")
def child_report(saved_pipelines):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(list(saved_pipelines)), json.dumps(CALL)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_model_index_names_the_defining_module(saved_pipelines):
    for folder, (cls, _, _) in saved_pipelines.items():
        with open(os.path.join(folder, "model_index.json")) as f:
            assert json.load(f)["scheduler"] == [cls.__module__, cls.__name__]
        assert cls.__module__.startswith("diffusers_distill.schedulers.scheduling_")


def test_reload_in_fresh_process_same_class_config_and_images(saved_pipelines, child_report):
    assert set(child_report) == set(saved_pipelines)
    for folder, (cls, config, images) in saved_pipelines.items():
        entry = child_report[folder]
        assert entry["classes"] == [f"{cls.__module__}.{cls.__name__}", cls.__name__], folder
        expected = {k: v for k, v in json.loads(json.dumps(config)).items() if not k.startswith("_")}
        assert entry["config"] == expected, folder
        np.testing.assert_allclose(np.load(os.path.join(folder, "reloaded.npy")), images, atol=1e-6)


def test_without_the_package_diffusers_names_the_module_to_import(saved_pipelines, child_report):
    for folder, (cls, _, _) in saved_pipelines.items():
        entry = child_report[folder]
        assert entry["error_without_package"] is not None, folder
        assert f"import {cls.__module__} before calling `from_pretrained`" in entry["error_without_package"]
        assert entry["scheduler_none_ok"], folder  # the documented escape hatch: scheduler=None, then set one
