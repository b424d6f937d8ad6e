"""The diffusion policy of the denoising MDP: a stochastic DDIM step as a Gaussian policy.

One episode is T DDIM steps with eta > 0. In state x_t the policy draws the action x_{t-1} from
pi(x_{t-1} | x_t, t, y) = N(mu_theta(x_t, t, y), sigma_t^2 I), where mu and sigma are exactly what
`DDIMScheduler.step(..., eta=eta)` computes (prev_sample = mu + sigma * z). Because sigma_t does not
depend on theta, log-probs and the KL to the reference model have closed forms in mu alone.

The policy only acts and scores; the algorithms in `agents/` update its parameters.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from t2i_rl.lora import LORA_TARGETS, check_lora_targets

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_REDUCTIONS = ("mean", "sum")


def _reduce(x: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce every non-batch dim: "mean" (DDPO's convention) or "sum" (the joint density)."""
    dims = tuple(range(1, x.ndim))
    return x.mean(dim=dims) if reduce == "mean" else x.sum(dim=dims)


def _check_reduce(reduce: str) -> None:
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")


# ---------------------------------------------------------------------------- the sampler's I/O
# The one home of prompt encoding, initial latents, encoding and decoding images: the env, the policy
# and the agents that sample or encode by themselves (ReFL, DRaFT, RWR, TRL's pipeline) all call these.
@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states [B, L, D] as SD's pipelines form them (padded to max length), in
    the text encoder's dtype."""
    ids = prompt_ids(pipe, prompts)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = (ids != pipe.tokenizer.pad_token_id).long()
    return pipe.text_encoder(ids, attention_mask=mask)[0]


def prompt_ids(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [B, L] padded to the tokenizer's max length, on the text encoder's device."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = pipe.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipe.text_encoder.device)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in [0, 1], float32, as the pipeline decodes them; with gradients
    unless called under `torch.no_grad()` (ReFL and DRaFT backpropagate through it)."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def initial_latents(pipe, n: int, latent_shape: Sequence[int], generator: torch.Generator, group: int = 1,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """x_T ~ N(0, sigma_init^2 I) [n, *latent_shape] in float32 on `device` (default: the pipeline's),
    drawn from `generator` on its own device (a CPU generator: the same x_T on any device), one draw
    per `group` consecutive samples."""
    noise = randn_tensor((n // group, *latent_shape), generator=generator, device=device or pipe.device,
                         dtype=torch.float32)
    return noise.repeat_interleave(group, 0) * pipe.scheduler.init_noise_sigma


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w] in float32, a draw of the VAE's posterior
    scaled as the UNet sees them (the inverse of `decode_latents`, for agents that train the denoising
    loss on images)."""
    vae = pipe.vae
    dist = vae.encode(images.to(vae.device, vae.dtype) * 2 - 1).latent_dist
    return dist.sample(generator=generator).float() * vae.config.scaling_factor


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per element, reduced over non-batch dims -> [B]:
    (mean - ref_mean)^2 / (2 std^2), the closed form of two Gaussians of one variance."""
    _check_reduce(reduce)
    return _reduce((mean - ref_mean) ** 2 / (2 * std**2), reduce)


def check_sampler(pipe, num_steps: int, eta: float, guidance_scale: float) -> None:
    """The sampler settings that define the MDP's transition (the env's and the policy's contract)."""
    num_train = pipe.scheduler.config.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be an int in [1, {num_train}], got {num_steps!r}")
    if not 0.0 < eta <= 1.0:
        raise ValueError(
            f"eta must be in (0, 1], got {eta!r}: eta > 0 makes the policy stochastic (log-probs need "
            "sigma_t > 0) and eta > 1 makes DDIM's direction term sqrt(1 - alpha_prev - sigma^2) undefined"
        )
    if not guidance_scale >= 0.0:
        raise ValueError(f"guidance_scale must be >= 0 (<= 1 means no classifier-free guidance), got {guidance_scale!r}")


def check_step_index(step_index: int | torch.Tensor, num_steps: int) -> int | torch.Tensor:
    """An int step index in [0, num_steps), or a LongTensor [B] of per-sample steps (one model call over
    several steps), returned on the CPU to index per-step coefficients."""
    if isinstance(step_index, torch.Tensor) and step_index.ndim == 1:
        if step_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"per-sample step indices must be an integer tensor, got {step_index.dtype}")
        if len(step_index) and not (0 <= int(step_index.min()) and int(step_index.max()) < num_steps):
            raise IndexError(f"step indices must be in [0, {num_steps - 1}], got "
                             f"{int(step_index.min())}..{int(step_index.max())}")
        return step_index.cpu()
    if isinstance(step_index, torch.Tensor):
        step_index = int(step_index)
    if not 0 <= step_index < num_steps:
        raise IndexError(f"step_index must be in [0, {num_steps - 1}], got {step_index}")
    return step_index


def per_sample(values: torch.Tensor, i: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-step coefficients `values` at step(s) i: a scalar, or [B, 1, ..., 1] to broadcast over a
    batch of latents shaped like `like`."""
    v = values[i].to(like.device)
    return v.view(-1, *([1] * (like.ndim - 1))) if v.ndim else v


class GaussianStepPolicy:
    """What every sampler of the denoising MDP seen as a Gaussian policy shares: its step is
    N(mean_theta(x_t), std_t^2 I) with std independent of theta, so acting, re-scoring a stored
    transition and the KL to the reference follow from `step_stats` alone. A subclass gives
    `step_stats` and its trainable network (`_denoiser`) with its frozen full-fine-tuning copy
    (`_reference`, None under LoRA: the reference is the network with its adapters off)."""

    def step_stats(self, latents: torch.Tensor, step_index: int | torch.Tensor, embeds,
                   reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of pi(. | x_t) in float32, differentiable unless `reference`."""
        raise NotImplementedError

    @property
    def _denoiser(self) -> torch.nn.Module:
        """The network that trains (its LoRA adapters, or all of it)."""
        raise NotImplementedError

    @property
    def _reference(self) -> torch.nn.Module | None:
        """The frozen copy of the network under full fine-tuning; None under LoRA."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _adapters_off(self) -> Iterator[None]:
        """Turn the LoRA adapters off (the base model is the reference), and back on afterwards."""
        if self._reference is not None:
            yield
            return
        # PEFT's toggle rewrites requires_grad of the adapter weights: remember and restore it.
        flags = [(p, p.requires_grad) for p in self._denoiser.parameters()]
        self._denoiser.disable_adapters()
        try:
            yield
        finally:
            self._denoiser.enable_adapters()
            for p, flag in flags:
                p.requires_grad_(flag)

    @staticmethod
    def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean",
                          pool: int = 1) -> torch.Tensor:
        """log N(x; mean, std^2 I) per element, reduced over non-batch dims -> [B].

        With `pool` = k > 1 it is the log-density of the action's k x k average pools, N(pool(mean),
        (std / k)^2 I): the coarse part of x, a marginal of the same Gaussian, whose score moves the
        mean only through its block averages. Its "mean" divides by the whole action's element count,
        so that its gradient in the mean is the whole log-prob's averaged over each block (the same
        scale: PPO's ratios and clip range mean what they mean without pooling)."""
        _check_reduce(reduce)
        std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
        elements = x[0].numel()
        if pool != 1:
            if not (isinstance(pool, int) and pool >= 1) or x.ndim != 4 or x.shape[-1] % pool or x.shape[-2] % pool:
                raise ValueError(f"pool = {pool} must be an int >= 1 dividing the latents' height and width, got "
                                 f"shape {tuple(x.shape)}")
            x, mean, std = F.avg_pool2d(x.float(), pool), F.avg_pool2d(mean, pool), std / pool
        logp = -((x.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
        if pool != 1 and reduce == "mean":
            return _reduce(logp, "sum") / elements
        return _reduce(logp, reduce)

    # ---------------------------------------------------------------- acting and scoring
    def sample_step(
        self,
        latents: torch.Tensor,
        step_index: int | torch.Tensor,
        embeds,
        generator: torch.Generator | None = None,
        reduce: str = "mean",
        grad: bool = False,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Act: x_{t-1} = mean + std * z, z ~ N(0, I) from `generator`; returns (x_{t-1}, log_prob [B]).

        The noise is drawn as diffusers' schedulers draw it in `step` (randn_tensor, float32), so
        the same generator state gives the scheduler's own sample; `noise` gives z instead (a caller that
        designs its samples' noise, e.g. antithetic pairs). No gradients unless `grad=True`.
        """
        _check_reduce(reduce)
        if noise is not None and tuple(noise.shape) != tuple(latents.shape):
            raise ValueError(f"noise must have the latents' shape {tuple(latents.shape)}, got {tuple(noise.shape)}")
        with torch.set_grad_enabled(grad):
            mean, std = self.step_stats(latents, step_index, embeds)
            if noise is None:
                z = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            else:
                z = noise.to(device=mean.device, dtype=torch.float32)
            next_latents = (mean + std * z).to(latents.dtype)
            # log-prob of the stored action (after any cast), so re-evaluation gives the same number
            logp = self.gaussian_log_prob(next_latents, mean, std, reduce)
        return next_latents, logp

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        step_index: int | torch.Tensor,
        embeds,
        reduce: str = "mean",
        pool: int = 1,
    ) -> torch.Tensor:
        """log pi(x_{t-1} | x_t) of a stored transition [B], with gradients (what PPO re-evaluates);
        `pool` > 1: of its average pools (`gaussian_log_prob`)."""
        _check_reduce(reduce)
        mean, std = self.step_stats(latents, step_index, embeds)
        return self.gaussian_log_prob(next_latents, mean, std, reduce, pool)

    def kl_to_reference(
        self, latents: torch.Tensor, step_index: int | torch.Tensor, embeds, reduce: str = "mean"
    ) -> torch.Tensor:
        """KL(pi_theta || pi_ref) at x_t [B]: (mu_theta - mu_ref)^2 / (2 sigma_t^2), same sigma on both sides."""
        _check_reduce(reduce)
        mean, ref_mean, std = self._with_reference(latents, step_index, embeds)
        return gaussian_kl(mean, ref_mean, std, reduce)

    def log_prob_and_kl(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        step_index: int | torch.Tensor,
        embeds,
        reduce: str = "mean",
        pool: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`log_prob` (of the average pools with `pool` > 1) and `kl_to_reference` (of the whole
        step) from one policy forward (DPOK needs both per step)."""
        _check_reduce(reduce)
        mean, ref_mean, std = self._with_reference(latents, step_index, embeds)
        return (self.gaussian_log_prob(next_latents, mean, std, reduce, pool),
                gaussian_kl(mean, ref_mean, std, reduce))

    def _with_reference(self, latents: torch.Tensor, step_index: int | torch.Tensor,
                        embeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu_theta, mu_ref, sigma) at x_t: the policy's step and the reference model's."""
        mean, std = self.step_stats(latents, step_index, embeds)
        ref_mean, _ = self.step_stats(latents, step_index, embeds, reference=True)
        return mean, ref_mean, std

    # ---------------------------------------------------------------- parameters
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimizer should update (LoRA weights, or the whole network)."""
        return [p for p in self._denoiser.parameters() if p.requires_grad]


class DiffusionPolicy(GaussianStepPolicy):
    """A stochastic DDIM sampler seen as a Gaussian policy, with log-probs and KL to a reference.

    With `lora_rank` an int, a PEFT LoRA adapter is added to `pipe.unet` (the pipeline is modified
    in place) and only its weights train; the reference model is the same UNet with adapters off,
    so it costs no memory. With `lora_rank=None` the whole UNet trains and the reference is a frozen
    deep copy of it, taken before any update. The VAE and text encoder are always frozen.

    Precision: the frozen weights stay in the pipeline's dtype (bf16/fp16 mixed precision); what
    trains is float32 (the LoRA weights; under full fine-tuning the UNet, upcast with its reference
    copy). Means, log-probs and KLs are computed in float32 from the UNet's output.
    """

    def __init__(
        self,
        pipe,
        num_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        lora_rank: int | None = 4,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = LORA_TARGETS,
    ) -> None:
        if not isinstance(pipe.scheduler, DDIMScheduler):
            raise TypeError(
                f"pipe.scheduler must be a diffusers DDIMScheduler (the policy's log-probs are DDIM's), "
                f"got {type(pipe.scheduler).__name__}; use DDIMScheduler.from_config(pipe.scheduler.config)"
            )
        check_sampler(pipe, num_steps, eta, guidance_scale)
        if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
            raise ValueError(f"lora_rank must be an int >= 1, or None for full fine-tuning, got {lora_rank!r}")
        if lora_alpha is not None and not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 (or None for lora_alpha = lora_rank), got {lora_alpha!r}")
        config = pipe.scheduler.config
        if config.thresholding or config.clip_sample:
            raise NotImplementedError(
                "DDIM with clip_sample or thresholding is not a Gaussian in the model output's mean; "
                "load the scheduler with clip_sample=False, thresholding=False"
            )
        if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {config.prediction_type!r}"
            )

        self.pipe = pipe
        self.unet = pipe.unet
        self.num_steps = num_steps
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.lora_rank = lora_rank
        self.prediction_type: str = config.prediction_type

        # Our own scheduler: a later `pipe(..., num_inference_steps=...)` must not move our timesteps.
        self.scheduler = DDIMScheduler.from_config(config)
        self.scheduler.set_timesteps(num_steps)
        self.timesteps: torch.Tensor = self.scheduler.timesteps.clone()
        self._coefficients()

        # Freeze what never trains, then make the trainable part (LoRA or the whole UNet).
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.reference_unet = None
        if lora_rank is None:
            # float32 weights (AdamW on bf16/fp16 weights loses small updates); the reference is a
            # float32 copy too, so that KL to it is exactly 0 before the first update
            self.unet.to(torch.float32).requires_grad_(True)
            self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        else:
            from peft import LoraConfig

            if getattr(self.unet, "_hf_peft_config_loaded", False):
                raise ValueError(
                    "pipe.unet already carries a PEFT adapter; build the policy on a fresh pipeline "
                    "(its reference model is the UNet with adapters disabled)"
                )
            check_lora_targets({n: type(m).__name__ for n, m in self.unet.named_modules()}, lora_target_modules)
            self.unet.requires_grad_(False)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                    init_lora_weights=True,  # B = 0: the fresh policy is exactly the reference model
                    target_modules=list(lora_target_modules),
                )
            )
            # PEFT makes the adapter in the base layers' dtype; it trains in float32 (as do its AdamW
            # state and gradients) and PEFT casts its input up and its output back around it
            for p in self.trainable_parameters():
                p.data = p.data.float()

        # the frozen weights' dtype, fixed from here on: diffusers' `unet.dtype` walks the parameters on
        # every call, which cost 10% of a ShapesWorld epoch when asked three times per UNet call
        self._compute_dtype: torch.dtype = self.unet.dtype
        self._uncond: torch.Tensor = self.encode_prompts([""])  # [1, L, D], cached once

    # ---------------------------------------------------------------- schedule
    def _coefficients(self) -> None:
        """Per-step alpha_t, alpha_prev and sigma_t, in float32 exactly as DDIMScheduler.step forms them."""
        s = self.scheduler
        step = s.config.num_train_timesteps // self.num_steps
        alpha_t, alpha_prev, std = [], [], []
        for i, t in enumerate(self.timesteps.tolist()):
            # 1. previous timestep (t - 1000 // T); before t = 0 DDIM uses final_alpha_cumprod
            prev = t - step
            a_t = s.alphas_cumprod[t]
            a_prev = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
            # 2. sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)), DDIM eq. (16)
            variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
            sigma = self.eta * variance**0.5
            if not sigma > 0:
                raise ValueError(
                    f"sigma_t is {float(sigma)} at step {i} (timestep {t}): the policy needs sigma_t > 0 at "
                    "every step (with set_alpha_to_one=True the last DDIM step is deterministic; use "
                    "set_alpha_to_one=False or fewer steps)"
                )
            alpha_t.append(a_t)
            alpha_prev.append(a_prev)
            std.append(sigma)
        self._alpha_t = torch.stack(alpha_t).float()
        self._alpha_prev = torch.stack([torch.as_tensor(a) for a in alpha_prev]).float()
        self._std = torch.stack(std).float()

    def _check_step(self, step_index: int | torch.Tensor) -> int | torch.Tensor:
        """`check_step_index` against this policy's number of steps."""
        return check_step_index(step_index, self.num_steps)

    def _per_sample(self, values: torch.Tensor, i: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`per_sample`: step i's coefficients, shaped to broadcast over `like`."""
        return per_sample(values, i, like)

    def sigma(self, step_index: int, device: torch.device | str | None = None) -> torch.Tensor:
        """sigma_t of step `step_index`: a float32 scalar tensor (independent of theta)."""
        return self._std[self._check_step(step_index)].to(device or self.device)

    @property
    def _denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def _reference(self) -> torch.nn.Module | None:
        return self.reference_unet

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def computes_in_float16(self) -> bool:
        """Whether the UNet runs in float16 (LoRA over float16 weights; full fine-tuning is float32),
        so that its backward pass needs loss scaling."""
        return any(p.dtype == torch.float16 for p in self.unet.parameters())

    # ---------------------------------------------------------------- text
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] as SD's pipelines form them (padded to max length)."""
        return encode_prompts(self.pipe, prompts)

    def initial_latents(self, n: int, latent_shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """x_T ~ N(0, sigma_init^2 I) [n, *latent_shape] in float32 (`initial_latents`)."""
        return initial_latents(self.pipe, n, latent_shape, generator, device=self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1], with gradients (`decode_latents`)."""
        return decode_latents(self.pipe, latents)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoising loss's regression target for x_t = add_noise(x0, noise, t), by the model's
        prediction type: the noise, the velocity, or x0 itself."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0  # "sample"

    def denoising_terms(self, x0: torch.Tensor, embeds: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoising loss's (prediction, target) on clean latents x0 [B, C, h, w]: noise and
        t ~ U{0, ..., num_train_timesteps - 1} drawn from `generator` (in that order), the trainable
        UNet's conditional output (no guidance) at add_noise(x0, noise, t), in float32, and
        `training_target`: what agents that regress on images (RWR, ReFL's pre-training term) fit."""
        x0 = x0.float()
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        t = t.to(x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = self.unet(noisy.to(self.unet.dtype), t, encoder_hidden_states=embeds.to(x0.device, self.unet.dtype),
                         return_dict=False)[0]
        return pred.float(), self.training_target(x0, noise, t)

    @property
    def uncond_embeds(self) -> torch.Tensor:
        """The empty prompt's embedding [1, L, D] (the unconditional half of guidance)."""
        return self._uncond

    # ---------------------------------------------------------------- model
    def noise_pred(
        self, latents: torch.Tensor, step_index: int | torch.Tensor, embeds: torch.Tensor, reference: bool = False
    ) -> torch.Tensor:
        """The guided model output in float32 (eps; v for v-prediction models), one UNet call.

        Guidance runs the [uncond; cond] batch through a single UNet forward. `reference=True`
        evaluates the frozen reference model under no_grad.
        """
        step_index = self._check_step(step_index)
        if embeds.shape[0] != latents.shape[0]:
            raise ValueError(f"embeds batch {embeds.shape[0]} != latents batch {latents.shape[0]}")
        unet = self.unet if (not reference or self.reference_unet is None) else self.reference_unet
        t = self.timesteps[step_index].to(latents.device)
        if t.ndim and len(t) != latents.shape[0]:
            raise ValueError(f"{len(t)} step indices for a batch of {latents.shape[0]} latents")
        cfg = self.guidance_scale > 1.0
        dtype = self._compute_dtype  # the reference's too: a copy of the UNet, or the UNet with adapters off
        x = latents.to(dtype)
        cond = embeds.to(device=latents.device, dtype=dtype)
        if cfg:
            uncond = self._uncond.to(device=latents.device, dtype=dtype).expand(cond.shape[0], -1, -1)
            x = torch.cat([x, x])
            cond = torch.cat([uncond, cond])
            t = torch.cat([t, t]) if t.ndim else t

        if reference:
            with torch.no_grad(), self._adapters_off():
                out = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        else:
            out = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        out = out.float()
        if cfg:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return out

    # ---------------------------------------------------------------- DDIM math
    def ddim_moments(
        self, latents: torch.Tensor, model_output: torch.Tensor, step_index: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, pred_x0) of x_{t-1} given the model output, in float32, as DDIMScheduler.step."""
        i = self._check_step(step_index)
        x = latents.float()
        out = model_output.float()
        alpha_t = self._per_sample(self._alpha_t, i, x)
        alpha_prev = self._per_sample(self._alpha_prev, i, x)
        std = self._per_sample(self._std, i, x)
        beta_t = 1 - alpha_t
        # 3. predicted x_0 and eps from the model output (DDIM eq. (12))
        if self.prediction_type == "epsilon":
            pred_x0 = (x - beta_t**0.5 * out) / alpha_t**0.5
            pred_eps = out
        elif self.prediction_type == "v_prediction":
            pred_x0 = alpha_t**0.5 * x - beta_t**0.5 * out
            pred_eps = alpha_t**0.5 * out + beta_t**0.5 * x
        else:  # "sample"
            pred_x0 = out
            pred_eps = (x - alpha_t**0.5 * pred_x0) / beta_t**0.5
        # 4. no clipping or thresholding (refused in __init__)
        # 5. sigma_t(eta) precomputed; 6. "direction pointing to x_t"
        direction = (1 - alpha_prev - std**2).clamp(min=0) ** 0.5 * pred_eps
        # 7. mean of x_{t-1}: the noise-free part of DDIM's step
        mean = alpha_prev**0.5 * pred_x0 + direction
        return mean, std, pred_x0

    def step_stats(
        self, latents: torch.Tensor, step_index: int | torch.Tensor, embeds: torch.Tensor, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B, C, H, W], std) of pi(. | x_t), float32; differentiable unless reference.

        `step_index` is one int for the batch, or a LongTensor [B] of per-sample steps (std is then
        [B, 1, 1, 1]): the UNet takes per-sample timesteps, so transitions of several steps can be
        re-evaluated in one call."""
        mean, std, _ = self.ddim_moments(latents, self.noise_pred(latents, step_index, embeds, reference), step_index)
        return mean, std

