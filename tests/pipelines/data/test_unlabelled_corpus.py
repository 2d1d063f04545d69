"""Corpora without labels: a flat folder, WebDataset shards without .cls, Parquet without a label
column; data.labels; code shards without classes and their readers."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import DataSection, parse_config, without_neutral_defaults
from pipelines.data.corpus import detect_format, open_corpus
from pipelines.data.demo_data import generate_corpus, render_image
from pipelines.data.keys import split_of
from pipelines.data.shards import iter_code_samples, read_key_index, write_shard
from pipelines.errors import ConfigError, InputError
from pipelines.manifest import fingerprint
from pipelines.runner import stage_inputs
from pipelines.stages import tokenize
from tests.pipelines.conftest import tiny_raw_config

SIZE = 16


def _png(index: int, size: int = SIZE) -> bytes:
    image = render_image(("circle", "square")[index % 2], size, np.random.default_rng(index))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_flat_folder(root, count: int, size: int = SIZE) -> str:
    """``count`` PNGs of ``size`` pixels a side directly in ``root`` (img-000.png, ...), no
    subfolder."""
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        with open(os.path.join(root, f"img-{i:03d}.png"), "wb") as f:
            f.write(_png(i, size))
    return str(root)


def _rows(data: DataSection, split: str = "all") -> dict[str, dict]:
    return {row["key"]: row for row in open_corpus(data).dataset(split).take_all()}


def _data(source, **extra) -> DataSection:
    return DataSection(source=str(source), image_size=SIZE, **extra)


def test_a_flat_folder_is_an_unlabelled_corpus_keyed_by_file_name(tmp_path, ray_local):
    root = write_flat_folder(tmp_path / "flat", 6)
    # Hidden entries are not images of the corpus, whatever they hold.
    os.makedirs(tmp_path / "flat" / ".thumbnails")
    (tmp_path / "flat" / ".thumbnails" / "img-000.png").write_bytes(_png(0))
    (tmp_path / "flat" / "_skip.png").write_bytes(_png(1))
    assert detect_format(root) == "folder"
    corpus = open_corpus(_data(root))
    assert not corpus.labelled and corpus.class_names == []
    rows = _rows(_data(root))
    stems = [f"img-{i:03d}" for i in range(6)]
    # The key is the file's name without its extension: no class, nothing that can change.
    assert sorted(rows) == stems
    for key, row in rows.items():
        assert row["label"] == -1
        assert row["split"] == split_of(key, 0.05, 0.05)
    assert sorted(os.path.basename(u) for unit in corpus.units() for u in unit["files"]) == [
        f"{s}.png" for s in stems
    ]


def test_a_folder_mixing_images_and_class_folders_is_refused_naming_it(tmp_path, ray_local):
    root = tmp_path / "mixed"
    generate_corpus(str(root), classes=("circle",), images_per_class=2, image_size=SIZE)
    (root / "stray.png").write_bytes(_png(0))
    with pytest.raises(InputError, match=f"{root}.*both class subfolders.*'stray.png'"):
        open_corpus(_data(root))
    with pytest.raises(InputError, match="both class subfolders"):
        open_corpus(_data(root, labels="required"))
    # data.labels: none reads every image below the root, unlabelled, with their usual keys.
    rows = _rows(_data(root, labels="none"))
    assert sorted(rows) == ["circle/00000", "circle/00001", "stray"]
    assert {row["label"] for row in rows.values()} == {-1}


def test_labels_required_on_a_flat_folder_gives_the_old_error(tmp_path):
    root = write_flat_folder(tmp_path / "flat", 2)
    with pytest.raises(
        InputError, match=r"has no class subfolders \(expected root/<class>/\*\.png\).*'required'"
    ):
        open_corpus(_data(root, labels="required"))
    # An empty folder is no corpus, labelled or not.
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no class subfolders"):
        open_corpus(_data(tmp_path / "empty", format="folder"))


def test_labels_none_ignores_the_class_folders(tmp_path, ray_local):
    root = tmp_path / "shapes"
    generate_corpus(str(root), classes=("circle", "square"), images_per_class=2, image_size=SIZE)
    labelled = _rows(_data(root))
    unlabelled = _rows(_data(root, labels="none"))
    assert sorted(unlabelled) == sorted(labelled)  # the same keys, so the same splits
    assert {row["label"] for row in labelled.values()} == {0, 1}
    assert {row["label"] for row in unlabelled.values()} == {-1}
    assert not open_corpus(_data(root, labels="none")).labelled


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_webdataset_shards_without_cls_are_an_unlabelled_corpus(tmp_path, ray_local):
    os.makedirs(tmp_path / "wds")
    for shard in range(2):
        _write_tar(
            tmp_path / "wds" / f"part-{shard}.tar",
            [(f"s{shard}-{i}.png", _png(i)) for i in range(3)],
        )
    data = _data(tmp_path / "wds")
    corpus = open_corpus(data)
    assert corpus.format == "webdataset" and not corpus.labelled
    rows = _rows(data)
    assert sorted(rows) == [f"s{s}-{i}" for s in range(2) for i in range(3)]
    assert {row["label"] for row in rows.values()} == {-1}
    with pytest.raises(InputError, match="found no labels.*data.labels is 'required'"):
        open_corpus(_data(tmp_path / "wds", labels="required"))
    # Shards with labels are read without them under data.labels: none.
    _write_tar(tmp_path / "labelled.tar", [("a.png", _png(0)), ("a.cls", b"1")])
    assert open_corpus(_data(tmp_path / "labelled.tar")).class_names == ["class_0", "class_1"]
    rows = _rows(_data(tmp_path / "labelled.tar", labels="none"))
    assert rows["a"]["label"] == -1


def test_parquet_without_a_label_column_is_an_unlabelled_corpus(tmp_path, ray_local):
    os.makedirs(tmp_path / "pq")
    table = pa.table({"image": [_png(i) for i in range(4)], "name": [f"n{i}" for i in range(4)]})
    pq.write_table(table, tmp_path / "pq" / "a.parquet", row_group_size=2)
    data = _data(tmp_path / "pq", key_column="name")
    corpus = open_corpus(data)
    assert corpus.format == "parquet" and not corpus.labelled
    rows = _rows(data)
    assert sorted(rows) == ["n0", "n1", "n2", "n3"]
    assert {row["label"] for row in rows.values()} == {-1}
    with pytest.raises(InputError, match="no label column 'label'.*'required'"):
        open_corpus(_data(tmp_path / "pq", labels="required"))
    # A label column in some files only is a mistake, not an unlabelled corpus.
    pq.write_table(
        pa.table({"image": [_png(0)], "name": ["m0"], "label": [0]}), tmp_path / "pq" / "b.parquet"
    )
    with pytest.raises(InputError, match="a.parquet lacks the label column 'label'"):
        open_corpus(_data(tmp_path / "pq", key_column="name"))
    # A label column without a single label is a broken labelled corpus, not an unlabelled one.
    os.makedirs(tmp_path / "nulls")
    nulls = pa.table({"image": [_png(0)], "label": pa.array([None], pa.int64())})
    pq.write_table(nulls, tmp_path / "nulls" / "a.parquet")
    with pytest.raises(InputError, match="found no labels"):
        open_corpus(_data(tmp_path / "nulls"))


# ---- configuration -------------------------------------------------------------------------


def test_rejection_with_labels_none_is_refused_naming_the_key(tmp_path):
    raw = tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "flat"))
    with pytest.raises(ConfigError, match=r"sample\.rejection\.enabled is true, but data.labels"):
        parse_config(raw, ["data.labels=none", "sample.rejection.enabled=true"])
    with pytest.raises(ConfigError, match=r"sample\.classes"):
        parse_config(raw, ["data.labels=none", "sample.classes=[circle]"])
    with pytest.raises(ConfigError, match=r"data\.class_names .* data\.labels is 'none'"):
        parse_config(raw, ["data.labels=none", "data.class_names=[a, b]"])
    with pytest.raises(ConfigError, match="data.labels"):
        parse_config(raw, ["data.labels=sometimes"])


def test_data_labels_at_its_default_leaves_the_fingerprints_as_they_were(tmp_path):
    """Adding data.labels redid no finished stage: at 'auto' it is not hashed; set, it is."""
    raw = tiny_raw_config(str(tmp_path / "out"), str(tmp_path / "flat"))
    cfg = parse_config(raw)
    dumped = cfg.data.model_dump(mode="json")
    assert dumped["labels"] == "auto"
    before = {k: v for k, v in dumped.items() if k != "labels"}  # the section before the key
    assert stage_inputs(cfg, tokenize.SPEC)["config.data"] == fingerprint(before)
    assert without_neutral_defaults("data", dumped) == before
    changed = parse_config(raw, ["data.labels=none"])
    assert stage_inputs(changed, tokenize.SPEC)["config.data"] != fingerprint(before)


# ---- code shards without classes -----------------------------------------------------------


def test_code_shards_of_an_unlabelled_corpus_carry_no_class(tmp_path):
    codes = {"codes": np.arange(2 * 4, dtype=np.uint8).reshape(2, 2, 2)}
    entry = write_shard(str(tmp_path), ["a", "b"], None, codes, sources=["a.png", "b.png"])
    with tarfile.open(entry.uri) as tar:
        assert tar.getnames() == ["a.codes.npy", "b.codes.npy"]
    assert entry.class_counts == {}
    assert read_key_index(entry.uri).column("label").to_pylist() == [None, None]
    samples = list(iter_code_samples([entry.uri], ["codes"], labelled=False))
    assert [(s["key"], s["label"]) for s in samples] == [("a", -1), ("b", -1)]
    np.testing.assert_array_equal(samples[1]["codes"], codes["codes"][1])
    # Read as labelled shards, a sample without a class is an error.
    with pytest.raises(ValueError, match="has no .cls"):
        list(iter_code_samples([entry.uri], ["codes"]))
