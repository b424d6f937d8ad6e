"""What every published reward model here shares: differentiable preprocessing, freezing, loading.

`ImageTransform` is an image processor (resize, center crop, normalize) written in torch, so that
ReFL and DRaFT can backpropagate from the score to the pixels; `PretrainedReward` is the frozen
model behind the reward protocol; the loaders turn a local folder, a file or a hub id into files
and give errors that name the path.
"""

from __future__ import annotations

import os
import re
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...world.judge import check_images
from .._common import TextCache, check_prompt_sets
from ..base import RawReward
from ..clip_style import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def check_weights_fit(weights: dict[str, torch.Tensor], model: nn.Module, what: str) -> None:
    """Raise unless `weights` sets exactly every entry of `model`'s state dict, in its shape:
    converted checkpoints must load strictly, never half."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
           for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{what}: missing {missing[:10]}, unexpected {unexpected[:10]}, wrong shapes {bad[:5]}")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's resampling codes, as image processors store them
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HUB_FILE = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w.+-]+)")


@dataclass(frozen=True)
class ImageTransform:
    """An image processor's resize, center crop and normalization, differentiable.

    `shortest_edge`: resize the shorter side to it (the longer one to int(shortest_edge * long /
    short), as transformers and torchvision do), then center-crop to `size`; None: resize straight
    to `size` (BLIP-2). The resize is antialiased like PIL's and clamped to [0, 1] as PIL's 8-bit
    result is; an image already of the target size is not resampled (PIL leaves it unchanged too).
    """

    size: tuple[int, int]
    shortest_edge: int | None = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    mode: str = "bicubic"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) >= 1, got {self.size!r}")
        if self.shortest_edge is not None and self.shortest_edge < max(self.size):
            raise ValueError(f"shortest_edge ({self.shortest_edge}) must be at least the crop size {self.size}")
        if self.mode not in _RESAMPLE.values():
            raise ValueError(f"mode must be one of {sorted(_RESAMPLE.values())}, got {self.mode!r}")

    @classmethod
    def from_processor(cls, processor) -> "ImageTransform":
        """The transform a transformers image processor applies (CLIP's or BLIP's)."""
        mode = _RESAMPLE.get(int(processor.resample))
        if mode is None:
            raise ValueError(f"unsupported resampling {processor.resample!r} in {type(processor).__name__}; "
                             f"allowed: {', '.join(f'{k} ({v})' for k, v in _RESAMPLE.items())}")
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        size = processor.size
        if getattr(processor, "do_center_crop", False):
            crop = (processor.crop_size.height, processor.crop_size.width)
            return cls(crop, size.shortest_edge, mean, std, mode)
        if size.height is None or size.width is None:
            raise ValueError(f"{type(processor).__name__} without center crop needs size height and width, got {size}")
        return cls((size.height, size.width), None, mean, std, mode)

    @classmethod
    def square(cls, size: int, crop: bool = True) -> "ImageTransform":
        """OpenAI CLIP's preprocessing at `size` (shortest side, center crop), or a plain resize."""
        return cls((size, size), size if crop else None)

    def resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalized pixel values [B, 3, *size]."""
        x = images
        if self.shortest_edge is None:
            x = self.resize(x, self.size)
        else:
            h, w = x.shape[-2:]
            short, long = min(h, w), max(h, w)
            new_long = int(self.shortest_edge * long / short)
            x = self.resize(x, (self.shortest_edge, new_long) if h <= w else (new_long, self.shortest_edge))
            top, left = (x.shape[-2] - self.size[0]) // 2, (x.shape[-1] - self.size[1]) // 2
            x = x[..., top:top + self.size[0], left:left + self.size[1]]
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


class RewardMLP(nn.Module):
    """The head of LAION's improved aesthetic predictor, which ImageReward reuses: Linear layers
    in -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between the first four and no activations.
    The module layout matches their checkpoints' keys (`layers.0`, `layers.2`, ..., `layers.7`)."""

    WIDTHS = (1024, 128, 64, 16, 1)
    DROPOUT = (0.2, 0.2, 0.1)

    def __init__(self, in_features: int) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        mods: list[nn.Module] = []
        widths = (in_features,) + self.WIDTHS
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(self.DROPOUT):
                mods.append(nn.Dropout(self.DROPOUT[i]))
        self.layers = nn.Sequential(*mods)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [...]."""
        return self.layers(x).squeeze(-1)


class PretrainedReward(RawReward):
    """A frozen published reward model behind the reward protocol.

    Subclasses implement `score(images, prompts, k)`: images [B, 3, H, W] in [0, 1], the B*K
    prompts flattened image by image, returning [B, K]. Gradients reach the images, never the
    weights. `cached` keeps per-prompt text features, which TextNorm asks for again and again.
    """

    differentiable = True
    default_tau = 1.0

    def __init__(self, model: nn.Module, tokenizer, transform: ImageTransform, cache_size: int = 65536) -> None:
        if not isinstance(transform, ImageTransform):
            raise ValueError(f"transform must be an ImageTransform, got {type(transform).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform
        self._cache = TextCache(cache_size)

    def to(self, device: str | torch.device) -> "PretrainedReward":
        self.model.to(device)
        self._cache.clear()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the model's pixel values (float32 maths, then its dtype)."""
        check_images(images)
        return self.transform(images.to(self.device, torch.float32)).to(self.dtype)

    def tokenize(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [N, L] on the model's device (padded to the longest)."""
        tok = self.tokenizer(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def cached(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """encode(prompts) [N, ...], each distinct prompt encoded once (without gradients) and kept."""
        return self._cache(prompts, encode, self.device)

    def score_prompts(self, images: torch.Tensor, prompt_sets: list[list[str]]) -> torch.Tensor:
        check_images(images)
        k = check_prompt_sets(images, prompt_sets)
        if k == 0:
            return torch.zeros(0, 0, device=self.device)
        return self.score(images, [p for s in prompt_sets for p in s], k).float()

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: list[str], k: int) -> torch.Tensor:
        """Scores [B, K] of image i against prompts[i*K:(i+1)*K]."""


# ------------------------------------------------------------------------------------------ loading
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """"float32", "float16", "bfloat16", a torch dtype among them, or None (float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def local_path(path: str | os.PathLike) -> Path | None:
    """The existing file or folder `path` names, or None for a hub id. A missing path that cannot
    be a hub id ("name" or "owner/name") is a FileNotFoundError naming it, so a typo downloads nothing."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    if local.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"no such file or folder: {text!r} (give a local folder or file, or a hub id)")
    return None


def local_dir(path: str | os.PathLike) -> Path | None:
    """The folder `path` names, or None for a hub id (see `local_path`)."""
    local = local_path(path)
    if local is not None and not local.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; this model loads from a folder or a hub id")
    return local


def load(what: str, path: str | os.PathLike, loader: Callable, *args, **kwargs):
    """loader(str(path), ...) with transformers' and the hub's errors re-raised naming `what` and `path`."""
    local_path(path)
    try:
        return loader(str(path), *args, **kwargs)
    except (OSError, ValueError) as e:
        raise (OSError if isinstance(e, OSError) else ValueError)(
            f"could not load the {what} from {str(path)!r}: {e}") from e


def resolve_file(path: str | os.PathLike, filenames: tuple[str, ...], what: str) -> Path:
    """A checkpoint file: `path` itself, the first of `filenames` found in the folder `path`, or
    a file from the hub: "owner/name" gives filenames[0], "owner/name/file" that file."""
    text = str(path)
    repo, filename = text, filenames[0]
    hub_file = _HUB_FILE.fullmatch(text)
    if hub_file is not None and not Path(text).expanduser().exists():
        repo, filename = hub_file.group(1), hub_file.group(2)
    else:
        local = local_path(path)
        if local is not None and local.is_file():
            return local
        if local is not None:
            for name in filenames:
                if (local / name).is_file():
                    return local / name
            raise FileNotFoundError(f"no {what} in {text!r}: expected one of {list(filenames)}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # the hub raises its own error types (offline, no such repository or file)
        raise OSError(f"could not get {filename!r} ({what}) from the hub repository {repo!r}: {e}") from e


def load_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint (weights only; a {"state_dict": ...}
    wrapper and DistributedDataParallel's "module." prefixes are removed)."""
    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def processor_transform(source: str | os.PathLike, processor_class, image_size: int,
                        crop: bool = True) -> ImageTransform:
    """The image processor config in `source` (a folder or hub id) as a transform; a local folder
    without one gets `ImageTransform.square(image_size, crop)` (OpenAI CLIP's constants)."""
    folder = local_dir(source)
    if folder is not None and not (folder / "preprocessor_config.json").is_file():
        transform = ImageTransform.square(image_size, crop)
    else:
        transform = ImageTransform.from_processor(load("image processor", source, processor_class.from_pretrained))
    if transform.size != (image_size, image_size):
        raise ValueError(f"the image processor in {str(source)!r} gives {transform.size} images, "
                         f"but the model takes {image_size}x{image_size}")
    return transform


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and (folder / "tokenizer_config.json").is_file()
