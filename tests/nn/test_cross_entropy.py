"""fused_linear_cross_entropy: loss and every gradient (hidden, weight, bias) against float64
``F.cross_entropy`` on materialized logits, on each backend of the fused chunk kernel (reference,
Triton interpreter, Metal executor).

The vocabulary (1003) is no multiple of any block, and the memory budget is forced down to a few
tokens per chunk so that chunk boundaries fall inside sequences. Float32 and bfloat16 results follow
the suite's relative rule: their error against float64 may be at most twice torch's own in that
dtype (torch: ``F.cross_entropy(logits.float())`` over the materialized logits, as Hugging Face's
causal-LM loss computes it).
"""

import pytest
import torch
import torch.nn.functional as F

from metalcore.nn import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from metalcore.nn.cross_entropy import DEFAULT_MEMORY_BUDGET, chunk_rows, cross_entropy_chunk_
from oracle import assert_within_torch_error

VOCAB, HIDDEN, BATCH, SEQ = 1003, 16, 2, 19
IGNORE = -100
CHUNK = 8  # tokens per chunk in most tests: 38 tokens -> 5 chunks, boundaries inside both sequences
OPTIONS = {
    "plain": {},
    "smooth": dict(label_smoothing=0.1),
    "softcap": dict(softcap=4.0),
    "zloss": dict(z_loss=1e-3),
    "all": dict(label_smoothing=0.2, softcap=3.0, z_loss=1e-2),
}


def budget_for(rows: int, dtype: torch.dtype) -> int:
    return rows * VOCAB * torch.empty((), dtype=dtype).element_size()


def make_inputs(dtype, bias=True, ignored=0.25):
    hidden = torch.randn(BATCH, SEQ, HIDDEN).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(VOCAB).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, VOCAB, (BATCH, SEQ))
    target[torch.rand(BATCH, SEQ) < ignored] = IGNORE
    return hidden, weight, target, b


def torch_loss(hidden, weight, target, bias, *, label_smoothing=0.0, reduction="mean", softcap=None, z_loss=0.0,
               num_items_in_batch=None):
    """The same loss from materialized logits (float32 math on logits of the inputs' dtype, as HF does)."""
    logits = F.linear(hidden, weight, bias)
    z = logits.float() if logits.dtype != torch.float64 else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z, t = z.reshape(-1, VOCAB), target.reshape(-1)
    valid = t != IGNORE
    rows = F.cross_entropy(z, t, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none")
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(z, -1).square(), 0.0)
    if reduction == "none":
        return rows.view(target.shape)
    if reduction == "sum":
        return rows.sum()
    count = valid.sum() if num_items_in_batch is None else num_items_in_batch
    return rows.sum() / count


def loss_and_grads(fn, hidden, weight, target, bias, grad_out=None, **kwargs):
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    loss = fn(hidden, weight, target, bias, **kwargs)
    grads = torch.autograd.grad(loss, leaves, grad_out if grad_out is not None else torch.ones_like(loss))
    return (loss, *grads)


def as64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def assert_kernel_runs(backend, dtype):
    logits, target = torch.randn(2, VOCAB, dtype=dtype), torch.zeros(2, dtype=torch.long)
    assert cross_entropy_chunk_.backend_for(logits, target, torch.ones(()), IGNORE, 0.0, 0.0, None, True) == backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_loss_and_gradients(backend, option, reduction, dtype):
    kwargs = dict(OPTIONS[option], reduction=reduction)
    assert_kernel_runs(backend, dtype)
    hidden, weight, target, bias = make_inputs(dtype)
    grad_out = torch.rand(BATCH, SEQ) if reduction == "none" else None
    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias, grad_out,
                          memory_budget=budget_for(CHUNK, dtype), **kwargs)
    theirs = loss_and_grads(torch_loss, hidden, weight, target, bias, grad_out, **kwargs)
    expected = loss_and_grads(torch_loss, *as64(hidden, weight), target, *as64(bias),
                              None if grad_out is None else grad_out.double(), **kwargs)
    assert ours[0].dtype == torch.float32 and ours[0].shape == expected[0].shape
    for name, a, t, e in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, theirs, expected):
        assert torch.isfinite(a).all(), name
        if name != "loss":
            assert a.dtype == dtype, name
        assert_within_torch_error(a, t, e)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradients(backend, reduction):
    hidden, weight, target, bias = make_inputs(torch.float32, ignored=1.0)
    assert (target == IGNORE).all()
    loss, *grads = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias, reduction=reduction,
                                  memory_budget=budget_for(CHUNK, torch.float32))
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    # Hugging Face's count may be 0 on a micro-batch whose tokens are all masked: still no NaN.
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, num_items_in_batch=torch.tensor(0))
    assert loss.item() == 0.0


@pytest.mark.parametrize("items", [7, 7.0, "tensor"], ids=["int", "float", "tensor"])
def test_num_items_in_batch_is_sum_over_count(items):
    hidden, weight, target, bias = make_inputs(torch.float64)
    count = torch.tensor(7) if items == "tensor" else items
    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias, num_items_in_batch=count,
                          label_smoothing=0.1)
    expected = loss_and_grads(torch_loss, hidden, weight, target, bias, reduction="sum", label_smoothing=0.1)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e / 7)


def test_without_bias_and_frozen_weight(backend):
    hidden, weight, target, _ = make_inputs(torch.float32, bias=False)
    weight.requires_grad_(False)
    loss = fused_linear_cross_entropy(hidden, weight, target, memory_budget=budget_for(CHUNK, torch.float32))
    (d_hidden,) = torch.autograd.grad(loss, hidden)
    h64, w64 = as64(hidden, weight)
    expected = torch.autograd.grad(torch_loss(h64, w64, target, None), h64)[0]
    theirs = torch.autograd.grad(torch_loss(hidden, weight, target, None), hidden)[0]
    assert_within_torch_error(d_hidden, theirs, expected)


def test_chunk_size_follows_the_budget():
    assert chunk_rows(VOCAB, 4, budget_for(CHUNK, torch.float32)) == CHUNK
    assert chunk_rows(VOCAB, 4, 1) == 1
    # Llama 3 in bf16: 256 MiB is 1046 tokens, rounded down to whole 64-row tiles.
    assert chunk_rows(128256, 2, DEFAULT_MEMORY_BUDGET) == 1024
    hidden, weight, target, bias = make_inputs(torch.float64)
    one_chunk = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias)
    for rows in (1, 3, 37, 38):
        chunked = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias,
                                 memory_budget=budget_for(rows, torch.float64))
        for a, b in zip(chunked, one_chunk):
            torch.testing.assert_close(a, b)


def peak_extra_bytes(fn) -> int:
    """Peak CPU memory allocated by ``fn()`` and not yet freed, in bytes: what
    ``torch.cuda.max_memory_allocated`` minus the memory held before measures in
    bench/scripts/flce_check.py.

    torch's CPU allocator reports every allocation and free to the profiler (pointer and size);
    summing them in time order, frees of tensors allocated before ``fn`` left out, gives the
    running total. (The allocator's own ``total_allocated`` also counts tensors left over from
    earlier profiled code, so it is not used.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    live, total, peak = {}, 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        else:
            total -= live.pop(ptr, 0)
    return peak


def test_peak_memory_is_one_copy_of_the_gradients_plus_chunks(backend):
    # d weight is 32 chunks here, so a second copy of the gradients (the zeros autograd materialized
    # for the gradient outputs' gradients, before the fix: 2.08 GiB instead of ~1.1 at Llama 3's
    # head) cannot hide under the chunk allowance.
    tokens, hidden_size, rows = 256, 256, 8
    hidden = torch.randn(tokens, hidden_size).requires_grad_()
    weight = (torch.randn(VOCAB, hidden_size) / hidden_size**0.5).requires_grad_()
    target = torch.randint(0, VOCAB, (tokens,))
    chunk = budget_for(rows, torch.float32)

    def fwd_bwd():
        fused_linear_cross_entropy(hidden, weight, target, memory_budget=chunk).backward()

    fwd_bwd()  # Triton's compile and the executor's build allocate once, outside the measurement
    hidden.grad = weight.grad = None
    extra = peak_extra_bytes(fwd_bwd)
    grads = (hidden.numel() + weight.numel()) * 4
    assert weight.grad is not None and hidden.grad is not None
    # Chunk-sized temporaries: the logits buffer itself (Metal: that is all); the Triton interpreter's
    # host copy of it; the reference's float32 intermediates (5 measured). Beyond them, small tensors
    # (loss rows, scales) get one chunk more.
    allowance = 6 * chunk
    assert grads <= extra <= grads + allowance, (extra, grads, chunk)


def test_deterministic(backend):
    hidden, weight, target, bias = make_inputs(torch.float32)
    runs = [loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias, label_smoothing=0.1,
                           memory_budget=budget_for(CHUNK, torch.float32)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_grad_output_scales_and_second_backward_refuses():
    hidden, weight, target, bias = make_inputs(torch.float64)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias)
    (3.0 * loss).backward(retain_graph=True)
    h64, w64, b64 = as64(hidden, weight, bias)
    (3.0 * torch_loss(h64, w64, target, b64)).backward()
    for ours, ref in ((hidden, h64), (weight, w64), (bias, b64)):
        torch.testing.assert_close(ours.grad, ref.grad)
    # The gradients were scaled in place: a second pass would scale them again, so autograd refuses.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_computes_the_loss_only():
    hidden, weight, target, bias = make_inputs(torch.float64)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, bias)
    torch.testing.assert_close(loss, torch_loss(hidden, weight, target, bias).detach())
    assert not loss.requires_grad


def test_module_and_leading_dims():
    loss_fn = FusedLinearCrossEntropyLoss(reduction="none", softcap=5.0)
    assert repr(loss_fn) == "FusedLinearCrossEntropyLoss(ignore_index=-100, reduction='none', softcap=5.0)"
    hidden, weight, target, bias = make_inputs(torch.float64)
    out = loss_fn(hidden, weight, target, bias)
    assert out.shape == target.shape
    torch.testing.assert_close(out, torch_loss(hidden, weight, target, bias, reduction="none", softcap=5.0))


def test_autocast_casts_like_the_linear_layer():
    hidden, weight, target, bias = make_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, target, bias)
        ref = torch_loss(hidden, weight, target, bias)
    d_weight = torch.autograd.grad(loss, weight)[0]
    assert loss.dtype == torch.float32 and d_weight.dtype == torch.float32
    # The oracle sees what autocast hands the linear layer: the inputs rounded to bfloat16.
    expected = torch_loss(*(t.detach().bfloat16().double() for t in (hidden, weight)), target,
                          bias.detach().bfloat16().double())
    assert_within_torch_error(loss, ref.float(), expected)


def test_bad_inputs():
    hidden, weight, target, bias = make_inputs(torch.float32)
    fn = r"metalcore\.nn\.fused_linear_cross_entropy"
    with pytest.raises(ValueError, match=fn + r": weight must have shape \(V, 16\)"):
        fused_linear_cross_entropy(hidden, weight[:, :5], target)
    with pytest.raises(ValueError, match=fn + r": target must have shape \(2, 19\)"):
        fused_linear_cross_entropy(hidden, weight, target[:, :3])
    with pytest.raises(ValueError, match=fn + r": bias must have shape \(1003,\)"):
        fused_linear_cross_entropy(hidden, weight, target, bias[:3])
    with pytest.raises(TypeError, match=fn + r": target must have dtype"):
        fused_linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(TypeError, match=fn + r": expected all tensors to have the same dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match=fn + r": reduction must be one of"):
        fused_linear_cross_entropy(hidden, weight, target, reduction="avg")
    with pytest.raises(ValueError, match=fn + r": num_items_in_batch .* needs reduction='mean'"):
        fused_linear_cross_entropy(hidden, weight, target, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match=fn + r": label_smoothing must be in \[0, 1\]"):
        fused_linear_cross_entropy(hidden, weight, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match=fn + r": softcap must be positive"):
        fused_linear_cross_entropy(hidden, weight, target, softcap=0.0)
    with pytest.raises(ValueError, match=fn + r": memory_budget must be a positive number of bytes"):
        fused_linear_cross_entropy(hidden, weight, target, memory_budget=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_fullgraph(reduction):
    hidden, weight, target, bias = make_inputs(torch.float64)
    grad_out = torch.rand(BATCH, SEQ, dtype=torch.float64) if reduction == "none" else None
    kwargs = dict(reduction=reduction, softcap=5.0, memory_budget=budget_for(CHUNK, torch.float64))
    compiled = torch.compile(fused_linear_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, target, bias, grad_out, **kwargs)
    expected = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, bias, grad_out, **kwargs)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["plain", "all"])
def test_cuda_compiled_kernel_at_a_real_vocabulary(option):
    """The compiled Triton kernel on a GPU, 32,003 words (no block multiple), chunks of 64 tokens."""
    vocab, kwargs = 32003, OPTIONS[option]
    hidden = torch.randn(2, 300, 256, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(vocab, 256, device="cuda") / 4).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (2, 300), device="cuda")
    target[:, :50] = IGNORE
    logits = torch.randn(2, vocab, device="cuda", dtype=torch.bfloat16)
    assert cross_entropy_chunk_.backend_for(logits, target[0, :2], torch.ones((), device="cuda"), IGNORE, 0.0, 0.0,
                                            None, True) == "triton"

    def reference(h, w, t, b=None, **kw):
        z = F.linear(h, w).float().reshape(-1, vocab)
        if kw.get("softcap") is not None:
            z = kw["softcap"] * torch.tanh(z / kw["softcap"])
        t = t.reshape(-1)
        rows = F.cross_entropy(z, t, ignore_index=IGNORE, label_smoothing=kw.get("label_smoothing", 0.0),
                               reduction="none")
        rows = rows + torch.where(t != IGNORE, kw.get("z_loss", 0.0) * torch.logsumexp(z, -1).square(), 0.0)
        return rows.sum() / (t != IGNORE).sum()

    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, None,
                          memory_budget=64 * vocab * 2, **kwargs)
    theirs = loss_and_grads(reference, hidden, weight, target, None, **kwargs)
    expected = loss_and_grads(reference, *as64(hidden, weight), target, None, **kwargs)
    for a, t, e in zip(ours, theirs, expected):
        assert_within_torch_error(a, t, e)
