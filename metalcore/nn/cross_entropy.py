"""Fused linear cross-entropy: the language-model loss without the logits.

``fused_linear_cross_entropy(hidden, weight, target)`` equals
``F.cross_entropy(softcap(hidden @ weight.T + bias), target, ...)`` but never holds the
``(tokens, vocab)`` logits: at 8192 tokens and Llama 3's 128,256-word vocabulary they are 2 GiB in
bf16, and ``F.cross_entropy`` (with its float32 softmax and the logits' gradient) peaks at 11.7 GiB
on the H100. Instead, chunks of tokens go through the LM-head GEMM one at a time; a fused kernel
turns each chunk's logits into per-token losses and, *in the same buffer*, into the gradient of the
loss with respect to those logits; two more GEMMs fold that gradient into ``d hidden`` (its rows of
the chunk) and ``d weight`` (accumulated over chunks). The gradients are therefore computed in the
forward pass and kept; the backward scales them by the incoming gradient (in place, so that no
second copy of ``d weight`` exists). With ``reduction="none"`` the incoming gradient is a vector
known only in the backward, which then recomputes the chunks.

Per token (``z = softcap·tanh(x / softcap)`` when ``softcap`` is set, else ``z = x``;
``lse = log Σ_j exp z_j``; ``ε`` = ``label_smoothing``; ``V`` = vocabulary size)::

    loss = lse − (1 − ε)·z_target − (ε / V)·Σ_j z_j + z_loss·lse²
    d loss / d z_j = softmax_j·(1 + 2·z_loss·lse) − (1 − ε)·[j = target] − ε / V
    d z_j / d x_j = 1 − (z_j / softcap)²

which is ``F.cross_entropy``'s label smoothing exactly, and PaLM's z-loss (Liger's ``lse_square``).
Tokens whose target is ``ignore_index`` contribute neither loss nor gradient.

Two layers of registered ops:

* ``metalcore::cross_entropy_chunk_(logits, target, grad_scale, ...) -> loss_rows``: the fused
  kernel (Triton, Metal, reference), overwriting ``logits`` with ``grad_scale · d loss / d logits``;
* ``metalcore::fused_linear_cross_entropy_fwd`` / ``_bwd``: the chunk loop and its GEMMs (plain
  torch matmuls, i.e. cuBLAS on CUDA), shared by every backend, with autograd.

Losses accumulate in float32 (float64 for float64 inputs) and the result is float32: Hugging Face's
causal-LM loss also upcasts the logits to float32. Everything is deterministic: one program per
token, GEMMs accumulate into ``d weight`` in a fixed chunk order, no atomics.
"""


from typing import Optional

import torch
from torch import Tensor, nn

from metalcore._op import metalcore_op
from metalcore._validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

_FN = "metalcore.nn.fused_linear_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")

# The chunk's logits buffer (tokens × vocab × element size) is the only tensor that grows with the
# chunk; everything else is the gradients themselves, so the peak extra memory of a fwd+bwd is
# d weight + d hidden + one chunk: at 8192 × 4096 × 128,256 bf16, 1002 + 64 MiB + the budget. Each
# chunk's d weight update reads and writes all of d weight (2 GiB of traffic), so small chunks make
# it memory-bound. Measured on the H100 at that size (bench/training.md; torch 51.3 ms, 11.7 GiB):
#   budget (tokens a chunk)   32 MiB (128)  64 MiB (256)  128 MiB (512)  256 MiB (1024)  512 MiB (2048)
#   fwd+bwd                   121.8 ms      65.9 ms       49.5 ms        44.5 ms         43.4 ms
#   extra memory (predicted)  1.07 GiB      1.10 GiB      1.17 GiB       1.29 GiB        1.54 GiB
# 256 MiB is the knee: 1.15x faster than torch, where 128 MiB is level with it and 512 MiB buys 2%.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Chunks of at least this many tokens are rounded down to a multiple of it (whole GEMM row tiles).
_ROW_ALIGN = 64


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_rows(vocab: int, element_size: int, memory_budget: int) -> int:
    """Tokens per chunk so that the chunk's logits (``rows × vocab × element_size`` bytes) fit the budget."""
    rows = max(1, memory_budget // max(1, vocab * element_size))
    return rows - rows % _ROW_ALIGN if rows >= _ROW_ALIGN else rows


# ------------------------------------------------------------------------------------- fused kernel

@metalcore_op("cross_entropy_chunk_", mutates_args=("logits",))
def cross_entropy_chunk_(logits: Tensor, target: Tensor, grad_scale: Tensor, ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: Optional[float],
                         write_grad: bool) -> Tensor:
    """Reference: per-token losses of ``logits`` (rows, V), and with ``write_grad`` the gradient.

    ``target`` (rows,) int64; ``grad_scale`` float32 (float64 for float64 logits), 0-d or (rows,).
    Returns the loss of each row (0 where ``target == ignore_index``) in float32 (float64); when
    ``write_grad``, ``logits`` is overwritten with ``grad_scale · d loss_row / d logits`` (0 on ignored
    rows). Out-of-range targets other than ``ignore_index`` are undefined, as in torch's CUDA kernel.
    """
    acc = _acc(logits)
    x = logits.to(acc)
    vocab = x.shape[-1]
    if x.numel() == 0:  # no rows, or no classes (every row then ignored, as torch needs): loss 0
        return x.new_zeros(x.shape[:1])
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).unsqueeze(-1)
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    # softmax = exp(z − max) / Σ, not exp(z − lse): lse (≈ 10–30) carries an absolute rounding error of
    # its ulp (~2e-6 in float32), which exp(z − lse) would turn into that relative error in every p.
    shifted = z - z.amax(-1, keepdim=True)
    e = torch.exp(shifted)
    total = e.sum(-1)
    lse = z.amax(-1) + torch.log(total)
    loss = lse - (1.0 - label_smoothing) * z.gather(-1, safe).squeeze(-1)
    if label_smoothing:
        loss = loss - (label_smoothing / vocab) * z.sum(-1)
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if write_grad:
        grad = e * ((1.0 + 2.0 * z_loss * lse) / total).unsqueeze(-1)
        grad = grad - label_smoothing / vocab
        grad.scatter_add_(-1, safe, grad.new_full(safe.shape, label_smoothing - 1.0))
        if softcap is not None:
            grad = grad * (1.0 - (z / softcap).square())
        row_scale = torch.where(valid, grad_scale.to(acc), 0.0)
        logits.copy_(grad * row_scale.unsqueeze(-1))
    return loss


@cross_entropy_chunk_.register_fake
def _(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap, write_grad):
    return logits.new_empty(logits.shape[:1], dtype=_acc(logits))


# ------------------------------------------------------------------------------------- chunk loop

def _chunked(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], grad_scale: Tensor,
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
             memory_budget: int, grad_hidden: bool, grad_weight: bool,
             grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss rows and the requested gradients (``grad_scale`` times those of the loss rows' sum,
    empty tensors for the others), one chunk of tokens at a time."""
    tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc(hidden)
    loss = torch.empty(tokens, dtype=acc, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    # d weight accumulates in the weight's dtype: a float32 accumulator would be 2 GiB at 128k × 4096.
    d_weight = torch.zeros_like(weight) if grad_weight else weight.new_empty(0)
    d_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if grad_bias else hidden.new_empty(0)
    write = grad_hidden or grad_weight or grad_bias
    rows = chunk_rows(vocab, hidden.element_size(), memory_budget)
    for start in range(0, tokens, rows):
        end = min(start + rows, tokens)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        scale = grad_scale if grad_scale.dim() == 0 else grad_scale[start:end]
        loss[start:end] = cross_entropy_chunk_(logits, target[start:end], scale, ignore_index, label_smoothing,
                                               z_loss, softcap, write)
        if grad_hidden:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_weight:
            d_weight.addmm_(logits.t(), h)
        if grad_bias:
            d_bias += logits.sum(0, dtype=acc)
        # Freed before the next chunk's GEMM allocates its own: otherwise two chunks are live there.
        del logits
    if grad_bias:
        d_bias = d_bias.to(bias.dtype)
    return loss, d_hidden, d_weight, d_bias


def _mean_scale(target: Tensor, ignore_index: int, num_items_in_batch: Optional[Tensor],
                dtype: torch.dtype) -> Tensor:
    """1 / (number of counted tokens), as a device tensor (no host sync); 0 when there are none, so that
    an all-ignored batch gives loss 0 and zero gradients instead of 0/0."""
    count = (target != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    count = count.to(dtype)
    return torch.where(count != 0, 1.0 / count, 0.0)


@metalcore_op("fused_linear_cross_entropy_fwd")
def fused_linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], num_items_in_batch: Optional[Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
    memory_budget: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, d hidden, d weight, d bias)`` for ``hidden`` (N, H), ``weight`` (V, H), ``target`` (N,).

    ``loss`` is float32 (float64): 0-d, or (N,) for ``reduction="none"``. The gradients are those of
    ``loss`` (for ``"mean"``/``"sum"``) where the matching ``grad_*`` flag is set, empty otherwise; with
    ``"none"`` none is computed here (the backward recomputes them, see the module docstring).
    """
    acc = _acc(hidden)
    if reduction == "none":
        grad_hidden = grad_weight = grad_bias = False
    if reduction == "mean":
        scale = _mean_scale(target, ignore_index, num_items_in_batch, acc)
    else:
        scale = torch.ones((), dtype=acc, device=hidden.device)
    loss, d_hidden, d_weight, d_bias = _chunked(
        hidden, weight, target, bias, scale, ignore_index, label_smoothing, z_loss, softcap, memory_budget,
        grad_hidden, grad_weight, grad_bias and bias is not None)
    if reduction != "none":
        loss = loss.sum() * scale
    return loss, d_hidden, d_weight, d_bias


@fused_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, target, bias, num_items_in_batch, ignore_index, label_smoothing, z_loss, softcap, reduction,
      memory_budget, grad_hidden, grad_weight, grad_bias):
    keep = reduction != "none"
    loss = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=_acc(hidden))
    return (loss,
            hidden.new_empty(hidden.shape if keep and grad_hidden else (0,)),
            weight.new_empty(weight.shape if keep and grad_weight else (0,)),
            hidden.new_empty((weight.shape[0],) if keep and grad_bias and bias is not None else (0,),
                             dtype=bias.dtype if bias is not None else hidden.dtype))


@metalcore_op("fused_linear_cross_entropy_bwd")
def fused_linear_cross_entropy_bwd(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: Optional[float], memory_budget: int, grad_hidden: bool,
    grad_weight: bool, grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``Σ grad_loss · loss_rows`` (``reduction="none"``), recomputing each chunk."""
    scale = grad_loss.to(_acc(hidden)).contiguous()
    _, d_hidden, d_weight, d_bias = _chunked(
        hidden, weight, target, bias, scale, ignore_index, label_smoothing, z_loss, softcap, memory_budget,
        grad_hidden, grad_weight, grad_bias and bias is not None)
    return d_hidden, d_weight, d_bias


@fused_linear_cross_entropy_bwd.register_fake
def _(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, memory_budget,
      grad_hidden, grad_weight, grad_bias):
    return (hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,)),
            hidden.new_empty((weight.shape[0],) if grad_bias and bias is not None else (0,),
                             dtype=bias.dtype if bias is not None else hidden.dtype))


def _setup(ctx, inputs, output):
    (hidden, weight, target, bias, _items, ignore_index, label_smoothing, z_loss, softcap, reduction,
     memory_budget, *_flags) = inputs
    ctx.reduction = reduction
    ctx.mark_non_differentiable(*output[1:])
    # The backward reads only the loss's gradient. Materialized, the gradients of the other outputs
    # would be zero tensors of their shapes, i.e. a second d weight and d hidden (1.07 GiB at
    # 128k × 4096 bf16, 8192 tokens) allocated while the real ones are alive: that doubled the peak.
    ctx.set_materialize_grads(False)
    if reduction == "none":
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, memory_budget)
        ctx.save_for_backward(hidden, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_):
    wants = ctx.needs_input_grad
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        grads = fused_linear_cross_entropy_bwd(grad_loss, hidden, weight, target, bias, *ctx.options,
                                               wants[0], wants[1], wants[3])
    else:
        saved = ctx.saved_tensors
        if type(grad_loss) is torch.Tensor and not torch._C._len_torch_dispatch_stack():
            # Eager: scaled in place, so that a second d weight (1 GiB at 128k × 4096 bf16) never
            # exists. Autograd's version check refuses a second backward over these (retain_graph),
            # which would scale them twice.
            grads = tuple(g.mul_(grad_loss) for g in saved)
        else:
            # Traced (torch.compile, AOT): the graph is functional, so say it out of place.
            grads = tuple((g * grad_loss).to(g.dtype) for g in saved)
    d_hidden, d_weight, d_bias = (g if want and g.numel() else None for g, want in zip(grads, (wants[0], wants[1], wants[3])))
    return d_hidden, d_weight, None, d_bias, None, None, None, None, None, None, None, None, None, None


fused_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------- public API

def _check_options(ignore_index, label_smoothing, reduction, softcap, z_loss, memory_budget) -> None:
    if not isinstance(ignore_index, int):
        raise TypeError(f"{_FN}: ignore_index must be an int; got {type(ignore_index).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_FN}: label_smoothing must be in [0, 1]; got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_FN}: reduction must be one of {', '.join(map(repr, _REDUCTIONS))}; got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{_FN}: softcap must be positive or None; got {softcap}")
    if not z_loss >= 0:
        raise ValueError(f"{_FN}: z_loss must be >= 0; got {z_loss}")
    if not (isinstance(memory_budget, int) and memory_budget > 0):
        raise ValueError(f"{_FN}: memory_budget must be a positive number of bytes; got {memory_budget!r}")


def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None, z_loss: float = 0.0,
    num_items_in_batch: Optional[Tensor | int | float] = None, memory_budget: Optional[int] = None,
) -> Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias), target, ...)`` without materializing the logits.

    ``hidden``: ``(*, H)`` fp32/bf16/fp16/fp64; ``weight``: ``(V, H)`` and ``bias``: ``(V,)``, same dtype;
    ``target``: ``(*)`` integer class indices (``ignore_index`` entries are skipped).

    * ``reduction``: ``"mean"`` over the tokens that are not ignored, ``"sum"``, or ``"none"`` (one loss
      per token, shape ``target.shape``). An all-ignored batch gives 0 (torch's ``"mean"`` gives NaN).
    * ``num_items_in_batch``: Hugging Face's gradient-accumulation count: the loss is
      ``sum / num_items_in_batch`` (only with ``reduction="mean"``, whose denominator it replaces).
    * ``label_smoothing``: as ``F.cross_entropy``; ``z_loss``: adds ``z_loss · logsumexp(logits)²`` per
      token (PaLM); ``softcap``: logits become ``softcap · tanh(logits / softcap)`` (Gemma 2/3's
      ``final_logit_softcapping``).
    * ``memory_budget``: bytes for one chunk's logits (default :data:`DEFAULT_MEMORY_BUDGET`); the
      number of tokens per chunk follows from it and the vocabulary size.

    Returns a float32 loss (float64 for float64 inputs). Under autocast, ``hidden``, ``weight`` and
    ``bias`` are cast to the autocast dtype first, as the LM-head ``Linear`` would be.

    >>> loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, labels[:, 1:])
    >>> loss.backward()
    """
    hidden = check_tensor(_FN, "hidden", hidden, dtypes=FLOAT_DTYPES, min_dim=1)
    weight = check_tensor(_FN, "weight", weight, dtypes=FLOAT_DTYPES)
    if bias is not None:
        check_tensor(_FN, "bias", bias, dtypes=FLOAT_DTYPES)
    check_tensor(_FN, "target", target, dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))
    check_same_device(_FN, hidden=hidden, weight=weight, target=target, bias=bias)
    memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    _check_options(ignore_index, label_smoothing, reduction, softcap, z_loss, memory_budget)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    check_same_dtype(_FN, hidden=hidden, weight=weight, bias=bias)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{_FN}: weight must have shape (V, {hidden.shape[-1]}) with V >= 1 to match hidden "
                         f"{tuple(hidden.shape)}; got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_FN}: bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_FN}: target must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension); got {tuple(target.shape)}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"{_FN}: num_items_in_batch replaces the mean's denominator and needs "
                             f"reduction='mean'; got reduction={reduction!r}")
        num_items_in_batch = torch.as_tensor(num_items_in_batch, device=hidden.device).reshape(())

    grad = torch.is_grad_enabled()
    with torch.autocast(device, enabled=False):
        loss, *_ = fused_linear_cross_entropy_fwd(
            hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1).long(), bias, num_items_in_batch,
            ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
            reduction, memory_budget, grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad)
    return loss.view(target.shape) if reduction == "none" else loss


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: ``loss_fn(hidden, weight, target, bias=None)``.

    >>> loss_fn = FusedLinearCrossEntropyLoss(ignore_index=-100, softcap=30.0)
    >>> loss = loss_fn(hidden, model.lm_head.weight, labels)
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, z_loss: float = 0.0, memory_budget: Optional[int] = None):
        super().__init__()
        _check_options(ignore_index, label_smoothing, reduction, softcap, z_loss,
                       DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.z_loss = z_loss
        self.memory_budget = memory_budget

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                num_items_in_batch: Optional[Tensor | int | float] = None) -> Tensor:
        return fused_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            reduction=self.reduction, softcap=self.softcap, z_loss=self.z_loss,
            num_items_in_batch=num_items_in_batch, memory_budget=self.memory_budget)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        parts += [f"{k}={getattr(self, k)}" for k in ("label_smoothing", "softcap", "z_loss", "memory_budget")
                  if getattr(self, k)]
        return ", ".join(parts)
