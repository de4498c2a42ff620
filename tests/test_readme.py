"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    namespace = {}
    # Names the later snippets take from context: a positive-definite A and a model to patch.
    setup = ("import torch\nimport metalcore\nA = torch.randn(4, 6, 6, dtype=torch.float64)\n"
             "A = A @ A.mT + 6 * torch.eye(6, dtype=torch.float64)\nmodel = torch.nn.Linear(4, 4)\n")
    exec(compile(setup + BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
