"""The demo world: classes, captions and determinism."""

from __future__ import annotations

import numpy as np

from pipeline import demo_world


def test_at_least_32_classes_with_unique_names():
    classes = demo_world.demo_classes()
    assert len(classes) >= 32
    assert [c.index for c in classes] == list(range(len(classes)))
    assert len({c.name for c in classes}) == len(classes)


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = demo_world.make_sample(0, "train", 7)
    b = demo_world.make_sample(0, "train", 7)
    c = demo_world.make_sample(1, "train", 7)
    d = demo_world.make_sample(0, "val", 7)
    assert a.jpeg == b.jpeg and a.attributes == b.attributes
    assert a.jpeg != c.jpeg and a.jpeg != d.jpeg
    assert a.key == "demo_train_0000007"


def test_captions_name_colour_and_shape_in_varied_phrasing():
    samples = [demo_world.make_sample(0, "train", i) for i in range(200)]
    for s in samples:
        assert s.attributes.colour in s.attributes.caption
        assert s.attributes.shape in s.attributes.caption
    assert len({s.attributes.caption for s in samples}) > 150
    assert len({s.attributes.label for s in samples}) > 40


def test_nuisances_vary_within_a_class():
    samples = [demo_world.make_image(0, "train", i)[1] for i in range(400)]
    one_class = [a for a in samples if a.label == samples[0].label]
    assert len({a.size for a in samples}) == 3
    assert len({a.background for a in samples}) == len(demo_world.BACKGROUND_KINDS)
    assert len({round(a.rotation) for a in one_class}) == len(one_class)


def test_shape_is_drawn_in_its_colour():
    pixels, attributes = demo_world.make_image(0, "train", 3)
    side = pixels.shape[0]
    mask = demo_world.shape_mask(attributes, side) > 0.99
    assert mask.sum() > 20
    inside = pixels[mask].astype(float).mean(0)
    target = np.asarray(demo_world.COLOURS[attributes.colour], dtype=float)
    assert np.abs(inside - target).max() < 60
