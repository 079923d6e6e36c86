"""Local datasets (issue 19): the four on-disk formats train alike, natural and skewed
partitions, bad input before Ray starts, and a worker decodes only its clients' images."""
import csv
import json

import numpy as np
import pytest

from conftest import tiny_overrides
from raysim.cli import main
from raysim.config import load_config
from raysim.data import prepare, row_ids_hash
from raysim.data.local import hf_datasets
from raysim.data.shapes import CLASSES, ShapesWorld

QUICK = "configs/quickstart.yaml"
HOSPITALS = ["north", "south", "east", "west", "lake", "hill"]


def scene_rows(per_client=12, clients=len(HOSPITALS)):
    """Small generated images (32x32 shapes scenes) with captions, labels and a hospital."""
    world = ShapesWorld(0, load_config(QUICK, ["data.dataset=shapes"]).data)
    rows = []
    for c in range(clients):
        for s in world.scenes("client", c, per_client):
            rows.append({"image": s["image"], "caption": s["caption"], "label": CLASSES[s["label"]],
                         "hospital": HOSPITALS[c % len(HOSPITALS)]})
    order = np.random.default_rng(1).permutation(len(rows))  # hospitals interleaved, as in real exports
    return [rows[i] for i in order]


def write_formats(root, rows):
    """The same rows as an imagefolder, parquet (image bytes), jsonl and csv (paths relative
    to the file) and a save_to_disk directory."""
    ds = hf_datasets()
    folder = root / "imagefolder"
    (folder / "images").mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, r in enumerate(rows):
            r["image"].save(folder / "images" / f"{i:04d}.png")
            meta.write(json.dumps({"file_name": f"images/{i:04d}.png", **{k: r[k] for k in ("caption", "label", "hospital")}}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"image": f"imagefolder/images/{i:04d}.png", **{k: r[k] for k in ("caption", "label", "hospital")}}) + "\n")
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label", "hospital"])
        for i, r in enumerate(rows):
            w.writerow([f"imagefolder/images/{i:04d}.png", r["caption"], r["label"], r["hospital"]])
    table = ds.Dataset.from_dict(
        {k: [r[k] for r in rows] for k in ("image", "caption", "label", "hospital")},
        features=ds.Features({"image": ds.Image(), "caption": ds.Value("string"), "label": ds.Value("string"),
                              "hospital": ds.Value("string")}),
    )
    table.to_parquet(str(root / "pairs.parquet"))
    table.save_to_disk(str(root / "saved"))
    return {"imagefolder": folder, "parquet": root / "pairs.parquet", "jsonl": root / "pairs.jsonl",
            "csv": root / "pairs.csv", "save_to_disk": root / "saved"}


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    rows = scene_rows()
    return rows, write_formats(tmp_path_factory.mktemp("formats"), rows)


def by_hospital(path, *extra):
    return load_config(QUICK, ["data.dataset=local", f"data.path={path}", "data.partition=by_column",
                               "data.columns.client=hospital", "clients.total=auto", "clients.per_round=3", *extra])


def run(tmp_path, name, path, **over):
    """Two FedAvg rounds from a random base (each format would pre-train a base of its own:
    the dataset's files are part of the cache key)."""
    out = tmp_path / name
    over = {"data.dataset": "local", "data.path": str(path), "data.partition": "by_column", "pretrain.enabled": "false",
            "data.columns.client": "hospital", "clients.total": "auto", "runtime.warm_start": "false", **over}
    assert main(["run", QUICK, *tiny_overrides(**over), "--out", str(out), "--quiet"]) == 0
    return out


def metrics(out):
    """Every record's non-timing values (placement is timing too)."""
    timing = lambda k: k.endswith("_s") or k in ("workers", "served_by")  # noqa: E731
    return [{k: v for k, v in json.loads(line).items() if not timing(k)} for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- formats ---------------------------------------------------------------------------

def test_every_format_gives_the_same_partition_and_examples(formats):
    rows, paths = formats
    seen = {}
    for name, path in paths.items():
        cfg, data = prepare(by_hospital(path))
        assert cfg.clients.total == len(HOSPITALS)
        record = data.partition_record()
        client = data.client(2)
        seen[name] = (record["rows_per_client"], record["row_ids_sha256"], data.class_names,
                      client.images.numpy().tobytes(), client.input_ids.numpy().tobytes(), data.test.labels.tolist())
        assert record["row_ids_sha256"] == row_ids_hash(data.client_partition)
        assert record["client_values"] == sorted(HOSPITALS)
    first = seen.pop("imagefolder")
    for name, value in seen.items():
        assert value == first, name
    assert sum(first[0]) + record["test_rows"] + record["pretrain_rows"] == len(rows)


def test_every_format_trains_alike_with_fedavg(tmp_path, formats):
    """Two FedAvg rounds per format (local mode); each writes partition.json and the same metrics."""
    _, paths = formats
    outs = {name: run(tmp_path, name, path) for name, path in paths.items()}
    first = metrics(outs["imagefolder"])
    partition = json.loads((outs["imagefolder"] / "partition.json").read_text())
    assert partition["clients"] == len(HOSPITALS) and partition["partition"] == "by_column"
    assert len(first) == 3 and all("accuracy" in r and "i2t_r1" in r for r in first)
    for name, out in outs.items():
        assert metrics(out) == first, name
        assert json.loads((out / "partition.json").read_text()) == partition, name


@pytest.mark.slow
def test_every_format_trains_alike_on_ray_workers(tmp_path, formats, ray_cluster):
    """The same on two Ray workers: every format gives bit-identical records."""
    _, paths = formats
    outs = {name: run(tmp_path, name, path, **{"runtime.num_workers": 2}) for name, path in paths.items()}
    first = metrics(outs["imagefolder"])
    assert [r["clients"] for r in first[1:]] and all(r["num_examples"] > 0 for r in first[1:])
    for name, out in outs.items():
        assert metrics(out) == first, name
        summary = json.loads((out / "summary.json").read_text())
        assert len(summary["peak_rss_mb_by_process"]["workers"]) == 2, name


@pytest.mark.slow
def test_ray_workers_train_on_a_local_dataset_like_local_mode(tmp_path, formats, ray_cluster):
    _, paths = formats
    local = metrics(run(tmp_path, "local", paths["parquet"]))
    pooled = metrics(run(tmp_path, "pooled", paths["parquet"], **{"runtime.num_workers": 2}))
    assert [r["clients"] for r in local] == [r["clients"] for r in pooled]
    assert [r.get("num_examples") for r in local] == [r.get("num_examples") for r in pooled]
    for x, y in zip(local, pooled):  # thread counts differ between the driver and the workers: float order
        assert x["i2t_r1"] == pytest.approx(y["i2t_r1"], abs=1e-6) and x["accuracy"] == pytest.approx(y["accuracy"], abs=1e-6)


def test_train_and_test_splits_and_a_separate_test_path(tmp_path, formats):
    rows, paths = formats
    ds = hf_datasets()
    table = ds.load_from_disk(str(paths["save_to_disk"]))
    ds.DatasetDict(train=table.select(range(60)), test=table.select(range(60, len(table)))).save_to_disk(str(tmp_path / "dd"))
    _, data = prepare(by_hospital(tmp_path / "dd", "data.pretrain_fraction=0", "pretrain.enabled=false"))
    assert len(data.test) == len(rows) - 60 and data.test_table.where.endswith("(split 'test')")
    assert sum(data.client_sizes()) == 60  # no rows go to the test split: it has its own
    _, data = prepare(by_hospital(paths["parquet"], f"data.test_path={tmp_path / 'dd'}"))
    assert len(data.test) == len(rows) - 60 and len(data.test_table) == len(rows) - 60


# --- partitions --------------------------------------------------------------------------

def test_by_column_reproduces_the_membership_of_each_client(formats):
    rows, paths = formats
    _, data = prepare(by_hospital(paths["jsonl"], "data.pretrain_fraction=0", "pretrain.enabled=false",
                                  f"data.test_path={paths['parquet']}"))
    for k, hospital in enumerate(sorted(HOSPITALS)):
        assert data.client_partition[k].tolist() == [i for i, r in enumerate(rows) if r["hospital"] == hospital]
        labels = [data.class_names[c] for c in data.client(k).labels.tolist()]
        assert labels == [r["label"] for r in rows if r["hospital"] == hospital]
    # with a test split of its own, each client gives its share: still only its own rows
    _, data = prepare(by_hospital(paths["jsonl"]))
    for k, hospital in enumerate(sorted(HOSPITALS)):
        members = {i for i, r in enumerate(rows) if r["hospital"] == hospital}
        assert set(data.client_partition[k].tolist()) <= members
        assert len(data.client_partition[k]) == len(members) - round(len(members) * 0.2) - round((len(members) - round(len(members) * 0.2)) * 0.2)


def test_dirichlet_skews_the_label_column(formats):
    rows, paths = formats
    labels = np.array([r["hospital"] for r in rows])  # 6 classes of 12 rows

    def mean_classes(alpha):
        cfg = load_config(QUICK, ["data.dataset=local", f"data.path={paths['parquet']}", "data.partition=dirichlet",
                                  "data.columns.label=hospital", f"data.alpha={alpha}", "clients.total=8", "clients.per_round=3"])
        _, data = prepare(cfg)
        assert data.class_names == sorted(HOSPITALS)
        for k, part in enumerate(data.client_partition):  # a client's labels are its rows' labels
            assert [data.class_names[c] for c in data.client(k).labels.tolist()] == labels[part].tolist()
        assert sorted(np.concatenate(data.client_partition).tolist()) == data.pool_idx.tolist()
        return np.mean([len(set(labels[p])) for p in data.client_partition])

    assert mean_classes(0.05) < 0.6 * mean_classes(100.0)


def test_quantity_and_iid_partitions(formats):
    _, paths = formats

    def sizes(partition, *extra):
        cfg = load_config(QUICK, ["data.dataset=local", f"data.path={paths['csv']}", f"data.partition={partition}",
                                  "clients.total=10", "clients.per_round=3", "data.columns.label=null", *extra])
        _, data = prepare(cfg)
        assert data.class_prompts is None  # no labels: no zero-shot prompts
        return sorted(data.client_sizes()), len(data.pool_idx)

    skewed, n = sizes("quantity", "data.quantity_exponent=0.7")
    even, _ = sizes("iid")
    assert sum(skewed) == sum(even) == n and min(skewed) >= 1
    assert max(even) - min(even) <= 1 and max(skewed) > 3 * np.median(skewed)


# --- bad input (each: exit 2, one paragraph, before Ray starts) --------------------------

@pytest.fixture
def no_ray(monkeypatch):
    import raysim.cli

    def fail(*_):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raysim.cli, "_start_ray", fail)


def bad(capsys, *overrides, workers=2):
    code = main(["run", QUICK, "data.dataset=local", *overrides, f"runtime.num_workers={workers}", "clients.per_round=2",
                 "--out", "/nonexistent/never-written", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("raysim: error: ") and "Traceback" not in err
    return err


def test_missing_path_and_unknown_formats(tmp_path, capsys, no_ray):
    err = bad(capsys, f"data.path={tmp_path / 'nope'}")
    assert f"data.path {tmp_path / 'nope'} does not exist" in err and "metadata.jsonl" in err and err.count("\n") == 1
    (tmp_path / "notes.txt").write_text("hello")
    assert "cannot read '.txt' files" in bad(capsys, f"data.path={tmp_path / 'notes.txt'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.bin").write_bytes(b"\0")
    assert "does not recognise as a dataset" in bad(capsys, f"data.path={tmp_path / 'junk'}")
    (tmp_path / "broken.parquet").write_text("not parquet")
    err = bad(capsys, f"data.path={tmp_path / 'broken.parquet'}")
    assert "broken.parquet: Hugging Face datasets could not read it (ArrowInvalid: Parquet magic bytes" in err


def test_missing_role_column_lists_the_columns(formats, capsys, no_ray):
    _, paths = formats
    err = bad(capsys, f"data.path={paths['imagefolder']}", "data.columns.text=description")
    assert "data.columns.text: column 'description' is not in" in err and str(paths["imagefolder"]) in err
    assert "its columns are image, caption, label, hospital" in err


def test_label_column_that_is_not_integer_or_string(tmp_path, formats, capsys, no_ray):
    rows, paths = formats
    with open(tmp_path / "scores.jsonl", "w") as f:
        for i in range(len(rows)):
            f.write(json.dumps({"image": str(paths["imagefolder"] / "images" / f"{i:04d}.png"), "caption": "x", "label": i / 7}) + "\n")
    err = bad(capsys, f"data.path={tmp_path / 'scores.jsonl'}")
    assert "data.columns.label: column 'label' of" in err and "scores.jsonl holds Value('float64')" in err
    assert "integers or strings" in err


def test_client_column_problems(tmp_path, formats, capsys, no_ray):
    rows, paths = formats
    p = f"data.path={paths['parquet']}"
    err = bad(capsys, p, "data.partition=by_column")
    assert "data.partition 'by_column' needs data.columns.client" in err
    err = bad(capsys, p, "data.partition=by_column", "data.columns.client=hospital", "clients.total=9")
    assert "column 'hospital' of" in err and "has only 6 distinct values but clients.total is 9" in err and "clients.total: auto" in err
    # a client whose single row goes to the test split
    with open(tmp_path / "lonely.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"image": str(paths["imagefolder"] / "images" / f"{i:04d}.png"), "caption": r["caption"],
                                "label": r["label"], "hospital": "tiny" if i == 0 else r["hospital"]}) + "\n")
    err = bad(capsys, f"data.path={tmp_path / 'lonely.jsonl'}", "data.partition=by_column", "data.columns.client=hospital",
              "clients.total=auto", "data.test_fraction=0.6")
    assert "value 'tiny' of data.columns.client) has no rows after the test and pre-training splits" in err


def test_an_undecodable_image_is_named_or_skipped_and_counted(tmp_path, formats, capsys, no_ray):
    rows, paths = formats
    folder = tmp_path / "folder"
    import shutil

    shutil.copytree(paths["imagefolder"], folder)
    png = folder / "images" / "0005.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated
    err = bad(capsys, f"data.path={folder}", "data.partition=iid", "clients.total=6")
    assert "the image of row 5 (" in err and str(png) in err and "cannot be decoded" in err and "data.skip_bad_images: true" in err
    out = tmp_path / "skipped"
    over = tiny_overrides(**{"data.dataset": "local", "data.path": str(folder), "data.partition": "iid", "clients.total": 6,
                             "data.skip_bad_images": "true"})
    assert main(["run", QUICK, *over, "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_bad_images"] == 1
    partition = json.loads((out / "partition.json").read_text())
    assert partition["bad_images"][0]["row"] == 5 and partition["bad_images"][0]["file"] == str(png)


# --- memory: a worker decodes its clients' images only --------------------------------------

def test_a_worker_decodes_only_the_images_of_the_clients_it_serves(tmp_path, ray_cluster):
    """2,000 images, 40 clients on two sticky workers: each worker serves 20 clients. Every
    image a worker decodes belongs to one of its clients, it holds at most CLIENT_CACHE
    clients' decoded data at once, and the driver decodes the test and pre-training rows only."""
    from raysim.data.federated import CLIENT_CACHE
    from raysim.pretrain import pretrained_base_dir
    from raysim.run.engine import Engine

    ds = hf_datasets()
    rng = np.random.default_rng(0)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(2000)]
    table = ds.Dataset.from_dict({"image": images, "caption": [f"a picture number {i % 7}" for i in range(2000)],
                                  "label": [i % 5 for i in range(2000)]},
                                 features=ds.Features({"image": ds.Image(), "caption": ds.Value("string"), "label": ds.Value("int64")}))
    table.to_parquet(str(tmp_path / "big.parquet"))
    over = tiny_overrides(**{"data.dataset": "local", "data.path": str(tmp_path / "big.parquet"), "data.partition": "iid",
                             "clients.total": 40, "clients.per_round": 40, "rounds": 1, "runtime.num_workers": 2,
                             "runtime.warm_start": "false", "algorithm.name": "tests.probe_algorithm:DecodeProbe",
                             "pretrain.epochs": 1, "data.image_size": 16})
    cfg = load_config(QUICK, over)
    pretrained_base_dir(cfg)  # here, so that no worker pre-trains (and decodes the pre-training rows)
    engine = Engine(cfg, str(tmp_path / "run"), False)
    engine.start()
    rec = engine.run_round()
    served = rec["served_by"]
    assert sorted(len(v) for v in served.values()) == [20, 20]
    data = engine.algorithm.data
    means = rec["client_means"]
    assert means["foreign_decoded"] == 0  # no worker decoded a row of a client it does not serve
    assert means["held_clients"] <= CLIENT_CACHE and means["memory_mapped"] == 1
    # each worker decoded exactly its own clients' rows (reported by its last client step)
    assert means["missing_decoded"] == 0
    driver = data.train.decoded
    assert driver <= set(data.test_idx.tolist()) | set(data.pretrain_idx.tolist())
    assert len(driver) < 2000 - sum(data.client_sizes()) + 1
    engine.finish()
