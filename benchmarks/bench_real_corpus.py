"""The demo pipeline on real image corpora it was not developed on: CAS, reconstruction, code use.

Builds a labelled folder corpus (``<output>/corpus/<class>/<key>.png``, the layout
``data.source`` reads) from real images that registry packages ship, so nothing is downloaded:

- ``digits``: scikit-learn's ``load_digits``, 1,797 handwritten digits (UCI optdigits), 10 classes,
  8x8 with 17 grey levels; scaled to 0..255, upscaled to 32x32 (bicubic) and written as RGB with
  three equal channels, the demo's size and channel count;
- ``photos``: non-overlapping 32x32 tiles cut from colour photographs that scikit-image ships
  (``skimage.data``: astronaut, chelsea, coffee, rocket, immunohistochemistry, the left image of
  stereo_motorcycle), one class per photograph, at most ``--tiles-per-class`` tiles each
  (a deterministic choice).

Then runs ``vqpipe run`` with ``configs/demo.yaml`` in which only the data keys differ
(``data.source`` is the built corpus, ``data.generate`` is removed; image size, channels and the
split fractions stay the demo's) and ``output_dir`` is ``--output``. Last, it prints what the
evaluate stage measured on the test split: CAS generated->real, the size-matched real->real
reference, their ratio with its bootstrap 95% interval, per-class accuracies, test MSE/PSNR, prior
bits per code and the codes in use per level out of the codebook size.

    pip install scikit-learn scikit-image
    python benchmarks/bench_real_corpus.py digits             # corpus, pipeline, figures
    python benchmarks/bench_real_corpus.py photos --output runs/bench-photos
    python benchmarks/bench_real_corpus.py digits --report    # figures of a finished run only
    python benchmarks/bench_real_corpus.py digits --set sample.temperature=1.0   # an experiment

``--set`` passes overrides to ``vqpipe run`` and is printed with the figures: a run with overrides
is no longer "the demo config with only the data keys changed". ``--config`` starts from another
config than the demo's (its data keys are replaced the same way), e.g. the photo-tile recipe:

    python benchmarks/bench_real_corpus.py photos --config configs/photo-tiles.yaml \
        --output runs/bench-photo-tiles
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
TILE = 32


def digits_corpus() -> dict[str, list[np.ndarray]]:
    """Class name -> uint8 RGB images (32x32) of scikit-learn's handwritten digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    corpus: dict[str, list[np.ndarray]] = {}
    for image, label in zip(digits.images, digits.target):
        grey = Image.fromarray(np.rint(image * 255.0 / 16.0).astype(np.uint8), mode="L")
        big = np.asarray(grey.resize((TILE, TILE), Image.BICUBIC))
        corpus.setdefault(f"digit-{label}", []).append(np.repeat(big[..., None], 3, axis=2))
    return corpus


def photo_corpus(tiles_per_class: int) -> dict[str, list[np.ndarray]]:
    """Class name (the photograph) -> its non-overlapping 32x32 RGB tiles."""
    from skimage import data

    corpus: dict[str, list[np.ndarray]] = {}
    for name in PHOTOS:
        image = getattr(data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        image = np.asarray(image)[..., :3]
        h, w = (s // TILE * TILE for s in image.shape[:2])
        grid = image[:h, :w].reshape(h // TILE, TILE, w // TILE, TILE, 3).swapaxes(1, 2)
        tiles = list(grid.reshape(-1, TILE, TILE, 3))
        if len(tiles) > tiles_per_class:
            # A fixed, spread-out choice: every tile of the photograph has the same chance.
            keep = np.random.default_rng(0).choice(len(tiles), tiles_per_class, replace=False)
            tiles = [tiles[i] for i in sorted(keep)]
        corpus[name] = tiles
    return corpus


def write_corpus(corpus: dict[str, list[np.ndarray]], root: Path) -> dict[str, int]:
    """Write ``root/<class>/<class>-<index>.png``; an existing complete corpus is kept."""
    from PIL import Image

    counts = {name: len(images) for name, images in corpus.items()}
    stamp = root / "_corpus.json"  # hidden from the folder reader (leading "_")
    if stamp.exists() and json.loads(stamp.read_text()) == counts:
        return counts
    for name, images in corpus.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, pixels in enumerate(images):
            Image.fromarray(pixels, mode="RGB").save(folder / f"{name}-{index:04d}.png")
    stamp.write_text(json.dumps(counts))
    return counts


def write_config(output: Path, corpus: Path, base: Path = DEMO) -> Path:
    """``base`` (configs/demo.yaml) with its data source replaced by ``corpus`` (nothing
    generated) and its output in ``output``; every other key is the base config's."""
    raw = yaml.safe_load(base.read_text())
    raw["output_dir"] = str(output)
    raw["data"]["source"] = str(corpus)
    raw["data"].pop("generate", None)
    path = output / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def vqpipe() -> list[str]:
    script = Path(sys.executable).with_name("vqpipe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]


def manifest(output: Path, stage: str) -> dict:
    path = output / stage / "manifest.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: has the pipeline run to the end?")
    return json.loads(path.read_text())


def report(output: Path) -> None:
    ev = manifest(output, "evaluate")
    tok = manifest(output, "tokenize")
    m = ev["metrics"]

    def ci(name: str) -> str:
        low, high = m.get(f"{name}/ci_low"), m.get(f"{name}/ci_high")
        return "" if low is None else f"  95% CI [{low:.3f}, {high:.3f}]"

    def spread(name: str) -> str:
        if f"{name}/std" not in m:
            return ""
        return (
            f"  seeds: std {m[f'{name}/std']:.3f}, {m[f'{name}/min']:.3f}..{m[f'{name}/max']:.3f}"
        )

    overrides_file = output / "overrides.json"
    overrides = json.loads(overrides_file.read_text()) if overrides_file.exists() else []
    print(f"run: {output}; overrides of the demo config besides data: {overrides or 'none'}")
    print(
        f"corpus: {tok['samples']} images, classes {', '.join(tok['class_names'])}; "
        f"splits {tok['splits']}"
    )
    print(
        f"CAS: {int(m['cas/generated_images'])} generated vs {int(m['cas/real_train_images'])} "
        f"size-matched real train images, scored on {int(m['cas/real_test_images'])} real test "
        f"images, {int(m['cas/seeds'])} sampling seed(s)"
    )
    for name in (
        "cas/generated_to_real",
        "cas/real_to_real",
        "cas/ratio",
        "cas/real_to_generated",
        "cas/judge_on_real",
        "cas/recognition_ratio",
    ):
        if name in m:
            print(f"  {name:24s} {m[name]:.3f}{ci(name)}{spread(name)}")
    print("  per class (generated->real / real->real):")
    for cls in tok["class_names"]:
        key = f"cas/generated_to_real/class/{cls}"
        if key in m:
            print(f"    {cls:22s} {m[key]:.3f} / {m[f'cas/real_to_real/class/{cls}']:.3f}")
    for name in ("quality/fid", "quality/fid_real_train", "quality/precision", "quality/recall"):
        if name in m:
            print(f"  {name:24s} {m[name]:.3f}")
    print(
        f"reconstruction (test, {int(m['test/images'])} images): MSE {m['test/mse']:.5f}, "
        f"PSNR {m['test/psnr']:.2f} dB"
    )
    for level in tok["levels"]:
        k = tok["codebook_sizes"][level]
        bits = m.get(f"test/bits_per_code/{level}", float("nan"))
        print(
            f"  codes {level:6s}: {int(m[f'test/codes_used/{level}'])}/{k} in use, perplexity "
            f"{m[f'test/perplexity/{level}']:.1f}; prior {bits:.3f} bits/code "
            f"(log2 K = {np.log2(k):.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", choices=("digits", "photos"))
    parser.add_argument("--output", type=Path, help="default: runs/bench-real-<corpus>")
    parser.add_argument(
        "--tiles-per-class", type=int, default=260, help="photos: most tiles per class"
    )
    parser.add_argument("--report", action="store_true", help="only print a finished run's figures")
    parser.add_argument("--prepare", action="store_true", help="only write the corpus and config")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for vqpipe run (then it is no longer the demo config)",
    )
    parser.add_argument("--force", nargs="*", metavar="STAGE", help="passed to vqpipe run")
    parser.add_argument(
        "--config", type=Path, default=DEMO, help="the config whose data keys are replaced"
    )
    args = parser.parse_args()

    output = (args.output or ROOT / "runs" / f"bench-real-{args.corpus}").resolve()
    if not args.report:
        output.mkdir(parents=True, exist_ok=True)
        images = digits_corpus() if args.corpus == "digits" else photo_corpus(args.tiles_per_class)
        counts = write_corpus(images, output / "corpus")
        print(
            f"corpus {args.corpus}: {sum(counts.values())} images in {len(counts)} classes {counts}"
        )
        config = write_config(output, output / "corpus", args.config)
        print(f"config: {config} ({args.config}, data.source replaced, data.generate removed)")
        if args.prepare:
            return
        command = [*vqpipe(), "run", str(config)]
        for assignment in args.set:
            command += ["--set", assignment]
        if args.force is not None:
            command += ["--force", *args.force]
        (output / "overrides.json").write_text(json.dumps(args.set))
        print(f"{load()} at start; running: {' '.join(command)}", flush=True)
        started = time.time()
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"pipeline took {time.time() - started:.0f} s; {load()} at the end")
    report(output)


if __name__ == "__main__":
    main()
