"""The README's Python examples run as written: every ```python block, in order, top to bottom, in
one namespace (a later block uses the names an earlier one defined, as a reader's session would)."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4  # linear algebra and training ops, HF patching, the Trainer, use_backend


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files (the Trainer's output_dir) writes here
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)
