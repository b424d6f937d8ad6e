"""Denoising as a Markov decision process: one episode is one image.

The env holds the sampler's state (latents, step, prompt) and the reward; the policy that proposes
the next latents lives with the agent (`t2i_rl.policy.DiffusionPolicy`, built by `env.policy()`
so that its steps, guidance and eta match the env's). Both are natively batched: the vector env
steps a batch of prompts in lockstep, so the policy makes one UNet call per step for the whole
batch, and every tensor stays on the pipeline's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from t2i_rl.policy import DiffusionPolicy, check_sampler, decode_latents, encode_prompts, initial_latents

PromptSource = Callable[[int, np.random.Generator], list[str]]


# Named ShapesWorld prompt sets: (split, probability of a two-object prompt). "composition" holds
# only two-object prompts (attribute binding), where the base model is weakest.
SHAPES_PROMPT_SETS = {
    "shapes-train": ("train", 0.3), "shapes-heldout": ("heldout", 0.3),
    "composition-train": ("train", 1.0), "composition-heldout": ("heldout", 1.0),
}


# The held-out family of each shipped fixed training set: prompts of the same kinds from the
# held-out split, which no training sees (a fixed set is for learning that shows on its own prompts;
# this family measures whether it generalizes).
FIXED_SET_HELDOUT = {"shapes-16": "composition-heldout", "shapes-agree-16": "composition-heldout"}


def heldout_counterpart(source) -> str | None:
    """The held-out set of a named training set ("composition-train" -> "composition-heldout",
    "shapes-16" -> its family in FIXED_SET_HELDOUT)."""
    if not isinstance(source, str):
        return None
    if source in FIXED_SET_HELDOUT:
        return FIXED_SET_HELDOUT[source]
    if source.endswith("-train"):
        name = source[: -len("-train")] + "-heldout"
        return name if name in SHAPES_PROMPT_SETS else None
    return None


def fixed_prompts(source) -> list[str] | None:
    """The prompts of a fixed set (a shipped set, `file:PATH` or a list), or None for a source that
    draws from a grammar or a callable."""
    if callable(source) or (isinstance(source, str) and source in SHAPES_PROMPT_SETS):
        return None
    if isinstance(source, str):
        from t2i_rl.prompts import load_prompt_set

        return load_prompt_set(source, also_allowed=list(SHAPES_PROMPT_SETS))
    return list(source)


def training_eval_prompts(prompt_source: PromptSource, source, n: int, seed: int) -> list[str]:
    """`n` evaluation prompts of the training distribution: a fixed set's prompts in turn (each
    equally often when `n` is a multiple of its size), else `n` draws of the source with `seed`."""
    fixed = fixed_prompts(source)
    if fixed is None:
        return prompt_source(n, np.random.default_rng(seed))
    return [fixed[i % len(fixed)] for i in range(n)]


def make_prompt_source(source: str | Sequence[str] | PromptSource) -> PromptSource:
    """A named ShapesWorld set (SHAPES_PROMPT_SETS), `file:PATH` (.txt, one prompt per line, or a
    .json list), a prompt set shipped in t2i_rl/assets/prompts ("animals", "activities"), a list of
    prompts, or a callable."""
    if callable(source):
        return source
    if isinstance(source, str) and source not in SHAPES_PROMPT_SETS:
        from t2i_rl.prompts import load_prompt_set

        source = load_prompt_set(source, also_allowed=list(SHAPES_PROMPT_SETS))  # a list from here on
    if isinstance(source, str):
        from t2i_rl.world import ShapesWorld

        split, two_object_prob = SHAPES_PROMPT_SETS[source]
        world = ShapesWorld(two_object_prob=two_object_prob)
        return lambda n, rng: world.sample_prompts(n, seed=int(rng.integers(2**31)), split=split)
    prompts = list(source)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("a prompt list must be a non-empty list of strings")
    return lambda n, rng: [prompts[i] for i in rng.integers(len(prompts), size=n)]


class DenoiseVectorEnv(VectorEnv):
    """## Description
    A batch of `num_envs` images denoised in lockstep by a DDIM sampler with eta > 0. The state
    is the noisy latents x_t, the step index and the prompt's text-encoder embedding; the action
    is the next latents x_{t-1}; the transition is deterministic (the next state is the action).
    After the last step the latents are decoded and scored by the reward function.

    ## Action Space
    `Box(-inf, inf, (num_envs, C, h, w), float32)`: the next latents, as a torch tensor on the
    pipeline's device (a numpy array is accepted and moved there).

    ## Observation Space
    `Dict(latents: Box(num_envs, C, h, w), step: MultiDiscrete(num_steps + 1),
    prompt_embeds: Box(num_envs, L, D))`, as torch tensors on the device.

    ## Rewards
    0 until the last step, then `reward(images, prompts).scores` (a torch tensor [num_envs]).
    `info` carries the prompts, every reward component (`reward/<name>`), the TextNorm
    confidence when the reward has one, and the gold judge's verdict (`gold/*`), which is never
    part of the reward.

    ## Episode End
    All sub-envs terminate together after `num_steps` steps; there is no truncation and no
    autoreset: call `reset()` for the next batch.

    ## Reset Options
    `prompts`: a list of `num_envs` prompts (else drawn from the prompt source). `noise_group`: k
    consecutive sub-envs start from the same x_T (default 1: every one its own), so that the
    samples of a group differ only by the actions taken.

    ## Arguments
    pipeline: a loaded `StableDiffusionPipeline` or a name/path for `load_pipeline` ("shapes").
    reward: a reward spec for `make_reward` ("clip", {"name": "textnorm", ...}) or a callable.
    prompts: a name or file for `make_prompt_source`, a list of prompts or a callable (n, rng) -> list.
    num_steps, guidance_scale, eta: the sampler the policy follows (eta > 0: log-probs need it).
    resolution: image height = width in pixels; None: the UNet's native size (sample_size x the
    VAE's factor). Latents and prompt embeddings are float32 whatever the pipeline's dtype.
    gold: spec of the diagnostic judge ("gold" for ShapesWorld; None for none).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        num_envs: int = 8,
        pipeline: Any = "shapes",
        reward: Any = "clip",
        prompts: str | Sequence[str] | PromptSource = "shapes-train",
        num_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        resolution: int | None = None,
        gold: Any = "gold",
        device: str | torch.device | None = None,
        render_mode: str | None = None,
    ) -> None:
        from t2i_rl.models import load_pipeline
        from t2i_rl.rewards import make_reward

        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.pipe = load_pipeline(pipeline, device=device or "cpu") if isinstance(pipeline, str) else pipeline
        check_sampler(self.pipe, num_steps, eta, guidance_scale)
        self.device = self.pipe.device if device is None else torch.device(device)
        self.reward_fn = reward if callable(reward) else make_reward(reward)
        self.gold_fn = None if gold is None else (gold if callable(gold) else make_reward(gold))
        self.prompt_source = make_prompt_source(prompts)
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.render_mode = render_mode

        unet, text_encoder = self.pipe.unet, self.pipe.text_encoder
        factor = self.pipe.vae_scale_factor
        # the UNet halves the latents once per down block but the last, so they must divide evenly
        multiple = factor * 2 ** (len(unet.config.down_block_types) - 1)
        self.image_size = unet.config.sample_size * factor if resolution is None else resolution
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1 \
                or self.image_size % multiple:
            raise ValueError(f"resolution must be a positive multiple of {multiple} for this pipeline (VAE factor "
                             f"{factor}, {len(unet.config.down_block_types)} UNet down blocks), got {resolution!r}")
        side = self.image_size // factor
        self.latent_shape = (unet.config.in_channels, side, side)
        embed_shape = (self.pipe.tokenizer.model_max_length, text_encoder.config.hidden_size)
        big = np.float32(np.inf)
        self.single_observation_space = spaces.Dict({
            "latents": spaces.Box(-big, big, self.latent_shape, np.float32),
            "step": spaces.Discrete(num_steps + 1),
            "prompt_embeds": spaces.Box(-big, big, embed_shape, np.float32),
        })
        self.single_action_space = spaces.Box(-big, big, self.latent_shape, np.float32)
        self.observation_space = spaces.Dict({
            "latents": spaces.Box(-big, big, (num_envs, *self.latent_shape), np.float32),
            "step": spaces.MultiDiscrete(np.full(num_envs, num_steps + 1)),
            "prompt_embeds": spaces.Box(-big, big, (num_envs, *embed_shape), np.float32),
        })
        self.action_space = spaces.Box(-big, big, (num_envs, *self.latent_shape), np.float32)

        self.prompts: list[str] = []
        self.latents: torch.Tensor | None = None
        self.prompt_embeds: torch.Tensor | None = None
        self.step_index = 0
        self.images: torch.Tensor | None = None
        self._generator = torch.Generator(device="cpu")

    # -- the policy that matches this MDP ---------------------------------------------------
    def policy(self, **kwargs) -> DiffusionPolicy:
        """A `DiffusionPolicy` on this env's pipeline with its steps, guidance and eta.

        Why the env builds it: those four settings define the MDP's transition, and a policy whose
        log-probs are taken under other ones would be silently wrong. This is a factory only: the env
        never holds or calls the policy it returns (`step` takes any action)."""
        return DiffusionPolicy(self.pipe, num_steps=self.num_steps,
                               guidance_scale=self.guidance_scale, eta=self.eta, **kwargs)

    # -- Gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        options = options or {}
        prompts = options.get("prompts")
        if prompts is None:
            prompts = self.sample_prompts(self.num_envs)
        if isinstance(prompts, str) or len(prompts) != self.num_envs:
            raise ValueError(f"options['prompts'] must be a list of {self.num_envs} prompts, got {prompts!r}")
        group = options.get("noise_group", 1)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or self.num_envs % group:
            raise ValueError(f"options['noise_group'] must be a positive int dividing num_envs "
                             f"({self.num_envs}), got {group!r}")
        self.prompts = list(prompts)
        self._generator.manual_seed(int(self.np_random.integers(2**63 - 1)))
        # 1. draw x_T from the env's own generator (on the CPU: the same on any device), one per
        #    `noise_group` consecutive sub-envs
        self.latents = initial_latents(self.pipe, self.num_envs, self.latent_shape, self._generator, group,
                                       device=self.device)
        # 2. encode the prompts once per episode
        self.prompt_embeds = encode_prompts(self.pipe, self.prompts).float()
        self.step_index = 0
        self.images = None
        return self._observation(), {"prompt": list(self.prompts)}

    def step(self, actions):
        if self.latents is None:
            raise RuntimeError("call reset() before step()")
        if self.step_index >= self.num_steps:
            raise RuntimeError(f"the episode ended after {self.num_steps} steps; call reset()")
        # 1. the action is the next state
        self.latents = self._check_action(actions)
        self.step_index += 1
        done = self.step_index == self.num_steps
        rewards = torch.zeros(self.num_envs, device=self.device)
        info: dict[str, Any] = {"prompt": list(self.prompts)}
        # 2. at the last step: decode, score, judge
        if done:
            self.images = self.decode(self.latents)
            out = self.reward_fn(self.images, self.prompts)
            rewards = out.scores.detach().to(self.device, torch.float32)
            info.update({f"reward/{k}": v.detach() for k, v in out.components.items()})
            if self.gold_fn is not None:
                gold = self.gold_fn(self.images, self.prompts)
                info.update({k: v.detach() for k, v in gold.components.items()})
        terminated = torch.full((self.num_envs,), done, dtype=torch.bool, device=self.device)
        truncated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self._observation(), rewards, terminated, truncated, info

    def render(self):
        """The decoded images as uint8 [num_envs, H, W, 3] (decoding the current latents)."""
        images = self.images if self.images is not None else self.decode(self.latents)
        return (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)

    def sample_prompts(self, n: int) -> list[str]:
        """`n` prompts from the env's prompt source and random state, as a reset draws them (an agent
        that designs its episodes, e.g. groups of one prompt, draws their prompts here)."""
        return self.prompt_source(n, self.np_random)

    def get_rng_state(self) -> dict[str, Any]:
        """The env's random state (prompt draws and x_T), for checkpoints that resume exactly."""
        return {"np": self.np_random.bit_generator.state, "torch": self._generator.get_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.np_random.bit_generator.state = state["np"]
        self._generator.set_state(state["torch"])

    # -- helpers ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [0, 1], as the pipeline decodes them."""
        return decode_latents(self.pipe, latents)

    def _observation(self) -> dict[str, torch.Tensor]:
        step = torch.full((self.num_envs,), self.step_index, dtype=torch.long, device=self.device)
        return {"latents": self.latents, "step": step, "prompt_embeds": self.prompt_embeds}

    def _check_action(self, actions) -> torch.Tensor:
        want = (self.num_envs, *self.latent_shape)
        if isinstance(actions, np.ndarray):
            if actions.dtype not in (np.float32, np.float64, np.float16):
                raise ValueError(f"actions must be floating point latents of shape {want}, got dtype {actions.dtype}")
            actions = torch.from_numpy(actions)
        if not isinstance(actions, torch.Tensor):
            raise ValueError(f"actions must be a torch.Tensor or numpy array of shape {want}, "
                             f"got {type(actions).__name__}")
        if tuple(actions.shape) != want:
            raise ValueError(f"actions must have shape {want} (num_envs, C, h, w), got {tuple(actions.shape)}")
        if not actions.is_floating_point():
            raise ValueError(f"actions must be floating point latents, got dtype {actions.dtype}")
        if not torch.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf; the latents must be finite")
        return actions.to(self.device, torch.float32)


class DenoiseEnv(gym.Env):
    """## Description
    One image denoised by a DDIM sampler (eta > 0): the single-env view of `DenoiseVectorEnv`
    (`num_envs=1`), with the same state, action, reward and arguments. Observations and actions
    are torch tensors on the device; `NumpyDenoise` (what `gymnasium.make("t2i_rl/Denoise-v0")`
    returns) converts them to numpy for `check_env`, Stable-Baselines3 and other numpy code.

    ## Action Space
    `Box(-inf, inf, (C, h, w), float32)`: the next latents x_{t-1}.

    ## Observation Space
    `Dict(latents: Box(C, h, w), step: Discrete(num_steps + 1), prompt_embeds: Box(L, D))`.

    ## Rewards
    0.0 until the last step, then the reward function's score of the decoded image (a float).
    `info` carries the prompt, every reward component, the TextNorm confidence (when the reward
    has one) and the gold verdict.

    ## Episode End
    Terminated after `num_steps` steps; never truncated.

    ## Arguments
    The same as `DenoiseVectorEnv` but `num_envs`. `reset(options={"prompt": str})` or
    `{"prompts": [str]}` fixes the prompt.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs) -> None:
        self.vec = DenoiseVectorEnv(num_envs=1, render_mode=render_mode, **kwargs)
        self.render_mode = render_mode
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space

    def policy(self, **kwargs):
        return self.vec.policy(**kwargs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if "prompt" in options:
            options["prompts"] = [options.pop("prompt")]
        # the vector env draws from this env's seeded generator
        self.vec._np_random = self.np_random
        obs, _ = self.vec.reset(options=options)
        return self._single(obs), {"prompt": self.vec.prompts[0]}

    def step(self, action):
        batched = action[None] if isinstance(action, (torch.Tensor, np.ndarray)) else action
        obs, rewards, terminated, truncated, info = self.vec.step(batched)
        info = {k: (v[0] if isinstance(v, list) else v[0].item()) for k, v in info.items()}
        return self._single(obs), float(rewards[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self):
        return self.vec.render()[0]

    @property
    def image(self) -> torch.Tensor | None:
        """The episode's decoded image [3, H, W] in [0, 1] once it has ended (None before)."""
        return None if self.vec.images is None else self.vec.images[0]

    def get_rng_state(self) -> dict[str, Any]:
        """The env's random state (prompt draws and x_T: this env's generator, the vector env's x_T)."""
        return {"np": self.np_random.bit_generator.state, "torch": self.vec.get_rng_state()["torch"]}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.np_random.bit_generator.state = state["np"]
        self.vec.set_rng_state(state)

    @staticmethod
    def _single(obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"latents": obs["latents"][0], "step": obs["step"][0], "prompt_embeds": obs["prompt_embeds"][0]}


class NumpyDenoise(gym.Env):
    """The numpy view of `DenoiseEnv` (same MDP, same arguments): numpy observations, numpy or
    torch actions. This is what `gymnasium.make("t2i_rl/Denoise-v0")` returns, for `check_env`,
    Stable-Baselines3 and other numpy code; agents that stay on the device use `DenoiseEnv`."""

    metadata = DenoiseEnv.metadata

    def __init__(self, env: DenoiseEnv | None = None, **kwargs) -> None:
        self.torch_env = env if env is not None else DenoiseEnv(**kwargs)
        self.observation_space = self.torch_env.observation_space
        self.action_space = self.torch_env.action_space
        self.render_mode = self.torch_env.render_mode

    def policy(self, **kwargs):
        return self.torch_env.policy(**kwargs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self.torch_env.reset(seed=seed, options=options)
        return self._numpy(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.torch_env.step(action)
        return self._numpy(obs), reward, terminated, truncated, info

    def render(self):
        return self.torch_env.render()

    @staticmethod
    def _numpy(obs: dict[str, torch.Tensor]) -> dict[str, Any]:
        # copies: users keep what they are given, and the embeddings live on for the episode
        return {
            "latents": obs["latents"].detach().float().cpu().numpy().copy(),
            "step": int(obs["step"]),
            "prompt_embeds": obs["prompt_embeds"].detach().float().cpu().numpy().copy(),
        }


def make_numpy_env(**kwargs) -> NumpyDenoise:
    """Entry point of `t2i_rl/Denoise-v0`: the numpy view, which passes `check_env`."""
    return NumpyDenoise(**kwargs)
