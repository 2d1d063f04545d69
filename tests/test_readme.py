"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        # Examples write to /tmp for brevity; keep the test's files in its own folder.
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), str(README), "exec"), {})
