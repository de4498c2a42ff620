"""Scaled dot-product attention, flash-attention style: the forward keeps the row log-sum-exp, the
backward recomputes the probabilities from it instead of storing the ``L × S`` matrix.

* ``metalcore::sdpa_fwd(q, k, v, attn_mask, is_causal, scale) -> (out, lse)``
* ``metalcore::sdpa_bwd(dout, q, k, v, out, lse, attn_mask, is_causal, scale) -> (dq, dk, dv)``

Op layout: ``q`` ``(B, H, L, E)``; ``k`` ``(B, Hkv, S, E)``; ``v`` ``(B, Hkv, S, Ev)``, any strides,
one dtype (fp32/bf16/fp16/fp64). ``Hkv`` divides ``H``: query head ``h`` reads key/value head
``h // (H / Hkv)`` (grouped-query attention, ``repeat_interleave`` order, as torch's ``enable_gqa``);
the reference expands, a kernel indexes. ``attn_mask`` is ``None`` or 4-D with each dimension 1 or
the full ``(B, H, L, S)`` (broadcast by the kernel), either bool (True = attend) or float (added
to the scores; float32 or the inputs' dtype). ``is_causal`` keeps key ``j`` for query ``i`` iff
``j ≤ i`` (top-left aligned when ``L ≠ S``, as torch). ``out`` ``(B, H, L, Ev)`` has ``q``'s dtype;
``lse`` ``(B, H, L)`` is float32 (float64 for float64 input) and ``−inf`` on rows with nothing to
attend, whose output and gradients are 0 (torch's behaviour since its "safe softmax").

With ``Z = scale·q kᵀ + mask`` and ``P = exp(Z − lse)``, the backward is
``dV = Pᵀ dO``, ``dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))``, ``dQ = scale·dS K``, ``dK = scale·dSᵀ Q``,
with ``dK``/``dV`` summed over each group of query heads that share a key/value head.

The public :func:`metal_scaled_dot_product_attention` runs these ops only where metalcore's kernel
is the automatic choice (Metal on MPS) or a backend is requested explicitly; elsewhere it calls
torch's own fused SDPA, and the reference stays the oracle. Two cases never reach the ops: ``dropout_p
> 0`` (kernels never do dropout) and a float ``attn_mask`` that requires a gradient; they run
torch's SDPA, or under the ``"reference"`` backend a composite of plain differentiable torch ops in
the same float32/float64 arithmetic.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import TorchVersion

from metalcore._backend import automatic_backend, automatic_selection, requested_backend, use_backend
from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from metalcore.nn.rms_norm import _acc

_FN = "metalcore.metal_scaled_dot_product_attention"


def _expand_heads(x: Tensor, heads: int) -> Tensor:
    """Key/value heads repeated so that query head ``h`` meets head ``h // (heads / Hkv)``."""
    return x if x.shape[-3] == heads else x.repeat_interleave(heads // x.shape[-3], dim=-3)


def _scores(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], is_causal: bool, scale: float,
            acc: torch.dtype) -> Tensor:
    """``Z = scale·q kᵀ + mask`` in ``acc``, ``−inf`` where a key is not attended."""
    z = torch.matmul(q.to(acc), k.to(acc).mT) * scale
    if attn_mask is not None:
        z = z.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else z + attn_mask.to(acc)
    if is_causal:
        L, S = z.shape[-2:]
        z = z.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=z.device).tril(), -math.inf)
    return z


def _probs(z: Tensor) -> Tensor:
    """``P = softmax(Z)`` by rows; a row with nothing to attend (all ``−inf``) gets ``P = 0``, not NaN.

    From the row maximum, not from ``lse``: a row masked entirely with ``finfo.min`` (Hugging Face's
    padding) has ``lse ≈ finfo.min``, which cannot hold the ``ln S`` that ``exp(Z − lse)`` needs, and
    would sum ``V`` instead of averaging it. torch's SDPA and the kernels give the average."""
    if z.shape[-1] == 0:  # no keys: nothing to normalise (amax has no identity)
        return z
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - torch.where(torch.isneginf(m), 0.0, m))
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total == 0, 1.0, total)


@metalcore_op("sdpa_fwd")
def sdpa_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
             scale: float) -> tuple[Tensor, Tensor]:
    """Reference forward in float32 (float64 for float64 input); materialises the ``L × S`` scores."""
    acc, heads = _acc(q), q.shape[1]
    z = _scores(q, _expand_heads(k, heads), attn_mask, is_causal, scale, acc)
    lse = torch.logsumexp(z, dim=-1)
    out = _probs(z) @ _expand_heads(v, heads).to(acc)
    return out.to(q.dtype), lse


@sdpa_fwd.register_fake
def _(q, k, v, attn_mask, is_causal, scale):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=_acc(q))


@metalcore_op("sdpa_bwd")
def sdpa_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             attn_mask: Optional[Tensor], is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference backward: recomputes ``P`` from the scores (``lse`` is unused here: see ``_probs``), then the
    formulas in the module docstring."""
    acc, (B, heads, _, E), (_, kv_heads, S, Ev) = _acc(q), q.shape, v.shape
    qf, do = q.to(acc), dout.to(acc)
    kf, vf = _expand_heads(k, heads).to(acc), _expand_heads(v, heads).to(acc)
    p = _probs(_scores(qf, kf, attn_mask, is_causal, scale, acc))
    dv = p.mT @ do
    # rowsum(dO ∘ O) equals rowsum(P ∘ dP) and costs Ev per row instead of S.
    ds = p * (do @ vf.mT - (do * out.to(acc)).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.mT @ qf) * scale
    group = heads // max(kv_heads, 1)  # no heads at all: nothing to sum
    dk = dk.view(B, kv_heads, group, S, E).sum(2)
    dv = dv.view(B, kv_heads, group, S, Ev).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, is_causal, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale = inputs
    out, lse = output
    ctx.is_causal, ctx.scale = is_causal, scale
    # The backend that ran the forward runs the backward: a ``use_backend("triton")`` block around the
    # model call only (the usual way to write it) otherwise sent the backward to the materialising
    # reference, fwd+bwd 0.04-0.06x torch on the H100 against 0.56-0.59x with the block around both.
    ctx.backend = None if torch.compiler.is_compiling() else requested_backend()
    ctx.save_for_backward(q, k, v, out, lse, attn_mask)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    if ctx.needs_input_grad[3]:
        raise RuntimeError("metalcore::sdpa_fwd does not differentiate attn_mask; "
                           "metalcore.metal_scaled_dot_product_attention does (through torch's SDPA)")
    q, k, v, out, lse, attn_mask = ctx.saved_tensors
    args = (dout.contiguous(), q, k, v, out, lse, attn_mask, ctx.is_causal, ctx.scale)
    if ctx.backend is None or ctx.backend == requested_backend():
        dq, dk, dv = sdpa_bwd(*args)
    else:
        with use_backend(ctx.backend):
            dq, dk, dv = sdpa_bwd(*args)
    return dq, dk, dv, None, None, None


sdpa_fwd.register_autograd(_backward, setup_context=_setup)


def _sdpa_composite(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                    is_causal: bool, scale: float) -> Tensor:
    """The ops' math from differentiable torch ops, plus dropout on ``P`` (torch's math backend order:
    safe softmax, then ``torch.dropout``, then ``P V``). Materialises ``P`` for autograd."""
    acc, heads = _acc(q), q.shape[1]
    z = _scores(q, _expand_heads(k, heads), attn_mask, is_causal, scale, acc)
    # Fully masked rows: softmax over zeros, then zeroed, so that neither P nor its gradient is NaN.
    dead = torch.isneginf(z).all(-1, keepdim=True)
    p = torch.softmax(z.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        p = torch.dropout(p, dropout_p, True)
    return (p @ _expand_heads(v, heads).to(acc)).to(q.dtype)


def _to_ops_layout(x: Tensor, batch: tuple[int, ...], heads: int) -> Tensor:
    """``(*b, h, n, d)`` broadcast to ``(*batch, heads, n, d)`` and viewed as ``(B, heads, n, d)``;
    copies only where a batch dimension is actually broadcast."""
    return x.expand(*batch, heads, *x.shape[-2:]).reshape(math.prod(batch), heads, *x.shape[-2:])


class _TorchServes(dict):
    """Device type -> whether torch's fused SDPA serves automatic calls there: metalcore's attention
    kernel is not the automatic choice (CUDA, where the Triton kernel measured 0.46-0.86x of torch's
    flash SDPA on the H100, bench/training_triton.md; the CPU, where the reference materialises the
    scores and ran 0.10-0.35x of torch's CPU flash kernel forward, bench/training.md v4). Filled on
    first use, emptied with the op's plans (a kernel plugged in, a selection table reloaded); a hit
    is one dict lookup (~0.03 µs, against ~0.05 for a cached function call)."""

    def __missing__(self, device_type: str) -> bool:
        served = self[device_type] = not sdpa_fwd.automatic_kernel(automatic_backend(torch.device(device_type)))
        return served


_torch_serves = sdpa_fwd.dropped_with_plans(_TorchServes())


def metal_scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                       dropout_p: float = 0.0, is_causal: bool = False,
                                       scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """Same signature and semantics as ``torch.nn.functional.scaled_dot_product_attention``.

    ``query`` ``(*, Hq, L, E)``, ``key`` ``(*, H, S, E)``, ``value`` ``(*, H, S, Ev)`` → ``(*, Hq, L, Ev)``;
    at least 2-D, one dtype (fp32/bf16/fp16/fp64), leading dimensions broadcast. Heads (dim −3)
    broadcast like batch dimensions; with ``enable_gqa=True`` the key/value head counts may instead
    divide ``Hq`` (grouped-query attention). ``attn_mask`` broadcasts to ``(*, Hq, L, S)``: bool
    (True = attend) or float (added to the scores; float32 or the inputs' dtype). ``is_causal``
    applies a top-left-aligned lower-triangular mask and cannot be combined with ``attn_mask``.
    ``scale`` defaults to ``1/sqrt(E)``. Rows that attend to nothing give 0 output and 0 gradients.
    ``dropout_p > 0`` drops probabilities whenever it is given — like torch's function, which has
    no ``training`` flag (modules pass ``dropout_p`` only in training).

    Who computes it: metalcore's ops where its kernel is the automatic choice (Metal on MPS) or a
    backend is requested explicitly, and the kernel takes the inputs; everywhere else (and under
    ``"reference"`` never) torch's own fused SDPA, called directly (the
    flash/memory-efficient kernels on CUDA, the flash kernel on the CPU), so importing metalcore never
    makes attention slower. Both follow the contract above: torch's CPU kernel gives 0 on rows with
    nothing to attend and the average of ``V`` on rows masked entirely with ``finfo.min`` (Hugging
    Face's padding), as the reference does; on a GPU its kernels do not, so there a bool mask reaches
    them with its fully masked rows opened (their output is then zeroed) and a float mask is rewritten
    and runs without cuDNN (``_mask_for_fused_kernels``). Under ``use_backend("reference")`` dropout
    and a mask that requires a gradient run a materialising composite of plain torch ops (dropout
    drawn as torch's math backend draws it). Autograd keeps the forward's choice for the backward:
    torch's fused backward after torch's forward, and a kernel backend's backward (also outside its
    ``use_backend`` block) after its forward.

    >>> out = metalcore.metal_scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    """
    # torch's route first, and nothing on it that a call does not need: a decode call takes ~18 µs on
    # the H100, so 0.95x of torch leaves ~0.95 µs of Python there (~0.55 µs on the development CPU).
    # No per-signature cache of the checks: its key (shapes, strides, dtypes of three tensors) would
    # cost more than the checks it saves (the op core's key: ~1.4 µs on the development CPU).
    # CUDA first, in its own branch: no device-type string, no CPU NaN guard test (bench/training.md v7).
    if isinstance(query, Tensor):
        if query.is_cuda:
            if _torch_serves["cuda"] and automatic_selection():
                # The hot path (no mask, no dropout: causal, GQA, decode) is _torch_sdpa's first case,
                # inlined, without the arguments it does not need (torch parses a positional None mask
                # and dropout_p=0.0 in ~0.14 µs). The S check stays: one of torch's CUDA kernels reads
                # past the end of a shorter value (bench/training.md v6); two shape reads, ~0.3 µs.
                if attn_mask is None and not dropout_p and value.shape[-2] == key.shape[-2]:
                    try:
                        return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal,
                                                              scale=scale, enable_gqa=enable_gqa)
                    except _TORCH_ERRORS:
                        _layout(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
                        raise
                return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        elif _torch_serves["cpu" if query.is_cpu else query.device.type] and automatic_selection():
            return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    requested = requested_backend()
    # What the ops do not do (dropout, a mask that requires a gradient) runs torch's SDPA under an
    # explicit kernel backend too; "reference" runs the materialising composite (the oracle).
    if requested != "reference" and (dropout_p > 0.0 or (attn_mask is not None and attn_mask.requires_grad)):
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    q4, k4, v4, mask4, out_shape = _layout(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    op_scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask_needs_grad = mask4 is not None and mask4.requires_grad and torch.is_grad_enabled()
    if dropout_p > 0.0 or mask_needs_grad:
        out4 = _sdpa_composite(q4, k4, v4, mask4, dropout_p, is_causal, op_scale)
    elif (requested != "reference"
          and sdpa_fwd.backend_for(q4, k4, v4, mask4, is_causal, op_scale) == "reference"):
        # A kernel backend (automatic on MPS, or requested) that does not take these inputs (a dtype or
        # head dim outside its scope): torch's fused SDPA, not the materialising reference.
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    else:
        out4, _ = sdpa_fwd(q4, k4, v4, mask4, is_causal, op_scale)
    return out4.view(out_shape)


# What torch's SDPA raises on arguments it refuses; metalcore then names the bad argument.
_TORCH_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError)


def _torch_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                is_causal: bool, scale: Optional[float], enable_gqa: bool) -> Tensor:
    """``F.scaled_dot_product_attention`` with metalcore's contract: its typed errors, 1-D masks, masked
    rows as documented on every device, NaN in, NaN out. Without a mask it adds no kernel launch on a
    GPU, one shape comparison and an attribute read."""
    try:
        # torch accepts a mask with is_causal and a value whose S differs from key's (its CPU kernel
        # then reads past the end): refuse both.
        if is_causal and attn_mask is not None or value.shape[-2] != key.shape[-2]:
            _layout(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(query, key, value, None, dropout_p, is_causal, scale=scale,
                                                 enable_gqa=enable_gqa)
        else:
            out = _torch_sdpa_masked(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    except _TORCH_ERRORS:
        # Name the bad argument as metalcore does everywhere; torch's own error if ours finds none.
        _layout(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        raise
    return _nan_guard(out, query, value) if query.is_cpu else out


def _nan_guard(out: Tensor, query: Tensor, value: Tensor) -> Tensor:
    """``out`` with NaN wherever the query holds one. torch's CPU flash kernel takes a query row holding
    a NaN for a fully masked row and returns 0 there (torch 2.13, measured; NaN in key or value does
    propagate), against metalcore's NaN in, NaN out. ``out + 0·q`` restores it with no host sync in
    one op, ~3 µs a decode call on the development CPU (before: ``0·Σ_E q`` added, three ops, ~8 µs);
    it marks the query's NaN columns of the row, or the whole row through ``Σ_E q`` when ``E ≠ Ev``."""
    q = query.detach()
    if q.shape[-1] != value.shape[-1]:
        q = q.sum(-1, keepdim=True)
    return torch.add(out, q, alpha=0)


def _torch_sdpa_masked(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, dropout_p: float,
                       scale: Optional[float], enable_gqa: bool) -> Tensor:
    """:func:`_torch_sdpa` with a mask. On the CPU torch's kernel gets the mask as given (its flash
    kernel already has metalcore's masked-row semantics, tests). On a GPU a bool mask also goes to
    torch as given, except that its fully masked rows are opened (then every kernel of torch's, cuDNN
    included, reads it safely) and their output zeroed; a float mask is rewritten and runs without
    cuDNN (``_mask_for_fused_kernels``, ``_sdpa_without_cudnn``; so does a bool mask before torch 2.11)."""
    mask = attn_mask[None] if attn_mask.dim() == 1 else attn_mask  # torch's kernels index dim -2 of a mask
    alive = sunk = None
    if not query.is_cpu:
        mask, alive, sunk = _mask_for_fused_kernels(mask, query.dtype)
    if mask.dtype == torch.bool and _CUDNN_READS_BOOL_MASKS:
        out = F.scaled_dot_product_attention(query, key, value, mask, dropout_p, False, scale=scale,
                                             enable_gqa=enable_gqa)
    else:
        out = _sdpa_without_cudnn(query, key, value, mask, dropout_p, scale, enable_gqa)
    if sunk is not None:  # padding rows: the average of V, as torch's CPU kernel and the reference give
        mean_v = value.mean(-2, keepdim=True)
        if enable_gqa and mean_v.shape[-3] != query.shape[-3]:
            mean_v = mean_v.repeat_interleave(query.shape[-3] // mean_v.shape[-3], dim=-3)
        out = torch.where(sunk, mean_v, out)
    if alive is not None:
        out = out * alive  # rows with nothing to attend ran over every key (finite); 0 out, 0 gradients
    return out


# A row whose largest mask value is below this is a padding row (Hugging Face fills them with
# finfo.min, -3.4e38, which overflows to -inf once a kernel scales it by log2(e)): the kernel sees it
# shifted to a maximum of 0 (finite) and its output is the average of V, as the contract says for
# finfo.min rows. Far beyond any score; rows above it are passed bit-for-bit.
_SHIFT_BELOW = -2.0 ** 16


def _mask_for_fused_kernels(attn_mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """A mask that torch's GPU kernels read safely; each row's "attends to something" flag ``alive``
    ``(..., L, 1)`` that the output is multiplied by; for a float mask the padding rows ``sunk``
    (maximum below ``_SHIFT_BELOW``), whose output becomes the average of V.

    On the H100 (torch 2.11, bench/training.md v5) torch's SDPA gave a fully masked row nonzero
    output or dq, a finfo.min row something other than the average of V, and a float32 mask with
    bf16 inputs non-finite results. cuDNN attention, torch's first choice there, turns a bool False
    into the finite -65504 (so a dead row attends to every key, its lse below -88.7, where cuDNN's
    backward gives NaN dq at L % 128 = 64, pytorch#196678) and reads a float32 bias with half inputs
    as half (pytorch#191612); a kernel that scales scores by log2(e) overflows -3.4e38 to -inf; the
    memory-efficient kernel refuses a bias whose dtype is not the query's. Here no row is fully
    masked (a dead row attends to every key and is zeroed afterwards, so its gradients are exactly
    0), no float row sits near the float range's end, and a float mask has the query's dtype (a
    float32 mask with half inputs is rounded to them, as the kernels read it). A bool mask stays bool
    and torch converts it, as it does for its own callers: one pass over the mask (its ``any``) and
    one over the output (the ``alive`` product) beyond torch's own call. No host sync."""
    if attn_mask.dtype == torch.bool:
        # Still bool, dead rows opened: torch converts it for whichever kernel it picks, as for its own
        # callers (cuDNN to -65504, which is then never a row's maximum).
        alive = attn_mask.any(-1, keepdim=True)
        return torch.where(alive, attn_mask, True), alive, None
    row_max = attn_mask.detach().amax(-1, keepdim=True)
    alive = row_max != -math.inf  # a NaN row stays alive: NaN in, NaN out
    lowest = torch.finfo(attn_mask.dtype).min
    # Dead rows: -inf clamped to the lowest finite value, then shifted by it to 0 (finite). The shift is
    # a constant per row, to which softmax (and so the gradient into the mask) is invariant.
    sunk = row_max < _SHIFT_BELOW
    shift = torch.where(sunk, row_max.clamp(min=lowest), 0.0)
    return (attn_mask.clamp(min=lowest) - shift).to(dtype), alive, sunk


# cuDNN attention ignored custom masks in torch 2.10 (pytorch#177842); from 2.11 on it reads an opened bool
# mask as torch converts it (bench/scripts/attention_public_check.py checks it on the H100).
_CUDNN_READS_BOOL_MASKS = TorchVersion(torch.__version__) >= (2, 11)


def _sdpa_without_cudnn(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor, dropout_p: float,
                        scale: Optional[float], enable_gqa: bool) -> Tensor:
    """torch's SDPA with a float mask, cuDNN attention left out (torch's first choice on the H100 when
    its cuDNN is newer than 9.15): besides the float32-bias misreading that the rewrite's cast avoids
    (pytorch#191612), it ignored custom masks in torch 2.10 (pytorch#177842), and a rewritten float
    row may still keep every value far below 0 (a bias of -1000 everywhere), where its backward gives
    NaN dq (pytorch#196678). The memory-efficient kernel (or math) serves instead; autograd keeps the
    forward's kernel for the backward. Flipping the global flag costs ~0.6 µs, ``sdpa_kernel`` ~13 µs
    (used only where torch.compile traces it). Bool masks keep cuDNN: leaving it out made the
    prefill call with a padding mask 0.37x of torch on the H100 (memory-efficient kernel against
    cuDNN; bench/training.md v6)."""
    def call():
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, False, scale=scale,
                                              enable_gqa=enable_gqa)
    if not query.is_cuda:
        return call()
    if torch.compiler.is_compiling():
        with sdpa_kernel(_NOT_CUDNN):
            return call()
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return call()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return call()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _layout(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
            is_causal: bool, enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], tuple[int, ...]]:
    """Validates the public arguments (typed errors naming the bad one) and lays them out for the ops:
    ``q4`` ``(B, H, L, E)``, ``k4``/``v4`` ``(B, Hkv, S, ·)``, a 4-D mask or None, and the output's shape."""
    q = check_tensor(_FN, "query", query, dtypes=FLOAT_DTYPES, min_dim=2)
    k = check_tensor(_FN, "key", key, dtypes=FLOAT_DTYPES, min_dim=2)
    v = check_tensor(_FN, "value", value, dtypes=FLOAT_DTYPES, min_dim=2)
    check_same_device(_FN, query=q, key=k, value=v, attn_mask=attn_mask)
    check_same_dtype(_FN, query=q, key=k, value=v)
    (L, E), S, Ev = q.shape[-2:], k.shape[-2], v.shape[-1]
    if k.shape[-1] != E:
        raise ValueError(f"{_FN}: key's last dimension must equal query's (E={E}); got key {tuple(k.shape)}")
    if v.shape[-2] != S:
        raise ValueError(f"{_FN}: value must have key's sequence length S={S} (dim -2); got value {tuple(v.shape)}")
    if E == 0:
        raise ValueError(f"{_FN}: query's last dimension (E) must be positive; got query {tuple(q.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{_FN}: dropout_p must be in [0, 1]; got {dropout_p!r}")
    if attn_mask is not None and is_causal:
        raise ValueError(f"{_FN}: attn_mask must be None when is_causal=True (as in torch); pass one or the other")

    # Heads live in dim -3 (a 2-D input has one); everything before it is batch.
    qh, kh, vh = (x if x.dim() >= 3 else x.unsqueeze(0) for x in (q, k, v))
    try:
        batch = tuple(torch.broadcast_shapes(qh.shape[:-3], kh.shape[:-3], vh.shape[:-3]))
    except RuntimeError:
        raise ValueError(f"{_FN}: the batch dimensions of query {tuple(q.shape)}, key {tuple(k.shape)} and "
                         f"value {tuple(v.shape)} cannot be broadcast together") from None
    hq, hk, hv = qh.shape[-3], kh.shape[-3], vh.shape[-3]
    if enable_gqa:
        if hq % hk or hq % hv:
            raise ValueError(f"{_FN}: with enable_gqa=True the number of heads in key ({hk}) and value ({hv}) "
                             f"must divide the number of heads in query ({hq})")
        heads = hq
    else:
        if any(h not in (1, max(hq, hk, hv)) for h in (hq, hk, hv)):
            raise ValueError(f"{_FN}: query, key and value have {hq}, {hk} and {hv} heads (dim -3), which do not "
                             "broadcast; pass enable_gqa=True for grouped-query attention")
        heads = max(hq, hk, hv)
    if hk != hv:  # rare: key and value grouped differently; the ops take one key/value head count
        kh, vh = _expand_heads(kh, heads), _expand_heads(vh, heads)
    q4 = _to_ops_layout(qh, batch, heads)
    k4 = _to_ops_layout(kh, batch, kh.shape[-3])
    v4 = _to_ops_layout(vh, batch, vh.shape[-3])

    mask4 = None
    if attn_mask is not None:
        check_tensor(_FN, "attn_mask", attn_mask, dtypes=(torch.bool, torch.float32, q.dtype))
        full = (*batch, heads, L, S)
        m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
        if m.dim() != len(full) or any(a not in (1, b) for a, b in zip(m.shape, full)):
            raise ValueError(f"{_FN}: attn_mask of shape {tuple(attn_mask.shape)} must broadcast to the "
                             f"attention weights' shape {full}")
        if all(d == 1 for d in m.shape[:-3]):
            mask4 = m.reshape(1, *m.shape[-3:])
        else:
            mask4 = m.expand(*batch, *m.shape[-3:]).reshape(math.prod(batch), *m.shape[-3:])
    two_d = max(q.dim(), k.dim(), v.dim()) == 2
    return q4, k4, v4, mask4, (L, Ev) if two_d else (*batch, heads, L, Ev)
