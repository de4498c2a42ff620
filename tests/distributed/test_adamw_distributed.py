"""MetalAdamW on FSDP2 (DTensor) parameters equals the single-process optimizer; its state (and
MuonWithAuxAdamW's) round-trips through torch.distributed.checkpoint, onto another world size.

Same setting as test_muon_distributed.py: a seeded model sharded with ``fully_shard``, gradients an
elementwise function of the parameters computed on each shard, an unsharded reference in the same
process. AdamW is elementwise, so each rank steps its shard alone; the comparison is within
``TOL[float32]``, not bit for bit, for the reason given in test_muon_distributed.py (torch's fused
CPU AdamW rounds a vector block and its scalar remainder differently).
"""

import copy

import torch

from ranks import init_device_mesh, run_ranks
from test_muon_distributed import STEPS, assert_same, _model, _set_grads, _shard


def _adamw(model):
    from metalcore.optim import MetalAdamW

    return MetalAdamW(model.parameters(), lr=0.01, weight_decay=0.1, betas=(0.9, 0.95))


def _muon_adamw(model):
    from metalcore.optim import MuonWithAuxAdamW, muon_param_groups

    return MuonWithAuxAdamW(muon_param_groups(model, lr=0.05, adamw_lr=0.01, weight_decay=0.1))


def _adamw_trajectory(rank: int, world_size: int) -> None:
    from torch.distributed.tensor import DTensor

    reference = _model()
    sharded = _shard(copy.deepcopy(reference), init_device_mesh(world_size))
    opt, ref_opt = _adamw(sharded), _adamw(reference)
    for t in range(STEPS):
        _set_grads(sharded, t)
        _set_grads(reference, t)
        opt.step()
        ref_opt.step()
        assert_same(sharded, reference, f"MetalAdamW, {world_size} ranks, step {t + 1}", exact_matrices=False)
    for p in sharded.parameters():  # state as DTensors placed like their parameter: what DCP shards
        state = opt.state[p]
        assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].placements == p.placements
        assert not isinstance(state["step"], DTensor)


def test_metal_adamw_fsdp2_trajectory_equals_single_process():
    run_ranks(_adamw_trajectory, 2)


SAVED_AT, TOTAL = 3, 6


def _models_and_optimizers(world_size: int, seed: int):
    torch.manual_seed(seed)
    models = [_shard(_model() if seed == 0 else _perturbed(), init_device_mesh(world_size)) for _ in range(2)]
    return models, [_adamw(models[0]), _muon_adamw(models[1])]


def _perturbed():
    """A model whose weights differ from the saved ones: only a working load brings them back."""
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return model


def _states(models, optimizers):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {f"run{i}": {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}
            for i, (m, o) in enumerate(zip(models, optimizers))}


def _save(rank: int, world_size: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp

    models, optimizers = _models_and_optimizers(world_size, seed=0)
    for t in range(SAVED_AT):
        for m, o in zip(models, optimizers):
            _set_grads(m, t)
            o.step()
    dcp.save(_states(models, optimizers), checkpoint_id=folder)


def _load_and_continue(rank: int, world_size: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    models, optimizers = _models_and_optimizers(world_size, seed=1)
    state = _states(models, optimizers)
    dcp.load(state, checkpoint_id=folder)
    for i, (m, o) in enumerate(zip(models, optimizers)):
        set_model_state_dict(m, state[f"run{i}"]["model"])
        set_optimizer_state_dict(m, o, state[f"run{i}"]["optim"])
    references = [_model(), _model()]
    ref_optimizers = [_adamw(references[0]), _muon_adamw(references[1])]
    for t in range(TOTAL):
        for m, o in zip(references, ref_optimizers):
            _set_grads(m, t)
            o.step()
        if t >= SAVED_AT:
            for m, o in zip(models, optimizers):
                _set_grads(m, t)
                o.step()
    for m, ref, name in zip(models, references, ("MetalAdamW", "MuonWithAuxAdamW")):
        # Muon's matrices are exact after the round trip; AdamW's within TOL[float32] (module docstring).
        assert_same(m, ref, f"{name} saved on 4 ranks at step {SAVED_AT}, resumed on {world_size} to step {TOTAL}",
                    exact_matrices=name != "MetalAdamW")


def test_dcp_save_on_4_ranks_resume_on_2(tmp_path):
    run_ranks(_save, 4, str(tmp_path / "checkpoint"))
    run_ranks(_load_and_continue, 2, str(tmp_path / "checkpoint"))
