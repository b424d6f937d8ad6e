"""Checkpoints of a run: weights and trainer state in files that hold data only, switched in atomically.

A checkpoint folder holds either `pytorch_lora_weights.safetensors` (LoRA, in the diffusers
format that `StableDiffusionPipeline.load_lora_weights` reads) or `unet/` (full fine-tuning,
`save_pretrained`), and the trainer state (optimizer, random states, epoch, statistics) so that a
resumed run continues exactly. Nothing in it is a pickle, which runs code when loaded: the state's
tensors are in `trainer_state.safetensors`, named by their path in the state, and everything else
in `trainer_state.json`, with references to those tensors in their place (`encode_state`).

A checkpoint is written into a temporary sibling folder `.<name>.XXXX`, which then replaces
`<name>` in two renames: `<name>` -> `.<name>.old`, then the new folder -> `<name>`. A crash
before the first leaves `<name>` as it was; a crash between the two leaves `<name>` missing and
the complete previous checkpoint in `.<name>.old`, which `find_checkpoint` (and so
`load_checkpoint`) takes instead. The next save removes the leftovers of a crashed one. Weights
holding NaN or inf are refused, so a diverged step never replaces a good checkpoint. A disk without
room for the new checkpoint is `DiskFull`, one message saying what is needed and what is free,
before anything is written (or, when the disk fills during the write, instead of the writer's own
error); either way the previous checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # earlier versions' pickled trainer state, refused
FORMAT_VERSION = 1
# room beyond the tensors' bytes: safetensors headers, config files, the filesystem's partly filled blocks
SPACE_MARGIN = 2**20
# how writers say that the disk is full: errno, Rust's io::ErrorKind (safetensors), the C library's text
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


class DiskFull(OSError):
    """The checkpoint's folder has no room for it; the previous checkpoint is kept."""


def find_checkpoint(path: str | Path) -> Path | None:
    """The folder to load for the checkpoint `path`: `path`, or its previous version `.<name>.old`
    when a save died between its two renames; None when there is neither."""
    path = Path(path)
    for folder in (path, _previous(path)):
        if folder.is_dir():
            return folder
    return None


def save_checkpoint(path: str | Path, policy, state: dict[str, Any]) -> None:
    """Write the policy's trainable weights and `state` as the checkpoint `path`, replacing the
    previous one only once the new one is complete on disk."""
    path = Path(path)
    layers = get_peft_model_state_dict(policy.unet) if policy.lora_rank is not None else policy.unet.state_dict()
    for name, value in layers.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"refusing to save the checkpoint {path}: the weight {name} holds NaN or inf values "
                             "(training diverged); the previous checkpoint is kept")
    tensors, tree = encode_state(state)  # before touching the disk: a state it cannot hold changes nothing
    text = json.dumps({"version": FORMAT_VERSION, "state": tree}, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    needed = checkpoint_bytes(layers, tensors, text)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise DiskFull(_full_message(path, needed, free, "has"))
    old = _previous(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        try:
            if policy.lora_rank is not None:
                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                                          safe_serialization=True)
            else:
                policy.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            save_file(tensors, tmp / TENSORS_FILE)
            (tmp / STATE_FILE).write_text(text)
            for item in [*tmp.rglob("*"), tmp]:  # the bytes reach the disk before the renames that publish them
                _fsync(item)
        except Exception as err:  # each writer words a full disk its own way
            if _out_of_space(err, tmp, needed):
                raise DiskFull(_full_message(path, needed, shutil.disk_usage(path.parent).free,
                                             f"filled up while writing it ({_first_line(err)}) and has")) from None
            raise
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_bytes(layers: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], text: str) -> int:
    """The disk space a checkpoint of these weights, state tensors and state JSON takes, with
    `SPACE_MARGIN` to spare (the previous checkpoint stays until the new one is complete, so this
    much must be free beside it)."""
    data = sum(t.numel() * t.element_size() + len(name) + 128 for part in (layers, tensors)
               for name, t in part.items())
    return data + len(text.encode()) + SPACE_MARGIN


def _out_of_space(err: BaseException, tmp: Path, needed: int) -> bool:
    """Whether a writer failed because the disk is full: it says so, or the disk now has less room
    than the part of the checkpoint not yet written (torch's writer says "unexpected pos ...")."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS or any(m in str(err) for m in FULL_MESSAGES):
        return True
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    try:
        return shutil.disk_usage(tmp).free < needed - written
    except OSError:
        return False


def _full_message(path: Path, needed: int, free: int, has: str) -> str:
    """One line: the checkpoint, the space it needs, its folder and the space free there."""
    return (f"not enough disk space to save the checkpoint {path}: it needs {_mib(needed)}, and "
            f"{path.parent} {has} {_mib(free)} free; the previous checkpoint is kept (free some space, or "
            "move the run folder to a larger disk, then run the same command to resume)")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of the checkpoint `path` (see `find_checkpoint`), without its weights."""
    folder = _require_checkpoint(path)
    if (folder / LEGACY_STATE_FILE).exists():
        raise ValueError(f"{folder} is a checkpoint of an earlier t2i-rl, whose trainer state ({LEGACY_STATE_FILE}) "
                         "is a pickle, which can run any code when loaded; it is no longer read, so this run cannot "
                         "resume (its weights still load with diffusers); start afresh in another output_dir")
    for name in (STATE_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} holds no {name}: not a complete checkpoint")
    try:
        saved = json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(folder / TENSORS_FILE)
    except (ValueError, SafetensorError) as err:  # ValueError: not UTF-8, not JSON
        raise ValueError(f"{folder} holds a trainer state that cannot be read: {err}") from None
    if not (isinstance(saved, dict) and saved.get("version") == FORMAT_VERSION and "state" in saved):
        raise ValueError(f"{folder / STATE_FILE} is not a trainer state of format {FORMAT_VERSION}, the one this "
                         "t2i-rl reads")
    return decode_state(saved["state"], tensors)


def load_checkpoint(path: str | Path, policy) -> dict[str, Any]:
    """Load the weights into the policy's UNet; return the trainer state (read first, so that a
    checkpoint that cannot resume leaves the policy untouched)."""
    folder = _require_checkpoint(path)
    state = load_trainer_state(folder)
    if policy.lora_rank is not None:
        if not (folder / LORA_FILE).exists():
            raise FileNotFoundError(f"{folder} holds no {LORA_FILE}; was the run trained with full fine-tuning?")
        raw = load_file(folder / LORA_FILE)
        unet_sd = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(policy.unet, convert_unet_state_dict_to_peft(unet_sd), "default")
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ValueError(f"checkpoint {folder} does not match the policy's LoRA layers: {missing[:3]}")
    else:
        from diffusers import UNet2DConditionModel

        if not (folder / "unet").is_dir():
            raise FileNotFoundError(f"{folder} holds no unet/; was the run trained with LoRA?")
        loaded = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        policy.unet.load_state_dict(loaded.state_dict())
    return state


# -- the trainer state as tensors + JSON -----------------------------------------------------------
def encode_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by name, a JSON-able tree): tensors and numpy arrays become {"$tensor": name} and
    {"$ndarray": name}, tuples {"$tuple": [...]}, NaN and inf {"$float": "nan"}, dicts whose keys are
    not all plain strings (an optimizer's int keys, a "$" key) {"$dict": [[key, value], ...]}.
    Anything else is refused: a checkpoint holds data, never objects to rebuild."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}  # id(tensor) -> its name: a tensor found twice is stored once

    def store(value: torch.Tensor, where: list[str]) -> str:
        if id(value) not in names:
            base = "/".join(where) or "state"
            name, n = base, 1
            while name in tensors:  # keys 0 and "0" give the same path
                n += 1
                name = f"{base}#{n}"
            # a copy of its own: tensors of one state may share storage (tied weights in a state_dict
            # are views of one parameter), which safetensors refuses to write
            tensors[name] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
            names[id(value)] = name
        return names[id(value)]

    def encode(value: Any, where: list[str]) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return {"$tensor": store(value, where)}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"cannot save the trainer state's {'/'.join(where)}: a numpy array of objects")
            return {"$ndarray": store(torch.from_numpy(np.ascontiguousarray(value)), where)}
        if isinstance(value, tuple):
            return {"$tuple": [encode(v, where + [str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, where + [str(i)]) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: encode(v, where + [k]) for k, v in value.items()}
            return {"$dict": [[encode(k, where + ["key"]), encode(v, where + [str(k)])] for k, v in value.items()]}
        raise TypeError(f"cannot save the trainer state's {'/'.join(where) or 'root'}: a {type(value).__qualname__} "
                        "is none of tensor, numpy array, dict, list, tuple, str, int, float, bool, None")

    return tensors, encode(state, [])


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state` (tensors come back on the CPU, numpy arrays as numpy arrays);
    a tree that references other tensors than `tensors` holds is refused."""
    used: set[str] = set()

    def tensor(name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"the trainer state references a tensor {name!r} that {TENSORS_FILE} does not hold")
        used.add(name)
        return tensors[name]

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        if not any(k.startswith("$") for k in node):
            return {k: decode(v) for k, v in node.items()}
        tag, payload = next(iter(node.items())) if len(node) == 1 else ("", None)
        if tag == "$tensor":
            return tensor(payload)
        if tag == "$ndarray":
            return tensor(payload).numpy()
        if tag == "$tuple" and isinstance(payload, list):
            return tuple(decode(v) for v in payload)
        if tag == "$float" and payload in ("nan", "inf", "-inf"):
            return float(payload)
        if tag == "$dict" and isinstance(payload, list) and all(isinstance(p, list) and len(p) == 2 for p in payload):
            return {_key(decode(k)): decode(v) for k, v in payload}
        raise ValueError(f"the trainer state holds an entry this version cannot read: {json.dumps(node)[:200]}")

    state = decode(tree)
    if used != set(tensors):
        raise ValueError(f"{TENSORS_FILE} holds tensors the trainer state does not reference "
                         f"({sorted(set(tensors) - used)[:3]}): the two files are of different saves")
    return state


def _key(key: Any) -> Any:
    """A decoded dict key, refused when it cannot be one (the encoder only writes keys it read)."""
    try:
        hash(key)
    except TypeError:
        raise ValueError(f"the trainer state holds a dict key {key!r} that cannot be a key") from None
    return key


# -- the switch ------------------------------------------------------------------------------------
def _previous(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _require_checkpoint(path: str | Path) -> Path:
    folder = find_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint at {path}")
    return folder


def remove_dead_saves(folder: str | Path) -> None:
    """Remove what saves that died left in the checkpoints folder `folder`: their temporary folders,
    and a `.<name>.old` beside its `<name>` (a `.<name>.old` alone is the checkpoint, and stays). The
    next save of a checkpoint does this for its own; this is for a run killed after its last save,
    whose leftovers would stay (a stale `.<name>.old` is a whole checkpoint's worth of disk). Only
    where no save is under way: the run lock's new holder calls it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    # the checkpoints there: `<name>`, or `.<name>.old` alone (other hidden entries are not ours to judge)
    folders = [p.name for p in folder.iterdir() if p.is_dir()]
    names = {n for n in folders if not n.startswith(".")} | {
        n[1:-len(".old")] for n in folders if n.startswith(".") and n.endswith(".old")}
    for name in names:
        _remove_leftovers(folder / name)


def _remove_leftovers(path: Path) -> None:
    """The temporary folders of saves that died, and `.<name>.old` when `<name>` is there (while
    `<name>` is missing, `.<name>.old` is the checkpoint and stays until the new one replaces it)."""
    previous = _previous(path)
    for leftover in path.parent.iterdir():
        if leftover.name.startswith(f".{path.name}.") and (leftover != previous or path.exists()):
            shutil.rmtree(leftover)


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
