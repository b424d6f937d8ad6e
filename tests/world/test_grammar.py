import pytest

from t2i_rl.world import ShapesWorld, parse_prompt
from t2i_rl.world.grammar import (
    BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, all_scenes, contrastive_scenes, split_scenes,
)


def test_palette_sizes_meet_the_spec():
    assert len(OBJECT_COLORS) >= 6 and len(SHAPES) >= 3 and len(BACKGROUND_COLORS) >= 4


def test_parse_round_trips_every_scene():
    single, double = all_scenes()
    for scene in single + double[::37]:
        assert parse_prompt(scene.text()) == scene


def test_parse_two_object_prompt():
    scene = parse_prompt("two red circles and one blue square on a white background")
    assert [(g.count, g.color, g.shape) for g in scene.groups] == [(2, "red", "circle"), (1, "blue", "square")]
    assert scene.background == "white"


@pytest.mark.parametrize("prompt, word", [
    ("one teal circle on a white background", "teal"),
    ("one red hexagon on a white background", "hexagon"),
    ("five red circles on a white background", "five"),
    ("one red circle on a plaid background", "plaid"),
    ("two red circle on a white background", "circles"),
])
def test_bad_words_name_the_word_and_the_allowed_ones(prompt, word):
    with pytest.raises(ValueError, match=word):
        parse_prompt(prompt)


def test_unparseable_prompt_gives_an_example():
    with pytest.raises(ValueError, match="expected e.g."):
        parse_prompt("a photo of a cat")


def test_splits_are_disjoint_and_heldout_is_about_15_percent():
    train = set(ShapesWorld().prompts("train"))
    held = set(ShapesWorld().prompts("heldout"))
    assert not train & held
    frac = len(held) / (len(train) + len(held))
    assert 0.10 < frac < 0.20
    assert all(p in held for p in ShapesWorld().sample_prompts(200, seed=3, split="heldout"))
    with pytest.raises(ValueError, match="split"):
        ShapesWorld().sample_prompts(2, split="test")


def test_heldout_single_scenes_still_cover_every_attribute_value():
    single, _ = split_scenes("heldout")
    assert {s.background for s in single} == set(BACKGROUND_COLORS)
    assert {s.groups[0].color for s in single} == set(OBJECT_COLORS)


def test_sampling_is_seeded():
    w = ShapesWorld()
    assert w.sample_prompts(20, seed=1) == w.sample_prompts(20, seed=1)
    assert w.sample_prompts(20, seed=1) != w.sample_prompts(20, seed=2)


def test_contrastive_prompts_differ_in_exactly_one_attribute():
    w = ShapesWorld()
    prompt = "two red circles on a white background"
    alts = w.contrastive(prompt)
    # 3 other counts + 5 colours + 2 shapes + 3 backgrounds
    assert len(alts) == 3 + 5 + 2 + 3 and prompt not in alts
    assert "three red circles on a white background" in alts
    assert "two red circles on a pink background" in alts
    sampled = w.contrastive(prompt, k=4, seed=0)
    assert len(sampled) == 4 and set(sampled) <= set(alts)


def test_two_object_contrastives_include_binding_swaps_and_stay_valid():
    scene = parse_prompt("one red circle and two blue squares on a gray background")
    attrs = {a for a, _ in contrastive_scenes(scene)}
    assert attrs == {"count", "color", "shape", "background", "binding"}
    binding = [s.text() for a, s in contrastive_scenes(scene) if a == "binding"]
    assert binding == ["one blue circle and two red squares on a gray background"]
    # counts that would overfill the scene (3 + 2 > 4) are not offered
    assert all(s.n_objects <= 4 for _, s in contrastive_scenes(scene))
