"""Single-pass ``_execution_device`` and ``device`` for our pipeline subclasses.

diffusers 0.42's ``DiffusionPipeline._execution_device`` looks for a group-offloading hook by walking every module of
every component (``hooks.group_offloading._get_top_level_group_offload_hook``), then calls ``self.device``, which asks
each component for ``ModelMixin.device``, and each of those walks the component again. A pipeline call pays this
several times: about 7 ms on CPU for the SD 1.5-architecture digits teacher, a third of a whole 1-step student call
there (docs/dmd2.md, "One-step latency"), and the same Python cost in front of every GPU call. diffusers has no
cheaper lookup, so this mixin computes the same answers with one walk per component: the first group-offloading
onload device, the first accelerate hook's ``execution_device`` and the first parameter (or buffer) device, each in
``Module.modules()`` order, exactly as diffusers' own lookups find them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_GROUP_OFFLOADING = "group_offloading"  # the hook name diffusers' group offloading registers


@dataclass(frozen=True)
class ComponentDevices:
    """What one walk over a component finds (None: not present)."""

    group_onload: torch.device | None  # onload device of the first group-offloading hook
    hook_execution: torch.device | None  # execution_device of the first accelerate hook that has one
    first_tensor: torch.device | None  # device of the first parameter, else of the first buffer


def scan_component(module: torch.nn.Module) -> ComponentDevices:
    """One pre-order walk (the order of ``module.modules()``, shared submodules once) over ``module``."""
    group = hook = parameter = buffer = None
    seen, stack = set(), [module]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        attributes = current.__dict__  # hooks are instance attributes; a missing nn.Module attribute raises slowly
        if group is None and "_diffusers_hook" in attributes:
            found = attributes["_diffusers_hook"].get_hook(_GROUP_OFFLOADING)
            group = found.config.onload_device if found is not None else None
        if hook is None and getattr(attributes.get("_hf_hook"), "execution_device", None) is not None:
            hook = torch.device(attributes["_hf_hook"].execution_device)
        if parameter is None and attributes["_parameters"]:
            parameter = next((p.device for p in attributes["_parameters"].values() if p is not None), None)
        if buffer is None and attributes["_buffers"]:
            buffer = next((b.device for b in attributes["_buffers"].values() if b is not None), None)
        children = attributes["_modules"]
        if children:
            stack.extend(reversed(children.values()))
    return ComponentDevices(group, hook, parameter if parameter is not None else buffer)


class SinglePassDeviceMixin:
    """``_execution_device`` and ``device`` with diffusers' semantics (see the module docstring), one walk each."""

    def _component_device(self, module: torch.nn.Module, scans: dict) -> torch.device:
        from diffusers import ModelMixin

        if not isinstance(module, ModelMixin):  # transformers models: their own (cheap) first-parameter lookup
            return module.device
        found = scans.get(id(module))
        if found is None:
            found = scans[id(module)] = scan_component(module)
        return found.group_onload if found.group_onload is not None else found.first_tensor

    def _device_from(self, scans: dict) -> torch.device:
        names, _ = self._get_signature_keys(self)
        modules = [m for m in (getattr(self, n, None) for n in names) if isinstance(m, torch.nn.Module)]
        devices = [self._component_device(m, scans) for m in modules]
        accelerator = next((d for d in devices if d.type not in ("cpu", "meta")), None)
        return accelerator if accelerator is not None else (devices[0] if devices else torch.device("cpu"))

    @property
    def device(self) -> torch.device:
        """The pipeline's device: the first component on an accelerator, else the first component's."""
        return self._device_from({})

    @property
    def _execution_device(self) -> torch.device:
        """Where the pipeline computes: a group-offloading onload device, else an accelerate hook's execution
        device (sequential / model CPU offload), else :attr:`device`."""
        modules = [(n, m) for n, m in self.components.items() if isinstance(m, torch.nn.Module)]
        scans = {id(m): scan_component(m) for _, m in modules}
        for _, module in modules:
            if scans[id(module)].group_onload is not None:
                return scans[id(module)].group_onload
        for name, module in modules:
            if name in self._exclude_from_cpu_offload:
                continue
            if not hasattr(module, "_hf_hook"):
                return self._device_from(scans)
            if scans[id(module)].hook_execution is not None:
                return scans[id(module)].hook_execution
        return self._device_from(scans)
