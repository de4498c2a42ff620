"""The recipes' files survive kills and damage: atomic writes, checksummed checkpoints, no orphans.

The kill tests run recipes/finetune.py as a subprocess that pauses inside a save (the test hook
``METALCORE_RECIPES_SAVE_PAUSE=NAME:SECONDS``: after the bytes are written, before the rename), SIGKILL
it there, and rerun.
"""

import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = ["--batch-size", "2", "--seq-len", "32", "--layers", "1", "--hidden-size", "32", "--vocab-size", "300",
        "--corpus-bytes", "40000", "--eval-every", "100", "--eval-batches", "1", "--threads", "1", "--quiet"]


def _load(name):
    sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common():
    return _load("common")


@pytest.fixture(scope="module")
def finetune():
    threads = torch.get_num_threads()
    yield _load("finetune")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished(finetune, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    finetune.main([*TINY, "--steps", "2", "--out", str(out)])
    return out


def _resume_error(finetune, out):
    with pytest.raises(SystemExit) as e:
        finetune.main([*TINY, "--steps", "2", "--out", str(out)])
    return str(e.value)


@pytest.mark.parametrize("damage,message", [
    ("empty", "empty file, not a checkpoint"),
    ("text", "a text file, not a checkpoint"),
    ("torch_save", "a PyTorch file, but not a checkpoint of this recipe"),
    ("flipped_byte", "checksum mismatch"),
    ("nan_weight", "holds NaN or infinity; refusing to resume"),
])
def test_damaged_checkpoint_is_refused_in_one_line(finetune, common, finished, tmp_path, damage, message):
    import shutil

    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    ckpt = tmp_path / "checkpoint.pt"
    good = ckpt.read_bytes()
    if damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "text":
        ckpt.write_text("step: 2\nloss: 5.7\n")
    elif damage == "torch_save":
        torch.save({"model": {}}, ckpt)
    elif damage == "flipped_byte":
        ckpt.write_bytes(good[:-100] + bytes([good[-100] ^ 0x40]) + good[-99:])
    else:  # a well-formed checkpoint (right checksum) whose weights went non-finite
        state = common.load_checkpoint(ckpt, "cpu")
        name = next(iter(state["model"]))
        state["model"][name][0] = float("nan")
        common.save_checkpoint(state, ckpt)
    error = _resume_error(finetune, tmp_path)
    assert message in error and str(ckpt) in error and "\n" not in error


def test_checkpoint_loads_without_unpickling_code(common, finished):
    """The payload is plain tensors and containers: torch.load(weights_only=True) reads it."""
    data = (finished / "checkpoint.pt").read_bytes()
    payload = data[data.index(b"\n") + 1:]
    state = torch.load(io.BytesIO(payload), weights_only=True)
    assert state["result"]["steps"] == 2 and state["args"]["vocab_size"] == 300


def test_save_refuses_to_overwrite_with_nonfinite_weights(finetune, tmp_path):
    """A diverged run stops with a clear line instead of saving NaN over the last good checkpoint."""
    with pytest.raises(SystemExit, match="NaN or infinite .training diverged"):
        finetune.main([*TINY, "--steps", "3", "--lr", "1e30", "--out", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pt").exists()


def _run_until_paused(out, artifact, extra, pattern):
    """Start the recipe with a pause inside the save of ``artifact``; return the process once a
    temporary matching ``pattern`` exists (the bytes are written, the rename has not happened)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "METALCORE_RECIPES_SAVE_PAUSE": f"{artifact}:120"}
    proc = subprocess.Popen([sys.executable, str(RECIPES / "finetune.py"), *TINY, *extra, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.rglob(pattern)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.2)
    return proc


def test_kill_during_checkpoint_save_then_rerun(finetune, tmp_path):
    proc = _run_until_paused(tmp_path, "checkpoint.pt", ["--steps", "4", "--save-every", "2"], ".checkpoint.pt.tmp*")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    orphans = list(tmp_path.glob(".checkpoint.pt.tmp*"))
    assert orphans and orphans[0].stat().st_size > 1000 and not (tmp_path / "checkpoint.pt").exists()
    summary = finetune.main([*TINY, "--steps", "4", "--save-every", "2", "--out", str(tmp_path)])
    assert summary["finished"] and summary["steps"] == 4
    assert not [p for p in tmp_path.rglob(".*") if ".tmp" in p.name or ".old" in p.name]  # orphan removed


def test_kill_during_tokenizer_save_then_other_vocab_size(finetune, tmp_path):
    """A kill while the tokenizer is written leaves no half tokenizer; a rerun with another --vocab-size
    (no checkpoint was saved yet) trains its own tokenizer instead of reusing the old one."""
    from transformers import AutoTokenizer

    proc = _run_until_paused(tmp_path, "tokenizer-v300-c40000", ["--steps", "2"], ".tokenizer-v300-c40000.tmp*")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "data" / "tokenizer-v300-c40000").exists()
    args = [a if a != "300" else "320" for a in TINY]
    summary = finetune.main([*args, "--steps", "2", "--out", str(tmp_path)])
    assert summary["finished"]
    assert len(AutoTokenizer.from_pretrained(tmp_path / "final")) == 320
    assert not [p for p in tmp_path.rglob(".*") if ".tmp" in p.name]
    # The original size, rerun in a fresh folder from the same data, works too.
    assert finetune.main([*TINY, "--steps", "2", "--out", str(tmp_path / "again")])["finished"]


def test_ctrl_c_says_how_to_resume_and_quiet_prints_nothing_else(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(RECIPES / "finetune.py"), *TINY, "--steps", "100000", "--save-every", "2",
                             "--out", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert out == b""  # --quiet
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "interrupted at step" in lines[0], lines
    assert "rerun the same command to resume from step" in lines[0] and str(tmp_path / "checkpoint.pt") in lines[0]
