"""Our pipelines' single-pass ``_execution_device`` / ``device`` give diffusers' own answers (the stock properties,
called on the same pipeline object) with and without offloading hooks."""

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module
from diffusers import DiffusionPipeline
from diffusers.hooks import apply_group_offloading

from diffusers_distill import DMD2StableDiffusionPipeline, DMD2StableDiffusionXLPipeline, testing
from diffusers_distill.pipelines.execution_device import scan_component

META = torch.device("meta")


def _stock(pipe):
    return DiffusionPipeline._execution_device.fget(pipe), DiffusionPipeline.device.fget(pipe)


def _ours(pipe):
    return pipe._execution_device, pipe.device


def _pipeline(kind):
    if kind == "sd15":
        return DMD2StableDiffusionPipeline(**testing.tiny_sd15_pipeline().components)
    return DMD2StableDiffusionXLPipeline(**testing.tiny_sdxl_pipeline().components)


def _group_offload_vae(pipe):
    cpu = torch.device("cpu")
    apply_group_offloading(pipe.vae, onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    # then point the hooks' onload device at "meta", so that the answer differs from every parameter's device
    for module in pipe.vae.modules():
        hook = getattr(module, "_diffusers_hook", None)
        if hook is not None and hook.get_hook("group_offloading") is not None:
            hook.get_hook("group_offloading").config.onload_device = META


def _model_cpu_offload(pipe):  # enable_model_cpu_offload's layout: a hook with an execution device on each model
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            add_hook_to_module(module, AlignDevicesHook(execution_device=META))


def _sequential_offload(pipe):  # enable_sequential_cpu_offload's layout: the execution device sits on leaves
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            add_hook_to_module(module, ModelHook())
    leaf = next(m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv2d))
    add_hook_to_module(leaf, AlignDevicesHook(execution_device=META), append=True)


def _unet_on_meta(pipe):
    pipe.unet.to(META)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize(
    "setup",
    [None, _group_offload_vae, _model_cpu_offload, _sequential_offload, _unet_on_meta],
    ids=["plain", "group_offload", "model_cpu_offload", "sequential_offload", "unet_on_meta"],
)
def test_device_lookups_equal_diffusers(kind, setup):
    pipe = _pipeline(kind)
    if setup is not None:
        setup(pipe)
    stock = _stock(pipe)
    assert _ours(pipe) == stock
    if setup in (_group_offload_vae, _model_cpu_offload, _sequential_offload):
        assert stock[0] == META  # the case is one where the lookup has something to find


def test_scan_component_finds_what_module_order_finds_first():
    unet = testing.tiny_sd15_pipeline().unet
    found = scan_component(unet)
    assert found.first_tensor == next(unet.parameters()).device and found.group_onload is None
    assert found.hook_execution is None
    shared = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2))
    shared[0].register_buffer("b", torch.zeros(1, device=META))
    assert scan_component(shared).first_tensor == torch.device("cpu")  # a parameter wins over an earlier buffer
    only_buffers = torch.nn.Sequential(torch.nn.Identity())
    only_buffers[0].register_buffer("b", torch.zeros(1, device=META))
    assert scan_component(only_buffers).first_tensor == META
