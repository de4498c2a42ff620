"""recipes/finetune_trainer.py: transformers.Trainer with a patched model and metalcore's optimizers,
at tiny settings on the CPU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = ["--batch-size", "2", "--seq-len", "32", "--layers", "1", "--hidden-size", "32", "--vocab-size", "300",
        "--corpus-bytes", "40000", "--warmup", "0", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2", "--threads", "1",
        "--quiet"]


@pytest.fixture(scope="module")
def recipe():
    threads = torch.get_num_threads()
    sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location("recipe_finetune_trainer", RECIPES / "finetune_trainer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def patched(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("patched")
    return out, recipe.main([*TINY, "--steps", "4", "--out", str(out)])


def _losses(out: Path) -> list[float]:
    import json

    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_patched_trainer_run_matches_the_unpatched_one(recipe, patched, tmp_path):
    out, summary = patched
    assert summary["finished"] and summary["patched"] and summary["optimizer"] == "MetalAdamW"
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert set(summary["sample"]) == {"prompt", "before", "after"}
    plain = recipe.main([*TINY, "--steps", "4", "--no-patch", "--out", str(tmp_path)])
    assert not plain["patched"] and plain["optimizer"] == "AdamW"
    # Same data, initial weights and hyperparameters; on the CPU metalcore computes what torch computes.
    assert _losses(out) == pytest.approx(_losses(tmp_path), rel=1e-5)
    assert summary["final_eval_loss"] == pytest.approx(plain["final_eval_loss"], rel=1e-5)
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()


def test_gradient_accumulation_normalises_by_items_in_batch(recipe, tmp_path):
    """Two micro-batches of 2 accumulate to exactly the update of one batch of 4: the loss of each is
    divided by the response tokens of both (num_items_in_batch), not averaged per micro-batch."""
    # --seq-len 128: responses of different lengths, so micro-batches hold different token counts (at 32
    # every example is cut to about the same count and a per-micro-batch mean would pass too; measured:
    # ignoring num_items_in_batch moves a weight by 6e-3 here).
    one = recipe.main([*TINY, "--steps", "2", "--seq-len", "128", "--batch-size", "4", "--out", str(tmp_path / "one")])
    two = recipe.main([*TINY, "--steps", "2", "--seq-len", "128", "--batch-size", "2", "--grad-accum", "2",
                       "--out", str(tmp_path / "two")])
    assert one["finished"] and two["finished"]
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for name, w in a.items():
        # atol 1e-4: Adam turns rounding-level differences of near-zero gradient entries into updates of
        # up to ~1e-5 (9e-6 measured); a per-micro-batch mean moves weights by 6e-3.
        assert torch.allclose(w, b[name], rtol=0, atol=1e-4), name
    # Had each micro-batch been averaged on its own, the tokens of the shorter one would weigh more.
    assert one["final_eval_loss"] < one["initial_eval_loss"]


def test_muon_through_optimizers_from_args(recipe, tmp_path):
    summary = recipe.main([*TINY, "--steps", "2", "--optimizer", "muon", "--out", str(tmp_path)])
    assert summary["optimizer"] == "MuonWithAuxAdamW" and summary["finished"]
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


def test_trainer_checkpoint_resume(recipe, patched, tmp_path):
    """Stopped after step 2 (checkpoint-2 saved, MetalAdamW state included), a rerun resumes there and
    ends where the uninterrupted run ended."""
    out, straight = patched
    first = recipe.main([*TINY, "--steps", "4", "--stop-after", "2", "--out", str(tmp_path)])
    assert not first["finished"] and first["steps"] == 2 and (tmp_path / "checkpoint-2" / "optimizer.pt").exists()
    second = recipe.main([*TINY, "--steps", "4", "--out", str(tmp_path)])
    assert second["finished"] and second["steps"] == 4
    assert second["initial_eval_loss"] == straight["initial_eval_loss"]  # kept from the first run
    assert second["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-5)
    assert _losses(tmp_path) == pytest.approx(_losses(out), rel=1e-5)


def test_optimizers_from_args_rejects_unknown_name():
    import metalcore.hf

    class Args:
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon = 1e-3, 0.0, 0.9, 0.95, 1e-8

    with pytest.raises(ValueError, match="optimizer must be one of"):
        metalcore.hf.optimizers_from_args(torch.nn.Linear(2, 2), Args(), "sgd")
    opt, scheduler = metalcore.hf.optimizers_from_args(torch.nn.Linear(2, 2), Args())
    assert scheduler is None and [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
