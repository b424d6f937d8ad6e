"""The published reward models on tiny random instances of their real architectures, saved to
folders and loaded back through `make_reward`, as a user's downloaded weights would be."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import (
    Blip2ForImageTextRetrieval, BlipImageProcessorPil, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer,
)

from t2i_rl.models import build_tokenizer
from t2i_rl.rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Ensemble, TextNorm, make_reward, reward_names
from t2i_rl.rewards.pretrained import (
    IMAGEREWARD_MEAN, IMAGEREWARD_STD, PRETRAINED, ImageRewardModel, RewardMLP, clip_from_open_clip,
    convert_open_clip_state_dict, save_tiny_reward,
)
from t2i_rl.rewards.pretrained.imagereward import UNUSED, convert_original_state_dict
from t2i_rl.rewards.pretrained.tiny import bert_tokenizer

NAMES = ["clipscore", "pickscore", "imagereward", "hpsv2", "blip2", "aesthetic"]
CLIP_FAMILY = ["clipscore", "pickscore", "hpsv2", "aesthetic"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{name: folder} of tiny random models in the layout each from_pretrained reads."""
    root = tmp_path_factory.mktemp("pretrained")
    return {name: str(save_tiny_reward(name, root / name, seed=i)) for i, name in enumerate(NAMES)}


@pytest.fixture(scope="module")
def rewards(tiny):
    return {name: make_reward({"name": name, "path": tiny[name]}) for name in NAMES}


def smooth_image(h: int, w: int, seed: int) -> torch.Tensor:
    """A [1, 3, h, w] image in [0, 1] on the 8-bit grid (so PIL sees exactly the same pixels)."""
    x = F.interpolate(torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed)), size=(h, w),
                      mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy())


# ------------------------------------------------------------------------------------- registry
def test_every_name_is_registered_and_loads_its_class(rewards):
    assert set(NAMES) <= set(reward_names())
    for name in NAMES:
        assert isinstance(rewards[name], PRETRAINED[name]) and rewards[name].name == name
        assert rewards[name].differentiable and not rewards[name].model.training
        assert not any(p.requires_grad for p in rewards[name].model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_bad_paths_and_options_are_named(tmp_path, name):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        make_reward({"name": name, "path": str(missing)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        make_reward({"name": name, "path": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="unknown dtype 'float64'; allowed: float32, float16, bfloat16"):
        make_reward({"name": name, "path": str(missing), "dtype": "float64"})
    with pytest.raises(ValueError, match=f"unknown keys \\['bogus'\\] for reward '{name}'"):
        make_reward({"name": name, "bogus": 1})


def test_blip2_mode_must_be_known(tiny):
    with pytest.raises(ValueError, match="unknown BLIP-2 mode 'match'; allowed: itm, itc"):
        make_reward({"name": "blip2", "path": tiny["blip2"], "mode": "match"})


# -------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_constants(rewards, name):
    t = rewards[name].transform
    # BLIP's processor defaults are the same numbers as OpenAI CLIP's (transformers' own configs)
    assert tuple(BlipImageProcessorPil().image_mean) == tuple(CLIPImageProcessorPil().image_mean) == OPENAI_CLIP_MEAN
    assert tuple(BlipImageProcessorPil().image_std) == tuple(CLIPImageProcessorPil().image_std) == OPENAI_CLIP_STD
    assert (t.mean, t.std, t.mode, t.size) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", (32, 32))
    # BLIP-2 resizes to a square; the others resize the shortest side and center-crop
    assert t.shortest_edge == (None if name == "blip2" else 32)


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_equals_the_transformers_processor(rewards, tiny, name):
    if name == "imagereward":  # its torchvision transform: Resize(n, bicubic), CenterCrop(n), CLIP's Normalize
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        processor = (BlipImageProcessorPil if name == "blip2" else CLIPImageProcessorPil).from_pretrained(tiny[name])
    for seed, (h, w) in enumerate([(40, 57), (97, 80), (20, 24), (32, 32)]):
        x = smooth_image(h, w, seed)
        ref = processor(to_pil(x), return_tensors="pt")["pixel_values"]
        out = rewards[name].preprocess(x)
        assert out.shape == ref.shape == (1, 3, 32, 32)
        # PIL rounds to 8 bits after each of its two resize passes: about 1/255 / std apart
        torch.testing.assert_close(out, ref, atol=0.03, rtol=0)


# ------------------------------------------------------------------------------ shapes, gradients
@pytest.mark.parametrize("name", NAMES)
def test_shapes_components_and_gradients(rewards, world, name):
    reward = rewards[name]
    prompts = world.sample_prompts(3, seed=5)
    images = torch.cat([smooth_image(48, 40, s) for s in range(3)]).requires_grad_(True)
    out = reward(images, prompts)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    torch.testing.assert_close(out.components[f"rm/{name}"], out.scores.detach())
    sets = [[p] + world.contrastive(p, k=3, seed=i) for i, p in enumerate(prompts)]
    scores = reward.score_prompts(images, sets)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:, 0], out.scores, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())
    assert reward.score_prompts(images[:0], []).shape == (0, 0)


def test_bfloat16_weights_take_float32_images(tiny, world):
    reward = make_reward({"name": "pickscore", "path": tiny["pickscore"], "dtype": "bfloat16"})
    assert reward.dtype == torch.bfloat16
    x = smooth_image(32, 32, 0).requires_grad_(True)
    score = reward(x, world.sample_prompts(1, seed=0)).scores
    assert score.dtype == torch.float32 and torch.isfinite(score).all()
    (grad,) = torch.autograd.grad(score.sum(), x)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


# ----------------------------------------------------------------------- the published formulas
@pytest.mark.parametrize("name, scale", [("clipscore", 2.5), ("pickscore", None), ("hpsv2", 100.0)])
def test_clip_scores_against_clipmodel_forward(rewards, tiny, world, name, scale):
    """CLIPModel's own logits_per_image are logit_scale.exp() * cos."""
    reward, model = rewards[name], CLIPModel.from_pretrained(tiny[name]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny[name])
    prompts = world.sample_prompts(4, seed=2)
    images = torch.cat([smooth_image(32, 32, s) for s in range(4)])
    with torch.no_grad():
        tok = tokenizer(prompts, padding=True, return_tensors="pt")
        logits = model(pixel_values=reward.preprocess(images), **tok).logits_per_image  # [4 images, 4 prompts]
        scores = reward.score_prompts(images, [prompts] * 4)
    exp_scale = model.logit_scale.exp()
    cos = logits / exp_scale
    expected = {"clipscore": 2.5 * cos.clamp_min(0), "pickscore": logits, "hpsv2": 100 * cos}[name]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert reward.scale == pytest.approx(scale or exp_scale.item())
    # TextNorm at the default tau is the model's own softmax over the prompts
    assert reward.default_tau == pytest.approx(reward.scale / exp_scale.item())
    if name == "clipscore":
        assert (cos > 0).any() and (scores >= 0).all() and (scores <= 2.5).all()


@pytest.mark.parametrize("mode", ["itm", "itc"])
def test_blip2_against_its_transformers_forward(tiny, world, mode):
    reward = make_reward({"name": "blip2", "path": tiny["blip2"], "mode": mode})
    model = Blip2ForImageTextRetrieval.from_pretrained(tiny["blip2"]).eval()
    prompts = world.sample_prompts(3, seed=4)
    images = torch.cat([smooth_image(40, 40, s) for s in range(3)])
    tok = reward.tokenizer(prompts, padding=True, truncation=True, max_length=32, return_tensors="pt")  # LAVIS's 32
    with torch.no_grad():
        scores = reward.score_prompts(images, [prompts] * 3)  # [3 images, 3 prompts]
        for i in range(3):
            pixels = reward.preprocess(images[i:i + 1]).expand(3, -1, -1, -1)
            out = model(pixel_values=pixels, input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                        use_image_text_matching_head=mode == "itm").logits_per_image
            # itm: [pairs, 2] logits; itc: [images, texts] cosines
            expected = out.softmax(-1)[:, 1] if mode == "itm" else out[0]
            torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all() if mode == "itm" else (scores.abs() <= 1 + 1e-6).all()


def test_imagereward_is_the_normalized_linear_mlp_of_the_cls_feature(rewards, world):
    reward = rewards["imagereward"]
    model = reward.model
    # the head has no activations: it is one affine map of the [CLS] feature
    h = torch.randn(5, model.config.text_config.hidden_size)
    w, b = torch.eye(h.shape[1]), torch.zeros(h.shape[1])
    for layer in model.mlp.layers:
        if isinstance(layer, nn.Linear):
            w, b = w @ layer.weight.T, b @ layer.weight.T + layer.bias
    with torch.no_grad():
        torch.testing.assert_close(model.mlp(h), (h @ w + b).squeeze(-1), rtol=1e-4, atol=1e-5)
    prompts = world.sample_prompts(2, seed=1)
    images = torch.cat([smooth_image(32, 32, s) for s in range(2)])
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=reward.preprocess(images)).last_hidden_state
        tok = reward.tokenizer(prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
        raw = model(tokens, tok.input_ids, tok.attention_mask)  # padded to 35 as ImageReward does
        scores = reward(images, prompts).scores
    assert (IMAGEREWARD_MEAN, IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    torch.testing.assert_close(scores, (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, rtol=1e-5, atol=1e-5)


def test_aesthetic_is_the_mlp_of_the_normalized_clip_embedding_for_every_prompt(rewards, tiny, world):
    reward = rewards["aesthetic"]
    clip = CLIPModel.from_pretrained(tiny["aesthetic"]).eval()
    head = load_file(f"{tiny['aesthetic']}/aesthetic_head.safetensors")
    images = torch.cat([smooth_image(36, 36, s) for s in range(3)])
    with torch.no_grad():
        emb = F.normalize(clip.get_image_features(pixel_values=reward.preprocess(images)).pooler_output, dim=-1)
        x = emb
        for i in (0, 2, 4, 6, 7):  # Linear layers; 1, 3, 5 are dropout
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
        scores = reward.score_prompts(images, [world.sample_prompts(4, seed=s) for s in range(3)])
    assert scores.shape == (3, 4)
    torch.testing.assert_close(scores, x.expand(3, 4), rtol=1e-5, atol=1e-5)


def test_aesthetic_head_loads_from_a_pth_file(tiny, tmp_path):
    mlp = RewardMLP(16)
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = make_reward({"name": "aesthetic", "path": tiny["aesthetic"], "head": str(tmp_path)})
    assert all(torch.equal(a, b) for a, b in zip(reward.model.head.state_dict().values(), mlp.state_dict().values()))
    torch.save({"layers.0.weight": torch.zeros(1024, 8)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        make_reward({"name": "aesthetic", "path": tiny["aesthetic"], "head": str(tmp_path / "bad.pth")})


# ------------------------------------------------------------------------------------ composers
def test_textnorm_and_ensembles_over_published_models(rewards, world):
    prompts = world.sample_prompts(3, seed=7)
    images = torch.cat([smooth_image(32, 32, s) for s in range(3)]).requires_grad_(True)
    for name in NAMES:
        tn = TextNorm(rewards[name], tau=rewards[name].default_tau, k=4)
        out = tn(images, prompts)
        assert out.scores.shape == (3,) and ((out.scores > 0) & (out.scores <= 1)).all()
        sets = [[p] + tn.contrastive_prompts(p) for p in prompts]
        with torch.no_grad():
            raw = rewards[name].score_prompts(images, sets)
        probs = (raw / rewards[name].default_tau).softmax(dim=1)  # the whole set's confidences sum to 1
        torch.testing.assert_close(out.scores.detach(), probs[:, 0], rtol=1e-4, atol=1e-5)
        if name == "aesthetic":  # prompt-independent: the confidence is 1/K for every image
            torch.testing.assert_close(out.scores.detach(), torch.full((3,), 1 / len(sets[0])))
    members = [rewards[n] for n in ("clipscore", "imagereward", "blip2")]
    ens = Ensemble(members, mode="mean_minus_std", lam=0.5)
    out = ens(images, prompts)
    assert out.scores.shape == (3,) and {f"rm/{m.name}" for m in members} <= set(out.components)
    tn = TextNorm(ens, tau={"clipscore": 0.05, "imagereward": 1.0, "blip2": 0.1}, k=3)
    out = tn(images, prompts)
    for m in members:
        conf = out.components[f"textnorm/{m.name}"]
        assert conf.shape == (3,) and ((conf > 0) & (conf <= 1)).all()
    (grad,) = torch.autograd.grad(out.scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_textnorm_spec_with_a_published_base(tiny, world):
    prompts = world.sample_prompts(2, seed=3)
    tn = make_reward({"name": "textnorm", "base": {"name": "hpsv2", "path": tiny["hpsv2"]}, "k": 2})
    out = tn(torch.cat([smooth_image(32, 32, s) for s in range(2)]), prompts)
    assert out.scores.shape == (2,) and {"rm/hpsv2", "textnorm/hpsv2", "textnorm/confidence"} <= set(out.components)


# ------------------------------------------------------------------------ open_clip -> CLIPModel
def open_clip_state_dict(seed=0, width=32, text_width=24, layers=2, vocab=50, ctx=12, patch=8, grid=3, embed=16):
    """A random state dict in open_clip's CLIP layout (as HPSv2's checkpoint holds it)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def blocks(prefix, w):
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out.update({
                p + "ln_1.weight": 1 + t(w), p + "ln_1.bias": t(w), p + "attn.in_proj_weight": t(3 * w, w),
                p + "attn.in_proj_bias": t(3 * w), p + "attn.out_proj.weight": t(w, w), p + "attn.out_proj.bias": t(w),
                p + "ln_2.weight": 1 + t(w), p + "ln_2.bias": t(w), p + "mlp.c_fc.weight": t(4 * w, w),
                p + "mlp.c_fc.bias": t(4 * w), p + "mlp.c_proj.weight": t(w, 4 * w), p + "mlp.c_proj.bias": t(w),
            })
        return out

    sd = {
        "visual.class_embedding": t(width), "visual.positional_embedding": t(grid * grid + 1, width),
        "visual.proj": t(width, embed), "visual.conv1.weight": t(width, 3, patch, patch),
        "visual.ln_pre.weight": 1 + t(width), "visual.ln_pre.bias": t(width),
        "visual.ln_post.weight": 1 + t(width), "visual.ln_post.bias": t(width),
        "token_embedding.weight": t(vocab, text_width), "positional_embedding": t(ctx, text_width),
        "ln_final.weight": 1 + t(text_width), "ln_final.bias": t(text_width),
        "text_projection": t(text_width, embed), "logit_scale": torch.tensor(4.6052),
    }
    sd.update(blocks("visual.", width))
    sd.update(blocks("", text_width))
    return sd


def open_clip_tower(x, sd, prefix, heads, mask=None):
    """open_clip's residual attention blocks, with torch's nn.MultiheadAttention as open_clip uses."""
    w = x.shape[-1]
    i = 0
    while f"{prefix}transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"{prefix}transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(w, heads, batch_first=True)
        attn.load_state_dict({k: sd[p + "attn." + k] for k in
                              ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return x


def open_clip_features(sd, pixels, ids, vision_heads, text_heads):
    """open_clip's encode_image and encode_text (unnormalized), written out from its layout."""
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    w = x.shape[-1]
    x = open_clip_tower(F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]), sd, "visual.",
                        vision_heads)
    img = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = open_clip_tower(t, sd, "", text_heads, causal)
    tw = t.shape[-1]
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
    return img, txt


def test_open_clip_conversion_uses_every_key_and_computes_the_same_features():
    sd = open_clip_state_dict()
    converted = convert_open_clip_state_dict(sd)
    in_proj = [k for k in sd if "in_proj" in k]
    assert len(converted) == len(sd) + 2 * len(in_proj)  # each packed q,k,v becomes three tensors
    w = sd["visual.transformer.resblocks.0.attn.in_proj_weight"]
    q, k, v = (converted[f"vision_model.encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), w)
    assert torch.equal(converted["text_projection.weight"], sd["text_projection"].T)
    model = clip_from_open_clip(sd, vision_heads=2, text_heads=3)
    assert all(p.device.type == "cpu" for p in model.parameters())
    vc, tc = model.config.vision_config, model.config.text_config
    assert (vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers) == (24, 8, 32, 2)
    assert (tc.vocab_size, tc.max_position_embeddings, tc.eos_token_id) == (50, 12, 49)
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[48, 5, 7, 49, 0, 0], [48, 9, 3, 11, 2, 49]])  # end-of-text = the largest id
    ref_img, ref_txt = open_clip_features(sd, pixels, ids, 2, 3)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(img, ref_img, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-4, atol=1e-4)
    assert model.logit_scale.item() == pytest.approx(4.6052)
    with pytest.raises(ValueError, match="visual.transformer.resblocks.0.ls_1.gamma"):
        convert_open_clip_state_dict({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})


def test_hpsv2_loads_an_open_clip_checkpoint_folder(tmp_path, world):
    tokenizer = build_tokenizer()
    sd = open_clip_state_dict(vocab=len(tokenizer), ctx=77, grid=4)  # 32x32 images
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "HPS_v2_compressed.pt")
    tokenizer.save_pretrained(tmp_path)
    reward = make_reward({"name": "hpsv2", "path": str(tmp_path)})
    prompts = world.sample_prompts(2, seed=8)
    images = torch.cat([smooth_image(32, 32, s) for s in range(2)])
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # open_clip pools at the largest id, HF at the first eos
    ids = tokenizer(prompts, padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img, txt = open_clip_features(sd, reward.preprocess(images), ids, 1, 1)  # width 32 and 24: one head each
        scores = reward(images, prompts).scores
    torch.testing.assert_close(scores, 100 * F.cosine_similarity(img, txt), rtol=1e-4, atol=1e-3)
    assert reward.transform.shortest_edge == 32  # no processor config: OpenAI CLIP's preprocessing


# ------------------------------------------------------------ original ImageReward checkpoint
MED_CONFIG = {"vocab_size": 111, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "pad_token_id": 0, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
              "add_cross_attention": True, "encoder_width": 768, "model_type": "bert", "type_vocab_size": 2}


def imagereward_state_dict(seed=0, width=64, layers=2, patch=8, grid=4, text=MED_CONFIG):
    """A random state dict in the original ImageReward layout (BLIP_Pretrain + MLP)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    v, tw = "blip.visual_encoder.", text["hidden_size"]
    sd = {v + "cls_token": t(1, 1, width), v + "pos_embed": t(1, grid * grid + 1, width),
          v + "patch_embed.proj.weight": t(width, 3, patch, patch), v + "patch_embed.proj.bias": t(width),
          v + "norm.weight": 1 + t(width), v + "norm.bias": t(width)}
    for i in range(layers):
        p = f"{v}blocks.{i}."
        for name, shape in {"norm1": (width,), "attn.qkv": (3 * width, width), "attn.proj": (width, width),
                            "norm2": (width,), "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width)}.items():
            sd[f"{p}{name}.weight"] = t(*shape)
            sd[f"{p}{name}.bias"] = t(shape[0])
    e = "blip.text_encoder."
    sd.update({e + "embeddings.word_embeddings.weight": t(text["vocab_size"], tw),
               e + "embeddings.position_embeddings.weight": t(text["max_position_embeddings"], tw),
               e + "embeddings.LayerNorm.weight": 1 + t(tw), e + "embeddings.LayerNorm.bias": t(tw),
               e + "embeddings.position_ids": torch.arange(text["max_position_embeddings"])[None]})
    for i in range(text["num_hidden_layers"]):
        p = f"{e}encoder.layer.{i}."
        for att, kv_in in (("attention", tw), ("crossattention", width)):
            for name, shape in {"self.query": (tw, tw), "self.key": (tw, kv_in), "self.value": (tw, kv_in),
                                "output.dense": (tw, tw), "output.LayerNorm": (tw,)}.items():
                sd[f"{p}{att}.{name}.weight"] = t(*shape)
                sd[f"{p}{att}.{name}.bias"] = t(shape[0])
        for name, shape in {"intermediate.dense": (text["intermediate_size"], tw),
                            "output.dense": (tw, text["intermediate_size"]), "output.LayerNorm": (tw,)}.items():
            sd[f"{p}{name}.weight"] = t(*shape)
            sd[f"{p}{name}.bias"] = t(shape[0])
    sd.update({"blip.vision_proj.weight": t(16, width), "blip.vision_proj.bias": t(16),
               "blip.text_proj.weight": t(16, tw), "blip.text_proj.bias": t(16)})
    widths = (tw, 1024, 128, 64, 16, 1)
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = t(b, a) / a ** 0.5, t(b)
    return sd


def blip_vit(sd, pixels, heads):
    """BLIP's timm-style ViT forward (all tokens after the final LayerNorm), from its layout."""
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"],
                 stride=sd[v + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"]
    b, n, c = x.shape
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, val = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, val).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        i += 1
    return F.layer_norm(x, (c,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)


def test_imagereward_original_keys_map_onto_the_blip_modules():
    sd = imagereward_state_dict()
    converted = convert_original_state_dict(sd)
    assert set(UNUSED) <= set(sd)
    assert len(converted) == len(sd) - len(UNUSED)  # every other key is used, once
    by_id = {id(v): k for k, v in sd.items()}
    assert all(id(v) in by_id for v in converted.values())  # tensors moved as they are
    model = ImageRewardModel.from_original(sd, MED_CONFIG)  # strict: nothing missing, nothing left over
    state = model.state_dict()
    assert set(state) == set(converted)
    assert all(torch.equal(state[k], v) for k, v in converted.items())
    assert torch.equal(state["vision_model.encoder.layers.1.self_attn.projection.weight"],
                       sd["blip.visual_encoder.blocks.1.attn.proj.weight"])
    assert torch.equal(state["text_encoder.encoder.layer.0.crossattention.self.key.weight"],
                       sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    vc = model.config.vision_config
    assert (vc.image_size, vc.patch_size, vc.num_attention_heads, vc.layer_norm_eps) == (32, 8, 1, 1e-6)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(tokens, blip_vit(sd, pixels, heads=1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="blip.itm_head.weight"):
        convert_original_state_dict({**sd, "blip.itm_head.weight": torch.zeros(2, 32)})
    missing = dict(sd)
    del missing["mlp.layers.7.bias"]
    with pytest.raises(ValueError, match="mlp.layers.7.bias"):
        ImageRewardModel.from_original(missing, MED_CONFIG)


def test_imagereward_loads_the_original_checkpoint_layout(tmp_path, world):
    tokenizer = bert_tokenizer()
    assert len(tokenizer) <= MED_CONFIG["vocab_size"]
    sd = imagereward_state_dict()
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    tokenizer.save_pretrained(tmp_path)
    reward = make_reward({"name": "imagereward", "path": str(tmp_path)})
    model = ImageRewardModel.from_original(sd, MED_CONFIG)
    prompts = world.sample_prompts(2, seed=6)
    images = torch.cat([smooth_image(40, 36, s) for s in range(2)])
    tok = tokenizer(prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        raw = model(blip_vit(sd, reward.preprocess(images), heads=1), tok.input_ids, tok.attention_mask)
        scores = reward(images, prompts).scores
    torch.testing.assert_close(scores, (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, rtol=1e-4, atol=1e-4)
    # the .pt file itself also loads (med_config.json and the tokenizer beside it)
    again = make_reward({"name": "imagereward", "path": str(tmp_path / "ImageReward.pt")})
    with torch.no_grad():
        torch.testing.assert_close(again(images, prompts).scores, scores)
    # saved in the transformers layout, it loads without converting
    reward.save_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "config.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(make_reward({"name": "imagereward", "path": str(tmp_path / "converted")})(
            images, prompts).scores, scores)
