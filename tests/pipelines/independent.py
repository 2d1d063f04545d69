"""The evaluate stage's figures recomputed from a finished run's files with plain numpy (and
scikit-learn), never with the functions that produced them: the corpus images on disk, the code
shards, the trained checkpoints, the sample PNGs, the judge and the predictions table.

Used by tests/pipelines/evaluation/test_published_figures.py (every figure of the shared run) and
tests/pipelines/stages/test_stage_settings.py (the figures of runs with one setting changed).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from vq_core.checkpoint import load_checkpoint


@dataclass
class RealImage:
    key: str
    label: int
    pixels: np.ndarray  # uint8 H x W x C


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def corpus_images(source: str) -> dict[str, RealImage]:
    """Every readable image of a folder corpus by key (``<class>/<stem>``), labelled by the index
    of its folder among the sorted class folders; unreadable files are left out."""
    classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    images = {}
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(source, name))):
            try:
                pixels = read_png(os.path.join(source, name, file))
            except OSError:  # the corrupt files
                continue
            key = f"{name}/{os.path.splitext(file)[0]}"
            images[key] = RealImage(key, label, pixels)
    return images


def split_of(key: str, validation_fraction: float, test_fraction: float) -> str:
    """The documented split rule: sha1 of the key as a number in [0, 1); test lowest."""
    position = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64
    if position < test_fraction:
        return "test"
    return "validation" if position < test_fraction + validation_fraction else "train"


def splits(images: dict[str, RealImage], data) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for key in sorted(images):
        out[split_of(key, data.validation_fraction, data.test_fraction)].append(key)
    return out


def to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W in [-1, 1]."""
    x = pixels.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def load_model(path: str) -> torch.nn.Module:
    with open(path, "rb") as f:
        return load_checkpoint(f.read(), map_location="cpu")[0].eval()


def shard_codes(shard_paths: list[str], levels: list[str]) -> dict[str, dict]:
    """key -> {"label": int, level: codes} read from the shard tars with tarfile and numpy."""
    found: dict[str, dict] = {}
    for path in shard_paths:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if not name.endswith(".cls"):
                    continue
                key = name[: -len(".cls")]
                entry = {"label": int(tar.extractfile(member).read())}
                for level in levels:
                    data = tar.extractfile(members[f"{key}.{level}.npy"]).read()
                    entry[level] = np.load(io.BytesIO(data))
                found[key] = entry
    return found


def histogram_figures(codes: np.ndarray, k: int) -> tuple[int, float, float]:
    """(codes used, usage, perplexity) of a set of codes from a codebook of size k."""
    counts = np.bincount(codes.ravel(), minlength=k).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    used = int((counts > 0).sum())
    return used, used / k, float(np.exp(-(p * np.log(p)).sum()))


def bits_per_code(logits: np.ndarray, codes: np.ndarray) -> float:
    """Mean negative log2-likelihood of B x h x w codes under B x K x h x w logits."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(log_probs, codes[:, None].astype(np.int64), axis=1)
    return float(-picked.mean() / np.log(2))


# ----------------------------------------------------------------------------------------------
# CAS, from the predictions table


def predictions(path: str) -> dict[str, np.ndarray]:
    table = pq.read_table(path).to_pydict()
    return {name: np.array(values, dtype=object) for name, values in table.items()}


def rows(table: dict[str, np.ndarray], classifier: str, images: str, seed=None) -> np.ndarray:
    """Indices of the table's rows of one classifier on one kind of images (and one seed)."""
    mask = (table["classifier"] == classifier) & (table["images"] == images)
    if seed is not None:
        mask &= table["sampling_seed"] == seed
    return np.flatnonzero(mask)


def correct(table: dict[str, np.ndarray], index: np.ndarray) -> np.ndarray:
    return (table["predicted"][index] == table["label"][index]).astype(float)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def cas_figures(
    table: dict[str, np.ndarray], class_names: list[str], resamples: int
) -> dict[str, float]:
    """Every cas/* accuracy, ratio, per-class figure and interval, from the predictions table,
    with the documented bootstrap (numpy default_rng(0), percentile 2.5 and 97.5)."""
    seeds = sorted({int(s) for s in table["sampling_seed"] if s is not None})
    test_keys = table["key"][rows(table, "judge", "test")]
    test_labels = table["label"][rows(table, "judge", "test")].astype(int)
    on_generated, on_real, judged = [], [], []
    for seed in seeds:
        for name, store in (("generated", on_generated), ("real", on_real)):
            index = rows(table, name, "test", seed)
            assert list(table["key"][index]) == list(test_keys)  # one order for every classifier
            store.append(correct(table, index))
        judged.append(correct(table, rows(table, "judge", "generated", seed)))
    g, r = np.array(on_generated), np.array(on_real)  # seeds x test images
    judge_on_test = correct(table, rows(table, "judge", "test"))
    figures = {
        "cas/generated_to_real": g.mean(),
        "cas/real_to_real": r.mean(),
        "cas/ratio": g.mean() / r.mean(),
        "cas/real_to_generated": np.mean([j.mean() for j in judged]),
        "cas/judge_on_real": judge_on_test.mean(),
        "cas/real_test_images": len(test_keys),
        "cas/seeds": len(seeds),
    }
    figures["cas/recognition_ratio"] = figures["cas/real_to_generated"] / judge_on_test.mean()
    for name, matrix in (("generated_to_real", g), ("real_to_real", r)):
        for label in sorted(set(test_labels)):
            key = f"cas/{name}/class/{class_names[label]}"
            figures[key] = matrix[:, test_labels == label].mean()
    # Paired bootstrap over test images: one draw of indices for every classifier.
    n = len(test_keys)
    draws = np.random.default_rng(0).integers(0, n, size=(resamples, n))
    top, bottom = g.mean(axis=0)[draws].mean(axis=1), r.mean(axis=0)[draws].mean(axis=1)
    intervals = {
        "generated_to_real": percentile_interval(top),
        "real_to_real": percentile_interval(bottom),
    }
    if (bottom > 0).mean() >= 0.975:  # else the ratio's upper bound is infinite: no interval
        intervals["ratio"] = percentile_interval(top / bottom)
    # Recognition: the samples and the test images resampled independently, samples first.
    rng = np.random.default_rng(0)
    samples = np.concatenate(judged)
    top = samples[rng.integers(0, len(samples), size=(resamples, len(samples)))].mean(axis=1)
    bottom = judge_on_test[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    if (bottom > 0).mean() >= 0.975:
        intervals["recognition_ratio"] = percentile_interval(top / bottom)
    for name, (low, high) in intervals.items():
        figures[f"cas/{name}/ci_low"], figures[f"cas/{name}/ci_high"] = low, high
    if len(seeds) > 1:
        per_seed = {
            "cas/generated_to_real": g.mean(axis=1),
            "cas/real_to_real": r.mean(axis=1),
            "cas/ratio": g.mean(axis=1) / r.mean(axis=1),
            "cas/real_to_generated": np.array([j.mean() for j in judged]),
            "cas/recognition_ratio": np.array([j.mean() for j in judged]) / judge_on_test.mean(),
        }
        for name, values in per_seed.items():
            figures[f"{name}/std"] = values.std(ddof=1)
            figures[f"{name}/min"], figures[f"{name}/max"] = values.min(), values.max()
    return {k: float(v) for k, v in figures.items() if np.isfinite(v)}


# ----------------------------------------------------------------------------------------------
# Feature space, in the judge's penultimate layer


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^1/2), the trace of the root as the
    sum of the square roots of the (real, non-negative) eigenvalues of S_a S_b."""
    mu = a.mean(axis=0) - b.mean(axis=0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * root)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    """k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019), with scikit-learn."""
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import NearestNeighbors

    def radii(points):  # distance to the k-th neighbour, the point itself excluded
        return NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)[0][:, k]

    precision = (pairwise_distances(generated, real) <= radii(real)[None]).any(axis=1).mean()
    recall = (pairwise_distances(real, generated) <= radii(generated)[None]).any(axis=1).mean()
    return float(precision), float(recall)


def matched_keys(train: list[tuple[str, int]], counts: dict[int, int], salt: int) -> list[str]:
    """The size-matched reference's real train images: per class, the first ``counts[class]``
    keys in the order of sha256("<salt>/<key>")."""
    chosen = []
    for label, count in sorted(counts.items()):
        members = [key for key, y in train if y == label]
        members.sort(key=lambda k: hashlib.sha256(f"{salt}/{k}".encode()).digest()[:8])
        chosen += members[:count]
    return chosen
