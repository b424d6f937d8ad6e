"""Models of the embedded world and the loader of every Stable Diffusion pipeline (SD 1.x/2.x and SD 3/3.5).

ShapesWorld's pipeline is a real `diffusers.StableDiffusionPipeline` (CLIP text encoder and
tokenizer, AutoencoderKL, UNet2DConditionModel, DDIM) at a size a CPU trains in minutes. It is
built here from configs, trained by `t2i_rl.pretrain`, and shipped in diffusers' folder format, so
the code that loads it is the code that loads SD 1.5 from a local folder or a hub id.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import ShapesWorld

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_PIPELINES = {"shapes": ASSETS / "shapes-sd"}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # as in CLIP and every SD checkpoint
# model.dtype: the precision of the frozen UNet, VAE and text encoder (trainable weights stay float32)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
# model.attention: "sdpa" is torch's scaled_dot_product_attention (fused kernels); "eager" is the
# plain matmul-softmax-matmul, for backends where SDPA misbehaves
ATTENTION_PROCESSORS = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
MODEL_KEYS = ("pipeline", "dtype", "attention", "gradient_checkpointing", "vae_slicing", "resolution")
# model.policy (optional, default "ddim"): the policy the checkpoint needs; "flow" for flow-matching
# pipelines (SD 3/3.5: t2i_rl.flow_policy.FlowPolicy), which t2i_rl.train does not drive yet
MODEL_POLICIES = ("ddim", "flow")
# the pipeline classes load_pipeline reads, by model_index.json's _class_name, and the policy of each
PIPELINE_POLICIES = {"StableDiffusionPipeline": "ddim", "StableDiffusion3Pipeline": "flow"}


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character map, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def train_bpe(words: list[str], max_merges: int = 10_000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with CLIP's `</w>` end-of-word suffix, trained deterministically.

    Ties between equally frequent pairs are broken by the pair itself, so the same corpus always
    gives the same merges (the `tokenizers` trainer breaks ties by hash order, which changes from
    run to run). Merging stops when every word is one token.
    """
    alphabet = _byte_alphabet()
    byte_char = dict(enumerate(alphabet))
    freq: dict[tuple[str, ...], int] = {}
    for word in words:
        symbols = [byte_char[b] for b in word.encode()]
        symbols[-1] += "</w>"
        freq[tuple(symbols)] = freq.get(tuple(symbols), 0) + 1
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, n in freq.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged = {}
        for symbols, n in freq.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        freq = merged
    vocab += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIPTokenizer trained offline on every ShapesWorld prompt (no hub files)."""
    world = ShapesWorld()
    words = [w for p in world.prompts("train") + world.prompts("heldout") for w in p.split()]
    vocab, merges = train_bpe(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int = 64, layers: int = 2) -> CLIPTextConfig:
    """A small CLIP text encoder whose special-token ids match the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def vae_config(resolution: int = 32, channels: tuple[int, ...] = (32, 64)) -> dict:
    """AutoencoderKL with one downsampling: 32x32x3 images <-> 16x16x4 latents."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=resolution,
    )


def unet_config(
    sample_size: int = 16,
    channels: tuple[int, ...] = (32, 64, 64),
    cross_attention_dim: int = 64,
) -> dict:
    """A small SD-style UNet: plain ResNet blocks at full size, cross-attention below."""
    n = len(channels)
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def ddim_scheduler() -> DDIMScheduler:
    """SD 1.5's noise schedule (scaled linear betas, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_pipeline(
    tokenizer: CLIPTokenizer | None = None,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    vae_channels: tuple[int, ...] = (32, 64),
    unet_channels: tuple[int, ...] = (32, 64, 64),
    resolution: int = 32,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A randomly initialized ShapesWorld pipeline (what `pretrain` starts from)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or build_tokenizer()
    vae = AutoencoderKL(**vae_config(resolution, vae_channels))
    factor = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(**unet_config(resolution // factor, unet_channels, text_hidden_size))
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer, text_hidden_size, text_layers))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def check_model_config(model: Mapping[str, Any]) -> None:
    """The `model` config group (configs/model/*.yaml): one ValueError line naming a bad value."""
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise ValueError(f"the model config lacks {', '.join(missing)}; every model config needs "
                         f"{', '.join(MODEL_KEYS)} (see configs/model/shapes.yaml)")
    resolution = model["resolution"]
    for key, ok, rule in [
        ("pipeline", isinstance(model["pipeline"], str) and bool(model["pipeline"]),
         "a shipped name, a local folder or a hub id"),
        ("dtype", model["dtype"] in MODEL_DTYPES, f"one of {', '.join(MODEL_DTYPES)}"),
        ("attention", model["attention"] in ATTENTION_PROCESSORS, f"one of {', '.join(ATTENTION_PROCESSORS)}"),
        ("gradient_checkpointing", isinstance(model["gradient_checkpointing"], bool), "true or false"),
        ("vae_slicing", isinstance(model["vae_slicing"], bool), "true or false"),
        ("resolution", resolution is None or (type(resolution) is int and resolution > 0),
         "a positive int (image height = width in pixels) or null for the checkpoint's native size"),
        ("policy", model.get("policy", "ddim") in MODEL_POLICIES,
         f"one of {', '.join(MODEL_POLICIES)} (the sampler the checkpoint needs; absent: ddim)"),
    ]:
        if not ok:
            raise ValueError(f"model.{key} = {model[key]!r} is invalid: must be {rule}")


def _local_config(name_or_path: str, component: str, cls) -> dict | None:
    """A pipeline component's config without its weights: from a shipped name, a local folder, or a
    hub id already in the local cache; None when it is not here to read."""
    folder = Path(SHIPPED_PIPELINES.get(name_or_path, name_or_path)).expanduser()
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices: not the user's business here
            warnings.simplefilter("ignore")
            return cls.load_config(str(folder) if folder.is_dir() else name_or_path, subfolder=component,
                                   local_files_only=True)
    except (OSError, ValueError):  # not a folder here, nor in the hub cache
        return None


def unet_layer_names(name_or_path: str) -> dict[str, str] | None:
    """Each module of the pipeline's UNet, its dotted path -> class name, built from its config on
    the meta device (no weights read); None when the config is not here to read."""
    config = _local_config(name_or_path, "unet", UNet2DConditionModel)
    if config is None:
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return {name: type(module).__name__ for name, module in unet.named_modules()}


def latent_side(name_or_path: str, resolution: int | None) -> int | None:
    """The side of the latents the pipeline denoises at `resolution` (None: its native size), read
    from its configs; None when they are not here to read."""
    unet = _local_config(name_or_path, "unet", UNet2DConditionModel)
    vae = _local_config(name_or_path, "vae", AutoencoderKL)
    if unet is None or vae is None:
        return None
    return unet["sample_size"] if resolution is None else resolution // 2 ** (len(vae["block_out_channels"]) - 1)


def pipeline_class_name(name_or_path: str, local_files_only: bool = True) -> str | None:
    """model_index.json's `_class_name` of a shipped name, a local folder, or a hub id (with
    `local_files_only`, only one already in the local cache: nothing is downloaded); None when it
    cannot be read."""
    folder = Path(SHIPPED_PIPELINES.get(name_or_path, name_or_path)).expanduser()
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notices
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(str(folder) if folder.is_dir() else name_or_path,
                                                  local_files_only=local_files_only)
    except (OSError, ValueError):  # not a folder here, nor in the hub cache (or the hub)
        return None
    return index.get("_class_name")


def model_policy(model: Mapping[str, Any]) -> str:
    """The policy a model config needs, "ddim" or "flow": its pipeline's, where model_index.json is here
    to read (an SD 3 folder under model=sd15 is a flow model too), else model.policy (absent: ddim)."""
    return PIPELINE_POLICIES.get(pipeline_class_name(model["pipeline"]), model.get("policy", "ddim"))


def _refuse_unsupported(folder: Path) -> None:
    """SDXL folders fail here in one line, not deep inside diffusers or at the first UNet call."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    name = str(index.get("_class_name", ""))
    if name.startswith("StableDiffusionXL") or ("text_encoder_2" in index and name not in PIPELINE_POLICIES):
        raise ValueError(
            f"{folder} holds an SDXL pipeline ({index.get('_class_name')}); t2i-rl runs StableDiffusionPipeline "
            "checkpoints (SD 1.x, 2.x) and StableDiffusion3Pipeline ones (SD 3, 3.5): SDXL's UNet also needs "
            "pooled embeddings of a second text encoder and size/crop time ids, which the env's observation and "
            "the policy do not carry"
        )


def load_pipeline(
    name_or_path: str = "shapes",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    attention: str | None = None,
    gradient_checkpointing: bool = False,
    vae_slicing: bool = False,
    **kwargs,
) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
    """Load a Stable Diffusion pipeline: "shapes" (shipped), a local folder, or a hub id.

    The pipeline class is model_index.json's: a `StableDiffusion3Pipeline` (SD 3, 3.5) loads as one,
    for `t2i_rl.flow_policy.FlowPolicy`; anything else loads as a `StableDiffusionPipeline` (SD 1.x,
    2.x), for `t2i_rl.policy.DiffusionPolicy`. Every weight is loaded in `dtype`; the policy keeps
    what it trains in float32 (LoRA weights, or the whole denoiser). `attention` ("sdpa", "eager"; None
    keeps diffusers' choice) sets the attention processors of the denoiser and the VAE,
    `gradient_checkpointing` recomputes the denoiser's activations in the backward pass, `vae_slicing`
    decodes and encodes one image at a time. The scheduler of an SD 1.x/2.x pipeline is always DDIM
    (the DDIM policy's log-probs are DDIM's), built from the checkpoint's own scheduler config so that
    its noise schedule and prediction type are kept; an SD 3 pipeline keeps its
    FlowMatchEulerDiscreteScheduler (its shifted sigmas define the flow policy's SDE).
    """
    if attention is not None and attention not in ATTENTION_PROCESSORS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_PROCESSORS)} or None, got {attention!r}")
    path = SHIPPED_PIPELINES.get(name_or_path, name_or_path)
    if name_or_path in SHIPPED_PIPELINES and not Path(path).is_dir():
        raise FileNotFoundError(
            f"the shipped pipeline {name_or_path!r} is missing at {path}; "
            "run `python -m t2i_rl.pretrain` to train it"
        )
    local = Path(path).expanduser()
    if (local.is_absolute() or str(path).startswith((".", "~"))) and not local.is_dir():
        raise FileNotFoundError(
            f"no pipeline folder at {path}; give a folder saved with save_pretrained, "
            f"a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', or one of {sorted(SHIPPED_PIPELINES)}"
        )
    if local.is_dir():
        _refuse_unsupported(local)
    source = str(local) if local.is_dir() else str(path)
    # a hub id's model_index.json: from the cache, else fetched (from_pretrained fetches it anyway); one
    # that cannot be read fails here, not after a second round of retries inside from_pretrained
    class_name = pipeline_class_name(source) or (None if local.is_dir() else pipeline_class_name(source, False))
    if class_name is None and not local.is_dir():
        raise OSError(f"cannot read model_index.json of {source!r}: it is not a local folder, not in the hub "
                      "cache, and the hub did not answer (offline?); pass a local folder saved with save_pretrained")
    if class_name == "StableDiffusion3Pipeline":
        pipe = _load_sd3(source, dtype, attention, **kwargs)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(source, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False, **kwargs)
        # DDIM's own default clip_sample=True is for pixel-space models; SD's latents are never clipped
        # (StableDiffusionPipeline turns it off too), so a scheduler config that does not say keeps it off.
        config = pipe.scheduler.config
        pipe.scheduler = DDIMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))
        if attention is not None:
            pipe.unet.set_attn_processor(ATTENTION_PROCESSORS[attention]())
    if attention is not None:
        pipe.vae.set_attn_processor(ATTENTION_PROCESSORS[attention]())
    denoiser = pipe.transformer if isinstance(pipe, StableDiffusion3Pipeline) else pipe.unet
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if vae_slicing:
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_sd3(source: str, dtype: torch.dtype, attention: str | None, **kwargs) -> StableDiffusion3Pipeline:
    """An SD 3 / 3.5 pipeline with its flow-matching scheduler. Its transformer's joint attention has
    one processor, JointAttnProcessor2_0 (torch's SDPA): attention="sdpa" sets it, and "eager" is
    refused (diffusers has no plain-matmul joint attention)."""
    if attention == "eager":
        raise ValueError(f"attention = 'eager' is invalid for {source}, an SD 3 pipeline: its joint attention "
                         "runs only as sdpa (JointAttnProcessor2_0); use attention=sdpa")
    pipe = StableDiffusion3Pipeline.from_pretrained(source, dtype=dtype, **kwargs)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"{source} has a {type(pipe.scheduler).__name__}; the flow policy needs its "
                         "FlowMatchEulerDiscreteScheduler (SD 3's own)")
    if attention == "sdpa":
        pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    return pipe


def save_pipeline_atomically(pipe: StableDiffusionPipeline, path: str | Path) -> None:
    """`save_pretrained` into a temporary folder, then swap it in: no half-written model on a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / "pipe"
        pipe.save_pretrained(staged, safe_serialization=True)
        if path.exists():
            old = Path(tmp) / "old"
            path.rename(old)
        staged.rename(path)
