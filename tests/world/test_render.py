import pytest
import torch

from t2i_rl.world import ShapesWorld


def test_render_shape_range_and_determinism():
    w = ShapesWorld()
    prompts = w.sample_prompts(8, seed=0)
    a = w.render(prompts, seed=7)
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, w.render(prompts, seed=7))
    assert not torch.equal(a, w.render(prompts, seed=8))


def test_layouts_keep_objects_apart_and_inside():
    w = ShapesWorld()
    prompts = ["two red circles and two blue squares on a black background"] * 50
    _, layouts = w.render_with_layouts(prompts, seed=3)
    for lay in layouts:
        assert len(lay.objects) == 4
        for i, a in enumerate(lay.objects):
            assert 0 <= a.x and a.x + a.size <= 32 and 0 <= a.y and a.y + a.size <= 32
            for b in lay.objects[i + 1:]:
                apart_x = a.x + a.size <= b.x or b.x + b.size <= a.x
                apart_y = a.y + a.size <= b.y or b.y + b.size <= a.y
                assert apart_x or apart_y


def test_render_rejects_bad_prompts():
    with pytest.raises(ValueError, match="teal"):
        ShapesWorld().render(["one teal circle on a white background"])


def test_world_rejects_bad_resolution():
    with pytest.raises(ValueError, match="resolution"):
        ShapesWorld(resolution=20)
