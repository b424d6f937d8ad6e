"""The flow-matching policy of the denoising MDP: Flow-GRPO's SDE form of the flow ODE as a Gaussian policy.

## Why an SDE

A flow-matching model (Stable Diffusion 3 / 3.5: `SD3Transformer2DModel` with diffusers'
`FlowMatchEulerDiscreteScheduler`) is sampled by an ODE, whose steps are deterministic: no log-probs,
so no policy gradient. Flow-GRPO (Liu et al. 2025) replaces the ODE by an SDE with the same marginals
p_s at every noise level s, whose Euler-Maruyama steps are Gaussians with closed-form log-probs and KL.

## The transition

Noise level s in [0, 1]: x_s = (1 - s) x0 + s eps; the model predicts the velocity v = eps - x0, and
the ODE is dx = v ds, run from s = 1 (noise) to s = 0 (image). Two identities of this path:

    eps = x + (1 - s) v        (the noise the model implies)
    score(x) = -eps / s        (the gradient of log p_s: the posterior mean of -eps / s)

For any noise schedule sigma_s >= 0, the reverse-time SDE

    dx = [v - sigma_s^2 / 2 * score(x)] ds + sigma_s dW = [v + sigma_s^2 / (2 s) (x + (1 - s) v)] ds + sigma_s dW

(ds < 0) has the ODE's marginals: the score term's drift and the noise's diffusion cancel in the
Fokker-Planck equation. Flow-GRPO's schedule is sigma_s = a sqrt(s / (1 - s)) with the noise level a.
One Euler-Maruyama step from s to s' (dt = s' - s < 0) is the policy:

    pi(x' | x) = N(mean, std^2 I),  mean = x + [v + sigma^2 / (2 s) (x + (1 - s) v)] dt,  std = sigma sqrt(-dt)

As a -> 0 the mean is x + v dt, the Euler ODE step of `FlowMatchEulerDiscreteScheduler.step`, and std
-> 0. std does not depend on theta, so log-probs are Gaussian in the mean alone and the KL to the
reference is |mean - ref_mean|^2 / (2 std^2) (`t2i_rl.policy.gaussian_kl`).

## The two ends of the schedule

- **s = 1** (the first step: the shifted schedule always starts there): sqrt(s / (1 - s)) is infinite.
  Because the SDE keeps the marginals for *any* schedule sigma_s, holding sigma constant near s = 1 is
  an SDE of the same family, not an approximation of one: the policy computes sigma at
  s~ = min(s, s_cap), with s_cap the largest sigma of the inference schedule below 1 (its second
  point), so the first step draws the noise of the second. Flow-GRPO guards the same place with
  sqrt(1 / (1 - s_cap)), a factor sqrt(1 / s_cap) (1.02 at 10 SD 3 steps) above this, which mixes the two
  ends of one interval; we keep sigma a function of a single s~. The drift's 1 / (2 s) is 1/2 there.
  With one step there is no second point: num_steps must be >= 2.
- **s' = 0** (the last step): nothing divides by s', dt = -s and std = sigma sqrt(s) > 0; the mean
  is x0_hat - sigma^2 / 2 * eps_hat. The image keeps a little noise (std about a s at small s),
  as the DDIM policy's last step with eta > 0 does, and its log-prob is as well defined as any other.

The policy only acts and scores; the algorithms in `agents/` update its parameters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from t2i_rl.lora import FLOW_LORA_TARGETS, check_lora_targets
from t2i_rl.policy import GaussianStepPolicy, check_step_index, per_sample

# the pipeline's own default token count of the T5 encoder (StableDiffusion3Pipeline.__call__)
T5_MAX_LENGTH = 256


@dataclass(frozen=True)
class FlowEmbeds:
    """An MMDiT's text conditioning: per-token embeddings [B, L, D] (CLIP x2 padded to T5's width,
    then T5) and the pooled embedding [B, P] (both CLIPs' projections), as `encode_prompt` makes them.

    Why one object: the transformer needs both in every call, and methods that take `embeds` (the
    DDIM policy's [B, L, D] tensor) take this in its place. It indexes, moves and concatenates like a
    tensor along the batch, so that rollouts can slice and gather it as they do embeddings."""

    prompt: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def __getitem__(self, index) -> FlowEmbeds:
        """The samples `index` selects (a slice, a list or a tensor of indices: keeps the batch dim)."""
        return FlowEmbeds(self.prompt[index], self.pooled[index])

    def to(self, *args, **kwargs) -> FlowEmbeds:
        """Both tensors `.to(*args, **kwargs)` (a device, a dtype)."""
        return FlowEmbeds(self.prompt.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(parts: Sequence[FlowEmbeds]) -> FlowEmbeds:
        """Concatenate along the batch."""
        return FlowEmbeds(torch.cat([p.prompt for p in parts]), torch.cat([p.pooled for p in parts]))


def flow_noise_schedule(sigmas: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per step i (from sigmas[i] to sigmas[i + 1]) of an inference schedule sigmas [T + 1] (1 ... 0):
    (dt [T], sde_sigma [T], std [T]) in float32: dt = s' - s, sde_sigma = a sqrt(s~ / (1 - s~)) with
    s~ = min(s, s_cap) (s_cap: the schedule's largest sigma below 1; see the module docstring), and
    std = sde_sigma sqrt(-dt). Computed in float64, so that the guard is not rounding's."""
    s = sigmas.double()
    below_one = s[(s < 1) & (s > 0)]
    if bool((s[:-1] >= 1).any()) and not len(below_one):
        raise ValueError(
            f"num_steps = {len(sigmas) - 1} is invalid: the SDE's noise a * sqrt(s / (1 - s)) is infinite at s = 1, "
            "where the schedule starts, and is taken from the next sigma below 1, which a single step lacks; "
            "use num_steps >= 2"
        )
    s_cap = below_one.max() if len(below_one) else torch.tensor(1.0, dtype=torch.float64)
    s_now = s[:-1]
    s_tilde = torch.minimum(s_now, s_cap)
    dt = s[1:] - s_now
    sde_sigma = noise_level * (s_tilde / (1 - s_tilde)).sqrt()
    std = sde_sigma * (-dt).sqrt()
    return dt.float(), sde_sigma.float(), std.float()


def sde_step_mean(latents: torch.Tensor, velocity: torch.Tensor, s: torch.Tensor | float, dt: torch.Tensor | float,
                  sde_sigma: torch.Tensor | float) -> torch.Tensor:
    """The mean of one Euler-Maruyama step of the flow SDE, in float32 (float64 for float64 inputs):
    x + [v + sigma^2 / (2 s) (x + (1 - s) v)] dt (the ODE step x + v dt when sigma = 0)."""
    dtype = torch.promote_types(torch.promote_types(latents.dtype, velocity.dtype), torch.float32)
    x, v = latents.to(dtype), velocity.to(dtype)
    return x + (v + sde_sigma**2 / (2 * s) * (x + (1 - s) * v)) * dt


def _check_number(name: str, value, ok: Callable[[float], bool], rule: str) -> float:
    """`value` as a float if it is a finite real number that `ok` accepts; else one ValueError line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} = {value!r} is invalid: must be {rule}")
    return float(value)


class FlowPolicy(GaussianStepPolicy):
    """Flow-GRPO's SDE sampler of a Stable Diffusion 3 / 3.5 pipeline seen as a Gaussian policy, with
    log-probs and KL to a reference, behind the interface of `t2i_rl.policy.DiffusionPolicy` (acting,
    re-scoring and the KL come from `GaussianStepPolicy`, given this class's `step_stats`).

    ## Arguments
    pipe: a `StableDiffusion3Pipeline` (`t2i_rl.models.load_pipeline` of a local folder or hub id) with
    its `FlowMatchEulerDiscreteScheduler`; the policy takes the scheduler's shifted sigmas.
    num_steps: sampler steps (>= 2: the first step's noise comes from the second sigma).
    guidance_scale: classifier-free guidance on the velocity (<= 1: none, one transformer call per step).
    noise_level: a > 0 of sigma_s = a sqrt(s / (1 - s)); Flow-GRPO trains SD 3.5 Medium with 0.7.
    lora_rank, lora_alpha: a PEFT LoRA adapter of that rank on `lora_target_modules` (None: every
    projection of `FLOW_LORA_TARGETS` the transformer has); `lora_rank=None` trains the whole
    transformer against a frozen float32 copy of it.
    max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
    mu: the resolution-dependent shift of schedulers with `use_dynamic_shifting` (FLUX's); refused
    where the scheduler has a fixed shift (SD 3 / 3.5).

    ## Precision and the reference
    As in the DDIM policy: the frozen weights stay in the pipeline's dtype, what trains is float32,
    means / log-probs / KLs are float32. With LoRA the reference is the transformer with adapters
    off (no memory); the VAE and the text encoders are always frozen.
    """

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        num_steps: int = 10,
        guidance_scale: float = 4.5,
        noise_level: float = 0.7,
        lora_rank: int | None = 4,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        max_sequence_length: int = T5_MAX_LENGTH,
        mu: float | None = None,
    ) -> None:
        scheduler = getattr(pipe, "scheduler", None)
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"pipe.scheduler = {type(scheduler).__name__} is invalid: the flow policy needs diffusers' "
                "FlowMatchEulerDiscreteScheduler (its sigmas define the SDE), the scheduler an SD 3 checkpoint "
                "ships and t2i_rl.models.load_pipeline keeps"
            )
        transformer = getattr(pipe, "transformer", None)
        if not isinstance(transformer, SD3Transformer2DModel):
            raise ValueError(f"pipe.transformer = {type(transformer).__name__} is invalid: the flow policy runs "
                             "SD3Transformer2DModel (a StableDiffusion3Pipeline)")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps = {num_steps!r} is invalid: must be an int >= 2 (the first step's noise "
                             "level is the second sigma's)")
        self.guidance_scale = _check_number("guidance_scale", guidance_scale, lambda g: g >= 0,
                                            "a number >= 0 (<= 1 means no classifier-free guidance)")
        self.noise_level = _check_number("noise_level", noise_level, lambda a: a > 0,
                                         "a number > 0 (the SDE's a; a -> 0 is the deterministic ODE, which has "
                                         "no log-probs)")
        if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
            raise ValueError(f"lora_rank = {lora_rank!r} is invalid: must be an int >= 1, or None for full "
                             "fine-tuning")
        if lora_alpha is not None:
            _check_number("lora_alpha", lora_alpha, lambda x: x > 0, "a number > 0, or None for lora_alpha = lora_rank")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length = {max_sequence_length!r} is invalid: must be an int in [1, 512] "
                             "(T5 tokens per prompt)")
        config = scheduler.config
        if config.invert_sigmas:
            raise ValueError("the scheduler's invert_sigmas = True is invalid: the flow policy runs s from 1 (noise) "
                             "to 0 (image)")
        if config.use_dynamic_shifting != (mu is not None):
            raise ValueError(
                f"mu = {mu!r} is invalid: a scheduler with use_dynamic_shifting = {config.use_dynamic_shifting} "
                + ("needs mu, its resolution-dependent shift" if config.use_dynamic_shifting
                   else "has a fixed shift; leave mu = None")
            )

        self.pipe = pipe
        self.transformer = transformer
        self.num_steps = num_steps
        self.lora_rank = lora_rank
        self.max_sequence_length = max_sequence_length

        # Our own scheduler: a later `pipe(..., num_inference_steps=...)` must not move our sigmas.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.scheduler.set_timesteps(num_steps, mu=mu)
        self.sigmas: torch.Tensor = self.scheduler.sigmas.float().cpu().clone()  # [T + 1], 1 ... 0
        self.timesteps: torch.Tensor = self.scheduler.timesteps.float().cpu().clone()  # [T], sigma * 1000
        self._s = self.sigmas[:-1].clone()
        self._dt, self._sde_sigma, self._std = flow_noise_schedule(self.sigmas, self.noise_level)
        if not (bool(torch.isfinite(self._std).all()) and bool((self._std > 0).all()) and bool((self._s > 0).all())):
            raise ValueError(f"the scheduler's sigmas {[round(float(x), 4) for x in self.sigmas]} are invalid for the "
                             "SDE: every step needs 0 < s <= 1 and s' < s (a finite std > 0)")

        # Freeze what never trains, then make the trainable part (LoRA or the whole transformer).
        for encoder in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if encoder is not None:
                encoder.requires_grad_(False)
        self.reference_transformer: SD3Transformer2DModel | None = None
        if lora_rank is None:
            # float32 weights and a float32 reference copy: KL to it is exactly 0 before the first update
            self.transformer.to(torch.float32).requires_grad_(True)
            self.reference_transformer = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        else:
            self._add_lora(lora_rank, lora_alpha, lora_target_modules)

        # the frozen weights' dtype, read once (diffusers' `.dtype` walks the parameters)
        self._compute_dtype: torch.dtype = self.transformer.dtype
        self._uncond: FlowEmbeds = self.encode_prompts([""])  # [1, ...], cached once

    def _add_lora(self, rank: int, alpha: float | None, targets: Sequence[str] | None) -> None:
        """A PEFT LoRA on the attention projections; B = 0, so the fresh policy is the reference."""
        from peft import LoraConfig

        if getattr(self.transformer, "_hf_peft_config_loaded", False):
            raise ValueError("pipe.transformer already carries a PEFT adapter; build the policy on a fresh pipeline "
                             "(its reference model is the transformer with adapters disabled)")
        layers = {n: type(m).__name__ for n, m in self.transformer.named_modules()}
        if targets is None:  # the defaults the transformer has (SD 3's last block has no to_add_out)
            targets = [t for t in FLOW_LORA_TARGETS if any(n == t or n.endswith("." + t) for n in layers)]
        check_lora_targets(layers, targets, model="transformer")
        self.lora_target_modules: list[str] = list(targets)
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                                init_lora_weights=True, target_modules=list(targets)))
        # PEFT makes the adapter in the base layers' dtype; it trains in float32 (PEFT casts around it)
        for p in self.trainable_parameters():
            p.data = p.data.float()

    # ---------------------------------------------------------------- schedule
    def sigma(self, step_index: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The action's std at step `step_index` (sde_sigma sqrt(-dt)): a float32 scalar, independent of theta."""
        return self._std[check_step_index(step_index, self.num_steps)].to(device or self.device)

    @property
    def _denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def _reference(self) -> torch.nn.Module | None:
        return self.reference_transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def computes_in_float16(self) -> bool:
        """Whether the transformer runs in float16 (its backward pass then needs loss scaling)."""
        return any(p.dtype == torch.float16 for p in self.transformer.parameters())

    # ---------------------------------------------------------------- text and latents
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> FlowEmbeds:
        """The pipeline's own `encode_prompt` (three text encoders, no guidance half), in the text
        encoders' dtype: FlowEmbeds(prompt [B, 77 + max_sequence_length, D], pooled [B, P])."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompt, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return FlowEmbeds(prompt, pooled)

    @property
    def uncond_embeds(self) -> FlowEmbeds:
        """The empty prompt's embeddings [1, ...]: the unconditional half of guidance, as the
        pipeline's default negative prompt."""
        return self._uncond

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(channels, side, side) of the latents for `resolution`-pixel images (None: the transformer's
        native sample_size); the side must be a multiple of the transformer's patch size."""
        config = self.transformer.config
        multiple = self.pipe.vae_scale_factor * config.patch_size
        if resolution is None:
            return config.in_channels, config.sample_size, config.sample_size
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1 or resolution % multiple:
            raise ValueError(f"resolution = {resolution!r} is invalid: must be a positive multiple of {multiple} "
                             f"(VAE factor {self.pipe.vae_scale_factor} x patch size {config.patch_size})")
        return config.in_channels, resolution // self.pipe.vae_scale_factor, resolution // self.pipe.vae_scale_factor

    def initial_latents(self, n: int, latent_shape: Sequence[int], generator: torch.Generator,
                        group: int = 1) -> torch.Tensor:
        """x_1 ~ N(0, I) [n, *latent_shape] in float32 on the policy's device, drawn from `generator` on its
        own device (a CPU generator: the same x_1 on any device), one draw per `group` consecutive samples."""
        noise = randn_tensor((n // group, *latent_shape), generator=generator, device=self.device, dtype=torch.float32)
        return noise.repeat_interleave(group, 0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1], float32, as the SD 3 pipeline decodes them
        (latents / scaling_factor + shift_factor); with gradients unless under `torch.no_grad()`."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------- model
    def _check_embeds(self, embeds: FlowEmbeds, batch: int) -> None:
        config = self.transformer.config
        want = (f"FlowEmbeds(prompt [{batch}, L, {config.joint_attention_dim}], "
                f"pooled [{batch}, {config.pooled_projection_dim}]) from encode_prompts")
        if not isinstance(embeds, FlowEmbeds):
            raise ValueError(f"embeds = {type(embeds).__name__} is invalid: must be {want}")
        prompt, pooled = embeds.prompt, embeds.pooled
        if (prompt.ndim != 3 or pooled.ndim != 2 or len(prompt) != batch or len(pooled) != batch
                or prompt.shape[-1] != config.joint_attention_dim or pooled.shape[-1] != config.pooled_projection_dim):
            raise ValueError(f"embeds of shapes prompt {tuple(prompt.shape)}, pooled {tuple(pooled.shape)} are "
                             f"invalid for {batch} latents: must be {want}")

    def velocity(self, latents: torch.Tensor, step_index: int | torch.Tensor, embeds: FlowEmbeds,
                 reference: bool = False) -> torch.Tensor:
        """The guided velocity v = eps - x0 in float32, one transformer call ([uncond; cond] batched with
        guidance). `reference=True` evaluates the reference model under no_grad."""
        step_index = check_step_index(step_index, self.num_steps)
        batch = latents.shape[0]
        self._check_embeds(embeds, batch)
        t = self.timesteps[step_index].to(latents.device)
        if t.ndim and len(t) != batch:
            raise ValueError(f"{len(t)} step indices for a batch of {batch} latents")
        t = t if t.ndim else t.expand(batch)
        dtype = self._compute_dtype  # the reference's too: a copy of the transformer, or it with adapters off
        x = latents.to(dtype)
        cond = embeds.to(device=latents.device, dtype=dtype)
        cfg = self.guidance_scale > 1.0
        if cfg:
            uncond = self._uncond.to(device=latents.device, dtype=dtype)[[0] * batch]
            x, t, cond = torch.cat([x, x]), torch.cat([t, t]), FlowEmbeds.cat([uncond, cond])
        if reference:
            model = self.reference_transformer if self.reference_transformer is not None else self.transformer
            with torch.no_grad(), self._adapters_off():
                out = model(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt,
                            pooled_projections=cond.pooled, return_dict=False)[0]
        else:
            out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt,
                                   pooled_projections=cond.pooled, return_dict=False)[0]
        out = out.float()
        if cfg:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return out

    # the DDIM policy's name for the guided model output, which here is the velocity
    noise_pred = velocity

    # ---------------------------------------------------------------- SDE math
    def sde_moments(self, latents: torch.Tensor, velocity: torch.Tensor,
                    step_index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of x' given the velocity, float32 (`sde_step_mean`; std = sde_sigma sqrt(-dt))."""
        i = check_step_index(step_index, self.num_steps)
        s, dt = per_sample(self._s, i, latents), per_sample(self._dt, i, latents)
        sde_sigma, std = per_sample(self._sde_sigma, i, latents), per_sample(self._std, i, latents)
        return sde_step_mean(latents, velocity, s, dt, sde_sigma), std

    def step_stats(self, latents: torch.Tensor, step_index: int | torch.Tensor, embeds: FlowEmbeds,
                   reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B, C, H, W], std) of pi(. | x_s), float32; differentiable unless reference. `step_index`
        is one int, or a LongTensor [B] of per-sample steps (std is then [B, 1, 1, 1])."""
        return self.sde_moments(latents, self.velocity(latents, step_index, embeds, reference), step_index)

    # ---------------------------------------------------------------- parameters
    def save_lora(self, path: str | Path) -> None:
        """The LoRA weights in diffusers' format (`pytorch_lora_weights.safetensors`), which
        `StableDiffusion3Pipeline.load_lora_weights(path)` reads onto a fresh pipeline."""
        if self.lora_rank is None:
            raise ValueError("save_lora needs a LoRA policy (lora_rank >= 1); with lora_rank = None save "
                             "policy.transformer with save_pretrained")
        from peft import get_peft_model_state_dict

        StableDiffusion3Pipeline.save_lora_weights(
            str(path), transformer_lora_layers=get_peft_model_state_dict(self.transformer), safe_serialization=True)
