"""Corpus readers on a real local Ray: three layouts, one result; splits; bad and odd inputs."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import DataSection
from pipelines.data.corpus import detect_format, open_corpus
from pipelines.data.demo_data import generate_corpus
from pipelines.data.images import BadImageError, decode_image
from pipelines.data.keys import key_hashes, sanitize_key, split_of
from pipelines.errors import BadInputError, user_error_in

CLASSES = ("circle", "square", "triangle")


def _read(source: str, split: str = "all", **data) -> dict[str, dict]:
    corpus = open_corpus(DataSection(source=source, **data))
    return {row["key"]: row for row in corpus.dataset(split).take_all()}


def _folder_files(root: str) -> list[tuple[str, str, bytes]]:
    """(class name, key, bytes) of a folder corpus, sorted by key."""
    out = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), "rb") as f:
                out.append((name, f"{name}/{os.path.splitext(file)[0]}", f.read()))
    return out


def _to_webdataset(root: str, out_dir: str, shards: int = 2) -> None:
    files = _folder_files(root)
    classes = sorted({c for c, _, _ in files})
    os.makedirs(out_dir)
    for s in range(shards):
        with tarfile.open(os.path.join(out_dir, f"part-{s:03d}.tar"), "w") as tar:
            for name, key, data in files[s::shards]:
                for member, payload in (
                    (f"{key}.png", data),
                    (f"{key}.cls", str(classes.index(name)).encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _to_parquet(root: str, path: str, key_column: bool = True, hf_struct: bool = False) -> None:
    files = _folder_files(root)
    classes = sorted({c for c, _, _ in files})
    images = (
        [{"bytes": d, "path": k} for _, k, d in files] if hf_struct else [d for _, _, d in files]
    )
    columns = {"image": images, "label": [classes.index(c) for c, _, _ in files]}
    if key_column:
        columns["name"] = [k for _, k, _ in files]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=5)


@pytest.fixture
def shapes_corpus(tmp_path):
    root = str(tmp_path / "folder")
    generate_corpus(root, classes=CLASSES, images_per_class=4, image_size=24)
    return root


def test_folder_webdataset_and_parquet_give_the_same_rows(shapes_corpus, tmp_path, ray_local):
    _to_webdataset(shapes_corpus, str(tmp_path / "wds"))
    _to_parquet(shapes_corpus, str(tmp_path / "pq" / "corpus.parquet"))
    size = {"image_size": (16, 8)}  # non-square: taller than wide
    folder = _read(shapes_corpus, **size)
    wds = _read(str(tmp_path / "wds"), class_names=list(CLASSES), **size)
    parquet = _read(str(tmp_path / "pq"), key_column="name", **size)

    assert len(folder) == 3 * 4
    assert set(folder) == set(wds) == set(parquet)
    for key, row in folder.items():
        assert row["image"].shape == (16, 8, 3) and row["image"].dtype == np.uint8
        assert row["label"] == CLASSES.index(key.split("/")[0])
        assert row["split"] == split_of(key, 0.05, 0.05)  # the default fractions
        for other in (wds[key], parquet[key]):
            assert other["label"] == row["label"]
            np.testing.assert_array_equal(other["image"], row["image"])


def test_class_names_for_webdataset_and_parquet_default_to_class_n(
    shapes_corpus, tmp_path, ray_local
):
    _to_webdataset(shapes_corpus, str(tmp_path / "wds"))
    assert open_corpus(DataSection(source=str(tmp_path / "wds"))).class_names == [
        "class_0",
        "class_1",
        "class_2",
    ]
    _to_parquet(shapes_corpus, str(tmp_path / "pq" / "a.parquet"))
    named = open_corpus(DataSection(source=str(tmp_path / "pq"), class_names=["x", "y", "z"]))
    assert named.class_names == ["x", "y", "z"]
    assert open_corpus(DataSection(source=shapes_corpus)).class_names == sorted(CLASSES)


def test_parquet_without_key_column_keys_rows_by_file_and_index(shapes_corpus, tmp_path, ray_local):
    # Hugging Face datasets store images as {"bytes", "path"} structs; read those too.
    path = str(tmp_path / "pq" / "train.v1.parquet")
    _to_parquet(shapes_corpus, path, key_column=False, hf_struct=True)
    rows = _read(path, image_size=16)
    # Dots in folders are fine for WebDataset, which only splits the last component.
    stem = "train.v1"
    assert sorted(rows) == [f"{stem}/{i:08d}" for i in range(12)]
    assert all("." not in key.rsplit("/", 1)[-1] for key in rows)
    labels = [rows[f"{stem}/{i:08d}"]["label"] for i in range(12)]
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    assert _read(path, image_size=16).keys() == rows.keys()  # stable across reads


def test_grey_and_rgb_outputs(tmp_path, ray_local):
    root = tmp_path / "solid" / "only"
    root.mkdir(parents=True)
    Image.new("RGB", (20, 20), (200, 100, 50)).save(root / "a.png")
    rgb = _read(str(tmp_path / "solid"), image_size=16, channels=3)["only/a"]["image"]
    grey = _read(str(tmp_path / "solid"), image_size=16, channels=1)["only/a"]["image"]
    assert rgb.shape == (16, 16, 3) and grey.shape == (16, 16, 1)
    assert (rgb == np.array([200, 100, 50], dtype=np.uint8)).all()
    # ITU-R 601 luma: 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2
    assert (grey == 124).all()


def _bands(width: int, height: int, vertical: bool) -> bytes:
    """Three equal bands red | green | blue, side by side (vertical) or stacked."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        if vertical:
            pixels[:, i * width // 3 : (i + 1) * width // 3] = colour
        else:
            pixels[i * height // 3 : (i + 1) * height // 3] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_resize_scales_the_short_side_and_crops_the_centre():
    wide = decode_image(_bands(96, 32, vertical=True), (16, 16), 3)  # 3:1 -> middle third
    assert (wide[:, 2:-2] == [0, 255, 0]).all()
    tall = decode_image(_bands(24, 72, vertical=False), (8, 8), 3)
    assert (tall[2:-2] == [0, 255, 0]).all()
    # A non-square target keeps the whole short side: 32x32 -> 16 x 8 keeps all rows.
    narrow = decode_image(_bands(32, 32, vertical=False), (16, 8), 3)
    assert narrow.shape == (16, 8, 3)
    assert (narrow[0] == [255, 0, 0]).all() and (narrow[-1] == [0, 0, 255]).all()


def test_split_is_deterministic_and_stable_when_images_are_added(tmp_path, ray_local):
    root = str(tmp_path / "grow")
    generate_corpus(root, classes=("circle", "cross"), images_per_class=10, image_size=16)
    data = {"image_size": 16, "validation_fraction": 0.25, "test_fraction": 0.25}
    splits = {s: set(_read(root, s, **data)) for s in ("train", "validation", "test")}
    assert all(splits.values())
    assert sum(len(keys) for keys in splits.values()) == len(set().union(*splits.values()))
    assert set().union(*splits.values()) == set(_read(root, "all", **data))
    for split, keys in splits.items():
        assert all(split_of(k, 0.25, 0.25) == split for k in keys)

    # Regenerating with more images keeps the first ten per class byte for byte.
    generate_corpus(root, classes=("circle", "cross"), images_per_class=15, image_size=16)
    splits2 = {s: set(_read(root, s, **data)) for s in ("train", "validation", "test")}
    assert sum(len(keys) for keys in splits2.values()) == 30
    for split in splits:
        assert splits[split] <= splits2[split]  # no old image changed split

    assert split_of("circle/00001", 0.0, 0.0) == "train"
    # The documented rule, computed here from the key alone: a key's place in [0, 1) is the first
    # 8 bytes of its SHA-1, big-endian; test takes [0, test), validation the next band.
    for i in range(50):
        place = int.from_bytes(hashlib.sha1(f"k{i}".encode()).digest()[:8], "big") / 2.0**64
        expected = "test" if place < 0.2 else "validation" if place < 0.5 else "train"
        assert split_of(f"k{i}", 0.3, 0.2) == expected
    # Test takes the lowest hashes: a new validation fraction never moves a test key.
    keys = [f"k{i}" for i in range(500)]
    test = {k for k in keys if split_of(k, 0.1, 0.2) == "test"}
    assert test == {k for k in keys if split_of(k, 0.4, 0.2) == "test"}
    assert 60 < len(test) < 140


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def odd_corpus(tmp_path):
    """One class folder with two broken files and images in unusual modes."""
    root = tmp_path / "odd"
    folder = root / "things"
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(_png(Image.new("RGB", (16, 16), (10, 20, 30))))
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    whole = _png(Image.fromarray(noise))
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "header.png").write_bytes(whole[:6])
    (folder / "empty.png").write_bytes(b"")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    (folder / "rgba.png").write_bytes(_png(Image.fromarray(rgba, mode="RGBA")))
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 40, 80, 120] + [0] * 762)
    (folder / "palette.png").write_bytes(_png(palette))
    grey16 = np.full((16, 16), 65535, dtype=np.uint16)
    grey16[8:] = 32768
    (folder / "grey16.png").write_bytes(_png(Image.fromarray(grey16)))
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(buffer, format="JPEG", quality=100)
    (folder / "cmyk.jpg").write_bytes(buffer.getvalue())
    (folder / "name.with.dots.png").write_bytes(_png(Image.new("RGB", (16, 16))))
    return str(root)


def test_bad_inputs_are_skipped_and_reported(odd_corpus, ray_local):
    rows = _read(odd_corpus, image_size=16)
    dotted = sanitize_key("things/name.with.dots")
    assert set(rows) == {
        "things/good",
        "things/rgba",
        "things/palette",
        "things/grey16",
        "things/cmyk",
        dotted,
    }
    # Wrong-mode images are converted (see pipelines.data.images): alpha onto white, palette to its
    # colours, 16-bit grey scaled to 8 bits, CMYK to RGB.
    rgba = rows["things/rgba"]["image"]
    assert (rgba[:, :6] == [255, 0, 0]).all() and (rgba[:, 10:] == [255, 255, 255]).all()
    assert (rows["things/palette"]["image"] == [40, 80, 120]).all()
    grey = rows["things/grey16"]["image"]
    assert (grey[:6] == 255).all() and (grey[10:] == 128).all()
    assert (rows["things/cmyk"]["image"] >= 250).all()  # CMYK (0,0,0,0) is white

    corpus = open_corpus(DataSection(source=odd_corpus, image_size=16))
    reported = {
        r["key"]: (r["error"], r["source"])
        for r in corpus.dataset("all", keep_errors=True).take_all()
        if r["error"]
    }
    assert set(reported) == {"things/truncated", "things/empty", "things/header"}
    assert "empty" in reported["things/empty"][0]
    assert "truncated" in reported["things/truncated"][0]
    assert "not a recognised image" in reported["things/header"][0]
    assert reported["things/empty"][1].endswith("empty.png")


def test_bad_input_fails_naming_the_file_when_asked(odd_corpus, ray_local):
    corpus = open_corpus(DataSection(source=odd_corpus, image_size=16, on_bad_input="fail"))
    # Ray Data wraps the task's error; the corpus' own BadInputError is its cause.
    with pytest.raises(Exception) as caught:
        corpus.dataset("all").take_all()
    error = user_error_in(caught.value)
    assert isinstance(error, BadInputError)
    assert re.search(r"(empty|truncated|header)\.png: ", str(error))
    assert "data.on_bad_input is 'fail'" in str(error)


def test_a_bad_image_under_fail_is_the_users_error_on_the_command_line(
    odd_corpus, ray_local, tmp_path, capsys
):
    """Status 2 and the file's name, as for every mistake in the inputs; not a traceback."""
    import json

    from jobs.cli import main
    from tests.pipelines.conftest import tiny_raw_config

    raw = tiny_raw_config(str(tmp_path / "out"), odd_corpus)
    raw["data"]["on_bad_input"] = "fail"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    assert main(["train-vqvae", str(config)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"vqpipe: error: \S+/things/(empty|truncated|header)\.png: ", err)
    assert "Traceback" not in err and "internal error" not in err
    assert not os.path.exists(tmp_path / "out" / "train_vqvae" / "manifest.json")


def test_resume_keys_are_dropped_before_decoding(shapes_corpus, ray_local):
    corpus = open_corpus(DataSection(source=shapes_corpus, image_size=16))
    everything = {r["key"] for r in corpus.dataset("all").take_all()}
    done = sorted(everything)[:5]
    rest = {r["key"] for r in corpus.dataset("all", skip_keys=key_hashes(done)).take_all()}
    assert rest == everything - set(done)


def test_keys_are_webdataset_safe_and_unique():
    assert sanitize_key("a/b/c") == "a/b/c"
    assert "." not in sanitize_key("dir/img.v2").rsplit("/", 1)[-1]
    assert sanitize_key("dir/img.v2") != sanitize_key("dir/img_v2")
    assert sanitize_key("dir/img.v2") == sanitize_key("dir/img.v2")
    assert sanitize_key("./x\\y") == "x/y"


def test_format_detection(shapes_corpus, tmp_path):
    _to_webdataset(shapes_corpus, str(tmp_path / "wds"))
    _to_parquet(shapes_corpus, str(tmp_path / "pq" / "a.parquet"))
    assert detect_format(shapes_corpus) == "folder"
    assert detect_format(str(tmp_path / "wds")) == "webdataset"
    assert detect_format(str(tmp_path / "wds" / "part-{000..001}.tar")) == "webdataset"
    assert detect_format(str(tmp_path / "pq")) == "parquet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(str(tmp_path / "missing"))


def test_decode_image_names_the_reason():
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"", (8, 8), 3)
    with pytest.raises(BadImageError, match="not a recognised image"):
        decode_image(b"not an image at all", (8, 8), 3)
