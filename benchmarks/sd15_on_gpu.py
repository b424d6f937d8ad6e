"""One DDPO epoch and one ReFL step of the SD-1.5-sized UNet (SD 1.5's configs, random weights),
LoRA over bfloat16 weights: samples per second and peak memory, as a markdown report (docs/gpu.md).

The pipeline is SD 1.5's architecture at full width (t2i_rl/sd_architectures.py; the text encoder
takes ShapesWorld's offline tokenizer), saved and loaded back through `model=sd15` as a real
checkpoint is; the reward is CLIPScore on a CLIP ViT-L/14-sized model with random weights. Random
weights cost what trained ones cost, so the times and memory are those of real SD 1.5 runs. Each
phase runs `--repeats` times (the first includes CUDA's warm-up); the report gives each.

    python benchmarks/sd15_on_gpu.py --out docs/gpu.md                       # on a GPU
    python benchmarks/sd15_on_gpu.py --device cpu --scaled-down --resolution 64 --steps 2 \\
        --samples 2 --batch 2                                                 # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from t2i_rl.sd_architectures import SCALED_DOWN, save_random_sd  # noqa: E402

# CLIP ViT-L/14 (openai/clip-vit-large-patch14): the tower sizes of CLIPScore's and SD 1.5's CLIP
CLIP_L = dict(image_size=224, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
              text_hidden=768, text_layers=12, text_heads=12, projection_dim=768)
CLIP_SCALED_DOWN = dict(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                        text_hidden=32, text_layers=1, text_heads=2, projection_dim=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="model.dtype: the frozen UNet, VAE and text encoder (LoRA trains in float32)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512, help="image size (512: SD 1.5's, 64x64 latents)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPO's 50)")
    p.add_argument("--samples", type=int, default=16, help="samples per DDPO epoch")
    p.add_argument("--batch", type=int, default=8, help="env.batch_size, and each agent's train_batch_size")
    p.add_argument("--repeats", type=int, default=2, help="times each phase runs (the first warms up)")
    p.add_argument("--scaled-down", action="store_true", help="the tests' scaled-down widths (for the CPU)")
    p.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = p.parse_args(argv)
    if args.samples % args.batch or args.repeats < 1:
        p.error(f"--samples ({args.samples}) must be a multiple of --batch ({args.batch}); --repeats >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (--device cpu --scaled-down for a smoke run)")
    return args


def save_clip_reward(path: Path, sizes: dict) -> None:
    from transformers import CLIPConfig, CLIPModel

    from t2i_rl.models import build_tokenizer, text_encoder_config
    from t2i_rl.rewards.pretrained.tiny import save_clip_folder

    tokenizer = build_tokenizer()
    text = text_encoder_config(tokenizer, sizes["text_hidden"], sizes["text_layers"])
    text.num_attention_heads, text.intermediate_size = sizes["text_heads"], 4 * sizes["text_hidden"]
    vision = dict(hidden_size=sizes["vision_hidden"], intermediate_size=4 * sizes["vision_hidden"],
                  num_hidden_layers=sizes["vision_layers"], num_attention_heads=sizes["vision_heads"],
                  image_size=sizes["image_size"], patch_size=sizes["patch_size"])
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=sizes["projection_dim"])
    save_clip_folder(CLIPModel(config), tokenizer, path)


def trainer_for(agent: str, args: argparse.Namespace, pipeline: Path, reward: Path, run_dir: Path):
    from hydra import compose, initialize_config_dir

    from t2i_rl.train import CONFIG_DIR, Trainer

    # one ReFL step: its minibatch is the whole epoch
    samples = args.samples if agent == "ddpo" else args.batch
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"agent={agent}", "env=clipscore", "model=sd15", f"model.pipeline={pipeline}",
            f"model.dtype={args.dtype}", f"model.resolution={args.resolution}", f"device={args.device}",
            f"env.reward.path={reward}", f"env.num_steps={args.steps}", f"env.batch_size={args.batch}",
            f"agent.samples_per_epoch={samples}", f"agent.train_batch_size={args.batch}",
            f"agent.lora_rank={args.lora_rank}", "epochs=1", f"output_dir={run_dir}",
            "eval.num_prompts=0", "eval.train_images=0", "samples.every=0", "resume=false",
            # DDPO as its paper runs it on SD (every step trained, per-prompt statistics), not the
            # ShapesWorld recipe of the agent config (groups of 8, antithetic pairs, the first step)
            *(["agent.group_size=0", "agent.train_steps=0", "agent.antithetic=false"] if agent == "ddpo" else [])])
    return Trainer(cfg)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory since the last reset: the GPU's allocated bytes, or on the CPU the process's
    peak resident size (which never resets)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(device: torch.device, fn) -> tuple[object, float, float]:
    reset_peak(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start, peak_gib(device)


def measure(agent: str, args: argparse.Namespace, pipeline: Path, reward: Path, tmp: Path
            ) -> tuple[list[tuple], int, int]:
    """Rows (phase, run, seconds, samples, peak GiB) of DDPO's sampling and update, or of one ReFL
    step (its rollout only gives it prompts), `--repeats` times; the UNet's and LoRA's sizes."""
    trainer = trainer_for(agent, args, pipeline, reward, tmp / f"run-{agent}")
    device = trainer.policy.device
    rows = []
    for run in range(1, args.repeats + 1):
        rollout, seconds, peak = timed(device, trainer.agent.collect)
        if agent == "ddpo":
            rows.append((f"ddpo: sampling, {args.steps} steps without gradients", run, seconds, len(rollout), peak))
        _, seconds, peak = timed(device, lambda: trainer.agent.update(rollout))
        what = ("ddpo: update, PPO over every step" if agent == "ddpo"
                else "refl: one step (sample to a late step, backpropagate one)")
        rows.append((what, run, seconds, len(rollout), peak))
    named = dict(trainer.policy.unet.named_parameters())
    unet = sum(p.numel() for n, p in named.items() if "lora" not in n)
    return rows, unet, sum(p.numel() for p in trainer.agent.params)


def report(args: argparse.Namespace, rows: list[tuple], unet_params: int, lora_params: int, device: str) -> str:
    import diffusers

    memory = "peak GiB allocated" if device.startswith("cuda") else "peak RSS GiB (process, never resets)"
    lines = [
        f"Device: {device}. torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"Python {platform.python_version()}.",
        f"SD 1.5's UNet ({unet_params / 1e6:.0f}M parameters{', scaled down' if args.scaled_down else ''}), "
        f"random weights, in {args.dtype}; LoRA rank {args.lora_rank} ({lora_params / 1e6:.2f}M float32 "
        f"parameters); {args.resolution}x{args.resolution} images, {args.steps} DDIM steps, guidance 5, "
        f"batch {args.batch}; gradient checkpointing, SDPA, VAE slicing (`model=sd15`); reward CLIPScore "
        f"on a CLIP ViT-L/14-sized model{' (scaled down)' if args.scaled_down else ''}.",
        "",
        f"| phase | run | seconds | samples | samples/s | {memory} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {phase} | {run} | {seconds:.2f} | {n} | {n / seconds:.2f} | {peak:.2f} |"
              for phase, run, seconds, n, peak in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sizes = SCALED_DOWN["sd15"] if args.scaled_down else {}
        pipeline = save_random_sd("sd15", tmp / "sd15", args.resolution, dtype=getattr(torch, args.dtype), **sizes)
        save_clip_reward(tmp / "clip", CLIP_SCALED_DOWN if args.scaled_down else CLIP_L)
        rows, unet_params, lora_params = measure("ddpo", args, pipeline, tmp / "clip", tmp)
        rows += measure("refl", args, pipeline, tmp / "clip", tmp)[0]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})"
    text = report(args, rows, unet_params, lora_params, device)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# SD 1.5 on a GPU: samples per second and peak memory\n\n"
                            "`python benchmarks/sd15_on_gpu.py` (its docstring says what runs).\n\n" + text)
    return text


if __name__ == "__main__":
    main()
