"""Free-text prompt sets for the environments: file:PATH and the sets shipped in assets/prompts."""

import json

import numpy as np
import pytest
import torch

from envs import DenoiseVectorEnv, fixed_prompts, heldout_counterpart, make_prompt_source, training_eval_prompts
from t2i_rl.models import build_pipeline
from t2i_rl.prompts import PROMPT_ASSETS, load_prompt_file, shipped_prompt_sets
from t2i_rl.rewards import ShapesCLIP, TextNorm
from t2i_rl.rewards.contrastive import RuleContrastive


def draw(source, n=64, seed=0):
    return make_prompt_source(source)(n, np.random.default_rng(seed))


def test_shipped_sets_are_ddpo_style_animals_and_activities():
    assert shipped_prompt_sets() == ["activities", "animals", "shapes-16", "shapes-agree-16"]
    animals = load_prompt_file(PROMPT_ASSETS / "animals.txt")
    activities = load_prompt_file(PROMPT_ASSETS / "activities.txt")
    assert 40 <= len(animals) <= 50 and 45 <= len(activities) <= 55
    assert len(set(animals)) == len(animals) and len(set(activities)) == len(activities)
    assert all(p.startswith(("a photo of a ", "a photo of an ")) for p in animals)
    assert "a photo of an elephant" in animals and "a raccoon riding a bike" in activities
    drawn = draw("animals")
    assert len(drawn) == 64 and set(drawn) <= set(animals) and len(set(drawn)) > 10
    assert set(draw("activities")) <= set(activities)


@pytest.mark.parametrize("name", ["shapes-16", "shapes-agree-16"])
def test_the_fixed_sets_are_16_distinct_training_prompts_of_two_objects(name):
    from t2i_rl.world import parse_prompt
    from t2i_rl.world.grammar import is_heldout

    prompts = load_prompt_file(PROMPT_ASSETS / f"{name}.txt")
    assert len(prompts) == len(set(prompts)) == 16
    scenes = [parse_prompt(p) for p in prompts]  # every prompt is in the grammar
    assert all(len(s.groups) == 2 and not is_heldout(s) for s in scenes)  # never a held-out prompt
    assert [s.text() for s in scenes] == prompts  # canonical text, as the judge and TextNorm read it
    assert heldout_counterpart(name) == "composition-heldout"
    assert heldout_counterpart("composition-train") == "composition-heldout"
    assert heldout_counterpart("animals") is None


def test_training_evaluation_takes_a_fixed_set_in_turn_and_draws_a_grammar_set():
    fixed = load_prompt_file(PROMPT_ASSETS / "shapes-16.txt")
    assert fixed_prompts("shapes-16") == fixed and fixed_prompts(["a", "b"]) == ["a", "b"]
    assert fixed_prompts("composition-train") is None
    evaluated = training_eval_prompts(make_prompt_source("shapes-16"), "shapes-16", 256, seed=0)
    assert evaluated == fixed * 16  # each prompt 16 times, in the file's order
    source = make_prompt_source("composition-train")
    drawn = training_eval_prompts(source, "composition-train", 16, seed=5)
    assert drawn == training_eval_prompts(source, "composition-train", 16, seed=5)  # fixed for a seed
    assert drawn == source(16, np.random.default_rng(5))


def test_file_sources_read_txt_and_json(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("# my prompts\na cat on a mat\n\n  a dog in the fog  \n")
    listed = tmp_path / "mine.json"
    listed.write_text(json.dumps(["a red car", "two blue birds"]))
    assert set(draw(f"file:{txt}")) == {"a cat on a mat", "a dog in the fog"}
    assert set(draw(f"file:{listed}")) == {"a red car", "two blue birds"}
    assert draw(f"file:{txt}", seed=3) == draw(f"file:{txt}", seed=3)


@pytest.mark.parametrize("name, content, error, match", [
    ("missing.txt", None, FileNotFoundError, "prompt file .*missing.txt does not exist"),
    ("empty.txt", "# nothing\n\n", ValueError, "empty.txt holds no prompts"),
    ("bad.json", "{oops", ValueError, "bad.json: not valid JSON"),
    ("dict.json", '{"a": "b"}', ValueError, "dict.json: expected a JSON list of prompts, got a dict"),
    ("mixed.json", '["a cat", 7]', ValueError, "mixed.json: item #1 must be a non-empty string, got 7"),
    ("prompts.csv", "a cat\n", ValueError, r"must be a .txt .* or a .json list, got '.csv'"),
])
def test_bad_prompt_files_are_named(tmp_path, name, content, error, match):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(error, match=match):
        make_prompt_source(f"file:{tmp_path / name}")


def test_an_unknown_name_lists_every_allowed_source():
    with pytest.raises(ValueError, match="unknown prompt source 'zoo'") as err:
        make_prompt_source("zoo")
    for name in ("shapes-train", "shapes-heldout", "animals", "activities", "file:PATH"):
        assert name in str(err.value)


def test_shapes_sets_are_unchanged():
    drawn = draw("shapes-heldout", n=8)
    assert all(p.endswith("background") for p in drawn)


def test_an_episode_on_free_text_prompts_with_rule_based_textnorm():
    """The judge reads only ShapesWorld prompts, so free text runs with gold=None."""
    pipe = build_pipeline(text_hidden_size=32, vae_channels=(16, 32), unet_channels=(16, 32), seed=0)
    reward = TextNorm(ShapesCLIP.build(seed=0), contrastive=RuleContrastive(k=4), tau=0.05)
    env = DenoiseVectorEnv(num_envs=3, pipeline=pipe, reward=reward, prompts="activities", num_steps=2, gold=None)
    policy = env.policy(lora_rank=None)
    obs, info = env.reset(seed=0)
    assert set(info["prompt"]) <= set(load_prompt_file(PROMPT_ASSETS / "activities.txt"))
    for i in range(2):
        action, _ = policy.sample_step(obs["latents"], i, obs["prompt_embeds"])
        obs, rewards, terminated, _, info = env.step(action)
    assert terminated.all() and ((rewards > 0) & (rewards < 1)).all()
    assert torch.equal(info["reward/textnorm/confidence"], rewards)
    assert all(len(reward.contrastive_prompts(p)) == 4 for p in info["prompt"])
