"""patch_model(recompute_norms=True): the outputs of swapped RMSNorms are recomputed in the backward
instead of kept by the projections they feed (metalcore/patch/recompute.py).

The saving must change memory and nothing else: gradients bit-identical to the same patch with
``recompute_norms=False`` (same norm function on the same inputs), the norm outputs' storage freed
once the forward returns, one norm pass per norm in the backward, and the hooks out of the way of
activation checkpointing, a user's own saved-tensor hooks, evaluation, FSDP2 and ``unpatch_model``.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import metalcore
from metalcore._op import observing
from metalcore.patch import patch_model, patch_report, unpatch_model

_spec = importlib.util.spec_from_file_location("patch_families_cases", Path(__file__).with_name("test_families.py"))
_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_families)
tiny_model, VOCAB, SEQ = _families.tiny_model, _families.VOCAB, _families.SEQ


def _pair(model_type, dtype=torch.float32, **patch):
    """The same tiny model patched with and without the recompute (training mode)."""
    on = tiny_model(model_type, dtype).train()
    off = copy.deepcopy(on)
    patch_model(on, **patch)
    patch_model(off, recompute_norms=False, **patch)
    return on, off


def _batch():
    ids = torch.randint(3, VOCAB, (2, SEQ))
    return ids, ids.clone()


def _norm_outputs(model):
    """Weak references to the storage of every decoder-layer norm output of the next forward."""
    refs, handles = [], []
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and name.count(".") == 3 and type(module).__name__.endswith("RMSNorm"):
            handles.append(module.register_forward_hook(
                lambda m, args, out: refs.append(StorageWeakRef(out.untyped_storage()))))
    return refs, handles


def _train_step(model, ids, labels, **kwargs):
    """Loss and every gradient of one step, with the metalcore ops that ran in the backward, and
    whether each decoder-layer norm output was still alive once the forward had returned."""
    model.zero_grad(set_to_none=True)
    refs, handles = _norm_outputs(model)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    alive = [not r.expired() for r in refs]
    ops = []
    with observing(lambda op, backend: ops.append(op)):
        loss.backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, ops, alive


def _assert_identical(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma", "phi3", "olmo2"])
def test_gradients_equal_the_saving_off_path_exactly(model_type, dtype):
    """Llama; Qwen3 (per-head q/k norms inside the RoPE-swapped attention); Gemma ((1 + w), no
    promotion); Phi-3 (fused gate_up projection); OLMo-2 (norms after attention and MLP)."""
    on, off = _pair(model_type, dtype)
    ids, labels = _batch()
    loss_on, grads_on, ops_on, alive_on = _train_step(on, ids, labels)
    loss_off, grads_off, ops_off, alive_off = _train_step(off, ids, labels)
    assert torch.equal(loss_on, loss_off)
    _assert_identical(grads_on, grads_off)
    layers = on.config.num_hidden_layers
    if model_type != "olmo2":  # pre-norm layers: each norm output feeds projections, which saved it
        assert alive_off == [True] * 2 * layers
        assert alive_on == [False] * 2 * layers, "a norm output outlived the forward: it was kept, not recomputed"
        assert ops_on.count("rms_norm_fwd") == 2 * layers and "rms_norm_fwd" not in ops_off


def test_report_and_unpatch():
    on, off = _pair("llama")
    assert patch_report(on).counts()["norm_recompute"] == 3  # 2 layers + the backbone
    assert "norm_recompute" not in patch_report(off).counts()
    report = unpatch_model(on)
    assert not report.active
    assert not any("forward" in m.__dict__ or "_metalcore_spec" in m.__dict__ for m in on.modules())
    ids, labels = _batch()
    *_, ops, alive = _train_step(on, ids, labels)
    assert not ops and all(alive)


def test_retained_graph_recomputes_again():
    on, off = _pair("llama", cross_entropy=False)  # the fused loss scales its gradients in place: one backward
    ids, labels = _batch()
    grads = []
    for model in (on, off):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward(retain_graph=True)
        first = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        loss.backward()
        second = {n: p.grad.clone() for n, p in model.named_parameters()}
        _assert_identical(first, second)
        grads.append(first)
    _assert_identical(*grads)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(reentrant):
    """HF gradient checkpointing wraps each layer: non-reentrant checkpointing's hooks are around the
    layer (the recompute steps aside), the reentrant one's forward runs without grad (likewise) and its
    recomputed forward with grad (the recompute works inside it)."""
    on, off = _pair("llama")
    for model in (on, off):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, labels = _batch()
    loss_on, grads_on, *_ = _train_step(on, ids, labels)
    loss_off, grads_off, *_ = _train_step(off, ids, labels)
    assert torch.equal(loss_on, loss_off)
    _assert_identical(grads_on, grads_off)


def test_user_saved_tensor_hooks_see_every_tensor():
    """A user's hooks around the model (e.g. offloading) receive what they would without the recompute."""
    on, off = _pair("llama")
    ids, labels = _batch()
    packed, grads = [], []
    for model in (on, off):
        seen = []

        def pack(t):
            seen.append((tuple(t.shape), t.dtype))
            return t.clone()  # the user's own storage: the layers' saves must come through here

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        packed.append(seen)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert packed[0] == packed[1]
    _assert_identical(*grads)


def test_evaluation_and_no_grad_are_untouched():
    on, off = _pair("llama")
    ids = torch.randint(3, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert torch.equal(on(input_ids=ids).logits, off(input_ids=ids).logits)
    on.eval()
    assert torch.equal(on(input_ids=ids).logits, off.eval()(input_ids=ids).logits)


def test_in_place_change_of_a_norm_input_is_refused():
    """As for any saved tensor: changing the norm's input in place between forward and backward raises."""
    on, _ = _pair("llama", cross_entropy=False)
    captured = []
    on.model.layers[1].input_layernorm.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    ids, labels = _batch()
    loss = on(input_ids=ids, labels=labels).loss
    with torch.no_grad():
        captured[0].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_automatic_choice_on_the_cpu_keeps_the_modules_own_code():
    on, off = _pair("llama")
    ids, labels = _batch()
    with metalcore.use_backend("auto"):
        loss_on, grads_on, ops, alive = _train_step(on, ids, labels)
        loss_off, grads_off, *_ = _train_step(off, ids, labels)
    assert not ops and all(alive)
    assert torch.equal(loss_on, loss_off)
    _assert_identical(grads_on, grads_off)


def _fsdp2_rank(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    grads = []
    with metalcore.use_backend("reference"):
        for recompute in (True, False):
            model = tiny_model("llama").train()
            patch_model(model, recompute_norms=recompute)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            torch.manual_seed(rank)
            ids = torch.randint(3, VOCAB, (2, SEQ))
            loss = model(input_ids=ids, labels=ids).loss
            ops = []
            with observing(lambda op, backend: ops.append(op)):
                loss.backward()
            assert ops.count("rms_norm_fwd") == (2 * len(model.model.layers) if recompute else 0)
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
    _assert_identical(*grads)


def test_fsdp2_sharded_layers():
    """fully_shard after patch_model (recipes/distributed.py): the norm weights the recompute reads are
    the unsharded parameters FSDP2 gathers again before each layer's backward."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))  # ranks.py, the gloo launcher
    from ranks import run_ranks

    run_ranks(_fsdp2_rank, 2)
