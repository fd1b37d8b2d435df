"""Network layout of DMD2 (arXiv 2405.14867): generator, fake score (+ GAN head) and real score (the frozen teacher).

Two layouts, selectable per trainable role:

* **LoRA shared base** (beyond the reference code): ONE frozen base UNet in memory; the real score is the base with
  adapters disabled, the generator is the base with the peft adapter ``"generator"``, the fake score the base
  with the adapter ``"fake_score"`` (its own rank).
* **Full**: a trainable ``copy.deepcopy`` of the base for the generator and/or the fake score (the reference layout:
  three UNets).

The GAN discriminator (DMD2 Sec. 4.2, App. F.1) is a small conv head on the fake score's mid-block output,
captured with a forward hook that stops the UNet forward right after the mid block.
The generator runs in 1-step mode (pure noise at a conditioning timestep) or N-step mode (fixed timesteps,
e.g. 999/749/499/249) with backward simulation (DMD2 Sec. 4.4).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
from torch import nn

from .constants import DEFAULT_LORA_TARGET_MODULES, LAYOUTS, dmd2_timesteps
from .noise_schedule import NoiseSchedule
from .randomness import randn
from .teacher import PromptEmbeddings, predict_x0, unet_output

__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "DMD2Networks",
    "FAKE_SCORE_ADAPTER",
    "GANHead",
    "GENERATOR_ADAPTER",
    "ROLES",
    "build_dmd2_networks",
    "generator_input",
    "generator_timesteps",
    "mid_block_features",
    "sample_student",
]

GENERATOR_ADAPTER = "generator"
FAKE_SCORE_ADAPTER = "fake_score"
generator_timesteps = dmd2_timesteps  # the student's fixed timestep list (kept under its old name)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (DMD2's head), fewer when a group would hold a single channel: the head's norms after
    its last conv see 1x1 maps, where a one-channel group normalises every value to zero (a constant logit)."""
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


class GANHead(nn.Module):
    """DMD2's ``cls_pred_branch`` (App. F.1): [Conv4x4 s2 -> GN -> SiLU] until 4x4, Conv4x4 s4 -> GN -> SiLU,
    Conv1x1 -> one logit. SD 1.5 at 512px has an 8x8 bottleneck (one stride-2 conv), SDXL at 1024px 32x32 (three).
    """

    def __init__(self, channels: int, feature_size: int):
        super().__init__()
        if feature_size < 4 or feature_size & (feature_size - 1):
            raise ValueError(f"feature_size must be a power of two >= 4, got {feature_size}")
        layers = []
        for _ in range(int(math.log2(feature_size)) - 2):
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _group_norm(channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, channels, 4, stride=4), _group_norm(channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)


class _MidBlockReached(Exception):
    def __init__(self, features):
        super().__init__()
        self.features = features


@contextlib.contextmanager
def mid_block_features(unet):
    """Within the context, ``capture(call)`` runs ``call()`` (a UNet forward) only up to the mid block and
    returns the mid-block output; a forward hook raises to skip the up blocks (written by hand: diffusers'
    UNet has no "stop after mid block" option)."""

    def hook(module, args, output):
        raise _MidBlockReached(output)

    handle = unet.mid_block.register_forward_hook(hook)

    def capture(call):
        try:
            call()
        except _MidBlockReached as stop:
            return stop.features
        raise RuntimeError("the UNet forward finished without reaching its mid block")

    try:
        yield capture
    finally:
        handle.remove()


ROLES = ("generator", "fake_score", "real_score")


class DMD2Networks(nn.Module):
    """The three DMD2 networks (generator, fake score, real score) and the GAN head, on one frozen base UNet.

    Run a role inside ``with nets.role("fake_score") as unet:``: the context activates the role's LoRA adapter (or
    the adapters off, for the real score) and returns the UNet to call; leaving it restores the role that was active
    before, so roles nest. A backward pass through a gradient-checkpointed LoRA role must run inside that role's
    context, because the recomputation uses whichever adapter is active then.
    """

    def __init__(
        self,
        base_unet,
        generator_unet=None,
        fake_score_unet=None,
        gan_head: GANHead | None = None,
        num_fake_score_steps: int = 0,
    ):
        super().__init__()
        self.base_unet = base_unet
        self.generator_unet = generator_unet  # None -> LoRA adapter "generator" on the base
        self.fake_score_unet = fake_score_unet  # None -> LoRA adapter "fake_score" on the base
        self.gan_head = gan_head
        self._active: list[str] = []
        self._sample_step: int | None = None
        self.fake_score_step_embedding = None
        if num_fake_score_steps > 0:
            self._condition_fake_score_on_step(num_fake_score_steps)

    def _condition_fake_score_on_step(self, num_steps: int) -> None:
        """A zero-initialised embedding of the generator step that made the sample, added to the fake score's time
        embedding (at the input of ``time_embedding.linear_1``, where diffusers adds ``cond_proj(timestep_cond)``).

        With it the fake score models each step's output distribution p_k separately instead of their mixture, so
        the DM gradient of step k is s_fake,k - s_real (written by hand: diffusers has no per-call extra time
        embedding that a shared-base UNet could take for one role only). Zero-initialised: at start it is the
        unconditioned fake score. Active only inside ``role("fake_score")`` with :meth:`sample_step` set.
        """
        linear = self.unet("fake_score").time_embedding.linear_1
        self.fake_score_step_embedding = nn.Embedding(num_steps, linear.in_features)
        nn.init.zeros_(self.fake_score_step_embedding.weight)

        def add_step_embedding(module, args):
            if self._sample_step is None or not self._active or self._active[-1] != "fake_score":
                return None
            embedding = self.fake_score_step_embedding.weight[self._sample_step]
            return (args[0] + embedding.to(args[0].dtype),)

        linear.register_forward_pre_hook(add_step_embedding)

    @contextlib.contextmanager
    def sample_step(self, step: int):
        """Within the context the fake score is conditioned on generator step ``step`` (when it is step-conditioned)."""
        if self.fake_score_step_embedding is not None and not 0 <= step < self.fake_score_step_embedding.num_embeddings:
            raise ValueError(f"step must be in [0, {self.fake_score_step_embedding.num_embeddings - 1}], got {step}")
        previous, self._sample_step = self._sample_step, step
        try:
            yield
        finally:
            self._sample_step = previous

    @property
    def generator_is_lora(self) -> bool:
        return self.generator_unet is None

    @property
    def fake_score_is_lora(self) -> bool:
        return self.fake_score_unet is None

    def _activate(self, role: str) -> None:
        if not (self.generator_is_lora or self.fake_score_is_lora):
            return
        adapter = {"generator": GENERATOR_ADAPTER, "fake_score": FAKE_SCORE_ADAPTER}.get(role)
        if (
            adapter is None
            or (role == "generator" and not self.generator_is_lora)
            or (role == "fake_score" and not self.fake_score_is_lora)
        ):
            self.base_unet.disable_adapters()  # the real score, or a role with its own full UNet
        else:
            self.base_unet.enable_adapters()
            self.base_unet.set_adapter(adapter)

    def unet(self, role: str):
        """The module that computes ``role`` (the shared base for LoRA roles and the real score)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == "generator" and not self.generator_is_lora:
            return self.generator_unet
        if role == "fake_score" and not self.fake_score_is_lora:
            return self.fake_score_unet
        return self.base_unet

    @contextlib.contextmanager
    def role(self, role: str):
        """Context in which ``role``'s adapter is active; yields the UNet to call for it."""
        unet = self.unet(role)
        self._active.append(role)
        self._activate(role)
        try:
            yield unet
        finally:
            self._active.pop()
            if self._active:
                self._activate(self._active[-1])

    def parameters_of(self, role: str) -> list[nn.Parameter]:
        """Trainable parameters of ``"generator"`` or ``"fake_score"`` (which includes the GAN head)."""
        if role == "generator":
            if self.generator_is_lora:
                return [p for n, p in self.base_unet.named_parameters() if f".{GENERATOR_ADAPTER}." in n]
            return list(self.generator_unet.parameters())
        if role != "fake_score":
            raise ValueError(f"role must be 'generator' or 'fake_score' (the real score is frozen), got {role!r}")
        if self.fake_score_is_lora:
            params = [p for n, p in self.base_unet.named_parameters() if f".{FAKE_SCORE_ADAPTER}." in n]
        else:
            params = list(self.fake_score_unet.parameters())
        for extra in (self.fake_score_step_embedding, self.gan_head):
            params += list(extra.parameters()) if extra is not None else []
        return params

    def gan_logits(self, x_t, timesteps, embeddings: PromptEmbeddings) -> torch.Tensor:
        """GAN logits: the fake score run up to its mid block on noised inputs, then the head."""
        with self.role("fake_score") as unet, mid_block_features(unet) as capture:
            features = capture(lambda: unet_output(unet, x_t, timesteps, embeddings))
        return self.gan_head(features)


def _lora_config(rank: int, alpha: float | None, target_modules):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def build_dmd2_networks(
    base_unet,
    student_type: str = "lora",
    fake_score_type: str = "lora",
    lora_rank: int = 64,
    lora_alpha: float | None = 8,
    fake_lora_rank: int = 64,
    fake_lora_alpha: float | None = None,
    lora_target_modules=DEFAULT_LORA_TARGET_MODULES,
    gan_feature_size: int | None = None,
    num_fake_score_steps: int = 0,
) -> DMD2Networks:
    """Build the DMD2 networks around a (teacher-initialised) ``base_unet``; the base is frozen.

    ``gan_feature_size`` = spatial size of the mid-block output (latent size / 2**(levels-1)); None -> no GAN head.
    ``num_fake_score_steps`` > 0 conditions the fake score on the generator step (see ``DMD2Networks``).
    """
    for name, value in (("student_type", student_type), ("fake_score_type", fake_score_type)):
        if value not in LAYOUTS:
            raise ValueError(f"{name} must be one of {LAYOUTS}, got {value!r}")
    base_unet.requires_grad_(False)
    generator_unet = copy.deepcopy(base_unet).requires_grad_(True) if student_type == "full" else None
    fake_score_unet = copy.deepcopy(base_unet).requires_grad_(True) if fake_score_type == "full" else None
    if student_type == "lora":
        base_unet.add_adapter(_lora_config(lora_rank, lora_alpha, lora_target_modules), adapter_name=GENERATOR_ADAPTER)
    if fake_score_type == "lora":
        config = _lora_config(fake_lora_rank, fake_lora_alpha, lora_target_modules)
        with warnings.catch_warnings():  # two adapters on one UNet is this layout's design, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            base_unet.add_adapter(config, adapter_name=FAKE_SCORE_ADAPTER)
    for name, param in base_unet.named_parameters():  # only adapter weights train
        param.requires_grad_(f".{GENERATOR_ADAPTER}." in name or f".{FAKE_SCORE_ADAPTER}." in name)
    head = None
    if gan_feature_size is not None:
        head = GANHead(base_unet.config.block_out_channels[-1], gan_feature_size)
    return DMD2Networks(base_unet, generator_unet, fake_score_unet, head, num_fake_score_steps)


def generator_input(
    networks: DMD2Networks,
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    embeddings: PromptEmbeddings,
    timesteps: list[int],
    num_simulated_steps: int,
    generator: torch.Generator | None = None,
):
    """Input ``(x_t, t)`` of the generator's training step (DMD2 Sec. 4.4, backward simulation).

    With ``num_simulated_steps = k`` the generator itself (without gradient) runs the first k of its own
    sampling steps from ``noise``; the last x0 is re-noised with fresh noise to ``timesteps[k]``. k = 0 is pure
    noise at ``timesteps[0]`` (the 1-step case). ``generator`` may live on another device than ``noise``.
    """
    if not 0 <= num_simulated_steps < len(timesteps):
        raise ValueError(f"num_simulated_steps must be in [0, {len(timesteps) - 1}], got {num_simulated_steps}")
    x_t = noise.float()
    batch = noise.shape[0]
    with torch.no_grad(), networks.role("generator") as unet:
        for i in range(num_simulated_steps):
            t = torch.full((batch,), timesteps[i], device=noise.device, dtype=torch.long)
            x0 = predict_x0(unet, schedule, x_t, t, embeddings)
            fresh = randn(noise.shape, generator, noise.device)
            x_t = schedule.add_noise(x0, fresh, torch.full_like(t, timesteps[i + 1]))
    t_in = torch.full((batch,), timesteps[num_simulated_steps], device=noise.device, dtype=torch.long)
    return x_t, t_in


@torch.no_grad()
def sample_student(networks, schedule, embeddings, timesteps, noise, generator=None) -> torch.Tensor:
    """Consistency-style multi-step sampling: x0 = G(x_t, t_i), then re-noise to t_{i+1} with fresh noise."""
    x_t, _ = generator_input(networks, schedule, noise, embeddings, timesteps, len(timesteps) - 1, generator)
    t = torch.full((noise.shape[0],), timesteps[-1], device=noise.device, dtype=torch.long)
    with networks.role("generator") as unet:
        return predict_x0(unet, schedule, x_t, t, embeddings)
