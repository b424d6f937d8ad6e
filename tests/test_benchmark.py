import json
import math

import pytest
import torch

from t2i_rl import benchmark
from t2i_rl.benchmark import (
    benchmark_prompts,
    default_reward_specs,
    format_table,
    load_cached_images,
    main,
    prompt_category,
    run_reward_benchmark,
    save_cached_images,
)
from t2i_rl.rewards.base import RewardFunction, RewardOutput
from t2i_rl.world import BACKGROUND_COLORS, OBJECT_COLORS, ShapesWorld, parse_prompt

PROMPTS = [
    "two red circles on a white background",             # counting
    "three blue squares on a black background",          # counting
    "one green triangle on a gray background",           # single object
    "one red circle and two blue squares on a pink background",  # composition
    "two yellow triangles and one purple circle on a white background",  # composition
    "four orange squares on a gray background",          # counting, all images correct
]


class NamedColourShare(RewardFunction):
    """Share of foreground pixels whose colour is one the prompt names (minus the share that is not)."""

    name = "colour_share"

    def forward(self, images, prompts):
        scores = []
        for img, p in zip(images, prompts):
            scene = parse_prompt(p)
            pix = img.permute(1, 2, 0).reshape(-1, 3)
            bg = torch.tensor(BACKGROUND_COLORS[scene.background])
            fg = pix[(pix - bg).norm(dim=1) > 0.25]
            if fg.shape[0] == 0:
                scores.append(torch.tensor(-1.0))
                continue
            named = torch.tensor([OBJECT_COLORS[g.color] for g in scene.groups])
            near = torch.cdist(fg, named).min(dim=1).values < 0.3
            scores.append(near.float().mean() - (~near).float().mean())
        scores = torch.stack(scores)
        return RewardOutput(scores, {"rm/colour_share": scores})


def background_match(images, prompts):
    """A plain function: minus the distance of the border pixels' mean colour to the background."""
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    bg = torch.tensor([BACKGROUND_COLORS[parse_prompt(p).background] for p in prompts])
    scores = -(border.mean(dim=2) - bg).norm(dim=1)
    return RewardOutput(scores, {"rm/background": scores})


class Gold:
    """The judge's score as a reward."""

    def __init__(self):
        self.world = ShapesWorld()

    def __call__(self, images, prompts):
        score = self.world.judge(images, prompts).score
        return RewardOutput(score, {"gold": score})


def _benchmark_images(world):
    """4 images per prompt: 2 renders of the prompt and 2 of contrastive prompts, interleaved;
    the last prompt gets 4 true renders (all labels equal: it must be skipped)."""
    images = []
    for i, p in enumerate(PROMPTS):
        if i == len(PROMPTS) - 1:
            which = [p] * 4
        else:
            wrong = world.contrastive(p, k=2, seed=i)
            which = [p, wrong[0], p, wrong[1]]
        images.append(torch.stack([world.render([q], seed=10 * i + j)[0] for j, q in enumerate(which)]))
    return torch.stack(images)


@pytest.fixture(scope="module")
def result():
    world = ShapesWorld()
    images = _benchmark_images(world)
    rewards = {"colour": NamedColourShare(), "background": background_match, "gold": Gold()}
    return run_reward_benchmark(images, PROMPTS, rewards, k=2, batch_size=5)


def test_prompt_categories():
    cats = [prompt_category(p) for p in PROMPTS]
    assert cats == ["counting", "counting", "single", "composition", "composition", "counting"]


def test_run_reward_benchmark_structure(result):
    assert result["benchmark"] == "TIA2-shapes"
    assert result["n_prompts"] == 6 and result["images_per_prompt"] == 4 and result["k"] == 2
    assert set(result["splits"]) == {"counting", "composition", "all"}
    assert result["splits"]["counting"]["n_prompts"] == 3
    assert result["splits"]["composition"]["n_prompts"] == 2
    assert result["splits"]["all"]["n_prompts"] == 6
    # the judge reads renders exactly: 2 of 4 right, and 4 of 4 for the last prompt
    assert result["per_prompt"]["n_correct"] == [2, 2, 2, 2, 2, 4]
    assert result["splits"]["all"]["base_rate"] == pytest.approx(14 / 24)
    assert result["splits"]["all"]["n_mixed"] == 5
    assert result["splits"]["counting"]["n_mixed"] == 2
    assert set(result["results"]) == {"colour", "background", "gold"}
    for name, by_split in result["results"].items():
        assert set(by_split) == {"counting", "composition", "all"}
        for split, metrics in by_split.items():
            assert set(metrics) == {"auroc", "auprc", "ap@2", "spearman", "kendall"}
            n_mixed = result["splits"][split]["n_mixed"]
            for metric in ("auroc", "auprc", "ap@2"):
                assert metrics[metric]["n"] == n_mixed  # the all-correct prompt is skipped
            for metric, v in metrics.items():
                lo = -1.0 if metric in ("spearman", "kendall") else 0.0
                assert lo <= v["mean"] <= 1.0, (name, split, metric, v)
        per = result["per_prompt"]["rewards"][name]
        assert math.isnan(per["auroc"][-1]) and len(per["auroc"]) == 6


def test_gold_reward_is_perfect_where_prompts_count(result):
    for split in ("counting", "composition", "all"):
        gold = result["results"]["gold"][split]
        assert gold["auroc"]["mean"] == 1.0
        assert gold["auprc"]["mean"] == 1.0
        assert gold["ap@2"]["mean"] == 1.0
        assert gold["spearman"]["mean"] == pytest.approx(1.0)
        assert gold["kendall"]["mean"] == pytest.approx(1.0)


def test_proxy_rewards_are_imperfect_but_informative(result):
    # background colour only tells the background swaps apart: better than nothing, short of gold
    all_ = result["results"]
    assert 0.5 <= all_["background"]["all"]["auroc"]["mean"] < 1.0
    assert all_["colour"]["all"]["auroc"]["mean"] >= 0.5


def test_table_and_json(result):
    table = format_table(result)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| reward"))
    assert header.count("|") == 1 + 1 + 15  # reward + 3 splits x 5 metrics
    assert "cnt ROC" in header and "comp AP@2" in header and "all tau" in header
    assert any(line.startswith("| gold | 1.000") for line in lines)
    json.dumps(benchmark._json_ready(result), allow_nan=False)  # NaN becomes null


def test_reward_errors_name_the_reward():
    images = _benchmark_images(ShapesWorld())[:2]

    def bad(images, prompts):
        return RewardOutput(torch.full((images.shape[0],), float("nan")))

    with pytest.raises(ValueError, match="'bad'.*NaN"):
        run_reward_benchmark(images, PROMPTS[:2], {"bad": bad})
    with pytest.raises(ValueError, match=r"\[P, M, 3, H, W\]"):
        run_reward_benchmark(images[0], PROMPTS[:1], {"bg": background_match})


def test_benchmark_prompts_are_fixed_distinct_heldout_and_prefix_stable():
    p = benchmark_prompts(40)
    assert len(set(p)) == 40 and p == benchmark_prompts(40)
    assert benchmark_prompts(10) == p[:10]
    heldout = set(ShapesWorld().prompts("heldout"))
    assert set(p) <= heldout
    cats = {prompt_category(x) for x in p}
    assert {"counting", "composition"} <= cats
    with pytest.raises(ValueError):
        benchmark_prompts(0)


def test_default_reward_specs():
    specs = default_reward_specs()
    assert specs["clip"] == "clip"
    assert specs["textnorm(clip)"] == {"name": "textnorm", "base": "clip", "tau": benchmark.DEFAULT_TAU["clip"]}
    assert specs["ensemble(mean-std)"]["mode"] == "mean_minus_std"
    tn_ens = specs["textnorm(ensemble(mean))"]
    assert tn_ens["base"]["members"] == ["clip", "lee", "pairwise"] and tn_ens["tau"] == benchmark.DEFAULT_TAU
    assert len(specs) == 10


def test_assets_load_every_learned_proxy_from_another_folder(tmp_path):
    """--assets: the learned proxies however deep they sit come from the folder; gold and published
    rewards are left as they are, and the specs build (tau keyed by model name still applies)."""
    specs = {name: benchmark.with_assets(spec, tmp_path) for name, spec in default_reward_specs().items()}
    assert specs["clip"] == {"name": "clip", "path": str(tmp_path / "clip")}
    assert specs["textnorm(lee)"]["base"] == {"name": "lee", "path": str(tmp_path / "lee")}
    members = specs["textnorm(ensemble(mean-std))"]["base"]["members"]
    assert members == [{"name": n, "path": str(tmp_path / n)} for n in ("clip", "lee", "pairwise")]
    assert specs["textnorm(ensemble(mean))"]["tau"] == benchmark.DEFAULT_TAU
    assert benchmark.with_assets("gold", tmp_path) == "gold"
    kept = {"name": "clip", "path": "/elsewhere/clip"}
    assert benchmark.with_assets(kept, tmp_path) == kept
    assert benchmark.with_assets({"name": "imagereward", "path": "/m"}, tmp_path) == {"name": "imagereward", "path": "/m"}


def test_image_cache_round_trip_slices_and_rejects_other_settings(tmp_path):
    path = tmp_path / "c.pt"
    prompts = benchmark_prompts(3)
    images = torch.rand(3, 4, 3, 32, 32)
    settings = {"steps": 20, "seed": 0}
    assert load_cached_images(path, settings, prompts, 4) is None
    save_cached_images(path, settings, prompts, images)
    assert torch.equal(load_cached_images(path, settings, prompts, 4), images)
    assert torch.equal(load_cached_images(path, settings, prompts[:2], 3), images[:2, :3])
    with pytest.raises(benchmark.CacheMismatch, match="steps=20"):
        load_cached_images(path, {"steps": 10, "seed": 0}, prompts, 4)
    with pytest.raises(benchmark.CacheMismatch, match="do not cover"):
        load_cached_images(path, settings, prompts, 5)
    with pytest.raises(benchmark.CacheMismatch, match="do not cover"):
        load_cached_images(path, settings, benchmark_prompts(4), 4)


class _FakePipe:
    """Stands in for a diffusers pipeline: the image is a function of the generator's draws."""

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompts, num_inference_steps, guidance_scale, eta, output_type, generator):
        assert len(generator) == len(prompts) and output_type == "pt"
        images = torch.stack([torch.rand(3, 32, 32, generator=g) for g in generator])
        return type("Out", (), {"images": images})()


def test_generate_images_is_seeded_per_image_and_batch_independent():
    prompts = benchmark_prompts(3)
    a = benchmark.generate_images(_FakePipe(), prompts, 2, steps=2, guidance=5.0, seed=0, batch_size=1)
    b = benchmark.generate_images(_FakePipe(), prompts, 2, steps=2, guidance=5.0, seed=0, batch_size=4)
    c = benchmark.generate_images(_FakePipe(), prompts[:2], 1, steps=2, guidance=5.0, seed=0, batch_size=4)
    assert a.shape == (3, 2, 3, 32, 32)
    assert torch.equal(a, b)
    assert torch.equal(a[:2, :1], c)  # a smaller run is a slice of a larger one
    assert not torch.equal(a[0, 0], a[0, 1])


@pytest.mark.parametrize("argv, message", [
    (["rewards", "--prompts", "0"], "--prompts must be in 1.."),
    (["rewards", "--prompts", "100000"], "--prompts must be in 1.."),
    (["rewards", "--images", "1"], "--images must be >= 2"),
    (["rewards", "--steps", "0"], "--steps must be >= 1"),
    (["rewards", "--guidance", "nan"], "--guidance"),
    (["rewards", "--cache", "x.npz"], "--cache must be a .pt file"),
    (["rewards", "--rewards", "clip", "nope"], "unknown reward 'nope'"),
    (["rewards", "--rewards", "{bad json"], "not valid JSON"),
    (["rewards", "--prompts", "ten"], "invalid int value"),
    (["rewards", "--assets", "/nonexistent/rewards"], "--assets /nonexistent/rewards is not a folder"),
    (["nope"], "invalid choice"),
    ([], "required"),
])
def test_cli_argument_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_cli_rejects_a_mismatched_cache_before_any_work(tmp_path, capsys):
    path = tmp_path / "c.pt"
    settings = {"benchmark": "TIA2-shapes", "steps": 7}
    save_cached_images(path, settings, benchmark_prompts(2), torch.rand(2, 2, 3, 32, 32))
    assert main(["rewards", "--prompts", "2", "--images", "2", "--cache", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "image cache" in errors[0] and "prompt_seed" in errors[0]


def test_cli_help_exits_0(capsys):
    assert main(["rewards", "--help"]) == 0
    assert "--prompts" in capsys.readouterr().out
