"""A generated class-conditional image corpus: one coloured shape per class.

The demo needs data that anyone can make in seconds, that a small VQ-VAE-2 reconstructs well, and
whose classes a prior can learn to tell apart: a sample of "triangle" should look like a triangle.
Each image is one filled shape with a random colour, size, position and slight rotation on a random
two-colour gradient background; the shape's colour is chosen to contrast with the background so
the class is always visible.

Layout (an image-folder corpus, readable by pipelines.data.corpus):

    root/<class>/<index:05d>.png
    root/<class>/broken-<n:03d>.png     # only with corrupt_files > 0: truncated or empty files
    root/.vqpipe-corpus.json            # the marker: parameters, files written, complete or not

Generation is deterministic per (seed, class, index) and idempotent: a complete corpus with the same
parameters is left untouched, so its files (and the fingerprints of stages that read it) never change.
An incomplete corpus, or one made with other parameters, is regenerated.

The generator only ever writes into a folder that does not exist yet, an empty one, or one that it
created itself, as its marker says. The marker is written before the first image and lists every
file the generator is about to write, so a run interrupted half-way still leaves a folder that is
recognisably its own. A folder holding any other file is someone's data: the generator refuses it
(``NotADemoCorpusError``) rather than overwrite or delete a single file there.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from pipelines.config import GenerateSection
from pipelines.data import storage
from pipelines.data.images import encode_png
from pipelines.errors import ConfigError

log = logging.getLogger("vqpipe")

FORMAT = "vqpipe.demo_corpus/2"
# Version 1 markers were the bare parameters, written once the corpus was complete; the files they
# stand for follow from those parameters, so such a corpus is still recognised as the generator's.
LEGACY_FORMAT = "vqpipe.demo_corpus/1"
MARKER_NAME = ".vqpipe-corpus.json"
# Shapes are drawn at this multiple of the output size and downsampled: smooth edges are easier
# for a small autoencoder and look like real images rather than aliased masks.
SUPERSAMPLE = 4
# What storage.write_bytes leaves behind when interrupted: "<file>.<8 hex digits>.partial".
_PARTIAL = re.compile(r"\.[0-9a-f]{8}" + re.escape(storage.TMP_SUFFIX) + "$")
_EXAMPLES_SHOWN = 5
# The generator's defaults are those of the config's data.generate section.
_DEFAULTS = GenerateSection()


class NotADemoCorpusError(ConfigError):
    """The demo corpus folder holds files that the generator did not write (or is not a folder)."""

    def __init__(self, root: str, reason: str):
        self.root = root
        super().__init__(
            f"refusing to generate the demo corpus in {root!r}: {reason}. The generator writes "
            "only into a new or empty folder, or one it created itself (it has a "
            f"{MARKER_NAME} marker), so that it never overwrites or deletes anyone's images. "
            "To use an existing corpus, remove `data.generate` from the config; to generate "
            "the demo corpus, point `data.source` at a new or empty folder."
        )


def _regular_polygon(sides: int, cx: float, cy: float, r: float, angle: float) -> list:
    return [
        (
            cx + r * math.cos(angle + 2 * math.pi * k / sides),
            cy + r * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _rotate(points: list, cx: float, cy: float, angle: float) -> list:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)) for x, y in points]


def _draw_circle(draw: ImageDraw.ImageDraw, cx, cy, r, angle, fill) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def _draw_square(draw, cx, cy, r, angle, fill) -> None:
    # Half-diagonal r, rotated at most a little so it never turns into the diamond class.
    draw.polygon(_regular_polygon(4, cx, cy, r, math.pi / 4 + angle), fill=fill)


def _draw_triangle(draw, cx, cy, r, angle, fill) -> None:
    # Pointing up; the centroid sits slightly below the bounding-box centre, so shift it down.
    draw.polygon(_regular_polygon(3, cx, cy + 0.2 * r, 1.1 * r, -math.pi / 2 + angle), fill=fill)


def _draw_cross(draw, cx, cy, r, angle, fill) -> None:
    w = 0.35 * r
    arms = [
        [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
        [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
    ]
    for arm in arms:
        draw.polygon(_rotate(arm, cx, cy, angle), fill=fill)


def _draw_diamond(draw, cx, cy, r, angle, fill) -> None:
    points = [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    draw.polygon(_rotate(points, cx, cy, angle), fill=fill)


def _draw_ring(draw, cx, cy, r, angle, fill) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.35 * r)))


def _draw_star(draw, cx, cy, r, angle, fill) -> None:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        a = -math.pi / 2 + angle + math.pi * k / 5
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    draw.polygon(points, fill=fill)


def _draw_hexagon(draw, cx, cy, r, angle, fill) -> None:
    draw.polygon(_regular_polygon(6, cx, cy, r, angle), fill=fill)


SHAPES = {
    "circle": _draw_circle,
    "square": _draw_square,
    "triangle": _draw_triangle,
    "cross": _draw_cross,
    "diamond": _draw_diamond,
    "ring": _draw_ring,
    "star": _draw_star,
    "hexagon": _draw_hexagon,
}


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


BACKGROUNDS = ("gradient", "plain", "palette")
# Eight well-separated colours for the "palette" corpus: background and shape each take one.
PALETTE = np.array(
    [
        (230, 57, 70),
        (244, 162, 97),
        (233, 216, 76),
        (42, 157, 143),
        (38, 70, 83),
        (69, 123, 230),
        (240, 240, 240),
        (30, 30, 30),
    ],
    dtype=np.float64,
)


def render_image(
    shape: str, size: int, rng: np.random.Generator, background: str = _DEFAULTS.background
) -> np.ndarray:
    """One uint8 size x size x 3 image of ``shape`` with random placement and colours.

    ``background`` "gradient" blends two random colours along a random direction; "plain" is one
    random colour; "palette" draws the background and the shape's colour from eight fixed colours,
    the easiest corpus for a prior trained for a few minutes on a CPU.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    big = size * SUPERSAMPLE
    use_palette = background == "palette"
    # Background: a linear blend of two colours along a random direction.
    start, end = rng.uniform(20, 235, size=(2, 3))
    if background == "palette":
        start = PALETTE[rng.integers(len(PALETTE))]
    if background != "gradient":
        end = start
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:big, 0:big] / max(big - 1, 1)
    t = (np.cos(theta) * (xs - 0.5) + np.sin(theta) * (ys - 0.5)) / math.sqrt(0.5) + 0.5
    t = np.clip(t, 0, 1)[:, :, None]
    background = (1 - t) * start + t * end
    # Shape colour: random hue, but far enough in brightness from the background's mean that the
    # class is never camouflaged.
    bg_luma = _luma(background.reshape(-1, 3).mean(0))
    for _ in range(32):
        if use_palette:
            colour = PALETTE[rng.integers(len(PALETTE))]
        else:
            colour = rng.uniform(0, 255, size=3)
        if abs(_luma(colour) - bg_luma) > 70:
            break
    else:
        colour = np.full(3, 0.0 if bg_luma > 127 else 255.0)
    image = Image.fromarray(background.astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.38) * big
    margin = radius * 1.05
    cx = rng.uniform(margin, big - margin)
    cy = rng.uniform(margin, big - margin)
    angle = rng.uniform(-0.25, 0.25)  # about +-15 degrees: rotation varies, the class does not
    SHAPES[shape](draw, cx, cy, radius, angle, tuple(int(v) for v in colour))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _corrupt_bytes(index: int, valid_png: bytes) -> bytes:
    # Alternate the two failures seen in real crawls: a truncated download and an empty file.
    return valid_png[: max(16, len(valid_png) // 3)] if index % 2 == 0 else b""


def _planned_files(params: dict[str, Any]) -> list[str]:
    """Paths, relative to the corpus root, of every file a corpus with ``params`` consists of."""
    classes = params["classes"]
    files = [
        f"{name}/{index:05d}.png" for name in classes for index in range(params["images_per_class"])
    ]
    files += [f"{key}.png" for key in _corrupt_keys(classes, params["corrupt_files"])]
    return sorted(files)


def _corrupt_keys(classes: list[str], corrupt_files: int) -> list[str]:
    return [f"{classes[i % len(classes)]}/broken-{i:03d}" for i in range(corrupt_files)]


def _existing_files(root: str) -> list[str] | None:
    """Every file under ``root``, relative to it; None when ``root`` does not exist.

    Raises NotADemoCorpusError when ``root`` is a file.
    """
    fs, base = storage.resolve(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise NotADemoCorpusError(root, "it is a file, not a folder")
    base = base.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path[len(base) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def _read_marker(root: str, existing: list[str]) -> dict[str, Any] | None:
    """The marker as {"params", "files", "complete"}; None when there is none.

    An unreadable marker means the folder's history is unknown, so it counts as foreign.
    """
    if MARKER_NAME not in existing:
        return None
    uri = storage.join(root, MARKER_NAME)
    try:
        marker = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        marker = None
    if isinstance(marker, dict) and marker.get("format") == FORMAT:
        if isinstance(marker.get("params"), dict) and isinstance(marker.get("files"), list):
            return marker
    if isinstance(marker, dict) and marker.get("format") == LEGACY_FORMAT:
        params = {k: v for k, v in marker.items() if k != "format"}
        try:
            files = _planned_files(params)
        except (KeyError, TypeError, ZeroDivisionError):
            files = None
        if files is not None:
            return {"params": params, "files": files, "complete": True}
    raise NotADemoCorpusError(root, f"its {MARKER_NAME} is not a marker this generator can read")


def _marker_bytes(params: dict[str, Any], files: list[str], complete: bool) -> bytes:
    marker = {"format": FORMAT, "complete": complete, "params": params, "files": files}
    return json.dumps(marker, indent=2).encode()


def _is_own(path: str, owned: set[str]) -> bool:
    # An interrupted atomic write of one of our files is ours too.
    return path in owned or _PARTIAL.sub("", path) in owned


def generate_corpus(
    root: str,
    classes: tuple[str, ...] | list[str] = tuple(_DEFAULTS.classes),
    images_per_class: int = _DEFAULTS.images_per_class,
    image_size: int = _DEFAULTS.image_size,
    corrupt_files: int = _DEFAULTS.corrupt_files,
    seed: int = _DEFAULTS.seed,
    background: str = _DEFAULTS.background,
) -> dict[str, Any]:
    """Write the demo corpus under ``root`` (a local path or URL) unless it is already complete.

    Returns a summary: root, classes, images (valid files), corrupt (keys of the broken files)
    and generated (False when an existing complete corpus was kept).

    Raises NotADemoCorpusError (a ValueError) without touching anything when ``root`` holds a file
    that this generator did not write, e.g. when it is someone's own image folder.
    """
    classes = list(classes)
    _check_params(classes, images_per_class, image_size, corrupt_files)
    params = {
        "classes": classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "corrupt_files": corrupt_files,
        "seed": seed,
        "background": background,
    }
    summary = {
        "root": root,
        "classes": classes,
        "images": images_per_class * len(classes),
        "corrupt": _corrupt_keys(classes, corrupt_files),
    }
    existing = _existing_files(root) or []
    previous = _read_marker(root, existing)
    if previous is not None and previous["complete"] and previous["params"] == params:
        return {**summary, "generated": False}
    owned = set(previous["files"]) if previous is not None else set()
    owned.add(MARKER_NAME)
    _refuse_foreign(root, existing, owned)

    log.info("generating demo corpus at %s (%d images)", root, summary["images"])
    planned = _planned_files(params)
    marker = storage.join(root, MARKER_NAME)
    # Claim every file this run may write before writing any: if it is interrupted, the next run
    # still knows them all as its own. Until rewritten below, the corpus reads as incomplete.
    in_progress = sorted((owned - {MARKER_NAME}) | set(planned))
    storage.write_bytes(marker, _marker_bytes(params, in_progress, complete=False))
    # Only files the marker recorded as ours, and leftovers of our own interrupted writes.
    keep = set(planned) | {MARKER_NAME}
    for path in existing:
        if path not in keep:
            storage.remove(storage.join(root, path))
    _write_images(root, params)
    storage.write_bytes(marker, _marker_bytes(params, planned, complete=True))
    return {**summary, "generated": True}


def _check_params(
    classes: list[str], images_per_class: int, image_size: int, corrupt_files: int
) -> None:
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ValueError(f"unknown demo classes {unknown}; expected names from {sorted(SHAPES)}")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list of distinct names, got {classes}")
    if images_per_class <= 0 or image_size < 8 or corrupt_files < 0:
        raise ValueError(
            f"need images_per_class > 0, image_size >= 8 and corrupt_files >= 0; got "
            f"{images_per_class}, {image_size}, {corrupt_files}"
        )


def _refuse_foreign(root: str, existing: list[str], owned: set[str]) -> None:
    """Raise NotADemoCorpusError, naming a few, when ``root`` holds files that are not ours."""
    foreign = [f for f in existing if not _is_own(f, owned)]
    if not foreign:
        return
    shown = ", ".join(foreign[:_EXAMPLES_SHOWN])
    more = f" and {len(foreign) - _EXAMPLES_SHOWN} more" if len(foreign) > _EXAMPLES_SHOWN else ""
    raise NotADemoCorpusError(
        root, f"it holds {len(foreign)} file(s) the generator did not write ({shown}{more})"
    )


def _write_images(root: str, params: dict[str, Any]) -> None:
    """Every image of the corpus ``params`` describe, the broken files included."""
    classes, size, seed = params["classes"], params["image_size"], params["seed"]
    background = params["background"]
    for class_index, name in enumerate(classes):
        for index in range(params["images_per_class"]):
            # One generator per image: any image can be regenerated alone and the corpus does
            # not depend on the order in which it is written.
            rng = np.random.default_rng([seed, class_index, index])
            png = encode_png(render_image(name, size, rng, background))
            storage.write_bytes(storage.join(root, name, f"{index:05d}.png"), png)
    for i, key in enumerate(_corrupt_keys(classes, params["corrupt_files"])):
        rng = np.random.default_rng([seed, 10_000 + i])
        valid = encode_png(render_image(classes[i % len(classes)], size, rng, background))
        storage.write_bytes(storage.join(root, f"{key}.png"), _corrupt_bytes(i, valid))
