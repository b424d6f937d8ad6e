"""The published reward models the papers fine-tune against, behind the reward protocol.

CLIPScore, PickScore, HPSv2, LAION's aesthetic predictor (`clip.py`), ImageReward
(`imagereward.py`) and BLIP-2 image-text matching (`blip2.py`): each a `RawReward`,
differentiable in the image, loaded with `from_pretrained(path_or_hub_id, device=..., dtype=...)`
through transformers. `make_reward({"name": "pickscore", "path": ...})` builds them by name.
"""

from .blip2 import BLIP2_MODES, BLIP2Reward
from .clip import AestheticReward, CLIPReward, CLIPScore, HPSv2, PickScore
from .common import ImageTransform, PretrainedReward, RewardMLP
from .imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageReward, ImageRewardModel
from .open_clip import clip_from_open_clip, convert_open_clip_state_dict, open_clip_config
from .tiny import save_tiny_reward

PRETRAINED = {cls.name: cls for cls in (CLIPScore, PickScore, ImageReward, HPSv2, BLIP2Reward, AestheticReward)}

__all__ = [
    "AestheticReward", "BLIP2Reward", "BLIP2_MODES", "CLIPReward", "CLIPScore", "HPSv2", "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD", "ImageReward", "ImageRewardModel", "ImageTransform", "PRETRAINED", "PickScore",
    "PretrainedReward", "RewardMLP", "clip_from_open_clip", "convert_open_clip_state_dict", "open_clip_config",
    "save_tiny_reward",
]
