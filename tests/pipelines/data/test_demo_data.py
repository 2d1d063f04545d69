"""The demo corpus generator never touches a folder of someone else's images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipelines.data.demo_data import MARKER_NAME, NotADemoCorpusError, generate_corpus

CLASSES = ("circle", "square")
SMALL = {"classes": CLASSES, "images_per_class": 3, "image_size": 8}


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pngs(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.png")}


@pytest.fixture
def user_corpus(tmp_path) -> Path:
    """A user's own image folder whose names collide with the generator's (circle/00000.png)."""
    root = tmp_path / "photos"
    for relative, payload in {
        "circle/00000.png": b"my own circle, not a generated one",
        "circle/00001.png": b"another irreplaceable file",
        "circle/holiday.jpg": b"jpeg bytes",
        "dog/00000.png": b"a class the demo does not know",
        "notes.txt": b"keep me",
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return root


def test_user_corpus_survives_byte_identical_and_is_refused(user_corpus):
    before = _hashes(user_corpus)
    with pytest.raises(NotADemoCorpusError) as caught:
        generate_corpus(str(user_corpus), classes=("circle", "square"), images_per_class=4)
    assert isinstance(caught.value, ValueError)  # config errors are reported as ValueError
    message = str(caught.value)
    assert str(user_corpus) in message
    assert "remove `data.generate`" in message
    assert "circle/00000.png" in message  # names an offending file
    assert _hashes(user_corpus) == before  # nothing written, overwritten or deleted
    assert not (user_corpus / MARKER_NAME).exists()


def test_single_stray_file_in_unmarked_folder_is_refused(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    with pytest.raises(NotADemoCorpusError, match=r"\.DS_Store"):
        generate_corpus(str(root), **SMALL)
    assert _hashes(root) == {".DS_Store": hashlib.sha256(b"\x00\x01").hexdigest()}


def test_new_and_empty_folders_are_generated_into(tmp_path):
    empty = tmp_path / "empty"
    (empty / "circle").mkdir(parents=True)  # empty subfolders hold no one's files either
    for root in (tmp_path / "new" / "corpus", empty):
        summary = generate_corpus(str(root), **SMALL)
        assert summary["generated"] and summary["images"] == 6
        assert _pngs(root) == {f"{c}/{i:05d}.png" for c in CLASSES for i in range(3)}
        marker = json.loads((root / MARKER_NAME).read_bytes())
        assert marker["complete"] and marker["params"]["images_per_class"] == 3
        assert sorted(marker["files"]) == sorted(_pngs(root))


def test_complete_corpus_with_same_parameters_is_left_untouched(tmp_path):
    root = tmp_path / "corpus"
    generate_corpus(str(root), **SMALL)
    before = {p: (root / p).stat().st_mtime_ns for p in _hashes(root)}
    assert generate_corpus(str(root), **SMALL)["generated"] is False
    assert {p: (root / p).stat().st_mtime_ns for p in _hashes(root)} == before


def test_marked_folder_is_regenerated_with_new_parameters(tmp_path):
    root = tmp_path / "corpus"
    generate_corpus(
        str(root),
        classes=("circle", "square", "cross"),
        images_per_class=4,
        image_size=8,
        corrupt_files=2,
    )
    first = _hashes(root)

    summary = generate_corpus(
        str(root), classes=("circle", "triangle"), images_per_class=2, image_size=8
    )
    assert summary["generated"]
    # Files of the old corpus that the new one lacks are gone: classes, indices, broken files.
    assert _pngs(root) == {f"{c}/{i:05d}.png" for c in ("circle", "triangle") for i in range(2)}
    # The same (seed, class, index) renders the same image, so circle/00000.png is unchanged.
    assert _hashes(root)["circle/00000.png"] == first["circle/00000.png"]
    assert json.loads((root / MARKER_NAME).read_bytes())["params"]["classes"] == [
        "circle",
        "triangle",
    ]


def test_file_added_to_a_generated_corpus_blocks_regeneration(tmp_path):
    root = tmp_path / "corpus"
    generate_corpus(str(root), **SMALL)
    (root / "circle" / "mine.png").write_bytes(b"added by hand")
    before = _hashes(root)
    with pytest.raises(NotADemoCorpusError, match=r"circle/mine\.png"):
        generate_corpus(str(root), classes=CLASSES, images_per_class=5, image_size=8)
    assert _hashes(root) == before


def test_interrupted_generation_is_resumed(tmp_path):
    """A run cut off after its first marker and some images still owns the folder."""
    root = tmp_path / "corpus"
    generate_corpus(str(root), **SMALL)
    marker = json.loads((root / MARKER_NAME).read_bytes())
    # What an interrupted bigger run leaves: its claim on more files, a half-written temporary.
    marker["complete"] = False
    marker["files"] += ["circle/00003.png", "circle/00004.png"]
    (root / MARKER_NAME).write_text(json.dumps(marker))
    (root / "circle" / "00003.png").write_bytes(b"written before the crash")
    (root / "circle" / "00004.png.0123abcd.partial").write_bytes(b"half")

    assert generate_corpus(str(root), **SMALL)["generated"]
    assert _pngs(root) == {f"{c}/{i:05d}.png" for c in CLASSES for i in range(3)}
    assert not list(root.rglob("*.partial"))


def test_unreadable_marker_is_not_trusted(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / MARKER_NAME).write_text("{not json")
    (root / "circle").mkdir()
    (root / "circle" / "00000.png").write_bytes(b"whose is this?")
    with pytest.raises(NotADemoCorpusError, match="not a marker"):
        generate_corpus(str(root), **SMALL)
    assert (root / "circle" / "00000.png").read_bytes() == b"whose is this?"


def test_corpus_marked_by_the_previous_format_is_still_recognised(tmp_path):
    """Corpora generated before the marker listed its files: the parameters imply them."""
    root = tmp_path / "corpus"
    generate_corpus(str(root), **SMALL)
    params = json.loads((root / MARKER_NAME).read_bytes())["params"]
    (root / MARKER_NAME).write_text(json.dumps({"format": "vqpipe.demo_corpus/1", **params}))
    assert generate_corpus(str(root), **SMALL)["generated"] is False
    generate_corpus(str(root), classes=("circle",), images_per_class=2, image_size=8)
    assert _pngs(root) == {"circle/00000.png", "circle/00001.png"}


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    path = tmp_path / "corpus"
    path.write_bytes(b"a file")
    with pytest.raises(NotADemoCorpusError, match="is a file"):
        generate_corpus(str(path), **SMALL)
    assert path.read_bytes() == b"a file"
