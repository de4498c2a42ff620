"""Scripts under ``torchrun --nproc-per-node 2`` on the CPU (gloo). The recipes with ``--fsdp``: they train, report
per-rank throughput and memory, and finetune.py resumes from its DCP checkpoint to exactly the
losses of an uninterrupted run (gloo's two-rank reductions are deterministic). The multi-GPU
benchmark script in its --tiny mode."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--layers", "2", "--hidden-size", "32",
        "--vocab-size", "300", "--corpus-bytes", "40000", "--threads", "1", "--quiet"]


def torchrun(script: Path, *args: str, timeout: float = 150.0) -> None:
    """``torchrun --standalone --nproc-per-node 2`` (a free port) of ``script``; fails the test on a
    non-zero exit or after ``timeout`` seconds (torchrun's process group is killed whole, workers
    included)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        pytest.fail(f"{script.name} under torchrun did not finish within {timeout:.0f} s:\n{output[-3000:]}")
    assert process.returncode == 0, f"{script.name} under torchrun exited with {process.returncode}:\n{output[-3000:]}"


def recipe(name: str, *args: str) -> None:
    torchrun(ROOT / "recipes" / name, "--fsdp", *TINY, *args)


def _losses(out: Path) -> list:
    import torch

    payload = (out / "checkpoint.pt").read_bytes()  # the recipes' format: a checksum line, then torch.save's bytes
    ckpt = torch.load(io.BytesIO(payload[payload.index(b"\n") + 1:]), weights_only=True)
    return [loss for _, loss in ckpt["result"]["train"]]


def test_finetune_fsdp_trains_and_resumes_exactly(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    common = ["--steps", "5", "--eval-every", "100", "--eval-batches", "1"]
    recipe("finetune.py", *common, "--out", str(whole))
    recipe("finetune.py", *common, "--stop-after", "3", "--out", str(halves))
    assert sorted(p.name for p in halves.glob("dcp-step*")) == ["dcp-step0000003"]
    recipe("finetune.py", *common, "--out", str(halves))
    assert _losses(halves) == _losses(whole) and len(_losses(whole)) == 5
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["ranks"]) == 2
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_bytes"] >= 0 for r in summary["ranks"])
    assert (whole / "final" / "model.safetensors").exists()


def test_pretrain_gpt_fsdp_with_muon(tmp_path):
    recipe("pretrain_gpt.py", "--optimizers", "muon", "--steps", "3", "--warmup", "0", "--eval-every", "3",
             "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["ranks"]) == 2
    assert summary["muon"]["final_eval_loss"] < summary["muon"]["initial_eval_loss"]


def test_distributed_check_tiny_matches_the_byte_model(tmp_path):
    """bench/scripts/distributed_check.py (the multi-GPU measurement) runs on 2 gloo processes: the
    sharded trajectory equals one process and the all-to-all bytes equal docs/distributed.md's model."""
    out = tmp_path / "check.json"
    torchrun(ROOT / "bench" / "scripts" / "distributed_check.py", "--device", "cpu", "--tiny", "--out", str(out))
    tiny = json.loads(out.read_text())["sets"]["tiny"]
    assert tiny["trajectory"]["max_abs_diff"] == 0.0
    assert tiny["bytes_per_step"]["measured_all_ranks"] == tiny["bytes_per_step"]["modelled"] > 0
    assert set(tiny["step_time"]) == {"metalcore_sharded", "naive_gather", "torch_unsharded", "metalcore_unsharded"}
