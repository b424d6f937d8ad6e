"""The judge against a test set it was not built on: another renderer's scenes, and adversarial images.

The first half checks that test set itself (independent.py draws what its ground truth claims);
the second measures the judge on every condition against its goal: on the sure-accept conditions
>= 98% of (image, prompt) pairs with a sure verdict equal to the truth, on the adversarial
classes >= 95% not accepted.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import independent as I  # the test set lives beside the tests; pytest puts this folder on sys.path
from t2i_rl.world import BACKGROUND_COLORS, OBJECT_COLORS, ShapesWorld, parse_prompt

N = 60  # images per condition in the default suite; the slow test below draws 500
SLOW_N = 500
SURE = [n for n, c in I.conditions().items() if c.kind == "sure"]
ADVERSARIAL = [n for n, c in I.conditions().items() if c.kind == "adversarial"]


def fine_points(o: I.DrawnObject, step: float = 0.05) -> np.ndarray:
    """Points of a fine grid inside an object, beyond the frame too: geometry checked by sampling."""
    r = o.radius + 1
    xs = np.arange(o.center[0] - r, o.center[0] + r, step)
    ys = np.arange(o.center[1] - r, o.center[1] + r, step)
    x, y = np.meshgrid(xs, ys)
    keep = o.inside(x, y)
    return np.stack([x[keep], y[keep]], 1)


def full_pixels(o: I.DrawnObject) -> np.ndarray:
    """Mask [RES, RES] of the pixels wholly inside a (convex) object: its four corners are."""
    c = np.arange(I.RES + 1, dtype=float)
    x, y = np.meshgrid(c, c)
    corner = o.inside(x, y)
    return corner[:-1, :-1] & corner[1:, :-1] & corner[:-1, 1:] & corner[1:, 1:]


def background_pixels(d: I.Drawing, edges: str) -> np.ndarray:
    """Mask of the pixels no object covers at all."""
    return sum(I._coverage(o, edges) for o in d.truth.objects) == 0


# --- the test set draws what it claims -------------------------------------------------------------

@pytest.mark.parametrize("name", ["clean", "faint_extra_object", "bar"])
def test_drawings_are_float_images_and_deterministic(name):
    images, prompts, expected, _ = I.make_condition(name, 6, seed=3)
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    again, prompts_again, _, _ = I.make_condition(name, 6, seed=3)
    assert torch.equal(images, again) and prompts == prompts_again
    assert not torch.equal(images, I.make_condition(name, 6, seed=4)[0])


def test_sure_conditions_pair_each_image_with_its_prompt_and_a_contrastive_one():
    images, prompts, expected, person_sure = I.make_condition("clean", 10, seed=0)
    assert person_sure and len(images) == len(prompts) == len(expected) == 20
    assert torch.equal(images[:10], images[10:])
    drawings = I.draw_condition("clean", 10, seed=0)
    assert expected[:10] == [True] * 10
    assert expected[10:] == [I.reads_as(d.truth, p) for d, p in zip(drawings, prompts[10:])]
    assert all(a != b for a, b in zip(prompts[:10], prompts[10:]))
    assert not any(expected[10:])  # one attribute changed: a person rejects it


@pytest.mark.parametrize("name", SURE)
def test_sure_drawings_read_as_their_heldout_prompts(name):
    heldout = set(ShapesWorld().prompts("heldout"))
    for d in I.draw_condition(name, 20, seed=0):
        assert d.prompt in heldout and I.reads_as(d.truth, d.prompt)


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_drawings_are_rejected_by_their_truth(name):
    _, _, expected, person_sure = I.make_condition(name, 5, seed=0)
    assert expected == [False] * 5 and not person_sure
    for d in I.draw_condition(name, 20, seed=0):
        assert not I.reads_as(d.truth, d.prompt)


@pytest.mark.parametrize("name", ["clean", "anti_aliased", "color_jitter"])
def test_object_and_background_pixels_have_their_colours(name):
    jitter = I.JITTER if name == "color_jitter" else 0.0
    edges = "aa" if name == "anti_aliased" else "hard"
    for d in I.draw_condition(name, 30, seed=1):
        img = d.image.permute(1, 2, 0).numpy()
        assert np.abs(np.subtract(d.truth.background_rgb, BACKGROUND_COLORS[d.truth.background])).max() <= jitter + 1e-9
        assert np.abs(img[background_pixels(d, edges)] - d.truth.background_rgb).max() < 1e-6
        for o in d.truth.objects:
            assert np.abs(np.subtract(o.rgb, OBJECT_COLORS[o.color])).max() <= jitter + 1e-9
            inner = full_pixels(o)
            assert inner.sum() >= 4
            assert np.abs(img[inner] - o.rgb).max() < 1e-6


def test_anti_aliased_coverage_matches_the_area():
    for d in I.draw_condition("anti_aliased", 10, seed=2):
        for o in d.truth.objects:
            assert I._coverage(o, "aa").sum() == pytest.approx(o.area(), rel=0.02)
            assert len(fine_points(o)) * 0.05**2 == pytest.approx(o.area(), rel=0.02)


@pytest.mark.parametrize("name", SURE)
def test_sizes_and_triangle_proportions_are_in_range(name):
    for d in I.draw_condition(name, 10, seed=0):
        for o in d.truth.objects:
            assert I.MIN_SIZE <= o.size <= I.MAX_SIZE
            pts = fine_points(o)
            if o.shape == "circle":
                assert np.ptp(pts, axis=0) == pytest.approx([o.size, o.size], abs=0.1)
            if o.shape == "square":
                assert len(pts) * 0.05**2 == pytest.approx(o.size**2, rel=0.02)
            if o.shape == "triangle":
                assert 0.85 <= o.aspect <= 1.15
                # height along the pointing direction, base across it
                r = np.deg2rad(o.angle)
                up, across = np.array([np.sin(r), -np.cos(r)]), np.array([np.cos(r), np.sin(r)])
                h, b = np.ptp(pts @ up), np.ptp(pts @ across)
                assert max(h, b) == pytest.approx(o.size, abs=0.25)  # a sampled apex falls short of the point
                assert h / b == pytest.approx(o.aspect, abs=0.04)


@pytest.mark.parametrize("name", ["clean", "anti_aliased", "jpeg_25"])
def test_objects_keep_two_to_six_pixels_from_their_nearest_neighbour(name):
    for d in I.draw_condition(name, 40, seed=0):
        objs = d.truth.objects
        for a in objs:
            assert I._fits(a)
            if len(objs) > 1:
                gaps = [I.gap(a, b) for b in objs if b is not a]
                assert 2 - 1e-6 <= min(gaps) <= 6 + 1e-6


@pytest.mark.parametrize("name, want", [("gap_2px", 2.0), ("gap_1px", 1.0), ("circles_touching", None)])
def test_close_pairs_are_as_far_apart_as_claimed(name, want):
    for d in I.draw_condition(name, 8, seed=0):
        a, b = d.truth.objects
        g = I.gap(a, b)
        if want is None:
            assert 0 <= g <= 1 + 1e-6 and a.color == b.color and a.shape == b.shape == "circle"
        else:
            assert g == pytest.approx(want, abs=1e-6)
        if name == "gap_1px":
            assert a.color != b.color
        sampled = cKDTree(fine_points(a)).query(fine_points(b))[0].min()
        assert g - 1e-3 <= sampled <= g + 0.15  # sampling agrees; a grid falls short of sharp corners


def test_gap_is_zero_for_overlapping_objects():
    for d in I.draw_condition("circles_overlapping", 12, seed=0):
        a, b = d.truth.objects
        assert I.gap(a, b) == 0
        ratio = np.hypot(*np.subtract(a.center, b.center)) / a.size
        assert a.size == b.size and 0.6 <= ratio <= 0.9


def test_border_cut_puts_a_quarter_of_one_object_outside_the_frame():
    for d in I.draw_condition("border_cut", 20, seed=0):
        fractions = sorted(o.visible_fraction() for o in d.truth.objects)
        assert fractions[0] == pytest.approx(1 - I.CUT_FRACTION, abs=0.005)
        assert all(f == 1 for f in fractions[1:])
        cut = min(d.truth.objects, key=lambda o: o.visible_fraction())
        pts = fine_points(cut)
        seen = ((pts >= 0) & (pts <= I.RES)).all(1).mean()
        assert seen == pytest.approx(1 - I.CUT_FRACTION, abs=0.02)


def test_triangles_point_down_left_or_right():
    for d in I.draw_condition("triangles_down_left_right", 30, seed=0):
        for o in d.truth.objects:
            if o.shape != "triangle":
                continue
            assert o.angle in (90.0, 180.0, 270.0)
            # the apex lies beyond the centroid in the pointing direction, the base behind it
            r = np.deg2rad(o.angle)
            toward = np.array([np.sin(r), -np.cos(r)])
            cov = I._coverage(o, "hard")
            ys, xs = np.nonzero(cov)
            proj = (np.stack([xs + 0.5, ys + 0.5], 1) - o.center) @ toward
            assert proj.max() > -proj.min()


def test_squares_are_tilted_20_to_45_degrees():
    for d in I.draw_condition("squares_rotated", 15, seed=0):
        for o in d.truth.objects:
            if o.shape == "square":
                assert 20 <= abs(o.angle) <= 45
                pts = fine_points(o)
                assert np.ptp(pts[:, 0]) > 1.25 * o.size  # wider than an upright square


@pytest.mark.parametrize("name, size, aspect", [("bar", 8, 0.25), ("rectangle", 12, 0.5), ("ellipse", None, 0.4)])
def test_elongated_objects_have_their_proportions(name, size, aspect):
    for d in I.draw_condition(name, 12, seed=0):
        (o,) = d.truth.objects
        pts = fine_points(o)
        axes = np.sqrt(np.linalg.eigvalsh(np.cov(pts.T)))
        assert axes[0] / axes[1] == pytest.approx(aspect, abs=0.02)  # same ratio for boxes and ellipses
        if size is not None:
            assert len(pts) * 0.05**2 == pytest.approx(size * size * aspect, rel=0.02)


def test_faint_object_is_whole_and_at_ten_to_fifteen_percent_contrast():
    for d in I.draw_condition("faint_extra_object", 20, seed=0):
        *scene, faint = d.truth.objects
        assert I.reads_as(I.Truth(d.truth.background, d.truth.background_rgb, tuple(scene)), d.prompt)
        assert I._fits(faint) and faint.size == I.FAINT_SIZE
        assert min(I.gap(faint, o) for o in scene) >= 2 - 1e-6
        img = d.image.permute(1, 2, 0).numpy()
        bg, full = np.asarray(d.truth.background_rgb), np.asarray(OBJECT_COLORS[faint.color])
        seen = img[full_pixels(faint)].mean(0)
        strong = np.abs(full - bg) > 0.2
        contrast = (seen - bg)[strong] / (full - bg)[strong]
        assert np.all((contrast >= 0.10 - 1e-4) & (contrast <= 0.15 + 1e-4))


@pytest.mark.parametrize("bg", list(I.OFF_PALETTE))
def test_off_palette_backgrounds_are_drawn_in_their_colour(bg):
    rgb, asked = I.OFF_PALETTE[bg]
    name = f"background_{bg.replace(' ', '_')}_as_{asked}"
    for d in I.draw_condition(name, 10, seed=0):
        assert parse_prompt(d.prompt).background == asked and d.truth.background == bg
        img = d.image.permute(1, 2, 0).numpy()
        assert np.abs(img[background_pixels(d, "aa")] - rgb).max() < 1e-6


@pytest.mark.parametrize("texture", ["blotches", "gradient", "stripes"])
def test_textures_stay_within_their_amplitude(texture):
    for d in I.draw_condition(f"texture_{texture}", 20, seed=0):
        img = d.image.permute(1, 2, 0).numpy()
        dev = img[background_pixels(d, "hard")] - np.asarray(d.truth.background_rgb)
        assert np.abs(dev).max() <= I.TEXTURE_AMPLITUDE + 1e-6
        assert np.abs(dev).max() >= I.TEXTURE_AMPLITUDE / 2  # there is a texture to see


def test_jpeg_changes_pixels_a_little_and_more_at_lower_quality():
    errors = {}
    for q in (50, 25):
        drawings = I.draw_condition(f"jpeg_{q}", 20, seed=0)
        plain = torch.stack([I.render(d.truth, I.Style(), np.random.default_rng(0)) for d in drawings])
        errors[q] = (torch.stack([d.image for d in drawings]) - plain).abs().mean().item()
    assert 0.005 < errors[50] < errors[25] < 0.1


def test_judge_verdicts_read_unsure_attributes():
    correct = torch.tensor([True, True, False, False])
    attributes = {"count": correct, "color": torch.ones(4, dtype=torch.bool)}
    accepts, unsure = I.judge_verdicts(SimpleNamespace(correct=correct, attributes=attributes))
    assert accepts.tolist() == correct.tolist() and not unsure.any()  # a judge without `unsure` is sure
    # 0: accepted, count unsure; 1: sure; 2: count surely false, colour unsure; 3: its only failure unsure
    hesitant = SimpleNamespace(correct=correct, attributes=attributes,
                               unsure={"count": torch.tensor([True, False, False, True]),
                                       "color": torch.tensor([False, False, True, False])})
    assert I.judge_verdicts(hesitant)[1].tolist() == [True, False, False, True]


# --- the judge against its goals ----------------------------------------------------------------

# Conditions on which the judge is still below its goal (figures at N, seed 0; the README's table has
# them at 300 images). Strict: a judge that reaches a goal must take its condition off this list.
BELOW_GOAL = {
    "color_jitter": "97.5% (99.0% at 300 images): 6 px hard-edged yellow on white, a grey that leans purple",
    "jpeg_50": "92.5%: colour-only outlines (yellow on pink, green on grey) blur to blobs, read unsure",
    "jpeg_25": "85.0%: as jpeg_50, and 6-7 px objects lose their corners in lightness too",
    "jpeg_50_lightness_outlines": "95.8%: 6-7 px squares and circles rounded or squared by the DCT",
    "jpeg_25_lightness_outlines": "93.3%: as jpeg_50_lightness_outlines, worse",
}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=BELOW_GOAL[n], strict=True)) if n in BELOW_GOAL else n
    for n in I.conditions()])
def test_judge_meets_its_goal(name):
    m = I.measure(name, N, seed=0)
    assert m.passed, m.summary()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(I.conditions()))
def test_judge_meets_its_goal_on_500_images(name):
    m = I.measure(name, SLOW_N, seed=1)
    assert m.passed, m.summary()
