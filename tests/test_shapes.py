"""The shapes world (issue 19): deterministic, lazy per client, and its captions, answers
and labels agree with its masks."""
import json
import time

import numpy as np
import pytest

from raysim.cli import main
from raysim.config import load_config
from raysim.data import FederatedData, prepare
from raysim.data.shapes import CLASSES, COLOURS, COUNT_WORDS, SHAPES, ShapesWorld

QUICK = "configs/quickstart.yaml"


def world(*extra):
    return ShapesWorld(0, load_config(QUICK, ["data.dataset=shapes", *extra]).data)


def pixels(scene):
    return np.asarray(scene["image"]), np.asarray(scene["mask"])


def test_scenes_are_a_function_of_seed_client_and_index():
    a, b = world().client_scenes(7), world().client_scenes(7)
    for x, y in zip(a, b):
        assert np.array_equal(pixels(x)[0], pixels(y)[0]) and np.array_equal(pixels(x)[1], pixels(y)[1])
        assert (x["caption"], x["questions"], x["answers"], x["label"]) == (y["caption"], y["questions"], y["answers"], y["label"])
    other = world().client_scenes(8)
    assert [s["caption"] for s in a] != [s["caption"] for s in other]
    reseeded = ShapesWorld(1, load_config(QUICK, ["data.dataset=shapes"]).data).client_scenes(7)
    assert [s["caption"] for s in a] != [s["caption"] for s in reseeded]
    # the test and pre-training streams are scenes no client holds
    test = world().scenes("test", 0, 8)
    assert not any(np.array_equal(pixels(t)[0], pixels(c)[0]) for t in test for c in world().client_scenes(0)[:8])


def test_a_million_clients_cost_nothing_until_one_is_asked_for():
    cfg = load_config(QUICK, ["data.dataset=shapes", "clients.total=1000000", "data.shapes.examples_per_client=16"])
    t0 = time.perf_counter()
    data = FederatedData(cfg)
    built = time.perf_counter() - t0
    assert len(data.client_partition) == 1_000_000 and data.client_sizes()[:3] == [16, 16, 16]
    data.client(0)  # the first Dataset pays for importing Hugging Face datasets
    t0 = time.perf_counter()
    last = data.client(999_999)
    took = time.perf_counter() - t0
    assert len(last) == 16 and last.images.shape == (16, 3, 32, 32)
    assert built < 1.0 and took < 0.5, (built, took)  # milliseconds on an idle core; shared cores are slower
    assert data.partition_record()["rows_per_client"][999_999] == 16


def test_every_client_holds_examples_per_client_scenes():
    cfg = load_config(QUICK, ["data.dataset=shapes", "clients.total=500", "data.shapes.examples_per_client=5"])
    _, data = prepare(cfg)
    for c in (0, 1, 123, 499):
        assert len(data.client(c)) == 5 and len(data.client_partition[c]) == 5
    assert set(data.client_sizes()) == {5} and len(data.test) == cfg.data.shapes.test_size
    assert len(data.pretrain) == cfg.data.shapes.pretrain_size


def object_regions(scene):
    image, mask = pixels(scene)
    ids = sorted(set(np.unique(mask).tolist()) - {0})
    return image, mask, ids


@pytest.mark.parametrize("shift", [0.0, 0.8])
def test_captions_answers_and_labels_agree_with_the_mask(shift):
    w = world(f"data.shapes.domain_shift={shift}")
    scenes = [s for c in range(6) for s in w.client_scenes(c)]
    for s in scenes:
        image, mask, ids = object_regions(s)
        objects = s["objects"]
        assert ids == list(range(1, len(objects) + 1))  # every object visible, numbered in caption order
        qa = dict(zip(s["questions"], s["answers"]))
        assert qa["how many shapes are there"] == COUNT_WORDS[len(ids)]
        centroids = [np.argwhere(mask == k).mean(0) for k in ids]  # (row, col)
        words = s["caption"].split()
        # the caption names the objects in mask order, joined by where each is relative to the next
        described, k = [], 0
        while k < len(words):
            assert words[k] == "a"
            described.append(tuple(words[k + 1 : k + 4]))  # size colour shape
            k += 4
            if k < len(words):
                rel = words[k] if words[k] != "left" else "left of"
                a, b = centroids[len(described) - 1], centroids[len(described)]
                assert {"left of": a[1] < b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[rel], (s["caption"], a, b)
                k += 2 if rel == "left of" else 1
        assert described == [(o["size"], o["colour"], o["shape"]) for o in objects]
        for k, o in zip(ids, objects):
            region = image[mask == k]
            if shift == 0:  # no style: an object's pixels are its colour, exactly
                assert (region == COLOURS[o["colour"]]).all()
            if f"what colour is the {o['shape']}" in qa:
                assert qa[f"what colour is the {o['shape']}"] == o["colour"]
        # the label is the largest object's colour and shape
        largest = max(objects, key=lambda o: o["r"])
        assert CLASSES[s["label"]] == f"{largest['colour']} {largest['shape']}"
        assert qa[f"is there a {largest['colour']} {largest['shape']}"] == "yes"
        absent = [q for q, a in qa.items() if q.startswith("is there") and a == "no"]
        assert absent and all(tuple(q.split()[-2:]) not in {(o["colour"], o["shape"]) for o in objects} for q in absent)
    assert {o["shape"] for s in scenes for o in s["objects"]} == set(SHAPES)


def test_domain_shift_gives_each_client_its_own_style():
    plain, shifted = world(), world("data.shapes.domain_shift=1.0")

    def mean_background(w, c):
        return np.mean([np.asarray(s["image"])[np.asarray(s["mask"]) == 0].mean(0) for s in w.client_scenes(c)], 0)

    spread_plain = np.std([mean_background(plain, c) for c in range(6)], 0).mean()
    spread_shifted = np.std([mean_background(shifted, c) for c in range(6)], 0).mean()
    assert spread_shifted > 3 * spread_plain


def test_dirichlet_skews_the_classes_of_each_client():
    def mean_classes(alpha):
        w = world("data.partition=dirichlet", f"data.alpha={alpha}")
        return np.mean([len({s["label"] for s in w.client_scenes(c)}) for c in range(10)])

    assert mean_classes(0.05) < 0.5 * mean_classes(100.0)


def test_export_writes_an_imagefolder_that_trains_as_local_data(tmp_path, capsys):
    out = tmp_path / "world"
    over = ["clients.total=3", "data.shapes.examples_per_client=6", "data.shapes.test_size=5"]
    assert main(["data", "export", "shapes", str(out), *over]) == 0
    assert "train/" not in capsys.readouterr().err
    lines = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and sorted({x["client"] for x in lines}) == [0, 1, 2]
    assert len((out / "test" / "metadata.jsonl").read_text().splitlines()) == 5
    expected = world(*over, "clients.per_round=1").client_scenes(1)
    assert [x["caption"] for x in lines if x["client"] == 1] == [s["caption"] for s in expected]
    cfg = load_config(QUICK, ["data.dataset=local", f"data.path={out}", "data.partition=by_column",
                              "data.columns.client=client", "clients.total=auto", "clients.per_round=2"])
    cfg, data = prepare(cfg)
    assert cfg.clients.total == 3 and len(data.test) == 5 and set(data.class_names) <= set(CLASSES)
    from PIL import Image

    first = next(x for x in lines if x["client"] == 1)
    mask = np.asarray(Image.open(out / "train" / first["mask_file_name"]))
    assert np.array_equal(mask, np.asarray(expected[0]["mask"]))
    assert main(["data", "export", "shapes", str(out)]) == 2  # not an empty directory: refused, nothing changed
    assert "not an empty directory" in capsys.readouterr().err
