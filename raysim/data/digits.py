"""scikit-learn's bundled digits (1,797 8x8 images) with generated captions: the
embedded dataset of the quickstart, read without any download."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a photo of the digit {}",
    "a handwritten {}",
    "an image of the number {}",
    "the digit {} written by hand",
    "a small picture of a {}",
]
PROMPT_TEMPLATE = "a photo of the digit {}"


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, (1797, 8, 8) images and labels, read from the CSV the package
    ships, as `sklearn.datasets.load_digits` reads it. Importing sklearn costs ~1.2 s (it
    imports scipy.stats), paid by the driver and every worker on their way to round 1."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a layout this reader does not know: the library's loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits_examples(seed: int) -> dict:
    """Every digit as a raw example: a grey [0, 1] float image (8x8), a caption from one of
    the templates (drawn from the seed) and the digit as label."""
    images, targets = digits_arrays()
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(CAPTION_TEMPLATES), size=len(targets))
    captions = [CAPTION_TEMPLATES[t].format(DIGIT_WORDS[y]) for t, y in zip(templates, targets.tolist())]
    pixels = (images / 16.0).astype(np.float32)  # k/16 is exact in float32
    return {"image": list(pixels), "text": captions, "label": np.asarray(targets, dtype=np.int64)}
