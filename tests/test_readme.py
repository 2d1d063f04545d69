"""The README and the pages under docs/ say what the code does.

Each page is held to the same checks: its ```python examples run as written; its ```yaml snippets
are valid configurations (merged onto a minimal config, so a snippet may show one section); the
``vqpipe`` commands in its code blocks parse with the CLI's parser (synopsis notation allowed:
``[optional]``, ``a|b`` alternatives, ``...``), and those in its inline code name real verbs and
options; the config keys, module paths and repository files it names in inline code exist; its
links resolve to existing files and headings. Examples that need a finished run are shown as
indented blocks, which are not run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from jobs.cli import build_parser
from pipelines.config import PipelineConfig, parse_config
from pipelines.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", flags=re.M | re.S)
# Config keys a page names as refused (an old key); the schema must refuse them.
REFUSED_KEYS = {"data.holdout_fraction"}
# A snippet is merged onto this, so that it may show one section.
BASE_CONFIG = {"output_dir": "runs/docs-example", "data": {"source": "corpus"}}
# Placeholders in a documented key, and a section that stands for them.
PLACEHOLDERS = {"<level>": "top", "<stage>": "train_vqvae"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fenced(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def _prose_and_code(page: Path) -> tuple[str, list[str]]:
    """The page's prose (code blocks removed) and the lines of its code blocks (fenced or
    indented by four spaces; a trailing backslash joins a line with the next)."""
    prose, code = [], []
    in_fence = in_indented = False
    after_blank = True
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif in_fence:
            code.append(line)
        elif not line.strip():
            prose.append(line)
        elif line.startswith("    ") and (after_blank or in_indented):
            in_indented = True
            code.append(line.strip())
        else:
            in_indented = False
            prose.append(line)
        after_blank = not line.strip()
    joined = "\n".join(code).replace("\\\n", " ")
    return "\n".join(prose), joined.splitlines()


def _inline_code(page: Path) -> list[str]:
    prose, _ = _prose_and_code(page)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def _headings(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    prose, _ = _prose_and_code(page)
    seen: dict[str, int] = {}
    anchors = set()
    for match in re.finditer(r"^#{1,6} +(.+?) *$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _cases(extract) -> list:
    return [
        pytest.param(page, item, id=f"{_name(page)}: {str(item)[:60]}")
        for page in PAGES
        for item in extract(page)
    ]


# ---- Python examples -------------------------------------------------------------------------


def test_there_are_python_examples():
    assert any(_fenced(page, "python") for page in PAGES), "no python example in README or docs/"


@pytest.mark.parametrize("page,block", _cases(lambda p: _fenced(p, "python")))
def test_python_examples_run(page, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Examples write to /tmp for brevity; keep the test's files in its own folder.
    exec(compile(block.replace("/tmp/", f"{tmp_path}/"), str(page), "exec"), {})


# ---- Config snippets and keys ----------------------------------------------------------------


def _merged(base: dict, snippet: dict) -> dict:
    out = dict(base)
    for key, value in snippet.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("page,block", _cases(lambda p: _fenced(p, "yaml")))
def test_yaml_snippets_are_valid_configs(page, block):
    snippet = yaml.safe_load(block)
    assert isinstance(snippet, dict), f"{_name(page)}: a yaml block that is not a config:\n{block}"
    parse_config(_merged(BASE_CONFIG, snippet))


def _section_model(ann: object) -> type[BaseModel] | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _named_sections(model: type[BaseModel]) -> type[BaseModel] | None:
    """The model of the sections a section holds under names of the user's choosing besides its
    fields (one per code level in ``train_prior``: its typed extra keys), or None."""
    if model.model_config.get("extra") != "allow":
        return None
    args = typing.get_args(typing.get_type_hints(model).get("__pydantic_extra__"))
    return _section_model(args[1]) if len(args) == 2 else None


def _key_exists(dotted: str) -> bool:
    """Whether ``a.b.c`` names a key of the schema (a model knob under ``*.model`` counts; so
    does any name where the schema takes names of the user's choosing, as code levels)."""
    model: type[BaseModel] | None = PipelineConfig
    for placeholder, example in PLACEHOLDERS.items():
        dotted = dotted.replace(placeholder, example)
    named: type[BaseModel] | None = None  # the model of a dict field's values, for the next part
    for part in dotted.split("."):
        if named is not None:
            model, named = named, None
            continue
        if model is None:
            return False
        field = model.model_fields.get(part)
        if field is None:
            model = _named_sections(model)
            if model is None:
                return False
            continue
        if part == "model":  # fields of the vq_core config dataclasses, validated there
            return True
        ann = field.annotation
        if typing.get_origin(ann) is dict:
            named, model = _section_model(typing.get_args(ann)[1]), None
            continue
        model = _section_model(ann)
    return True


SECTIONS = tuple(PipelineConfig.model_fields)
CONFIG_KEY = re.compile(rf"^(?:{'|'.join((*SECTIONS, *PLACEHOLDERS))})\.[\w.<>]+$")


@pytest.mark.parametrize(
    "page,key", _cases(lambda p: sorted({s for s in _inline_code(p) if CONFIG_KEY.match(s)}))
)
def test_config_keys_exist(page, key):
    if key in REFUSED_KEYS:
        section, name = key.split(".", 1)
        with pytest.raises(ConfigError, match=name):
            parse_config(_merged(BASE_CONFIG, {section: {name: 0.1}}))
    else:
        assert _key_exists(key), f"{_name(page)} names config key {key!r}, not in the schema"


# ---- Commands ----------------------------------------------------------------------------------


def _expansions(command: str) -> list[list[str]]:
    """The argument lists a synopsis line stands for: brackets dropped, ``...`` dropped, each
    ``a|b`` alternative taken in turn."""
    tokens = shlex.split(command.replace("[", " ").replace("]", " "), comments=True)
    tokens = [t for t in tokens if t != "..."]
    choices = [t.split("|") if "|" in t else [t] for t in tokens]
    return [list(combo) for combo in itertools.product(*choices)]


def _commands(page: Path) -> list[str]:
    _, code = _prose_and_code(page)
    return [line.strip() for line in code if line.strip().startswith("vqpipe ")]


@pytest.mark.parametrize("page,command", _cases(_commands))
def test_commands_parse(page, command):
    for argv in _expansions(command):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                args = build_parser().parse_args(argv[1:])
            except SystemExit as exit:
                assert exit.code == 0, f"{_name(page)}: {' '.join(argv)!r}: {err.getvalue()}"
                continue
        for assignment in getattr(args, "overrides", []):
            key = assignment.split("=", 1)[0]
            if not key.isupper():  # KEY=VALUE is a placeholder
                assert _key_exists(key), f"{_name(page)}: --set {key}: not a config key"


def _subcommands() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The CLI's parser and its subcommands' parsers by verb."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return parser, sub.choices


@pytest.mark.parametrize(
    "page,span", _cases(lambda p: [s for s in _inline_code(p) if s.startswith("vqpipe ")])
)
def test_inline_commands_name_real_verbs_and_options(page, span):
    parser, verbs = _subcommands()
    for argv in _expansions(span):
        words = [w for w in argv[1:] if not w.startswith("-")]
        verb = words[0] if words else None
        if verb is not None and verb.startswith("<"):
            continue  # `vqpipe <verb>`
        assert verb is None or verb in verbs, f"{_name(page)}: {span!r}: no verb {verb!r}"
        known = set(parser._option_string_actions)
        if verb is not None:
            known |= set(verbs[verb]._option_string_actions)
        for word in argv[1:]:
            if word.startswith("-"):
                assert word.split("=")[0] in known, f"{_name(page)}: {span!r}: no option {word}"


# ---- Modules, files and links ------------------------------------------------------------------

MODULE_PATH = re.compile(r"^(?:vq_core|pipelines|jobs)(?:\.\w+)+$")
REPO_PATH = re.compile(
    r"^(?:vq_core|pipelines|jobs|infra|configs|benchmarks|scripts|tests|docs)/[\w./-]*$"
)


@pytest.mark.parametrize(
    "page,dotted", _cases(lambda p: sorted({s for s in _inline_code(p) if MODULE_PATH.match(s)}))
)
def test_module_paths_import(page, dotted):
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for attr in parts[n:]:
            assert hasattr(obj, attr), f"{_name(page)}: {dotted}: no {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{_name(page)}: {dotted} does not import")


@pytest.mark.parametrize(
    "page,path", _cases(lambda p: sorted({s for s in _inline_code(p) if REPO_PATH.match(s)}))
)
def test_named_files_exist(page, path):
    assert (ROOT / path).exists(), f"{_name(page)} names {path}, which does not exist"


def _links(page: Path) -> list[str]:
    prose, _ = _prose_and_code(page)
    prose = re.sub(r"`[^`]+`", "", prose)
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    return sorted({t for t in targets if "://" not in t})


@pytest.mark.parametrize("page,target", _cases(_links))
def test_links_resolve(page, target):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{_name(page)} links to {target}: no such file"
    if anchor:
        assert dest.suffix == ".md", f"{_name(page)} links to {target}: an anchor in a non-page"
        assert anchor in _headings(dest), f"{_name(page)} links to {target}: no such heading"


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _links(README)}
    missing = [_name(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README does not link {missing}"
