"""Stable-Baselines3's PPO on the denoising MDP, through the Gymnasium API: the proof that
algorithms written elsewhere run on our environments unchanged.

`DiffusionActorCriticPolicy` is an SB3 `ActorCriticPolicy` around our `DiffusionPolicy`:

- actor: at the observation (x_t, t, y) the action distribution is N(mu_theta(x_t, t, y), sigma_t^2 I)
  over the flattened latents, with mu_theta the policy's DDIM mean (classifier-free guidance with
  its cached unconditional embedding) and sigma_t the sampler's fixed std (`FixedStdDiagGaussian`:
  SB3's diagonal Gaussian without the learned log_std). Its log-prob sums over the action dims,
  as SB3 does, so it equals `DiffusionPolicy.log_prob(..., reduce="sum")`.
- critic: a small value head on pooled latents, a step embedding and pooled prompt embeddings.
- parameters: the policy's trainable parameters (LoRA, or the whole UNet) plus the value head are
  registered in the module, so SB3's optimizer updates exactly those.

    env = gymnasium.make("t2i_rl/Denoise-v0", pipeline=pipe, reward=reward, num_steps=T)
    policy = env.unwrapped.policy(lora_rank=4)
    PPO(DiffusionActorCriticPolicy, FiniteActionBounds(env), n_steps=k * T,
        policy_kwargs={"diffusion_policy": policy}, device=policy.device).learn(...)

(`FiniteActionBounds`: SB3 asserts finite Box bounds; our action Box is unbounded.)

`SB3PPOAgent` lets the Trainer run it, one iteration of `PPO.learn` per epoch split in its two
halves: `collect()` is PPO's `collect_rollouts` of `samples_per_epoch` episodes through the gym API
(on a numpy env built on the Trainer env's pipeline, reward and sampler settings), handed to the
Trainer's diagnostics as a Rollout; `update()` is PPO's `train()` on that rollout buffer. So the
diagnostics see exactly the samples PPO trains on, and an epoch samples once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch.distributions import Normal

from .base import Agent, AgentConfig, Rollout

_OBS_KEYS = ("latents", "step", "prompt_embeds")


# ------------------------------------------------------------------------------------ helpers
def _check_observation_space(observation_space: spaces.Space) -> tuple[tuple[int, ...], int, tuple[int, int]]:
    """(latent shape, num_steps, embed shape) of the denoising MDP's Dict observation space."""
    if not isinstance(observation_space, spaces.Dict) or set(observation_space.spaces) != set(_OBS_KEYS):
        raise ValueError(f"the observation space must be Dict({', '.join(_OBS_KEYS)}) of the denoising MDP "
                         f"(t2i_rl/Denoise-v0), got {observation_space}")
    step_space = observation_space["step"]
    if not isinstance(step_space, spaces.Discrete) or step_space.n < 2:
        raise ValueError(f"observation 'step' must be Discrete(num_steps + 1), got {step_space}")
    embeds = observation_space["prompt_embeds"].shape
    if len(embeds) != 2:
        raise ValueError(f"observation 'prompt_embeds' must have shape (L, D), got {embeds}")
    return tuple(observation_space["latents"].shape), int(step_space.n) - 1, (int(embeds[0]), int(embeds[1]))


def step_indices(step: torch.Tensor, batch: int, num_steps: int) -> torch.Tensor:
    """The integer step index [batch] of an observation's "step", in any form SB3 hands it over:
    raw from the env ([B], int), from the rollout buffer ([B, 1], float) or one-hot encoded by
    `preprocess_obs` ([B, T + 1] or [B, 1, T + 1], float)."""
    s = torch.as_tensor(step).reshape(batch, -1)
    if s.shape[1] == 1:
        return s[:, 0].round().long()
    if s.shape[1] == num_steps + 1:  # one-hot (num_steps + 1 >= 2, so never confused with [B, 1])
        return s.argmax(dim=1)
    raise ValueError(f"observation 'step' of shape {tuple(step.shape)} is neither an index per sample "
                     f"nor a one-hot over {num_steps + 1} steps")


class FiniteActionBounds(gym.Wrapper):
    """The same env, with the action Box bounded by +-float32 max instead of +-inf.

    SB3 refuses a Box action space with infinite bounds (and clips actions to them); the largest
    finite float32 bounds pass its check and make its clipping a no-op on every finite action.
    Actions reach the env unchanged."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        if not isinstance(space, spaces.Box):
            raise ValueError(f"FiniteActionBounds wraps a Box action space, got {space}")
        big = np.finfo(np.float32).max
        self.action_space = spaces.Box(np.maximum(space.low, -big), np.minimum(space.high, big),
                                       space.shape, np.float32)


class EpisodeRecorder(gym.Wrapper):
    """The same env, keeping what SB3's rollout buffer does not hold of each finished episode: its
    prompt, final image, reward and info (reward components, gold verdicts), for the Trainer's
    diagnostics. `take()` returns them and starts a new list."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.episodes: list[dict[str, Any]] = []

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            image = self.env.unwrapped.torch_env.image.detach().float().cpu()
            self.episodes.append({"reward": float(reward), "image": image, "info": dict(info)})
        return obs, reward, terminated, truncated, info

    def take(self) -> list[dict[str, Any]]:
        episodes, self.episodes = self.episodes, []
        return episodes


class FixedStdDiagGaussian(DiagGaussianDistribution):
    """SB3's diagonal Gaussian over the flattened action, with the std given, not learned.

    The DDIM sampler fixes sigma_t (it does not depend on theta), so there is no log_std
    parameter: `proba_distribution(mean [B, N], std)` takes the std as a scalar or one per sample
    ([B] or [B, 1]). `log_prob` and `entropy` sum over the N action dims, as SB3's do."""

    def proba_distribution_net(self, *args, **kwargs):
        raise NotImplementedError("FixedStdDiagGaussian has no learned layers: the mean comes from the "
                                  "DiffusionPolicy and the std is the sampler's sigma_t")

    def proba_distribution(self, mean_actions: torch.Tensor, std: torch.Tensor | float) -> "FixedStdDiagGaussian":
        std = torch.as_tensor(std, dtype=mean_actions.dtype, device=mean_actions.device)
        if std.ndim == 1:
            std = std[:, None]
        self.distribution = Normal(mean_actions, std.expand_as(mean_actions))
        return self


class DenoiseValueFeatures(BaseFeaturesExtractor):
    """The critic's features of (x_t, t, y): per-channel mean and std of the latents, a learned
    embedding of the step and the mean prompt embedding. Reads the raw observation (the integer
    step, not SB3's one-hot; `step_indices` accepts either)."""

    def __init__(self, observation_space: spaces.Dict, step_embed_dim: int = 16) -> None:
        latent_shape, num_steps, (_, embed_dim) = _check_observation_space(observation_space)
        channels = latent_shape[0]
        super().__init__(observation_space, features_dim=2 * channels + step_embed_dim + embed_dim)
        self.num_steps = num_steps
        self.step_embedding = nn.Embedding(num_steps + 1, step_embed_dim)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        latents = obs["latents"].float().flatten(2)  # [B, C, h*w]
        steps = step_indices(obs["step"], latents.shape[0], self.num_steps).clamp(0, self.num_steps)
        embeds = obs["prompt_embeds"].float().mean(dim=1)  # [B, D]
        return torch.cat([latents.mean(dim=2), latents.std(dim=2, unbiased=False),
                          self.step_embedding(steps.to(latents.device)), embeds], dim=1)


# ------------------------------------------------------------------------------------ the SB3 policy
class DiffusionActorCriticPolicy(ActorCriticPolicy):
    """An SB3 actor-critic whose actor is our `DiffusionPolicy` (see the module docstring).

    policy_kwargs: `diffusion_policy` (required: e.g. `env.unwrapped.policy(lora_rank=4)`, built on
    the env's pipeline with its num_steps, guidance and eta), `value_hidden` (width of the value
    MLP), `step_embed_dim`, and SB3's `optimizer_class` / `optimizer_kwargs`. The SB3 device must
    be the pipeline's (`PPO(..., device=policy.device)`); the UNet is never moved by `.to()`.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule,
        diffusion_policy=None,
        value_hidden: int = 64,
        step_embed_dim: int = 16,
        use_sde: bool = False,
        **kwargs: Any,
    ) -> None:
        if diffusion_policy is None:
            raise ValueError("DiffusionActorCriticPolicy needs policy_kwargs={'diffusion_policy': policy}: a "
                             "t2i_rl.policy.DiffusionPolicy on the env's pipeline (e.g. env.unwrapped.policy())")
        if use_sde:
            raise ValueError("use_sde=True is not supported: the noise is the DDIM sampler's sigma_t")
        if value_hidden < 1 or step_embed_dim < 1:
            raise ValueError(f"value_hidden ({value_hidden}) and step_embed_dim ({step_embed_dim}) must be >= 1")
        for key in ("features_extractor_class", "share_features_extractor", "squash_output"):
            if key in kwargs:
                raise ValueError(f"{key} is fixed by DiffusionActorCriticPolicy and cannot be passed")
        latent_shape, num_steps, _ = _check_observation_space(observation_space)
        if not isinstance(action_space, spaces.Box) or tuple(action_space.shape) != latent_shape:
            raise ValueError(f"the action space must be Box{latent_shape} (the next latents), got {action_space}")
        if num_steps != diffusion_policy.num_steps:
            raise ValueError(f"the env has {num_steps} denoising steps but the diffusion policy "
                             f"{diffusion_policy.num_steps}; build the policy with the env's num_steps")
        # plain attributes (not nn.Modules): the UNet stays outside this module; only its
        # trainable parameters are registered (in _build)
        self.diffusion = diffusion_policy
        self.num_steps = num_steps
        self.value_hidden = value_hidden
        super().__init__(observation_space, action_space, lr_schedule, use_sde=False,
                         features_extractor_class=DenoiseValueFeatures,
                         features_extractor_kwargs={"step_embed_dim": step_embed_dim},
                         share_features_extractor=True, **kwargs)

    def _build(self, lr_schedule) -> None:
        self.action_dist = FixedStdDiagGaussian(int(np.prod(self.action_space.shape)))
        self.value_net = nn.Sequential(
            nn.LayerNorm(self.features_dim),
            nn.Linear(self.features_dim, self.value_hidden), nn.Tanh(),
            nn.Linear(self.value_hidden, self.value_hidden), nn.Tanh(),
            nn.Linear(self.value_hidden, 1),
        )
        # the very Parameter objects of the UNet's LoRA layers: SB3's optimizer updates the policy
        self.diffusion_params = nn.ParameterList(self.diffusion.trainable_parameters())
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _apply(self, fn, recurse: bool = True):
        # `.to(device)` / `.float()` must not move or cast the UNet's LoRA weights away from the
        # rest of the UNet: the pipeline owns their device and dtype.
        diffusion_params = self._modules.pop("diffusion_params", None)
        try:
            return super()._apply(fn, recurse)
        finally:
            if diffusion_params is not None:
                self._modules["diffusion_params"] = diffusion_params

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for key in ("use_sde", "log_std_init", "squash_output", "full_std", "use_expln", "ortho_init",
                    "features_extractor_class", "net_arch", "activation_fn"):
            data.pop(key, None)
        data.update(value_hidden=self.value_hidden,
                    step_embed_dim=self.features_extractor_kwargs["step_embed_dim"])
        return data

    # -- observation -> (latents, step, embeds) -----------------------------------------------
    def unpack(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents = obs["latents"].float()
        steps = step_indices(obs["step"], latents.shape[0], self.num_steps)
        return latents, steps, obs["prompt_embeds"].float()

    def extract_features(self, obs, features_extractor=None) -> torch.Tensor:
        """The critic's features from the raw observation (no one-hot: the step stays an index)."""
        return (features_extractor or self.features_extractor)(obs)

    # -- actor ---------------------------------------------------------------------------------
    def actor_moments(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(DDIM mean [B, C*h*w], sigma_t [B]) of pi(. | x_t, t, y): one UNet call per distinct step."""
        latents, steps, embeds = self.unpack(obs)
        if latents.device != self.diffusion.device:
            raise RuntimeError(f"observations are on {latents.device} but the pipeline on {self.diffusion.device}: "
                               "create the SB3 model with device=<the pipeline's device>")
        if bool(((steps < 0) | (steps >= self.num_steps)).any()):
            raise ValueError(f"no action at step indices {sorted(set(steps.tolist()))}: actions exist at steps "
                             f"0..{self.num_steps - 1} (step {self.num_steps} ends the episode)")
        means, stds, order = [], [], []
        for s in torch.unique(steps).tolist():
            idx = (steps == s).nonzero(as_tuple=True)[0]
            mean, std = self.diffusion.step_stats(latents[idx], s, embeds[idx])
            means.append(mean.flatten(1))
            stds.append(std.expand(len(idx)))
            order.append(idx)
        mean, std = torch.cat(means), torch.cat(stds)
        if len(order) > 1:  # back to the batch order
            inverse = torch.argsort(torch.cat(order).to(mean.device))
            mean, std = mean[inverse], std[inverse]
        return mean, std

    def get_distribution(self, obs) -> FixedStdDiagGaussian:
        return self.action_dist.proba_distribution(*self.actor_moments(obs))

    def _predict(self, observation, deterministic: bool = False) -> torch.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)

    # -- critic --------------------------------------------------------------------------------
    def predict_values(self, obs) -> torch.Tensor:
        return self.value_net(self.extract_features(obs))

    # -- both ----------------------------------------------------------------------------------
    def forward(self, obs, deterministic: bool = False):
        distribution = self.get_distribution(obs)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        values = self.predict_values(obs)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def evaluate_actions(self, obs, actions: torch.Tensor):
        distribution = self.get_distribution(obs)
        log_prob = distribution.log_prob(actions.reshape(actions.shape[0], -1).float())
        return self.predict_values(obs), log_prob, distribution.entropy()


# ------------------------------------------------------------------------------------ the agent
@dataclass
class SB3Config(AgentConfig):
    name: str = field(default="sb3", metadata={"help": "the agent's name (its file in agents/)"})
    lr: float = field(default=1e-5, metadata={"help": "Adam(W) learning rate of SB3's optimizer (LoRA and "
                                                      "value head); small: the log-prob sums over every latent"})
    batch_size: int | None = field(default=None, metadata={
        "help": "SB3 minibatch size in transitions; null: train_batch_size * env.num_steps"})
    n_epochs: int = field(default=1, metadata={"help": "PPO passes over each SB3 rollout"})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon"})
    clip_range_vf: float | None = field(default=None, metadata={
        "help": "clip of the value change per update (null: no value clipping)"})
    gamma: float = field(default=1.0, metadata={"help": "discount (1: the final reward counts at every step)"})
    gae_lambda: float = field(default=1.0, metadata={"help": "GAE lambda (1: Monte-Carlo returns minus values)"})
    ent_coef: float = field(default=0.0, metadata={
        "help": "entropy bonus (the entropy is fixed by sigma_t, so it has no gradient)"})
    vf_coef: float = field(default=0.5, metadata={"help": "weight of the value loss"})
    normalize_advantage: bool = field(default=True, metadata={"help": "standardize advantages per minibatch"})
    target_kl: float | None = field(default=None, metadata={
        "help": "stop the PPO epochs early once approx KL > 1.5 * this (null: never)"})
    value_hidden: int = field(default=64, metadata={"help": "width of the value head's two hidden layers"})
    step_embed_dim: int = field(default=16, metadata={"help": "size of the value head's step embedding"})
    verbose: int = field(default=0, metadata={"help": "SB3 verbosity (0 silent, 1 info, 2 debug)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            ("batch_size", self.batch_size is None or _is_int(self.batch_size) and self.batch_size >= 1,
             ">= 1 or null"),
            ("n_epochs", _is_int(self.n_epochs) and self.n_epochs >= 1, "an int >= 1"),
            ("clip_range", self.clip_range > 0, "> 0"),
            ("clip_range_vf", self.clip_range_vf is None or self.clip_range_vf > 0, "> 0 or null"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("gae_lambda", 0 <= self.gae_lambda <= 1, "in [0, 1]"),
            ("ent_coef", self.ent_coef >= 0, ">= 0"),
            ("vf_coef", self.vf_coef >= 0, ">= 0"),
            ("target_kl", self.target_kl is None or self.target_kl > 0, "> 0 or null"),
            ("value_hidden", _is_int(self.value_hidden) and self.value_hidden >= 1, "an int >= 1"),
            ("step_embed_dim", _is_int(self.step_embed_dim) and self.step_embed_dim >= 1, "an int >= 1"),
            ("verbose", self.verbose in (0, 1, 2), "0, 1 or 2"),
            ("kl_coef", self.kl_coef == 0, "0: SB3's PPO loss has no KL-to-base term (use agent=dpok for one)"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"agent.{key} = {getattr(self, key)!r} is invalid: {self.help(key)}; must be {rule}")
        if self.normalize_advantage and self.batch_size == 1:
            raise ValueError("agent.batch_size = 1 is invalid with agent.normalize_advantage = true: "
                             "advantages cannot be standardized over one transition")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# SB3 logger key -> our TensorBoard tag
_SB3_TAGS = {
    "train/policy_gradient_loss": "loss/policy",
    "train/value_loss": "loss/value",
    "train/entropy_loss": "loss/entropy",
    "train/loss": "loss/total",
    "train/approx_kl": "policy/approx_kl",
    "train/clip_fraction": "policy/clipfrac",
    "train/explained_variance": "value/explained_variance",
}


class SB3PPOAgent(Agent):
    """Stable-Baselines3 PPO with `DiffusionActorCriticPolicy`, on a `NumpyDenoise` env that shares
    the Trainer env's pipeline, reward, gold judge, prompts and sampler settings."""

    config_class = SB3Config
    cfg: SB3Config
    single_process_reason = "Stable-Baselines3's PPO has no data-parallel training"
    own_optimizer_reason = "Stable-Baselines3's PPO steps the optimizer of its policy"

    def __init__(self, cfg: SB3Config, env, policy) -> None:
        from stable_baselines3 import PPO
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import DummyVecEnv

        from envs import DenoiseEnv, NumpyDenoise

        super().__init__(cfg, env, policy)
        T = policy.num_steps
        if env.num_steps != T:
            raise ValueError(f"env.num_steps ({env.num_steps}) != the policy's num_steps ({T})")
        self.n_steps = cfg.samples_per_epoch * T  # one SB3 rollout per epoch, of whole episodes
        self.batch_size = cfg.batch_size if cfg.batch_size is not None else cfg.train_batch_size * T
        if cfg.normalize_advantage and self.batch_size < 2:
            raise ValueError(f"agent.batch_size ({self.batch_size} transitions) must be >= 2 with "
                             "agent.normalize_advantage = true")

        self.numpy_env = NumpyDenoise(DenoiseEnv(
            pipeline=env.pipe, reward=env.reward_fn, gold=env.gold_fn, num_steps=env.num_steps,
            guidance_scale=env.guidance_scale, eta=env.eta, prompts=env.prompt_source, device=env.device))
        self.recorder = EpisodeRecorder(FiniteActionBounds(self.numpy_env))
        self.monitor = Monitor(self.recorder)
        self.vec_env = DummyVecEnv([lambda: self.monitor])
        self.model = PPO(
            DiffusionActorCriticPolicy, self.vec_env,
            learning_rate=cfg.lr, n_steps=self.n_steps, batch_size=self.batch_size, n_epochs=cfg.n_epochs,
            gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
            clip_range_vf=cfg.clip_range_vf, normalize_advantage=cfg.normalize_advantage,
            ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm or math.inf,
            target_kl=cfg.target_kl, verbose=cfg.verbose, device=policy.device,
            policy_kwargs=dict(diffusion_policy=policy, value_hidden=cfg.value_hidden,
                               step_embed_dim=cfg.step_embed_dim, optimizer_class=torch.optim.AdamW,
                               optimizer_kwargs={"weight_decay": cfg.weight_decay, "betas": (cfg.adam_beta1, 0.999)}),
        )
        # SB3's optimizer is the one that steps (LoRA + value head): checkpoints save its state
        self.optimizer = self.model.policy.optimizer
        self.params = list(self.model.policy.parameters())
        self.guard_steps(self.optimizer)
        self._seeded = False
        self._episodes_seen = 0
        self._collected = False  # PPO's buffer holds a rollout that `update` has not trained on

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self._seed_sb3(seed + 1)

    def _seed_sb3(self, seed: int) -> None:
        self.vec_env.seed(seed)  # applies at the next reset of the SB3 env
        np.random.seed(seed)  # SB3 shuffles its rollout buffer with numpy's global generator
        self._seeded = True

    def collect(self, prompts: list[str] | None = None) -> Rollout:
        """PPO's own collection, the first half of a `PPO.learn` iteration: `collect_rollouts` of
        samples_per_epoch episodes into its rollout buffer, through the gym API, returned as a
        Rollout (log-probs summed over the latent, as SB3 computes them). With `prompts` (held-out
        evaluation) the base class's episodes with the current policy, outside PPO."""
        if prompts is not None:
            return super().collect(prompts)
        if not self._seeded:  # from the agent's generator, which the Trainer seeds
            self._seed_sb3(int(torch.randint(2**31 - 1, (1,), generator=self.generator)))
        model = self.model
        # every epoch starts a fresh episode from the env's random state (what a resume restores)
        model._last_obs = self.vec_env.reset()
        model._last_episode_starts = np.ones((self.vec_env.num_envs,), dtype=bool)
        total, callback = model._setup_learn(self.n_steps, None, reset_num_timesteps=False)
        model.rollout_buffer.buffer_size = self.n_steps  # `keep_rows` may have shrunk the last one
        self.recorder.take()
        model.collect_rollouts(self.vec_env, callback, model.rollout_buffer, n_rollout_steps=self.n_steps)
        model._update_current_progress_remaining(model.num_timesteps, total)
        self._collected = True
        return self._rollout(self.recorder.take())

    def _rollout(self, episodes: list[dict[str, Any]]) -> Rollout:
        """The episodes in PPO's buffer (one env: its transitions are whole episodes, in order) with
        what the recorder kept of their ends."""
        buffer, T, device = self.model.rollout_buffer, self.policy.num_steps, self.policy.device
        n = len(episodes)
        if n * T != buffer.buffer_size:
            raise RuntimeError(f"SB3 collected {buffer.buffer_size} transitions but {n} episodes of {T} steps")
        latent_shape = buffer.observations["latents"].shape[2:]
        states = torch.as_tensor(buffer.observations["latents"][:, 0]).reshape(n, T, *latent_shape)
        last = torch.as_tensor(buffer.actions[:, 0]).reshape(n, T, *latent_shape)[:, -1:]
        embeds = torch.as_tensor(buffer.observations["prompt_embeds"][::T, 0])  # each episode's first step
        numeric = [k for k, v in episodes[0]["info"].items() if isinstance(v, (bool, int, float))]
        return Rollout(
            prompts=[ep["info"]["prompt"] for ep in episodes],
            embeds=embeds.to(device),
            latents=torch.cat([states, last], 1).to(device),
            log_probs=torch.as_tensor(buffer.log_probs[:, 0]).reshape(n, T).to(device),
            rewards=torch.tensor([ep["reward"] for ep in episodes], dtype=torch.float32, device=device),
            images=torch.stack([ep["image"] for ep in episodes]).to(device),
            info={k: torch.tensor([float(ep["info"][k]) for ep in episodes], device=device) for k in numeric},
        )

    def keep_rows(self, rollout: Rollout, rows: torch.Tensor) -> Rollout:
        """PPO trains on its own buffer: the episodes left out leave it too, and its returns and
        advantages are recomputed without them (a NaN reward would spread through GAE to every earlier
        episode). Every episode ends in the buffer, so nothing is bootstrapped past its end."""
        buffer, T = self.model.rollout_buffer, self.policy.num_steps
        steps = (rows.cpu()[:, None] * T + torch.arange(T)).flatten().numpy()
        for name in ("actions", "rewards", "episode_starts", "values", "log_probs"):
            setattr(buffer, name, getattr(buffer, name)[steps])
        buffer.observations = {k: v[steps] for k, v in buffer.observations.items()}
        buffer.buffer_size = len(steps)
        buffer.advantages = np.zeros_like(buffer.rewards)
        buffer.compute_returns_and_advantage(last_values=torch.zeros(buffer.n_envs), dones=np.ones(buffer.n_envs))
        return super().keep_rows(rollout, rows)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """PPO's `train()` on the rollout buffer that `collect()` filled (the second half of the
        `PPO.learn` iteration); SB3's logged losses."""
        if not self._collected:
            raise RuntimeError("SB3's PPO trains on the episodes its own collect() gathered: call collect() "
                               "(without prompts) before each update()")
        self._collected = False
        self.model.train()
        logged = self.model.logger.name_to_value
        out = {tag: float(logged[key]) for key, tag in _SB3_TAGS.items() if key in logged}
        returns = self.monitor.get_episode_rewards()[self._episodes_seen:]
        self._episodes_seen += len(returns)
        if returns:
            out["sb3/episode_reward"] = float(np.mean(returns))
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        policy = self.model.policy
        heads = {k: v for k, v in policy.state_dict().items() if not k.startswith("diffusion_params.")}
        return {**super().state_dict(), "sb3": {
            "heads": heads, "num_timesteps": self.model.num_timesteps, "n_updates": self.model._n_updates,
            "env_rng": self.numpy_env.torch_env.get_rng_state(), "numpy_rng": np.random.get_state(),
            "seeded": self._seeded}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        sb3 = state["sb3"]
        self.model.policy.load_state_dict(sb3["heads"], strict=False)
        self.model.num_timesteps = sb3["num_timesteps"]
        self.model._n_updates = sb3["n_updates"]
        self.numpy_env.torch_env.set_rng_state(sb3["env_rng"])
        np.random.set_state(sb3["numpy_rng"])
        self._seeded = sb3["seeded"]
