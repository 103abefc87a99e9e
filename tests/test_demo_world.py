"""The demo world: classes, captions and determinism."""

from __future__ import annotations

import numpy as np

from pipeline import demo_world


def test_at_least_32_classes_unique_but_for_homonym_pairs():
    classes = demo_world.demo_classes()
    assert len(classes) >= 32
    assert [c.index for c in classes] == list(range(len(classes)))
    assert len({c.id for c in classes}) == len(classes)
    by_name = {}
    for c in classes:
        by_name.setdefault(c.name, []).append(c)
    shared = {name: group for name, group in by_name.items() if len(group) > 1}
    assert sorted(shared) == sorted(demo_world.HOMONYMS) and len(shared) >= 4
    for name, (a, b) in shared.items():  # visually distinct: other colour and other shape
        assert a.colour != b.colour and a.shape != b.shape, name
        assert a.sense and b.sense and a.sense != b.sense
        assert demo_world.demo_contexts(a) == (a.sense,)
    senses = [c.sense for c in classes if c.sense]
    assert len(set(senses)) == len(senses)  # every sense word names one class


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = demo_world.make_sample(0, "train", 7)
    b = demo_world.make_sample(0, "train", 7)
    c = demo_world.make_sample(1, "train", 7)
    d = demo_world.make_sample(0, "val", 7)
    assert a.jpeg == b.jpeg and a.attributes == b.attributes
    assert a.jpeg != c.jpeg and a.jpeg != d.jpeg
    assert a.key == "demo_train_0000007"


def test_captions_name_the_class_in_varied_phrasing():
    samples = [demo_world.make_sample(0, "train", i) for i in range(400)]
    classes = demo_world.demo_classes()
    with_sense = 0
    homonym_samples = 0
    for s in samples:
        cls = classes[s.attributes.label]
        caption = s.attributes.caption
        words = set(caption.replace(",", " ").replace(".", " ").split())
        if cls.sense:
            homonym_samples += 1
            assert cls.name in words and cls.colour not in words and cls.shape not in words
            with_sense += f"{cls.name}, a kind of {cls.sense}" in caption
            assert not any(other.sense in words for other in classes
                           if other.sense and other.sense != cls.sense)
        else:
            assert cls.colour in words and cls.shape in words
        assert ",." not in caption and ",," not in caption and not caption.endswith(",")
    assert homonym_samples > 80
    assert 0.35 < with_sense / homonym_samples < 0.65  # CONTEXT_RATE = 0.5
    assert len({s.attributes.caption for s in samples}) > 300
    assert len({s.attributes.label for s in samples}) == len(classes)


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


def test_caption_noise_swaps_a_seeded_share_of_train_captions_for_other_images():
    from pipeline.demo_world import caption_of, make_sample

    count, noise = 400, 0.3
    own = [caption_of(0, "train", i) for i in range(count)]
    noisy = [make_sample(0, "train", i, 16, caption_noise=noise, count=count).attributes.caption for i in range(count)]
    swapped = [i for i in range(count) if noisy[i] != own[i]]
    assert 0.2 * count < len(swapped) < 0.4 * count  # about 30%, some swaps land on an identical caption
    assert all(noisy[i] in own for i in swapped)  # another image's caption, not a made-up one
    again = [make_sample(0, "train", i, 16, caption_noise=noise, count=count).attributes.caption for i in range(count)]
    assert again == noisy  # seeded: the same world every time
    assert [make_sample(0, "val", i, 16, caption_noise=noise, count=count).attributes.caption
            for i in range(20)] == [caption_of(0, "val", i) for i in range(20)]  # val stays clean
    clean = make_sample(0, "train", 5, 16)
    assert clean.attributes.caption == own[5] and clean.jpeg == make_sample(0, "train", 5, 16, 0.3, count).jpeg


def test_the_easy_world_is_what_it_was():
    """The hard world's options leave the easy world's bytes alone: the digest of its first 40
    train and val samples (seed 0), which the code before the hard world gave too."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(40):
            sample = demo_world.make_sample(0, split, i, 64, 0.3 if split == "train" else 0.0, 40)
            digest.update(sample.jpeg + json.dumps(sample.attributes.record(), sort_keys=True).encode())
    assert digest.hexdigest() == EASY_DIGEST
    assert not any(key.startswith("distractor") for key in sample.attributes.record())


EASY_DIGEST = "c84d7b8723da136eb2cde180a2cfe331197b5d89426699d9adb2ae1e1b82168a"


def test_the_hard_world_has_twins_distractors_and_partial_captions():
    hard = demo_world.HARD
    samples = [demo_world.make_sample(0, "train", i, world=hard) for i in range(400)]
    assert demo_world.make_sample(0, "train", 5, world=hard) == samples[5]  # seeded
    classes = demo_world.demo_classes(hard)
    assert len({s.attributes.label for s in samples}) == len(classes) == 64
    with_distractor = [s.attributes for s in samples if s.attributes.distractor_colour]
    assert 0.22 < len(with_distractor) / len(samples) < 0.38
    for a in with_distractor:
        assert (a.distractor_colour, a.distractor_shape) != (a.colour, a.shape)  # another class
        assert a.distractor_radius < 0.56 * a.radius  # smaller: the label is the larger object
        assert set(a.record()) >= {"distractor_colour", "distractor_cx"}
    mentioned = [a for a in with_distractor if f"and a smaller {a.distractor_colour} {a.distractor_shape}" in a.caption]
    assert 0.3 < len(mentioned) / len(with_distractor) < 0.7
    # partial captions name the shape or the colour only; the others name the class
    named = [s for s in samples if classes[s.attributes.label].name in s.attributes.caption]
    assert 0.75 < len(named) / len(samples) < 0.95
    pixels, _ = demo_world.make_image(0, "val", 3, world=hard)
    assert pixels.shape == (64, 64, 3)


def test_the_shifted_split_draws_outlines_on_backgrounds_no_other_split_has():
    """The shifted split (`shards --shifted N`): the same classes, each object its outline only, on
    the backgrounds of SHIFTED_BACKGROUNDS; image i of val and of shifted are different draws."""
    from pipeline.demo_world import BACKGROUND_KINDS, HARD, SHIFTED_BACKGROUNDS, make_image, shape_mask

    filled, hollow = [], []
    for i in range(40):
        for split, kept in (("val", filled), ("shifted", hollow)):
            pixels, a = make_image(0, split, i, 64, HARD)
            assert a.background in (SHIFTED_BACKGROUNDS if split == "shifted" else BACKGROUND_KINDS)
            core = shape_mask(type(a)(**{**a.__dict__, "radius": a.radius * 0.4}), 64) > 0.99  # the centre
            if core.any() and not a.distractor_colour:
                colour = np.asarray(HARD.colours[a.colour], dtype=np.float32)
                kept.append(float(np.abs(pixels[core].astype(np.float32) - colour).mean()))
    # the centre of a filled object is its colour (jitter and noise aside); an outline's is background
    assert np.median(filled) < 40 < np.median(hollow), (np.median(filled), np.median(hollow))
