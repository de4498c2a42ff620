"""recipes/finetune.py at tiny settings: 5 steps, resumption from a checkpoint, --compare, --model."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

TINY = ["--steps", "5", "--batch-size", "2", "--seq-len", "32", "--layers", "1", "--hidden-size", "32",
        "--vocab-size", "300", "--corpus-bytes", "40000", "--eval-every", "5", "--eval-batches", "1",
        "--save-every", "100", "--threads", "1", "--quiet"]


def _load(name):
    sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune():
    threads = torch.get_num_threads()
    yield _load("finetune")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(finetune, tmp_path_factory):
    """One uninterrupted 5-step run, shared by the tests below."""
    out = tmp_path_factory.mktemp("straight")
    return out, finetune.main([*TINY, "--out", str(out)])


def test_five_steps_write_everything(straight):
    out, summary = straight
    assert summary["finished"] and summary["steps"] == 5
    run = summary["metalcore"]
    assert run["tokens_per_second"] > 0 and run["final_eval_loss"] is not None
    assert 0 < run["final_train_loss"] < 10
    # Evaluated before the first step too, and a greedy answer recorded before and after training.
    assert run["initial_eval_loss"] is not None and run["initial_eval_loss"] != run["final_eval_loss"]
    assert set(run["sample"]) == {"prompt", "before", "after"} and run["sample"]["prompt"]
    assert (out / "checkpoint.pt").exists() and (out / "loss_curve.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # atomic writes left no temporaries


def test_resume_continues_where_it_stopped(finetune, straight, tmp_path):
    _, reference = straight
    first = finetune.main([*TINY, "--out", str(tmp_path), "--stop-after", "3"])
    assert not first["finished"] and first["steps"] == 3
    common = _load("common")
    ckpt = common.load_checkpoint(tmp_path / "checkpoint.pt", "cpu")
    assert ckpt["result"]["steps"] == 3 and ckpt["sampler"]["index"] == 6
    second = finetune.main([*TINY, "--out", str(tmp_path)])
    assert second["finished"] and second["metalcore"]["resumed_from"] == 3
    # Speed is that of the steps trained by this process, never inherited from the killed one.
    assert second["metalcore"]["measured_steps"] == [4, 5] and second["metalcore"]["tokens_per_second"] > 0
    # Model, optimizer, RNG and data position all came back: the losses are the uninterrupted run's.
    for key in ("final_train_loss", "final_eval_loss"):
        assert second["metalcore"][key] == reference["metalcore"][key]
    straight_ckpt = common.load_checkpoint(straight[0] / "checkpoint.pt", "cpu")
    resumed_ckpt = common.load_checkpoint(tmp_path / "checkpoint.pt", "cpu")
    assert resumed_ckpt["result"]["train"] == straight_ckpt["result"]["train"]
    for name, p in straight_ckpt["model"].items():
        assert torch.equal(resumed_ckpt["model"][name], p), name


def test_checkpoint_of_another_run_is_refused(finetune, straight):
    out, _ = straight
    with pytest.raises(SystemExit, match="different run"):
        finetune.main([*TINY, "--out", str(out), "--lr", "1e-4"])


def test_compare_and_model_path(finetune, straight, tmp_path):
    """--model loads the first run's saved checkpoint; --compare adds the plain-PyTorch run."""
    out, _ = straight
    args = [*TINY, "--steps", "2", "--eval-every", "2", "--model", str(out / "final"), "--out", str(tmp_path),
            "--compare"]
    summary = finetune.main(args)
    assert set(summary) >= {"metalcore", "pytorch"}
    m, p = summary["metalcore"], summary["pytorch"]
    assert m["tokens_per_second"] > 0 and p["tokens_per_second"] > 0
    # Same seed, same data, same starting weights: both runs see the same losses up to rounding.
    assert m["final_eval_loss"] == pytest.approx(p["final_eval_loss"], rel=1e-3)
    assert (tmp_path / "compare" / "pytorch" / "checkpoint.pt").exists()


def test_compare_after_a_finished_run_measures_both_sides_now(finetune, straight, tmp_path):
    """A finished checkpoint in OUT is not resumed by --compare: both sides train all their steps in this
    process, so their speed and memory are measured under the same conditions."""
    import shutil

    shutil.copytree(straight[0], tmp_path, dirs_exist_ok=True)
    summary = finetune.main([*TINY, "--out", str(tmp_path), "--compare"])
    for side in ("metalcore", "pytorch"):
        assert summary[side]["resumed_from"] == 0 and summary[side]["measured_steps"] == [1, 5], side
        assert summary[side]["tokens_per_second"] > 0
    # The patched side retraced the finished run exactly; the main checkpoint was left alone.
    assert summary["metalcore"]["final_eval_loss"] == straight[1]["metalcore"]["final_eval_loss"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == (straight[0] / "checkpoint.pt").read_bytes()


def test_data_and_split_are_deterministic():
    common = _load("common")
    a, b = common.stdlib_docstrings(20_000), common.stdlib_docstrings(20_000)
    assert a == b and len(a) > 10
    examples = common.sft_examples(a)
    assert all(e["prompt"] and len(e["response"]) >= 40 for e in examples)
    assert [common.is_heldout(e) for e in examples] == [common.is_heldout(e) for e in common.sft_examples(b)]


def test_pretrain_gpt_two_optimizers(tmp_path):
    pretrain = _load("pretrain_gpt")
    summary = pretrain.main(["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--layers", "1",
                             "--hidden-size", "64", "--vocab-size", "300", "--corpus-bytes", "40000",
                             "--eval-every", "3", "--threads", "1", "--quiet", "--out", str(tmp_path)])
    for name in ("adamw", "muon"):
        assert summary[name]["tokens_per_second"] > 0 and 0 < summary[name]["final_eval_loss"] < 10
    assert summary["muon"]["optimizers"] == ["MuonWithAuxAdamW"]  # metalcore's Muon, not torch's
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
