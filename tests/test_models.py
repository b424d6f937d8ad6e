import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from t2i_rl.models import (
    SHIPPED_PIPELINES, build_pipeline, build_tokenizer, load_pipeline, save_pipeline_atomically,
)

PROMPT = "two red circles and one blue square on a white background"


def test_tokenizer_is_deterministic_and_clip_shaped(tmp_path):
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    ids = a(PROMPT).input_ids
    assert ids == b(PROMPT).input_ids
    assert ids[0] == a.bos_token_id and ids[-1] == a.eos_token_id
    assert a.model_max_length == 77
    assert a.decode(ids, skip_special_tokens=True) == PROMPT
    a.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(PROMPT).input_ids == ids
    padded = again([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert padded.shape == (2, 77)


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)


def test_from_pretrained_round_trip(tiny_pipe, tmp_path):
    save_pipeline_atomically(tiny_pipe, tmp_path / "pipe")
    for loaded in (
        StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None),
        load_pipeline(str(tmp_path / "pipe")),
    ):
        for name in ("unet", "vae", "text_encoder"):
            want = getattr(tiny_pipe, name).state_dict()
            got = getattr(loaded, name).state_dict()
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)
        assert loaded.tokenizer(PROMPT).input_ids == tiny_pipe.tokenizer(PROMPT).input_ids
    out = load_pipeline(str(tmp_path / "pipe"))(
        [PROMPT], num_inference_steps=2, guidance_scale=3.0, eta=1.0, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_atomic_save_replaces_an_existing_folder(tiny_pipe, tmp_path):
    target = tmp_path / "pipe"
    save_pipeline_atomically(tiny_pipe, target)
    save_pipeline_atomically(tiny_pipe, target)
    assert json.loads((target / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_shipped_pipeline_loads_both_ways():
    path = SHIPPED_PIPELINES["shapes"]
    pipe = load_pipeline("shapes")
    direct = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    assert pipe.unet.config.sample_size == direct.unet.config.sample_size == 16
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 25 * 2**20


def test_missing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises((OSError, FileNotFoundError), match="nowhere"):
        load_pipeline(str(tmp_path / "nowhere"))
