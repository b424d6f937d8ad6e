"""Rewards: `reward(images, prompts) -> RewardOutput(scores[B], components{name: [B]})`.

Raw proxy models of ShapesWorld (`ShapesCLIP`, `LeeReward`, `PairwiseReward`), the gold judge
(`GoldReward`, diagnostics only), composers (`Ensemble`, `TextNorm`), and the published models
(`CLIPScore`, `PickScore`, `ImageReward`, `HPSv2`, `BLIP2Reward`, `AestheticReward`, in
`pretrained`). `make_reward(spec)` builds any of them from a name or a config.
"""

from .base import RawReward, RewardFunction, RewardOutput
from .clip_style import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ShapesCLIP, clip_config
from .composers import ENSEMBLE_MODES, Ensemble, TextNorm
from .gold import GoldReward
from .head import CLIPHeadReward, FeatureHead
from .lee import LeeReward, lee_loss
from .pairwise import PairwiseReward, bradley_terry_loss, preference_pairs
from .pretrained import AestheticReward, BLIP2Reward, CLIPScore, HPSv2, ImageReward, PickScore
from .registry import REWARD_ASSETS, make_reward, reward_names

__all__ = [
    "AestheticReward", "BLIP2Reward", "CLIPScore", "HPSv2", "ImageReward", "PickScore",
    "CLIPHeadReward", "ENSEMBLE_MODES", "Ensemble", "FeatureHead", "GoldReward", "LeeReward",
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PairwiseReward", "REWARD_ASSETS", "RawReward",
    "RewardFunction", "RewardOutput", "ShapesCLIP", "TextNorm", "bradley_terry_loss", "clip_config",
    "lee_loss", "make_reward", "preference_pairs", "reward_names",
]
