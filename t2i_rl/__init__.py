"""t2i-rl: reinforcement learning for text-to-image diffusion models, with diagnostics that show
when optimizing a proxy reward stops pleasing the (gold) human.

Importing the package registers its Gymnasium environments (Gymnasium 1.x has no entry-point
plugins): `gymnasium.make("t2i_rl/Denoise-v0")` gives the single-image MDP with numpy
observations, `gymnasium.make_vec("t2i_rl/Denoise-v0", num_envs=B)` the natively batched,
torch-native vector env.
"""

import gymnasium

__version__ = "0.1.0"

ENV_IDS = ("t2i_rl/Denoise-v0",)

if "t2i_rl/Denoise-v0" not in gymnasium.registry:
    gymnasium.register(
        id="t2i_rl/Denoise-v0",
        entry_point="envs.denoise:make_numpy_env",
        vector_entry_point="envs.denoise:DenoiseVectorEnv",
        disable_env_checker=False,
    )
