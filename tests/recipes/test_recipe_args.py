"""Every recipe answers a bad argument with one line naming it, before any heavy import or slow work.

Each case runs the recipe as a user would (a subprocess) with a ``transformers`` and a ``metalcore``
that end the process if imported (a folder first on ``PYTHONPATH``): the error must come before
either is loaded, and within a few seconds.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TRAPPED = ("transformers", "metalcore", "tokenizers")


@pytest.fixture(scope="module")
def trap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trap")
    for name in TRAPPED:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise SystemExit('heavy import before the argument check: {name}')\n")
    return folder


@pytest.fixture(scope="module")
def not_a_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / "empty").mkdir()
    (folder / "weights_only").mkdir()
    (folder / "weights_only" / "config.json").write_text("{}")
    (folder / "weights_only" / "model.safetensors").write_bytes(b"")
    (folder / "notes.txt").write_text("not a model\n")
    return folder


def _cases():
    ft, pt, tr = "finetune.py", "pretrain_gpt.py", "finetune_trainer.py"
    cuda_missing = not torch.cuda.is_available()
    mps_missing = not (sys.platform == "darwin" and torch.backends.mps.is_available())
    for recipe in (ft, pt, tr):
        yield recipe, ["--batch-size", "0"], "--batch-size must be at least 1; got 0", True
        yield recipe, ["--steps", "0"], "--steps must be at least 1; got 0", True
        yield recipe, ["--lr", "nan"], "--lr must be a positive finite number", True
        yield recipe, ["--device", "tpu"], "--device must be one of auto, cpu, cuda, cuda:N, mps", True
        yield recipe, ["--device", "mps"], "--device mps: no Apple GPU", mps_missing
        yield recipe, ["--device", "cuda"], "--device cuda: not available", cuda_missing
        yield recipe, ["--hidden-size", "130"], "--hidden-size 130 gives", True
    for recipe in (ft, tr):
        yield recipe, ["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder", True
        yield recipe, ["--model", "{models}/empty"], "not a Hugging Face checkpoint folder: no config.json", True
        yield recipe, ["--model", "{models}/weights_only"], "no tokenizer files", True
        yield recipe, ["--model", "{models}/notes.txt"], "a file, not a checkpoint folder", True
        yield recipe, ["--model", "nobody-here/no-such-model"], "not in the Hugging Face cache", True
        yield recipe, ["--seq-len", "4096"], "--seq-len must be at most 1024", True
        yield recipe, ["--vocab-size", "100"], "--vocab-size must be at least 262", True
    yield ft, ["--compare", "--no-patch"], "--compare already trains the unpatched side", True
    yield pt, ["--optimizers", "adamw,sgd"], "--optimizers: unknown or empty ['sgd']; choose from adamw, muon", True
    yield tr, ["--grad-accum", "0"], "--grad-accum must be at least 1; got 0", True
    yield tr, ["--optimizer", "sgd"], "invalid choice: 'sgd'", True


CASES = list(_cases())


@pytest.mark.parametrize("recipe,argv,message,applies", CASES,
                         ids=[f"{r.split('.')[0]}:{' '.join(a)}" for r, a, _, _ in CASES])
def test_bad_argument_is_one_line_before_heavy_work(recipe, argv, message, applies, trap, not_a_checkpoint, tmp_path):
    if not applies:
        pytest.skip("the device exists on this machine")
    argv = [a.replace("{models}", str(not_a_checkpoint)) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(trap), "HF_HUB_CACHE": str(tmp_path / "hub"),
           # An endpoint that refuses at once stands for an offline machine (no 3 s wait here).
           "HF_ENDPOINT": "https://127.0.0.1"}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(RECIPES / recipe), *argv, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert message in err, err[-2000:]
    assert "heavy import" not in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    # Python and (for a CUDA request only) torch start in ~1.5 s idle; 10 s leaves room for a loaded machine.
    assert elapsed < 10, elapsed
    assert not (tmp_path / "out").exists()  # nothing written before the arguments were accepted


def test_offline_name_in_cache_is_loaded_offline(tmp_path, monkeypatch):
    """A cached hub name passes the check and turns the hub off, so loading it never waits on the network."""
    sys.path.insert(0, str(RECIPES))
    import common

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    common.check_model("org/tiny")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
