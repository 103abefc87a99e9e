"""The demo world: a seeded generator of captioned images, a laptop-sized stand-in for ImageNet.

A class is a (colour, shape) pair: 6 colours x 8 shapes = 48 classes. Every image also
varies in nuisance factors that do not change its class: size, position, rotation,
background (kind and tone), colour jitter and pixel noise, so that classes are not
separable from raw pixels alone. Each image carries a caption that states its attributes
in varied phrasing; it is what the demo CLIP teacher is trained on.

Lexical ambiguity, as on ImageNet (two classes called "crane"): 16 classes come in 8
homonym pairs. The two classes of a pair look nothing alike (other colour, other shape)
but share one name, e.g. "crane" is the red triangle (a kind of bird) and the blue cross
(a kind of machine). Their captions call them by that name only, and add the
disambiguating sense ("crane, a kind of bird") in `CONTEXT_RATE` of the captions, as web
text sometimes does. A plain prompt ("a photo of a crane.") cannot tell the pair apart;
a CPA prompt with the sense ("a photo of a crane, a kind of bird.") can.

Image `i` of a split depends only on (seed, split, i): generation can be split across
processes and the same seed always gives the same bytes.

Two worlds share this generator (`WORLDS`, the shards option `--world`):

- **easy** (the default, `make demo`): the above. Its classes differ in colour and shape by
  wide margins, so a small teacher becomes near-certain (99% zero-shot).
- **hard**: a teacher as unsure as a real CLIP, for the studies that need one. 8 colours x 8
  shapes = 64 classes that share structure the way ImageNet's do: every colour has a twin
  close to it (red and scarlet, orange and amber, green and teal, blue and violet) and six of the
  shapes have one (circle and octagon, square and pentagon, star and six-point star), so a
  class has one or two near neighbours, its fine-grained variants. 30% of the images hold a
  distractor, a smaller object of another class (the label is the larger object), which half
  their captions mention; 15% of the captions are partial (name only the colour or only the
  shape). The errors a teacher makes here are structured: mostly a twin of the true
  class (`twin_classes`), which probe's confusion summary shows.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 175, 60),
    "blue": (35, 80, 225),
    "purple": (150, 45, 190),
}
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart",
)
# Radius as a fraction of the image side. Measured: with radii 0.11-0.34 a ResNet-18 at 64 px
# (16x16 maps after its stem) told the shapes apart slowly (shape right 59% of the time after 5
# epochs, colour 99.9%); at these radii its 5-epoch linear probe rose from 69.1 to 85.7.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.16, 0.2),
    "medium": (0.22, 0.28),
    "large": (0.3, 0.36),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "striped", "checkered", "noisy")
BACKGROUND_TONES: dict[str, tuple[float, float]] = {  # grey level range, 0-255
    "dark": (25, 80),
    "grey": (95, 150),
    "light": (170, 230),
}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
SPLIT_CODES = {"train": 1, "val": 2, "shifted": 3}
# The shifted val split (an ImageNet-Sketch/-R analogue, `shards --shifted N`): every object drawn as its
# outline only (OUTLINE_INNER: the hollow part's radius as a share of the object's), on backgrounds that
# no train or val image has.
OUTLINE_INNER = 0.62
SHIFTED_BACKGROUNDS: tuple[str, ...] = ("dotted", "woven")
JPEG_QUALITY = 92

# name -> ((colour, shape, sense), (colour, shape, sense)): visually distinct pairs.
HOMONYMS: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "crane": (("red", "triangle", "bird"), ("blue", "cross", "machine")),
    "bat": (("orange", "crescent", "mammal"), ("green", "square", "club")),
    "mouse": (("yellow", "circle", "rodent"), ("purple", "star", "gadget")),
    "bass": (("green", "heart", "fish"), ("red", "ring", "guitar")),
    "jaguar": (("blue", "star", "cat"), ("yellow", "square", "car")),
    "apple": (("purple", "circle", "fruit"), ("orange", "triangle", "computer")),
    "palm": (("yellow", "heart", "tree"), ("blue", "ring", "hand")),
    "bow": (("purple", "crescent", "ribbon"), ("orange", "cross", "weapon")),
}
CONTEXT_RATE = 0.5  # share of a homonym class's captions that state its sense

SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "mid-sized"),
              "large": ("large", "big")}

# The hard world (see the module's text). Twins: colours a jitter apart, shapes a few pixels apart.
HARD_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "scarlet": (235, 62, 28),
    "orange": (245, 135, 20),
    "amber": (245, 168, 22),
    "green": (40, 175, 60),
    "teal": (28, 160, 110),
    "blue": (35, 80, 225),
    "violet": (82, 62, 222),
}
HARD_SHAPES: tuple[str, ...] = (
    "circle", "octagon", "square", "pentagon", "star", "six-point star", "heart", "cross",
)
HARD_TWINS: tuple[tuple[str, str], ...] = (
    ("red", "scarlet"), ("orange", "amber"), ("green", "teal"), ("blue", "violet"),
    ("circle", "octagon"), ("square", "pentagon"), ("star", "six-point star"),
)
HARD_HOMONYMS: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "crane": (("red", "star", "bird"), ("teal", "cross", "machine")),
    "bat": (("orange", "heart", "mammal"), ("violet", "square", "club")),
    "mouse": (("amber", "circle", "rodent"), ("blue", "six-point star", "gadget")),
    "bass": (("green", "pentagon", "fish"), ("scarlet", "octagon", "guitar")),
}


@dataclass(frozen=True)
class World:
    """What a world's images and captions are made of (`EASY`, `HARD`)."""

    name: str
    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    homonyms: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]]
    twins: tuple[tuple[str, str], ...] = ()  # colours or shapes that are near neighbours
    distractor_rate: float = 0.0  # share of images with a second, smaller object of another class
    distractor_caption_rate: float = 0.0  # share of those whose caption mentions it
    partial_rate: float = 0.0  # share of captions naming only the colour or only the shape

    def homonym_of(self, colour: str, shape: str) -> tuple[str, str] | None:
        """(name, sense) of a homonym class, None for the others."""
        for name, pair in self.homonyms.items():
            for c, s, sense in pair:
                if (c, s) == (colour, shape):
                    return name, sense
        return None

    def twin(self, attribute: str) -> str | None:
        for a, b in self.twins:
            if attribute in (a, b):
                return b if attribute == a else a
        return None


EASY = World("easy", COLOURS, SHAPES, HOMONYMS)
HARD = World("hard", HARD_COLOURS, HARD_SHAPES, HARD_HOMONYMS, HARD_TWINS, distractor_rate=0.3,
             distractor_caption_rate=0.5, partial_rate=0.15)
WORLDS: dict[str, World] = {"easy": EASY, "hard": HARD}


@dataclass(frozen=True)
class DemoClass:
    index: int
    colour: str
    shape: str
    world: str = "easy"

    @property
    def name(self) -> str:
        """What captions and plain prompts call the class: "red star", or a homonym ("crane")."""
        homonym = WORLDS[self.world].homonym_of(self.colour, self.shape)
        return homonym[0] if homonym else f"{self.colour} {self.shape}"

    @property
    def sense(self) -> str:
        """The disambiguating context of a homonym class ("bird"), "" for the others."""
        homonym = WORLDS[self.world].homonym_of(self.colour, self.shape)
        return homonym[1] if homonym else ""

    @property
    def id(self) -> str:
        return f"{self.colour}_{self.shape.replace(' ', '_').replace('-', '_')}"


def demo_classes(world: World = EASY) -> list[DemoClass]:
    """All classes of `world` in index order (colour-major)."""
    return [
        DemoClass(c * len(world.shapes) + s, colour, shape, world.name)
        for c, colour in enumerate(world.colours)
        for s, shape in enumerate(world.shapes)
    ]


def twin_classes(world: World) -> dict[int, list[int]]:
    """Each class's near neighbours: the classes that differ from it by one twin attribute
    (its colour's twin with its shape, or its shape's twin with its colour). Empty lists in the
    easy world, which has no twins."""
    classes = demo_classes(world)
    index = {(c.colour, c.shape): c.index for c in classes}
    neighbours: dict[int, list[int]] = {}
    for c in classes:
        near = []
        if (colour := world.twin(c.colour)) is not None:
            near.append(index[(colour, c.shape)])
        if (shape := world.twin(c.shape)) is not None:
            near.append(index[(c.colour, shape)])
        neighbours[c.index] = sorted(near)
    return neighbours


def demo_contexts(cls: DemoClass) -> tuple[str, ...]:
    """CPA contexts of a demo class: the sense of a homonym ("bird"), none for the others.

    A class without contexts falls back to the plain templates (see `pipeline.prompts`), so
    plain and CPA anchors differ exactly where a name is ambiguous, as on ImageNet.
    """
    return (cls.sense,) if cls.sense else ()


@dataclass(frozen=True)
class DemoAttributes:
    """Everything that determines one image (stored as the sample's `json`)."""

    label: int
    colour: str
    shape: str
    size: str
    radius: float  # fraction of the image side
    cx: float  # centre, fractions of the image side
    cy: float
    rotation: float  # degrees
    background: str
    tone: str
    noise: float  # pixel noise standard deviation, 0-255 scale
    caption: str
    # hard world: a smaller second object of another class ("" colour: none)
    distractor_colour: str = ""
    distractor_shape: str = ""
    distractor_radius: float = 0.0
    distractor_cx: float = 0.0
    distractor_cy: float = 0.0
    distractor_rotation: float = 0.0

    def record(self) -> dict:
        """The attributes as a shard sample stores them (`json`): without the distractor's keys
        when there is none, so an easy-world sample is what it always was."""
        fields = asdict(self)
        if not self.distractor_colour:
            fields = {k: v for k, v in fields.items() if not k.startswith("distractor_")}
        return fields


def position_words(cx: float, cy: float) -> tuple[str, str]:
    row = ROWS[min(int(cy * 3), 2)]
    column = COLUMNS[min(int(cx * 3), 2)]
    return row, column


def position_phrase(row: str, column: str, rng: np.random.Generator) -> str:
    if row == "middle" and column == "center":
        return str(rng.choice(["in the center", "in the middle", "at the center"]))
    if row == "middle":
        return f"on the {column}"
    if column == "center":
        return f"at the {row}"
    return str(rng.choice([f"in the {row} {column}", f"in the {row} {column} corner"]))


def caption_for(a: DemoAttributes, rng: np.random.Generator, world: World = EASY) -> str:
    """A caption that states the attributes, in one of several phrasings.

    The class is always named (colour and shape, or its homonym, with its sense in
    `CONTEXT_RATE` of a homonym's captions); size, position and background come and go, so
    the teacher learns that the class words matter whatever else is said. In the hard world a
    share of captions names only the colour or only the shape (`World.partial_rate`), and some
    mention the distractor.
    """
    size = str(rng.choice(SIZE_WORDS[a.size]))
    where = position_phrase(*position_words(a.cx, a.cy), rng)
    background = f"{a.tone} {a.background} background"
    homonym = world.homonym_of(a.colour, a.shape)
    if world.partial_rate and rng.random() < world.partial_rate:
        name = a.shape if rng.random() < 0.5 else f"{a.colour} object"
        homonym = None
    elif homonym:
        name, sense = homonym
        if rng.random() < CONTEXT_RATE:
            name = f"{name}, a kind of {sense},"
    else:
        name = f"{a.colour} {a.shape}"
    phrasings = [
        f"a {size} {name} on a {background}",
        f"a photo of a {name}, {a.size}, on a {background}.",
        f"a {name} {where}",
        f"a {size} {name} {where} of the picture",
        f"a {name} {where} on a {background}",
        f"an image of a {size} {name}",
        f"a {background} with a {size} {name} {where}",
        f"there is a {name} on a {background}",
        f"a {name}",
        f"a photo of a {name}.",
    ]
    if not homonym and world is EASY:
        phrasings.append(f"{size} {a.shape}, colour {a.colour}, {where}")
    caption = phrasings[int(rng.integers(len(phrasings)))]
    if a.distractor_colour and rng.random() < world.distractor_caption_rate:
        caption = f"{caption.rstrip('.')}, and a smaller {a.distractor_colour} {a.distractor_shape}"
    return " ".join(caption.replace(",,", ",").replace(",.", ".").rstrip(",").split())


def sample_attributes(label: int, rng: np.random.Generator, world: World = EASY,
                      backgrounds: tuple[str, ...] = BACKGROUND_KINDS) -> DemoAttributes:
    classes = demo_classes(world)
    cls = classes[label]
    size = str(rng.choice(list(SIZES)))
    radius = float(rng.uniform(*SIZES[size]))
    margin = radius * 0.9
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    attributes = DemoAttributes(
        label=label,
        colour=cls.colour,
        shape=cls.shape,
        size=size,
        radius=radius,
        cx=cx,
        cy=cy,
        rotation=float(rng.uniform(0, 360)),
        background=str(rng.choice(backgrounds)),
        tone=str(rng.choice(list(BACKGROUND_TONES))),
        noise=float(rng.uniform(0, 14)),
        caption="",
    )
    if world.distractor_rate and rng.random() < world.distractor_rate:
        attributes = with_distractor(attributes, classes, rng)
    return replace(attributes, caption=caption_for(attributes, rng, world))


def with_distractor(a: DemoAttributes, classes: list[DemoClass], rng: np.random.Generator) -> DemoAttributes:
    """`a` with a second object of another class, 35-55% of its size, placed where it overlaps
    the main object little (the last of 20 tries if none is clear)."""
    other = classes[(a.label + 1 + int(rng.integers(len(classes) - 1))) % len(classes)]
    radius = a.radius * float(rng.uniform(0.35, 0.55))
    margin = radius * 0.9
    for _ in range(20):
        cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
        if math.hypot(cx - a.cx, cy - a.cy) >= (a.radius + radius) * 0.9:
            break
    return replace(a, distractor_colour=other.colour, distractor_shape=other.shape, distractor_radius=radius,
                   distractor_cx=cx, distractor_cy=cy, distractor_rotation=float(rng.uniform(0, 360)))


def shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list:
    """Vertices of a polygonal shape in pixels (for the shapes drawn as one polygon)."""
    if shape == "square":
        points = [(math.cos(a), math.sin(a)) for a in np.radians([45, 135, 225, 315])]
        points = [(x * 0.95, y * 0.95) for x, y in points]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    elif shape == "star":
        points = [
            ((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
            for k, a in enumerate(np.radians(np.arange(10) * 36 - 90))
        ]
    elif shape == "six-point star":
        points = [
            ((1.0 if k % 2 == 0 else 0.5) * math.cos(a), (1.0 if k % 2 == 0 else 0.5) * math.sin(a))
            for k, a in enumerate(np.radians(np.arange(12) * 30 - 90))
        ]
    elif shape == "octagon":
        points = [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(8) * 45 + 22.5)]
    elif shape == "pentagon":
        points = [(math.cos(a), math.sin(a)) for a in np.radians(np.arange(5) * 72 - 90)]
    elif shape == "cross":
        w = 0.34
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                  (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        points = list(zip(x / 17.0, (y + 2.5) / 17.0, strict=True))
    else:
        raise ValueError(f"{shape} is not a polygon shape")
    theta = math.radians(rotation)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * cos_t - y * sin_t), cy + r * (x * sin_t + y * cos_t)) for x, y in points]


SUPERSAMPLE = 4


def shape_mask(a: DemoAttributes, side: int) -> np.ndarray:
    """Anti-aliased coverage (0-1) of the shape, drawn at 4x and averaged down."""
    big = side * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = a.cx * big, a.cy * big, a.radius * big
    if a.shape in ("circle", "ring", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if a.shape == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
        elif a.shape == "crescent":
            theta = math.radians(a.rotation)
            ox, oy = cx + 0.45 * r * math.cos(theta), cy + 0.45 * r * math.sin(theta)
            cut = r * 0.85
            draw.ellipse([ox - cut, oy - cut, ox + cut, oy + cut], fill=0)
    else:
        draw.polygon(shape_polygon(a.shape, cx, cy, r, a.rotation), fill=255)
    small = mask.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def background(a: DemoAttributes, side: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation background (H, W, 3) float array in 0-255."""
    level = rng.uniform(*BACKGROUND_TONES[a.tone])
    tint = rng.normal(0, 6, size=3)  # a faint colour cast, never a class colour
    base = np.full((side, side, 3), level, dtype=np.float32) + tint.astype(np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    contrast = rng.uniform(18, 40)
    if a.background == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        base += (ramp * 2 * contrast)[..., None]
    elif a.background == "striped":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.2)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        base += (np.sign(np.sin(2 * math.pi * phase)) * contrast / 2)[..., None]
    elif a.background == "checkered":
        cell = rng.uniform(0.08, 0.2)
        checks = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
        base += ((checks - 0.5) * contrast)[..., None]
    elif a.background == "dotted":  # shifted split only
        cell = rng.uniform(0.07, 0.12)
        dots = ((np.mod(xx, cell) / cell - 0.5) ** 2 + (np.mod(yy, cell) / cell - 0.5) ** 2) < 0.09
        base += ((dots - 0.5) * contrast)[..., None]
    elif a.background == "woven":  # shifted split only
        period = rng.uniform(0.06, 0.1)
        weave = np.sin(2 * math.pi * xx / period) * np.sin(2 * math.pi * yy / period)
        base += (weave * contrast / 2)[..., None]
    elif a.background == "noisy":
        coarse = rng.normal(0, contrast / 2, size=(side // 8 + 1, side // 8 + 1))
        blobs = np.kron(coarse, np.ones((8, 8)))[:side, :side]
        base += blobs[..., None].astype(np.float32)
    return base


def paint(canvas: np.ndarray, a: DemoAttributes, rgb: tuple[int, int, int], side: int,
          rng: np.random.Generator, outline: bool = False) -> np.ndarray:
    """`canvas` with the shape of `a` painted over it in `rgb`, jittered and softly shaded; with
    `outline`, only its rim (the shape less the same shape OUTLINE_INNER as large)."""
    colour = np.asarray(rgb, dtype=np.float32)
    colour = np.clip(colour * rng.uniform(0.82, 1.1) + rng.normal(0, 10, size=3), 0, 255)
    mask = shape_mask(a, side)
    if outline:
        mask = np.clip(mask - shape_mask(replace(a, radius=a.radius * OUTLINE_INNER), side), 0, 1)
    mask = mask[..., None]
    # Soft shading across the shape so it is not a flat fill.
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    shade = 1.0 + 0.12 * ((xx - a.cx) * rng.uniform(-1, 1) + (yy - a.cy) * rng.uniform(-1, 1))
    return canvas * (1 - mask) + (colour * shade[..., None]) * mask


def render(a: DemoAttributes, side: int, rng: np.random.Generator, world: World = EASY,
           outline: bool = False) -> np.ndarray:
    """The image of `a` as (side, side, 3) uint8: the distractor, if any, under the main object;
    with `outline` (the shifted split), every object drawn as its outline."""
    canvas = background(a, side, rng)
    if a.distractor_colour:
        distractor = replace(a, shape=a.distractor_shape, radius=a.distractor_radius, cx=a.distractor_cx,
                             cy=a.distractor_cy, rotation=a.distractor_rotation)
        canvas = paint(canvas, distractor, world.colours[a.distractor_colour], side, rng, outline)
    canvas = paint(canvas, a, world.colours[a.colour], side, rng, outline)
    canvas += rng.normal(0, a.noise, size=canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class DemoSample:
    key: str
    jpeg: bytes
    attributes: DemoAttributes


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def make_image(seed: int, split: str, index: int, side: int = 64,
               world: World = EASY) -> tuple[np.ndarray, DemoAttributes]:
    """Image `index` of `split` as (side, side, 3) uint8 pixels, with its attributes. The
    `shifted` split draws outlines on backgrounds of its own (SHIFTED_BACKGROUNDS)."""
    rng = sample_rng(seed, split, index)
    label = int(rng.integers(len(demo_classes(world))))
    shifted = split == "shifted"
    attributes = sample_attributes(label, rng, world, SHIFTED_BACKGROUNDS if shifted else BACKGROUND_KINDS)
    return render(attributes, side, rng, world, outline=shifted), attributes


NOISE_CODE = 77  # keeps the caption-noise draws apart from the image's own random stream


def caption_of(seed: int, split: str, index: int, world: World = EASY) -> str:
    """The caption image `index` of `split` states (without rendering the image)."""
    rng = sample_rng(seed, split, index)
    return sample_attributes(int(rng.integers(len(demo_classes(world)))), rng, world).caption


def noisy_caption(seed: int, split: str, index: int, count: int, noise: float, caption: str,
                  world: World = EASY) -> str:
    """Web-like caption noise: with probability `noise` (a seeded draw per image), the caption
    of another image of the split (one of `count`) replaces the image's own `caption`."""
    if noise <= 0 or count < 2:
        return caption
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index, NOISE_CODE])
    if rng.random() >= noise:
        return caption
    other = int(rng.integers(count - 1))
    return caption_of(seed, split, other + (other >= index), world)


def make_sample(seed: int, split: str, index: int, side: int = 64, caption_noise: float = 0.0,
                count: int = 0, world: World = EASY) -> DemoSample:
    """Image `index` of `split` (one of `count`) as a shard sample: key, JPEG bytes, attributes
    and caption; `caption_noise` of the train split's captions belong to another image."""
    pixels, attributes = make_image(seed, split, index, side, world)
    if split == "train" and caption_noise > 0:
        caption = noisy_caption(seed, split, index, count, caption_noise, attributes.caption, world)
        attributes = replace(attributes, caption=caption)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return DemoSample(f"demo_{split}_{index:07d}", buffer.getvalue(), attributes)
