import pytest
import torch

from t2i_rl.rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ShapesCLIP


def test_preprocessing_uses_openai_constants_and_the_model_size(clip):
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.preprocess(x), (x - mean) / std)
    # other sizes are resized (bilinear, antialiased) to the model's image size
    assert clip.image_size == 32
    big = torch.rand(2, 3, 64, 64)
    assert clip.preprocess(big).shape == (2, 3, 32, 32)
    flat = torch.full((1, 3, 64, 64), 0.5)  # a constant image stays constant through the resize
    torch.testing.assert_close(clip.preprocess(flat), (0.5 - mean) / std * torch.ones(1, 3, 32, 32))


def test_config_matches_the_tokenizer(clip, tokenizer):
    text = clip.model.config.text_config
    assert text.vocab_size == len(tokenizer)
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    vision = clip.model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (32, 4)
    assert clip.embed_dim == 16 and clip.name == "clip" and clip.differentiable


def test_embeddings_are_normalized_and_scores_are_cosines(clip, batch):
    images, prompts = batch
    img, txt = clip.image_embeds(images), clip.text_embeds(prompts)
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    out = clip(images, prompts)
    torch.testing.assert_close(out.scores, (img * txt).sum(-1))
    assert out.scores.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(out.components["rm/clip"], out.scores)


def test_gradients_reach_the_image_but_not_the_weights(clip, batch):
    images, prompts = batch
    x = images.clone().requires_grad_(True)
    clip(x, prompts).scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.model.parameters())


def test_score_prompts_shape_and_agreement_with_call(clip, batch, world):
    images, prompts = batch
    sets = [[p] + world.contrastive(p, k=2, seed=i) for i, p in enumerate(prompts)]
    scores = clip.score_prompts(images, sets)
    assert scores.shape == (4, 3)
    torch.testing.assert_close(scores[:, 0], clip(images, prompts).scores, rtol=1e-5, atol=1e-6)
    # each column is the image scored against that prompt alone
    torch.testing.assert_close(scores[:, 2], clip(images, [s[2] for s in sets]).scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same length"):
        clip.score_prompts(images, [sets[0], sets[1][:2], sets[2], sets[3]])
    with pytest.raises(ValueError, match="4 images for 3 prompt sets"):
        clip.score_prompts(images, sets[:3])


def test_text_cache_matches_fresh_encoding_and_deduplicates(clip, batch):
    _, prompts = batch
    clip._cache.clear()
    twice = clip.text_embeds(prompts + prompts[::-1])
    assert len(clip._cache) == len(set(prompts))
    torch.testing.assert_close(twice[:4], twice[4:].flip(0))
    with torch.no_grad():
        fresh = clip._encode_text(prompts)
    torch.testing.assert_close(twice[:4], fresh, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_is_exact(clip, batch, tmp_path):
    images, prompts = batch
    clip.save_pretrained(tmp_path / "clip")
    loaded = ShapesCLIP.from_pretrained(tmp_path / "clip")
    assert loaded.frozen
    assert torch.equal(loaded(images, prompts).scores, clip(images, prompts).scores)
    assert loaded.tokenizer(prompts).input_ids == clip.tokenizer(prompts).input_ids
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        ShapesCLIP.from_pretrained(tmp_path / "nothing")


def test_text_cache_encodes_each_prompt_once_in_chunks_and_empties_when_full():
    from t2i_rl.rewards._common import TextCache

    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        return torch.tensor([[float(len(p))] for p in prompts])

    cache = TextCache(size=3, chunk=2)
    out = cache(["a", "bb", "a", "ccc"], encode, torch.device("cpu"))
    assert out.squeeze(1).tolist() == [1.0, 2.0, 1.0, 3.0]
    assert calls == [["a", "bb"], ["ccc"]] and len(cache) == 3
    cache(["bb"], encode, torch.device("cpu"))
    assert len(calls) == 2  # kept: not encoded again
    cache(["dddd"], encode, torch.device("cpu"))  # a 4th prompt would pass the size: emptied first
    assert calls[-1] == ["dddd"] and len(cache) == 1
    none = TextCache(size=0)
    none(["a", "a"], encode, torch.device("cpu"))
    assert calls[-1] == ["a"] and len(none) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"^cache_size must be an int >= 0, got"):
            TextCache(size=bad)
