"""One home per format: the code-shard layout is spelled out in ``pipelines.data.shards`` alone,
and a checkpoint's metadata is read and written through ``pipelines.checkpoint_meta`` alone.

Every other module asks those two: a shard's member names, file names and index suffixes, and
the keys of a checkpoint's ``extra`` dict, each change in one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("pipelines", "jobs", "benchmarks")
SHARDS = "pipelines/data/shards.py"
CHECKPOINT_META = "pipelines/checkpoint_meta.py"
# Pieces of the shard layout: level members, shard names, key indexes, the wids index.
LAYOUT = (".npy", "codes-", ".keys.parquet", "codes.wids.json")
# Tars of images (WebDataset image corpora, benchmark fixtures) are another format.
TAR_READERS = {SHARDS, "benchmarks/bench_shuffle.py"}


def sources() -> dict[str, ast.Module]:
    found = {}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found[rel] = ast.parse(path.read_text(), rel)
    return found


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def called(node: ast.AST, name: str) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == name) or (
        isinstance(func, ast.Attribute) and func.attr == name
    )


def test_only_the_shard_module_spells_the_shard_layout():
    found = []
    for rel, tree in sources().items():
        if rel == SHARDS:
            continue
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in skip and any(piece in node.value for piece in LAYOUT):
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if "tarfile" in names and rel not in TAR_READERS:
                found.append(f"{rel}:{node.lineno} imports tarfile")
    assert not found, f"the shard layout outside {SHARDS}; ask that module instead: {found}"


def test_only_checkpoint_meta_reads_or_writes_checkpoint_metadata():
    found = []
    for rel, tree in sources().items():
        if rel == CHECKPOINT_META:
            continue
        for node in ast.walk(tree):
            if called(node, "save_checkpoint") and (
                len(node.args) > 2 or any(k.arg == "extra" for k in node.keywords)
            ):
                found.append(f"{rel}:{node.lineno} saves an extra dict")
            if isinstance(node, ast.Assign) and called(node.value, "load_checkpoint"):
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and len(target.elts) == 2:
                        extra = target.elts[1]
                        if not (isinstance(extra, ast.Name) and extra.id.startswith("_")):
                            found.append(f"{rel}:{node.lineno} keeps load_checkpoint's extra")
            if isinstance(node, ast.Subscript) and called(node.value, "load_checkpoint"):
                index = node.slice
                if not (isinstance(index, ast.Constant) and index.value == 0):
                    found.append(f"{rel}:{node.lineno} indexes load_checkpoint's result")
    assert not found, (
        f"checkpoint metadata handled outside {CHECKPOINT_META}; use load_with_meta and "
        f"save_with_meta: {found}"
    )
