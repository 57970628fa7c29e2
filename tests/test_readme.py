"""The README's API example runs as written (in a temporary directory)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
@pytest.mark.ci  # ~20 s: MiniLM at 128 tokens, compile, replay, report, ONNX
def test_readme_api_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert (tmp_path / "plan.json").exists() and (tmp_path / "minilm.onnx").exists()
    assert namespace["again"].plan.sites == namespace["cm"].plan.sites
