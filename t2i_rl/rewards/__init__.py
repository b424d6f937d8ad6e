"""Rewards: `reward(images, prompts) -> RewardOutput(scores[B], components{name: [B]})`.

Raw proxy models of ShapesWorld (`ShapesCLIP`, `LeeReward`, `PairwiseReward`), the gold judge
(`GoldReward`, diagnostics only), and composers (`Ensemble`, `TextNorm`). `make_reward(spec)`
builds any of them from a name or a config.
"""

from .base import RawReward, RewardFunction, RewardOutput
from .clip_style import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ShapesCLIP, clip_config
from .composers import ENSEMBLE_MODES, Ensemble, TextNorm
from .gold import GoldReward
from .head import CLIPHeadReward, FeatureHead
from .lee import LeeReward, lee_loss
from .pairwise import PairwiseReward, bradley_terry_loss, preference_pairs
from .registry import REWARD_ASSETS, make_reward, reward_names

__all__ = [
    "CLIPHeadReward", "ENSEMBLE_MODES", "Ensemble", "FeatureHead", "GoldReward", "LeeReward",
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PairwiseReward", "REWARD_ASSETS", "RawReward",
    "RewardFunction", "RewardOutput", "ShapesCLIP", "TextNorm", "bradley_terry_loss", "clip_config",
    "lee_loss", "make_reward", "preference_pairs", "reward_names",
]
