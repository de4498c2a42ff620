"""Every registered op passes torch.library.opcheck (schema, fake tensor, autograd registration,
AOT dispatch) on its samples; an op registered without samples fails here."""

import importlib.util
from pathlib import Path

import pytest
import torch

import metalcore  # noqa: F401  (registers every op)
from metalcore._op import registered_ops

HERE = Path(__file__).parent


def _samples() -> dict:
    merged = {}
    for path in sorted(HERE.glob("*/opcheck_samples.py")):
        spec = importlib.util.spec_from_file_location(f"opcheck_samples_{path.parent.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, makers in module.SAMPLES.items():
            merged.setdefault(name, []).extend(makers)
    return merged


SAMPLES = _samples()
CASES = [(name, i) for name in sorted(registered_ops()) for i in range(max(1, len(SAMPLES.get(name, []))))]


@pytest.mark.parametrize("name,index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_opcheck(name, index):
    assert name in SAMPLES, f"op metalcore::{name} has no entry in any tests/*/opcheck_samples.py"
    args = SAMPLES[name][index]()
    torch.library.opcheck(registered_ops()[name].custom_op, args)


def test_samples_name_only_registered_ops():
    assert set(SAMPLES) <= set(registered_ops()), set(SAMPLES) - set(registered_ops())
