"""Contrastive prompts for free text: rules, a language model, JSON files, and TextNorm's wiring."""

import json

import pytest
import torch

from t2i_rl.rewards import TextNorm, make_reward
from t2i_rl.rewards.contrastive import (
    COLORS,
    FEW_SHOT,
    JsonContrastive,
    LMContrastive,
    RuleContrastive,
    load_contrastive_sets,
    make_contrastive,
    parse_lines,
    pluralize,
    singularize,
)
from t2i_rl.world import ShapesWorld

RULES = RuleContrastive()


def norm(text):
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------------------------
# Rules


@pytest.mark.parametrize("singular, plural", [
    ("dog", "dogs"), ("mouse", "mice"), ("sheep", "sheep"), ("puppy", "puppies"), ("bus", "buses"),
    ("box", "boxes"), ("knife", "knives"), ("teddy bear", "teddy bears"), ("tomato", "tomatoes"),
    ("toy", "toys"), ("dress", "dresses"), ("person", "people"), ("cookie", "cookies"), ("horse", "horses"),
])
def test_pluralize_and_singularize_are_inverse(singular, plural):
    assert pluralize(singular) == plural
    assert singularize(plural) == singular


def test_count_swaps_inflect_the_noun_and_follow_tia2_neighbours():
    assert RULES.by_kind("two dogs")["count"] == ["one dog", "three dogs", "four dogs"]
    assert RULES.by_kind("a photo of a mouse")["count"] == ["a photo of two mice", "a photo of three mice"]
    assert RULES.by_kind("three wolves in the snow")["count"] == [
        "one wolf in the snow", "two wolves in the snow", "four wolves in the snow", "five wolves in the snow"]
    assert RULES.by_kind("2 sheep")["count"] == ["1 sheep", "3 sheep", "4 sheep"]
    # modifiers between the count and the noun (a colour word is one, even "orange")
    assert RULES.by_kind("three fluffy kittens")["count"][:2] == ["one fluffy kitten", "two fluffy kittens"]
    assert RULES.by_kind("an orange cat")["count"] == ["two orange cats", "three orange cats"]
    # "a photo" is not a count: photo is no known object
    assert RULES.by_kind("a photo")["count"] == []


def test_colour_swaps_fix_the_article_and_tell_the_fruit_from_the_colour():
    swaps = RULES.by_kind("a red car")["color"]
    assert len(swaps) == len(COLORS) - 1 and "an orange car" in swaps and "a blue car" in swaps
    assert "a red cat" in RULES.by_kind("an orange cat")["color"]
    fruit = RULES.by_kind("a photo of an orange")
    assert fruit["color"] == [] and "a photo of a banana" in fruit["object"]
    assert "a gray cat" not in RULES.by_kind("a grey cat")["color"]  # grey is gray


def test_object_swaps_stay_within_the_category_and_keep_the_number():
    objects = RULES.by_kind("two dogs on a sofa")["object"]
    assert "two cats on a sofa" in objects and "two mice on a sofa" in objects and "two dogs on a chair" in objects
    assert not any("banana" in o or "car " in o for o in objects)
    assert "a photo of a kite" in RULES.by_kind("a photo of a teddy bear")["object"]  # the longer noun wins
    assert "a banana and an orange" in RULES.by_kind("an apple and an orange")["object"]


def test_spatial_and_binding_swaps():
    assert RULES.by_kind("a cat on top of a table")["spatial"] == ["a cat under a table"]
    assert RULES.by_kind("a dog to the left of a cat")["spatial"] == ["a dog to the right of a cat"]
    assert RULES.by_kind("a car in front of a house")["spatial"] == ["a car behind a house"]
    assert RULES.by_kind("a lamp under a desk")["spatial"] == ["a lamp on top of a desk"]
    assert RULES.by_kind("a red cube and a blue ball")["binding"] == ["a blue cube and a red ball"]
    assert RULES.by_kind("an orange cube and a red ball")["binding"] == ["a red cube and an orange ball"]
    assert RULES.by_kind("a red cube and a red ball")["binding"] == []


def test_the_prompt_itself_and_repeats_never_come_back_and_case_is_kept():
    for prompt in ["A dog on a sofa", "a grey horse and a white horse", "two red circles and one blue square "
                   "on a white background", "an apple and an orange"]:
        out = RULES(prompt)
        assert out and norm(prompt) not in map(norm, out)
        assert len(set(map(norm, out))) == len(out)
    assert RULES("A dog on a sofa")[0] == "Two dogs on a sofa"


def test_nothing_applies_gives_an_empty_list():
    assert RULES("a photo") == []
    assert RULES("sunset over the sea, oil painting") == []


def test_k_mixes_the_kinds_and_is_deterministic_per_seed():
    prompt = "a red cube and a blue ball on top of a table"
    groups = RULES.by_kind(prompt)
    kind_of = {alt: kind for kind, alts in groups.items() for alt in alts}
    first = RuleContrastive(k=5, seed=0)(prompt)
    assert len(first) == 5 and [kind_of[a] for a in first] == ["count", "color", "object", "spatial", "binding"]
    assert RuleContrastive(k=5, seed=0)(prompt) == first
    seeds = {tuple(RuleContrastive(k=5, seed=s)(prompt)) for s in range(5)}
    assert len(seeds) > 1
    assert sorted(RuleContrastive(k=10_000)(prompt)) == sorted(RULES(prompt))
    assert RuleContrastive(kinds=["binding"])(prompt) == groups["binding"]


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k must be"), ({"seed": 1.5}, "seed must"),
                                           ({"kinds": ["size"]}, "kinds must")])
def test_rule_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RuleContrastive(**kwargs)


# ----------------------------------------------------------------------------------------------
# TextNorm with an empty contrastive set


def test_textnorm_gives_confidence_one_with_zero_gradient_when_no_contrastive_prompt_applies(clip):
    prompts = ["a photo", "two red circles on a white background"]
    images = ShapesWorld().render(["one red circle on a white background", prompts[1]], seed=0).requires_grad_()
    reward = TextNorm(clip, contrastive=RULES, tau=0.1)
    assert reward.contrastive_prompts("a photo") == []
    out = reward(images, prompts)
    assert out.scores[0].item() == 1.0
    alts = RULES(prompts[1])
    raw = clip.score_prompts(images[1:], [[prompts[1]] + alts])[0]
    assert out.scores[1].item() == pytest.approx(torch.softmax(raw / 0.1, 0)[0].item(), rel=1e-5)
    out.scores.sum().backward()
    clip.model.zero_grad(set_to_none=True)  # the fixture is shared
    assert images.grad[0].abs().max().item() == 0.0 and images.grad[1].abs().max().item() > 0


# ----------------------------------------------------------------------------------------------
# JSON files


def write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_json_sets_are_read_merged_and_fall_back(tmp_path):
    a = write(tmp_path / "a.json", {"a dog": ["a cat", "two dogs", "a cat", "a dog"], "a photo": []})
    b = write(tmp_path / "b.json", {"a dog": ["a wolf"]})
    assert load_contrastive_sets(a) == {"a dog": ["a cat", "two dogs", "a cat", "a dog"], "a photo": []}
    gen = JsonContrastive([a, b], fallback=RULES)
    assert gen("a dog") == ["a cat", "two dogs", "a wolf"]
    assert gen("a photo") == []
    assert gen("two red cars") == RULES("two red cars")
    with pytest.raises(ValueError, match="'three cats' has no contrastive set in .*a.json"):
        JsonContrastive(a)("three cats")


@pytest.mark.parametrize("content, match", [
    ("{not json", "a.json: not valid JSON"),
    (["a dog"], "a.json: expected an object"),
    ({"a dog": "a cat"}, "a.json: entry 'a dog' must be a list of prompts, got str"),
    ({"a dog": ["a cat", 3]}, r"a.json: entry 'a dog': alternative #1 must be a non-empty string, got 3"),
    ({"a dog": ["  "]}, "alternative #0 must be a non-empty string"),
    ({" ": ["a cat"]}, "an entry has an empty prompt"),
])
def test_json_errors_name_the_file_and_entry(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        load_contrastive_sets(write(tmp_path / "a.json", content))


def test_a_missing_json_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        make_contrastive({"name": "json", "path": str(tmp_path / "nope.json")})


# ----------------------------------------------------------------------------------------------
# The language model: a tiny GPT-2 saved offline


def tiny_lm(path, corpus, train_on=None, steps=150):
    """A 2-layer GPT-2 with a byte-level BPE tokenizer trained on `corpus`, saved to `path`;
    random weights, or fitted to the texts `train_on` (so that greedy decoding reproduces them)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    eos = tok.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos))
    if train_on is not None:
        query, target = train_on
        ids = torch.tensor([tok(query)["input_ids"] + tok(target)["input_ids"] + [eos]])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


PROMPT = "a dog on a sofa"
# What the fitted model writes: two good lines, a repeat, garbage, the prompt itself (other case),
# a third good line, then the next example's header (where parsing stops), then more text.
CONTINUATION = (" two dogs on a sofa\n- two dogs on a sofa\n- a cat on a sofa\n- zebra quantum\n"
                "- A dog on a sofa\n- a dog under a sofa\n\nPrompt: a dog on a rug")


@pytest.fixture(scope="module")
def fitted_lm(tmp_path_factory):
    query = LMContrastive.query(PROMPT)
    return tiny_lm(tmp_path_factory.mktemp("lm") / "fitted", [query + CONTINUATION], (query, CONTINUATION))


@pytest.fixture(scope="module")
def random_lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm") / "random", [FEW_SHOT.format(prompt=PROMPT) + CONTINUATION])


def test_parse_lines_cleans_filters_and_stops_at_the_next_example():
    text = (' "two dogs on a sofa"\n* three dogs on a sofa\n2) two dogs on a sofa\n\n- \n- 42\n'
            "- A DOG ON A SOFA\n- quantum zebra flux\n- " + "a dog on a sofa and " * 5 + "\n"
            "1. a dog   under a sofa\nPrompt: a cat on a sofa\n- a cat on a bed")
    assert parse_lines(text, PROMPT) == ["two dogs on a sofa", "three dogs on a sofa", "a dog under a sofa"]
    assert parse_lines("- a cat\n- a bird", "a dog", min_overlap=0.5) == ["a cat", "a bird"]
    assert parse_lines("- a cat\n- a bird", "a dog", min_overlap=0.6) == []


def test_lm_lines_are_parsed_deduplicated_capped_topped_up_and_cached(fitted_lm):
    gen = LMContrastive(fitted_lm, k=4, max_new_tokens=60)
    raw = gen.generate(PROMPT)
    assert raw.startswith(CONTINUATION[:-len(" a dog on a rug")])  # the model writes what it was fitted to
    gen = LMContrastive(fitted_lm, k=4, max_new_tokens=60)
    out = gen(PROMPT)
    top_up = next(a for a in RULES(PROMPT) if a not in out[:3])
    assert out == ["two dogs on a sofa", "a cat on a sofa", "a dog under a sofa", top_up]
    assert gen.calls == 1
    out.append("mutated")
    assert gen(PROMPT) == out[:4] and gen.calls == 1  # cached, and the cache is not the caller's list
    assert LMContrastive(fitted_lm, k=2, max_new_tokens=60)(PROMPT) == ["two dogs on a sofa", "a cat on a sofa"]
    assert LMContrastive(fitted_lm, k=6, max_new_tokens=60, fallback=None)(PROMPT) == out[:3]


def test_garbage_from_random_weights_falls_back_to_the_rules(random_lm):
    gen = LMContrastive(random_lm, k=5, max_new_tokens=40)
    raw = gen.generate(PROMPT)
    parsed = parse_lines(raw, PROMPT)
    assert len(parsed) < 5  # random weights write garbage
    out = gen(PROMPT)
    assert gen.calls == 2 and len(out) == 5 and out[:len(parsed)] == parsed
    rest = [a for a in RULES(PROMPT) if norm(a) not in map(norm, parsed)]
    assert out[len(parsed):] == rest[:5 - len(parsed)]


def test_lm_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LMContrastive(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="k must be"):
        make_contrastive({"name": "lm", "path": str(tmp_path), "k": 0})


# ----------------------------------------------------------------------------------------------
# Specs and make_reward


def test_make_reward_builds_textnorm_with_each_contrastive_source(clip, tmp_path, fitted_lm):
    clip.save_pretrained(tmp_path / "clip")
    base = {"name": "clip", "path": str(tmp_path / "clip")}
    sets = write(tmp_path / "sets.json", {"a dog": ["a cat"]})
    shapes = make_reward({"name": "textnorm", "base": base})
    p = "two red circles on a white background"
    assert shapes.contrastive_prompts(p) == ShapesWorld().contrastive(p)
    assert isinstance(make_reward({"name": "textnorm", "base": base, "contrastive": "rules"}).contrastive,
                      RuleContrastive)
    from_file = make_reward({"name": "textnorm", "base": base,
                             "contrastive": {"name": "json", "path": str(sets), "fallback": "rules"}})
    assert from_file.contrastive_prompts("a dog") == ["a cat"]
    assert from_file.contrastive_prompts("two dogs") == RULES("two dogs")
    lm = make_reward({"name": "textnorm", "base": base,
                      "contrastive": {"name": "lm", "path": fitted_lm, "k": 2, "max_new_tokens": 60}})
    assert lm.contrastive_prompts(PROMPT) == ["two dogs on a sofa", "a cat on a sofa"]


@pytest.mark.parametrize("contrastive, match", [
    ("grammar", "unknown contrastive source 'grammar'; allowed: shapes, rules, lm, json"),
    ({"name": "rules", "n": 3}, r"unknown keys \['n'\] for contrastive source 'rules'"),
    ({"name": "json"}, "needs 'path'"),
    ({"name": "json", "path": "/no/such.json"}, "/no/such.json"),
    (3, "a contrastive spec must be"),
])
def test_bad_contrastive_specs_fail_before_loading_the_model(contrastive, match):
    base = {"name": "clip", "path": "/no/such/model"}  # never reached
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        make_reward({"name": "textnorm", "base": base, "contrastive": contrastive})
