"""t2i-rl: reinforcement learning for text-to-image diffusion models, with diagnostics that show
when optimizing a proxy reward stops pleasing the (gold) human.

Importing the package registers its Gymnasium environments (Gymnasium 1.x has no entry-point
plugins): `gymnasium.make("t2i_rl/Denoise-v0")` gives the single-image MDP with numpy
observations, `gymnasium.make_vec("t2i_rl/Denoise-v0", num_envs=B)` the natively batched,
torch-native vector env.
"""

import logging
from pathlib import Path

import gymnasium

__version__ = "0.1.0"

# The Hydra configs: package data (t2i_rl/conf, mapped from configs/ by pyproject.toml) in an installed
# wheel, the repository's configs/ in a source checkout or an editable install
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "configs"


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers announces at every start that its image processors fall back to PIL without
    torchvision, which this package never needs; only that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())

ENV_IDS = ("t2i_rl/Denoise-v0",)

if "t2i_rl/Denoise-v0" not in gymnasium.registry:
    gymnasium.register(
        id="t2i_rl/Denoise-v0",
        entry_point="envs.denoise:make_numpy_env",
        vector_entry_point="envs.denoise:DenoiseVectorEnv",
        disable_env_checker=False,
    )
