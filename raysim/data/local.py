"""Datasets on local disk, read by Hugging Face `datasets` (never from a hub):

- an imagefolder directory: images plus metadata.jsonl / metadata.csv, optional train/ and
  test/ splits, as `load_dataset("imagefolder")` reads it;
- a .parquet, .jsonl or .csv file whose image column holds image bytes as `datasets` writes
  them (parquet) or paths relative to the file;
- a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`.

Every form ends as an Arrow table that is memory-mapped (`datasets` converts files into its
cache once). A `Table` reads the label and client columns without touching an image, and
decodes the images of the rows it is asked for only, so a process holds the images of the
clients it serves and nothing else.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from raysim.cache import cache_root
from raysim.data.errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
FORMATS = (
    "an imagefolder directory (images with metadata.jsonl or metadata.csv, optionally in train/ and test/), "
    "a directory written by Dataset.save_to_disk or DatasetDict.save_to_disk, or a .parquet, .jsonl or .csv file"
)


def hf_datasets():
    """`datasets`, offline and quiet: raysim reads local files only and shows its own progress."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its read errors reach the user as a DataError
    return datasets


def _reason(err: BaseException) -> str:
    """The innermost cause of `err` on one line (datasets wraps a file's parse error)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _hf_cache() -> str:
    return str(cache_root() / "hf-datasets")


def _is_imagefolder(p: Path) -> bool:
    for f in p.rglob("*"):
        if f.name in ("metadata.jsonl", "metadata.csv") or f.suffix.lower() in IMAGE_EXTENSIONS:
            return True
    return False


def open_splits(path: str, key: str) -> tuple[dict, Path]:
    """The splits of the dataset at `path` ({'train': Dataset, 'test': ...}) and the directory
    that relative image paths start from. `key` names the config key in messages."""
    ds = hf_datasets()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key} {path} does not exist; point it at {FORMATS}")
    try:
        if p.is_file():
            builder = FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(
                    f"{key} {path}: raysim cannot read '{p.suffix or p.name}' files; give {FORMATS}"
                )
            table = ds.load_dataset(builder, data_files=str(p), split="train", cache_dir=_hf_cache())
            return {"train": table}, p.parent
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            loaded = ds.load_from_disk(str(p))
            return (dict(loaded) if isinstance(loaded, ds.DatasetDict) else {"train": loaded}), p
        if _is_imagefolder(p):
            return dict(ds.load_dataset("imagefolder", data_dir=str(p), cache_dir=_hf_cache())), p
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever `datasets` raises on a malformed file
        raise DataError(
            f"{key} {path}: Hugging Face datasets could not read it ({_reason(err)}); "
            f"check the file, or give {FORMATS}"
        ) from None
    raise DataError(f"{key} {path} is a directory raysim does not recognise as a dataset; give {FORMATS}")


def pick_split(splits: dict, name: str, key: str, path: str):
    if name in splits:
        return splits[name]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise DataError(
        f"{key} {path} has the splits {sorted(splits)} but no '{name}' split; name one of its directories "
        f"(or DatasetDict keys) '{name}'"
    )


# --- what the columns hold ------------------------------------------------------------

def _kind(feature) -> str:
    """'image', 'bytes', 'int', 'string', 'strings', 'class', 'bool', 'float' or another feature name."""
    ds = hf_datasets()
    if isinstance(feature, ds.Image):
        return "image"
    if isinstance(feature, ds.ClassLabel):
        return "class"
    if isinstance(feature, ds.Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return "string"
        if dtype in ("binary", "large_binary"):
            return "bytes"
        if dtype.startswith(("int", "uint")):
            return "int"
        if dtype == "bool":
            return "bool"
        return "float" if dtype.startswith("float") else dtype
    if isinstance(feature, ds.List) and _kind(feature.feature) == "string":
        return "strings"  # several per row, e.g. the questions about one image
    if isinstance(feature, dict) and set(feature) >= {"bytes", "path"}:
        return "image"  # {bytes, path} structs without the Image feature's metadata
    return type(feature).__name__


def check_roles(table, roles: dict[str, str], where: str) -> None:
    """Every role column exists and holds what its role needs; else a DataError naming it."""
    features = table.features
    for role, column in roles.items():
        key = f"data.columns.{role}"
        if column not in features:
            raise DataError(
                f"{key}: column '{column}' is not in {where}; its columns are {', '.join(features)}. "
                f"Set {key} to one of them" + (" (or to null: the role is then absent)" if role != "image" else "")
            )
        kind = _kind(features[column])
        wanted = {
            "image": ("image", "string", "bytes"),
            "text": ("string",),
            "question": ("string", "strings"),
            "answer": ("string", "strings"),
            "label": ("int", "string", "class"),
            "client": ("int", "string", "class"),
        }[role]
        if kind not in wanted:
            what = {
                "image": "images (as datasets writes them), image bytes or image paths",
                "label": "integers or strings (one class each)",
                "client": "integers or strings (one client each)",
                "question": "strings (or lists of strings)",
                "answer": "strings (or lists of strings)",
            }.get(role, "strings")
            raise DataError(
                f"{key}: column '{column}' of {where} holds {features[column]}, but a {role} column must hold {what}; "
                f"convert the column, or point {key} at another one"
            )


# --- images ---------------------------------------------------------------------------

class BadImage(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(reason)
        self.file, self.reason = file, reason


def decode_image(value, base_dir: Path):
    """A PIL image from what an image column holds: {bytes, path} (datasets' Image storage),
    raw bytes, or a path (relative to `base_dir`). Raises BadImage naming the file."""
    from PIL import Image

    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = value, None
    else:
        data, path = None, value
    file = str(path) if path else "image bytes"
    try:
        if data:
            img = Image.open(io.BytesIO(data))
        elif path:
            full = Path(path) if Path(path).is_absolute() else base_dir / path
            file = str(full)
            img = Image.open(full)
        else:
            raise ValueError("the row holds no image")
        img.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "cannot decode"
        raise BadImage(file, _reason(err)) from None
    return img


@dataclass
class Table:
    """Rows of raw examples held by an HF Dataset (memory-mapped where it was loaded from
    disk). `roles` maps role (image, text, label, ...) -> column."""

    dataset: object
    roles: dict[str, str]
    where: str  # for messages: the file or directory, or what generated the rows
    base_dir: Path  # relative image paths start here
    skip_bad: bool = False

    def __post_init__(self):
        ds = hf_datasets()
        check_roles(self.dataset, self.roles, self.where)
        self.dataset = self.dataset.select_columns(sorted(set(self.roles.values())))
        image = self.roles["image"]
        if isinstance(self.dataset.features[image], ds.Image):  # decode here, row by row, counted
            self.dataset = self.dataset.cast_column(image, ds.Image(decode=False))
        self.decoded: set[int] = set()  # rows whose image this process decoded for examples()

    def __len__(self) -> int:
        return len(self.dataset)

    def values(self, role: str) -> list:
        """A non-image column, read without touching any image."""
        column = self.roles[role]
        return self.dataset.select_columns([column])[:][column]

    def feature(self, role: str):
        return self.dataset.features[self.roles[role]]

    def examples(self, rows) -> tuple[dict[str, list], list[int]]:
        """The raw examples of `rows` (images decoded) and the rows kept: with skip_bad, rows
        whose image cannot be decoded are left out."""
        rows = [int(r) for r in rows]
        batch = self.dataset[rows] if rows else {c: [] for c in self.dataset.column_names}
        image = self.roles["image"]
        keep, images = [], []
        for i, (row, value) in enumerate(zip(rows, batch[image])):
            try:
                images.append(decode_image(value, self.base_dir))
            except BadImage as bad:
                if self.skip_bad:
                    continue
                raise DataError(bad_image_message(self.where, row, bad)) from None
            self.decoded.add(row)
            keep.append(i)
        out = {role: [batch[col][i] for i in keep] for role, col in self.roles.items() if role != "image"}
        out["image"] = images
        return out, [rows[i] for i in keep]

    def scan(self) -> list[dict]:
        """Decode every image once, one at a time (nothing is kept): the rows that fail, with
        their file and reason. Cached on disk by the dataset's files and the image files."""
        image = self.roles["image"]
        only = self.dataset.select_columns([image])
        target = cache_root() / "image-scans" / f"{self._scan_key(only)}.json"
        if target.is_file():
            return json.loads(target.read_text())
        bad = []
        for start in range(0, len(only), 256):
            for i, value in enumerate(only[start : start + 256][image]):
                try:
                    decode_image(value, self.base_dir)
                except BadImage as err:
                    bad.append({"row": start + i, "file": err.file, "reason": err.reason})
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(bad))
        tmp.replace(target)
        return bad

    def _scan_key(self, only) -> str:
        """The dataset's own files, plus each referenced image file's size and mtime (a fixed
        image must be scanned again)."""
        h = hashlib.sha256(json.dumps([self.where, self.roles["image"], len(only)]).encode())
        for f in sorted({c["filename"] for c in self.dataset.cache_files}):
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        image = self.roles["image"]
        for start in range(0, len(only), 4096):
            for value in only[start : start + 4096][image]:
                path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
                if isinstance(path, str):
                    full = Path(path) if Path(path).is_absolute() else self.base_dir / path
                    try:
                        st = os.stat(full)
                        h.update(f"{full}:{st.st_size}:{st.st_mtime_ns}".encode())
                    except OSError:
                        h.update(f"{full}:missing".encode())
        if not self.dataset.cache_files:  # an in-memory table: its content
            h.update(self.dataset._fingerprint.encode())
        return h.hexdigest()[:24]


def bad_image_message(where: str, row: int, bad: BadImage) -> str:
    return (
        f"{where}: the image of row {row} ({bad.file}) cannot be decoded ({bad.reason}); replace or remove that row, "
        "or set data.skip_bad_images: true to skip rows whose image cannot be decoded (they are counted in summary.json)"
    )


def files_fingerprint(path: str | None) -> str | None:
    """Names, sizes and modification times of the files at `path` (a file or a directory
    tree), for cache keys: a changed dataset is a different dataset."""
    if path is None:
        return None
    p = Path(path).expanduser().absolute()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    h = hashlib.sha256(str(p).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
