"""`shapes`: a procedurally generated image-text world, the embedded default for experiments.

A scene is a function of (seed, split, client id, index) only: 1-3 objects, each with a
shape, a colour, a size and a position, on a background; optionally a per-client domain
style (tint, texture, noise, rotation) for feature skew. Each scene comes with a
compositional caption ("a small red circle left of a large blue square"), question-answer
pairs ("what colour is the circle" / "red", "how many shapes are there" / "two"), a class
label (the largest object's colour and shape, "red circle") and a per-pixel instance mask
(0 background, k the k-th object of the caption).

A client's scenes exist only when they are asked for, so a population of 1,000,000 clients
costs nothing until one is sampled; each holds `data.shapes.examples_per_client` scenes.
The test and pre-training splits are scenes of their own streams, which no client holds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (60, 90, 235),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = ((25, 25, 25), (45, 45, 62), (62, 45, 40), (35, 56, 46))
COUNT_WORDS = ("zero", "one", "two", "three")
# label = shape index * len(COLOURS) + colour index; the class name is "<colour> <shape>"
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)
PROMPT_TEMPLATE = "a large {}"
SIZES = {"small": (0.11, 0.16), "large": (0.20, 0.27)}  # radius as a share of the image side
STREAMS = {"client": 0, "test": 1, "pretrain": 2}
_TAG = 5150  # keeps these streams apart from every other use of the seed


def vocabulary() -> list[str]:
    """Every word a caption, question, answer or prompt can hold."""
    return sorted(
        {*SHAPES, *COLOURS, *SIZES, *COUNT_WORDS, "a", "left", "of", "above", "below", "large", "yes", "no"}
        | {"how", "many", "shapes", "are", "there", "what", "colour", "is", "the", "shape", "one", "size"}
    )


@dataclass(frozen=True)
class Style:
    """A domain: what every scene of one client shares (feature skew)."""

    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tint_amount: float = 0.0
    texture: str = "none"  # none | stripes | checker
    texture_amplitude: float = 0.0
    noise: float = 0.0  # std of per-pixel Gaussian noise, in 0-255 units
    angle: float = 0.0  # degrees every shape is turned by


def draw_style(rng: np.random.Generator, strength: float) -> Style:
    if strength <= 0:
        return Style()
    return Style(
        tint=tuple(float(v) for v in rng.uniform(0, 255, 3)),
        tint_amount=float(0.5 * strength * rng.uniform(0.5, 1.0)),
        texture=str(rng.choice(["none", "stripes", "checker"])),
        texture_amplitude=float(40 * strength),
        noise=float(25 * strength * rng.uniform(0.5, 1.0)),
        angle=float(rng.uniform(-45, 45) * strength),
    )


def client_style(seed: int, client: int, strength: float) -> Style:
    return draw_style(np.random.default_rng([seed, _TAG, 10, client]), strength)


def client_class_weights(seed: int, client: int, num_classes: int, alpha: float | None) -> np.ndarray:
    """Which class a client's scenes are about: uniform (iid), or ~ Dir(alpha) (label skew)."""
    if alpha is None:
        return np.full(num_classes, 1.0 / num_classes)
    return np.random.default_rng([seed, _TAG, 11, client]).dirichlet(np.full(num_classes, alpha))


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float  # circumradius in pixels

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def _layout(rng: np.random.Generator, side: int, label: int, max_objects: int) -> list[Obj]:
    """1..max_objects non-overlapping objects; the first (the label's colour and shape) is
    the largest. Returned in caption order (left to right)."""
    n = int(rng.integers(1, max_objects + 1))
    shape, colour = SHAPES[label // len(COLOURS)], COLOUR_NAMES[label % len(COLOURS)]
    r0 = rng.uniform(*SIZES["large"]) * side
    specs = [(shape, colour, "large", r0)]
    for _ in range(n - 1):
        size = "large" if rng.random() < 0.5 and r0 / side - 0.01 > SIZES["large"][0] else "small"
        lo, hi = SIZES[size]
        r = rng.uniform(lo, min(hi, r0 / side - 0.01)) * side
        specs.append((SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))], size, r))
    placed: list[Obj] = []
    for shape, colour, size, r in specs:
        for _ in range(100):
            x, y = rng.uniform(r + 1, side - r - 1, size=2)
            if all(math.hypot(x - o.x, y - o.y) >= r + o.r + 2 for o in placed):
                placed.append(Obj(shape, colour, size, float(x), float(y), float(r)))
                break
    return sorted(placed, key=lambda o: (o.x, o.y))


def _polygon(o: Obj, angle: float) -> list[tuple[float, float]]:
    if o.shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif o.shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus of arms 0.35 wide
        w, l = 0.35, 1.0
        pts = [(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l), (-w, w), (-l, w), (-l, -w), (-w, -w)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(o.x + o.r * (c * px - s * py), o.y + o.r * (s * px + c * py)) for px, py in pts]


def _draw(draw: ImageDraw.ImageDraw, o: Obj, angle: float, fill) -> None:
    if o.shape == "circle":
        draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
    else:
        draw.polygon(_polygon(o, angle), fill=fill)


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`, the next object of the caption (b.x >= a.x)."""
    dx, dy = b.x - a.x, b.y - a.y
    if dx >= abs(dy):
        return "left of"
    return "above" if dy > 0 else "below"


def caption(objects: list[Obj]) -> str:
    parts = [objects[0].describe()]
    for a, b in zip(objects, objects[1:]):
        parts += [relation(a, b), b.describe()]
    return " ".join(parts)


def questions_answers(objects: list[Obj], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    qa = [("how many shapes are there", COUNT_WORDS[len(objects)])]
    shapes = [o.shape for o in objects]
    colours = [o.colour for o in objects]
    for o in objects:
        if shapes.count(o.shape) == 1:
            qa.append((f"what colour is the {o.shape}", o.colour))
    for o in objects:
        if colours.count(o.colour) == 1:
            qa.append((f"what shape is the {o.colour} one", o.shape))
    pairs = [(o.colour, o.shape) for o in objects]
    for o in objects:
        if pairs.count((o.colour, o.shape)) == 1:
            qa.append((f"what size is the {o.colour} {o.shape}", o.size))
    largest = max(objects, key=lambda o: o.r)  # the label's object
    qa.append((f"is there a {largest.colour} {largest.shape}", "yes"))
    absent = [c for c in CLASSES if tuple(c.split()) not in pairs]
    colour, shape = absent[rng.integers(len(absent))].split()
    qa.append((f"is there a {colour} {shape}", "no"))
    return [q for q, _ in qa], [a for _, a in qa]


def _texture(side: int, style: Style) -> np.ndarray:
    if style.texture == "none" or style.texture_amplitude == 0:
        return np.zeros((side, side, 1))
    yy, xx = np.mgrid[0:side, 0:side]
    if style.texture == "stripes":
        pattern = ((xx + yy) // 3) % 2
    else:
        pattern = ((xx // 4) + (yy // 4)) % 2
    return (pattern * 2.0 - 1.0)[..., None] * style.texture_amplitude


def scene(seed: int, stream: str, client: int, index: int, *, side: int, max_objects: int,
          class_weights: np.ndarray, style: Style | None, domain_shift: float) -> dict:
    """One scene, a function of its arguments only. `style` None: each scene draws its own
    (the test and pre-training streams, when domain_shift > 0)."""
    rng = np.random.default_rng([seed, _TAG, STREAMS[stream], client, index])
    label = int(rng.choice(len(class_weights), p=class_weights))
    objects = _layout(rng, side, label, max_objects)
    if style is None:
        style = draw_style(rng, domain_shift)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = Image.new("RGB", (side, side), background)
    mask = Image.new("L", (side, side), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for k, o in enumerate(objects, start=1):
        _draw(draw_image, o, style.angle, COLOURS[o.colour])
        _draw(draw_mask, o, style.angle, k)
    if style != Style():
        pixels = np.asarray(image, dtype=np.float64)
        background_only = (np.asarray(mask) == 0)[..., None]
        pixels = pixels + _texture(side, style) * background_only
        pixels = pixels * (1 - style.tint_amount) + np.asarray(style.tint) * style.tint_amount
        pixels = pixels + rng.normal(0, style.noise, pixels.shape) if style.noise else pixels
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    questions, answers = questions_answers(objects, rng)
    return {
        "image": image,
        "mask": mask,
        "caption": caption(objects),
        "questions": questions,
        "answers": answers,
        "label": label,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "x": o.x, "y": o.y, "r": o.r} for o in objects
        ],
    }


class ShapesWorld:
    """The scenes of one config: per client, the test split and the pre-training split."""

    def __init__(self, seed: int, d):  # d: the data config
        self.seed, self.side, self.shapes = seed, d.image_size, d.shapes
        self.alpha = d.alpha if d.partition == "dirichlet" else None

    def scenes(self, stream: str, client: int, count: int) -> list[dict]:
        s = self.shapes
        if stream == "client":
            weights = client_class_weights(self.seed, client, len(CLASSES), self.alpha)
            style = client_style(self.seed, client, s.domain_shift)
        else:
            weights, style = np.full(len(CLASSES), 1.0 / len(CLASSES)), (None if s.domain_shift else Style())
        return [
            scene(self.seed, stream, client, i, side=self.side, max_objects=s.max_objects, class_weights=weights,
                  style=style, domain_shift=s.domain_shift)
            for i in range(count)
        ]

    def client_scenes(self, client: int) -> list[dict]:
        return [dict(row, client=client) for row in self.scenes("client", client, self.shapes.examples_per_client)]

    def dataset(self, rows: list[dict]):
        """The scenes as an HF Dataset (images stored as PNG), read like a user's data."""
        from raysim.data.local import hf_datasets

        ds = hf_datasets()
        features = ds.Features(
            {
                "image": ds.Image(),
                "mask": ds.Image(),
                "caption": ds.Value("string"),
                "questions": ds.List(ds.Value("string")),
                "answers": ds.List(ds.Value("string")),
                "label": ds.ClassLabel(names=list(CLASSES)),
                "client": ds.Value("int64"),
                "objects": ds.List(
                    {"shape": ds.Value("string"), "colour": ds.Value("string"), "size": ds.Value("string"),
                     "x": ds.Value("float32"), "y": ds.Value("float32"), "r": ds.Value("float32")}
                ),
            }
        )
        rows = [dict(row, client=row.get("client", -1)) for row in rows]
        return ds.Dataset.from_dict({k: [row[k] for row in rows] for k in features}, features=features)


def export_imagefolder(world: ShapesWorld, num_clients: int, out: Path) -> dict[str, int]:
    """Write the clients' scenes (train/, one directory per client) and the test split
    (test/, client -1) as an imagefolder: PNG images and masks plus metadata.jsonl."""
    counts = {}
    for split, groups in (
        ("train", ((c, world.client_scenes(c)) for c in range(num_clients))),
        ("test", [(None, world.scenes("test", 0, world.shapes.test_size))]),
    ):
        root = out / split
        root.mkdir(parents=True, exist_ok=True)
        n = 0
        with open(root / "metadata.jsonl", "w") as meta:
            for client, rows in groups:
                folder = f"client-{client:06d}" if client is not None else "scenes"
                (root / folder).mkdir(exist_ok=True)
                for i, row in enumerate(rows):
                    name = f"{folder}/{i:05d}"
                    row["image"].save(root / f"{name}.png")
                    row["mask"].save(root / f"{name}-mask.png")
                    record = {"file_name": f"{name}.png", "mask_file_name": f"{name}-mask.png", "caption": row["caption"],
                              "questions": row["questions"], "answers": row["answers"], "label": CLASSES[row["label"]],
                              "objects": row["objects"], "client": -1 if client is None else client}  # -1: no client's
                    meta.write(json.dumps(record) + "\n")
                    n += 1
        counts[split] = n
    return counts
