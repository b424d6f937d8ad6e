"""The judge is the gold reward: its agreement with the ground truth is the base of every figure."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2i_rl.world import Perception, SeenObject, ShapesWorld, parse_prompt, verdict

N = 300  # the full 2,000-image check is the slow test below


def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    x = torch.arange(-1, 2, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def agreement(world: ShapesWorld, n: int, corrupt, seed: int) -> float:
    """Fraction of (image, prompt) pairs on which the judge's all-correct equals the truth's.

    Each image is judged against its own prompt (truth: correct) and against a random
    contrastive prompt (truth: computed from the layout), so both kinds of error count.
    """
    rng = np.random.default_rng(seed)
    prompts = world.sample_prompts(n, seed=seed)
    images, layouts = world.render_with_layouts(prompts, seed=seed)
    images = corrupt(images, torch.Generator().manual_seed(seed))
    others = [str(rng.choice(world.contrastive(p))) for p in prompts]
    hits = []
    for asked in (prompts, others):
        result = world.judge(images, asked)
        for i, lay in enumerate(layouts):
            groups, bg = verdict(world.truth(lay), parse_prompt(asked[i]))
            truth = bg and all(all(g.values()) for g in groups)
            hits.append(bool(result.correct[i]) == truth)
    return float(np.mean(hits))


CORRUPTIONS = {
    "clean": (lambda x, g: x, 0.99),
    "noise": (lambda x, g: (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1), 0.95),
    "blur": (lambda x, g: gaussian_blur(x), 0.95),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_judge_agrees_with_ground_truth(name):
    corrupt, floor = CORRUPTIONS[name]
    assert agreement(ShapesWorld(), N, corrupt, seed=1234) >= floor


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_judge_agrees_on_2000_unseen_images(name):
    corrupt, floor = CORRUPTIONS[name]
    assert agreement(ShapesWorld(), 2000, corrupt, seed=98765) >= floor


def test_attribute_verdicts_on_a_known_mismatch():
    w = ShapesWorld()
    images = w.render(["two red circles on a white background"], seed=0)
    r = w.judge(images, ["three red squares on a pink background"])
    assert not r.attributes["count"][0] and not r.attributes["shape"][0]
    assert not r.attributes["background"][0] and r.attributes["color"][0]
    assert r.score[0].item() == pytest.approx(1 / 4)
    assert not r.correct[0]


def test_two_object_prompts_get_per_group_verdicts():
    w = ShapesWorld()
    images = w.render(["one red circle and two blue squares on a gray background"], seed=2)
    r = w.judge(images, ["one red circle and three blue squares on a gray background"])
    assert r.groups[0] == [
        {"count": True, "color": True, "shape": True},
        {"count": False, "color": True, "shape": True},
    ]
    assert r.score[0].item() == pytest.approx(6 / 7)


def test_blank_and_random_images_are_judged_without_error():
    w = ShapesWorld()
    prompts = ["one red circle on a white background"] * 3
    images = torch.stack([torch.ones(3, 32, 32), torch.zeros(3, 32, 32), torch.rand(3, 32, 32)])
    r = w.judge(images, prompts)
    assert not r.correct.any()
    assert ((r.score >= 0) & (r.score <= 1)).all()


def test_larger_images_are_read_at_the_world_resolution():
    w = ShapesWorld()
    prompts = w.sample_prompts(16, seed=5)
    big = F.interpolate(w.render(prompts, seed=5), scale_factor=2, mode="nearest")
    assert w.judge(big, prompts).correct.float().mean() >= 0.9


@pytest.mark.parametrize("images, match", [
    (torch.rand(2, 32, 32), "shape"),
    (torch.rand(2, 1, 32, 32), "shape"),
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "float"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    (torch.rand(3, 3, 32, 32), "3 images for 2 prompts"),
])
def test_bad_images_raise_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        ShapesWorld().judge(images, ["one red circle on a white background"] * 2)


def _seen(*objects, background="white", background_unsure=False):
    return Perception(background, tuple(SeenObject(*o[:2], 50.0, frozenset(o[2:])) for o in objects),
                      background_unsure)


@pytest.mark.parametrize("seen, want", [
    # sure and right
    (_seen(("red", "circle"), ("red", "circle")), ({"count": True, "color": True, "shape": True}, True)),
    # one shape unsure: shape unsure, count and colour still sure
    (_seen(("red", "circle"), ("red", "circle", "shape")), ({"count": True, "color": True, "shape": None}, True)),
    # a sure square among them: shape surely wrong, whatever the unsure one is
    (_seen(("red", "square"), ("red", "circle", "shape")), ({"count": True, "color": True, "shape": False}, True)),
    # maybe a third object of no palette colour (a barely visible one): only colour is unsure
    (_seen(("red", "circle"), ("red", "circle"), (None, None, "exists")),
     ({"count": True, "color": None, "shape": True}, True)),
    # maybe a third red circle (an unsure split): count unsure
    (_seen(("red", "circle"), ("red", "circle"), ("red", "circle", "exists")),
     ({"count": None, "color": True, "shape": True}, True)),
    # a sure faint object of no palette colour: a stray colour, surely
    (_seen(("red", "circle"), ("red", "circle"), (None, None)), ({"count": True, "color": False, "shape": True}, True)),
    # three sure red objects: count surely wrong even with an unsure fourth
    (_seen(("red", "circle"), ("red", "circle"), ("red", "circle"), ("red", "circle", "exists")),
     ({"count": False, "color": True, "shape": True}, True)),
    # colour unsure on one of two: count can't be sure either
    (_seen(("red", "circle"), ("red", "circle", "color")), ({"count": None, "color": None, "shape": True}, True)),
    # background between two names
    (_seen(("red", "circle"), ("red", "circle"), background_unsure=True),
     ({"count": True, "color": True, "shape": True}, None)),
    (_seen(("red", "circle"), ("red", "circle"), background=None), ({"count": True, "color": True, "shape": True}, False)),
])
def test_verdict_is_three_valued(seen, want):
    groups, bg = verdict(seen, parse_prompt("two red circles on a white background"))
    assert (groups[0], bg) == want


def test_unsure_attributes_count_half_in_the_score_and_nothing_in_correct():
    w = ShapesWorld()
    prompt = "one red circle on a white background"
    image = w.render([prompt], seed=0)
    background = (image - torch.tensor([0.95, 0.95, 0.95]).view(1, 3, 1, 1)).abs().sum(1) < 0.2
    image[:, :, background[0]] = 0.78  # light grey: between white and a colour that is not white
    r = w.judge(image, [prompt])
    assert r.perceptions[0].background_unsure and r.unsure["background"][0]
    assert not r.correct[0] and not r.sure[0] and not r.attributes["background"][0]
    assert r.score[0].item() == pytest.approx((3 + 0.5) / 4)


def test_a_person_reads_these_as_a_person_would():
    """Five probes of the kinds an RL policy finds, each drawn here by hand."""
    w = ShapesWorld()
    yy, xx = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    red, white = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1), torch.tensor([0.95] * 3).view(3, 1, 1)

    def draw(mask):
        m = mask.float()
        return (white * (1 - m) + red * m).unsqueeze(0)

    def disk(cx, cy, r):
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r

    one = "one red circle on a white background"
    # two touching circles are two objects
    assert not w.judge(draw(disk(11, 16, 5) | disk(21, 16, 5)), [one]).correct[0]
    assert w.judge(draw(disk(11, 16, 5) | disk(21, 16, 5)), ["two red circles on a white background"]).attributes["count"][0]
    # an ellipse of aspect 0.4 is no circle
    assert not w.judge(draw(((xx - 16) / 7) ** 2 + ((yy - 16) / 2.8) ** 2 <= 1), [one]).correct[0]
    # a triangle pointing down is a triangle
    down = (yy >= 10) & (yy <= 22) & ((xx - 16).abs() <= (22 - yy) / 2)
    assert w.judge(draw(down), ["one red triangle on a white background"]).correct[0]
    # a square rotated 45 degrees is a square
    diamond = ((xx - 16).abs() + (yy - 16).abs()) <= 7
    assert w.judge(draw(diamond), ["one red square on a white background"]).correct[0]
    # light grey is not white
    grey = draw(disk(16, 16, 5)) * 0 + torch.tensor([0.75] * 3).view(1, 3, 1, 1)
    grey[0, :, disk(16, 16, 5)] = red.view(3, 1)
    assert not w.judge(grey, [one]).attributes["background"][0]


def exact_shape(shape: str, cx: float, cy: float, size: float, angle: float, n: int, ss: int) -> np.ndarray:
    """Whether each of ss x ss points per pixel of an n x n image lies in the shape [n*ss, n*ss], drawn
    here by hand as the judge's templates define it (a triangle's base and height are `size`)."""
    sub = (np.arange(n * ss) + 0.5) / ss
    x, y = np.meshgrid(sub, sub)
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * cos + (y - cy) * sin, -(x - cx) * sin + (y - cy) * cos
    return {"circle": u**2 + v**2 <= (size / 2) ** 2,
            "square": (np.abs(u) <= size / 2) & (np.abs(v) <= size / 2),
            "triangle": (v <= size / 3) & (np.abs(u) <= (v + 2 * size / 3) / 2)}[shape]


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_fit_template_is_the_shape_blurred(shape):
    """The fit's template against a hand computation: the exact shape, supersampled 16x16 per pixel,
    box-filtered to pixels and blurred by FIT_BLUR. A square is exact up to the pixel box's
    Gaussian approximation, a circle's curved edge nearly so; a triangle's three edges multiplied
    are looser at its acute corners."""
    from scipy import ndimage

    from t2i_rl.world import judge as J

    n, ss, size, rot, c = 24, 16, 10.0, 0.4, 11.7
    inside = exact_shape(shape, c, c, size, rot, n, ss)
    exact = ndimage.gaussian_filter(inside.reshape(n, ss, n, ss).mean((1, 3)), J.FIT_BLUR, mode="constant")
    template = J._template(shape, c, c, size, rot, n, n)
    assert np.abs(template - exact).max() < {"square": 0.03, "circle": 0.03, "triangle": 0.12}[shape]
    assert template.sum() == pytest.approx(exact.sum(), rel=0.02)  # the area: 100, 78.5 or 50 px


@pytest.mark.parametrize("shape, angle", [("square", -25.0), ("square", 30.0), ("square", 0.0),
                                          ("triangle", 100.0), ("triangle", -40.0), ("circle", 0.0)])
def test_a_border_cut_object_is_fitted_as_its_shape_at_any_rotation(shape, angle):
    """A quarter of the object outside the frame, hard edges: the fit starts from the best of a grid
    of rotations over the shape's period, so a tilt on either side of the first start is found."""
    from t2i_rl.world import judge as J

    n, ss = 20, 8
    # the centre 2 px from the left edge: about a quarter outside; point-sampled near pixel centres
    inside = exact_shape(shape, 2.0, 11.0, 10.0, np.deg2rad(angle), n, ss)
    alpha = inside.reshape(n, ss, n, ss)[:, ss // 2, :, ss // 2].astype(float)
    assert J._shape_by_fit(alpha) == (shape, False)


@pytest.mark.parametrize("edges, sigma, want", [("hard", 0.0, 0.0), ("aa", 0.0, 0.24), ("aa", 1.0, 1.04),
                                                ("aa", 1.5, 1.53)])
def test_edge_blur_measures_an_outlines_gaussian(edges, sigma, want):
    """A 12 px disk point-sampled (hard: 0), box-filtered over 16x16 points per pixel (anti-aliased:
    a pixel's box, which the pixel-step gradient reads as 0.24 where a Gaussian of its variance
    would be 0.29) and then blurred: about the blur's sigma with the box's added in quadrature."""
    from scipy import ndimage

    from t2i_rl.world import judge as J

    n, ss = 32, 16
    inside = exact_shape("circle", 16.0, 16.0, 12.0, 0.0, n, ss)
    cov = inside.reshape(n, ss, n, ss)[:, ss // 2, :, ss // 2] if edges == "hard" else inside.reshape(
        n, ss, n, ss).mean((1, 3))
    cov = ndimage.gaussian_filter(cov.astype(float), sigma, mode="constant") if sigma else cov.astype(float)
    assert J._edge_blur(cov) == pytest.approx(want, abs=0.05)


def smeared(rgb: tuple[float, float, float], bg: tuple[float, float, float], mask: np.ndarray,
            chroma_sigma: float) -> torch.Tensor:
    """An object drawn on a background, its chroma (not its lightness) blurred as JPEG's 4:2:0
    smears it: image [1, 3, H, W]."""
    from scipy import ndimage

    from t2i_rl.world import judge as J

    m = mask.astype(float)[..., None]
    img = np.asarray(bg) * (1 - m) + np.asarray(rgb) * m
    luma = img @ J._LUMA
    chroma = ndimage.gaussian_filter(img - luma[..., None], (chroma_sigma, chroma_sigma, 0), mode="nearest")
    return torch.from_numpy((chroma + luma[..., None]).clip(0, 1)).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("color, background, size, sigma", [
    ("orange", "black", 6.0, 1.5), ("blue", "white", 6.0, 1.5), ("red", "white", 6.0, 2.0), ("orange", "black", 8.0, 2.0)])
def test_a_small_objects_smeared_colour_is_named_from_its_chroma_around_it(color, background, size, sigma):
    """A small square whose chroma is smeared over `sigma` px: its core keeps the object's lightness
    but holds only part of its chroma (orange's core reads yellowish, red's greyish); summed with the
    chroma around it, per unit of its lightness, it is surely its colour."""
    from t2i_rl.world import BACKGROUND_COLORS, OBJECT_COLORS

    mask = exact_shape("square", 16.0, 16.0, size, 0.0, 32, 1)
    image = smeared(OBJECT_COLORS[color], BACKGROUND_COLORS[background], mask, sigma)
    result = ShapesWorld().judge(image, [f"one {color} square on a {background} background"])
    assert [(o.color, o.unsure) for o in result.perceptions[0].objects] == [(color, frozenset())]


def test_colour_without_lightness_beside_an_object_is_no_faint_object():
    """JPEG's smeared chroma beside an object has hue but no lightness; a faint object has both, in
    the same proportion. On grey, a 4x5 px patch of blue chroma alone beside a blue circle is not an
    object; the same patch with blue's lightness at that alpha is a faint object of no palette colour."""
    from t2i_rl.world import judge as J

    gray, blue = np.array([0.5] * 3), np.array([0.1, 0.25, 0.9])
    yy, xx = np.mgrid[:32, :32] + 0.5
    img = np.broadcast_to(gray, (32, 32, 3)).copy()
    img[(xx - 10) ** 2 + (yy - 16) ** 2 <= 16] = blue
    patch = (xx > 20) & (xx < 26) & (yy > 13) & (yy < 19)
    step = 0.14 * (blue - gray)
    ghost, faint = img.copy(), img.copy()
    ghost[patch] += step - step @ J._LUMA  # the colour's chroma, none of its lightness
    faint[patch] += step
    seen = {name: J.perceive(x.transpose(2, 0, 1)) for name, x in (("ghost", ghost), ("faint", faint))}
    assert [(o.color, o.shape) for o in seen["ghost"].objects] == [("blue", "circle")]
    assert (None, None) in [(o.color, o.shape) for o in seen["faint"].objects]


def test_an_image_with_a_surely_wrong_attribute_is_a_sure_rejection():
    """Hesitating on one attribute does not make an image unsure when another is surely wrong: a
    person rejects it either way, and a rate that left it out would count too few failures."""
    w = ShapesWorld()
    image = w.render(["one red circle on a white background"], seed=0)
    background = (image - torch.tensor([0.95, 0.95, 0.95]).view(1, 3, 1, 1)).abs().sum(1) < 0.2
    image[:, :, background[0]] = 0.78  # light grey: the background verdict is unsure
    r = w.judge(image, ["two red circles on a white background"])  # and the count surely wrong
    assert r.unsure["background"][0] and not r.attributes["count"][0] and not r.unsure["count"][0]
    assert r.sure[0] and not r.correct[0]


def test_two_objects_of_one_colour_joined_by_a_third_are_counted():
    """Two yellow squares both touching a green circle between them are one region of two colours;
    its yellow parts are one part of two objects, which the judge counts as a person does."""
    w = ShapesWorld()
    yy, xx = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    yellow, green = torch.tensor([0.95, 0.85, 0.1]).view(3, 1, 1), torch.tensor([0.1, 0.7, 0.2]).view(3, 1, 1)
    left = ((xx - 8.5).abs() <= 4) & ((yy - 16).abs() <= 4)
    right = ((xx - 23.5).abs() <= 4) & ((yy - 16).abs() <= 4)
    middle = (xx - 16) ** 2 + (yy - 16) ** 2 <= 3.5 ** 2
    image = torch.zeros(3, 32, 32) + 0.05
    image = torch.where(left | right, yellow, image)
    image = torch.where(middle, green, image).unsqueeze(0)
    r = w.judge(image, ["two yellow squares and one green circle on a black background"])
    assert r.attributes["count"][0] and not r.unsure["count"][0]
