"""Bytes each decoder layer keeps for the backward: a Llama model unpatched against ``patch_model``.

    python bench/scripts/saved_activations.py [--tokens 2048] [--dtype bfloat16] [--detail]

Counted exactly, on the CPU, as memory: every storage that an op creates during the training
forward is recorded (a ``TorchDispatchMode``), with the module that ran the op (global module
hooks) and the op's name; once the forward has returned, and only the loss is held, the storages
still alive are what the graph keeps for the backward — whoever keeps them (saved tensors, views of
them, metalcore's recompute recipes) — and that is what the GPU run holds at the start of its
backward. Parameters are not created in the forward and do not count. The middle layer of three is
reported, so the RoPE ``cos``/``sin`` (made once, by the model's rotary module), the embedding, the
final norm and the loss head fall outside it.

The model is the 0.85B-class Llama of ``hf_throughput.py`` (hidden 2048, intermediate 5632, 32/8
heads). Patched variants run under ``metalcore.use_backend("reference")``: on the CPU a patched model
otherwise runs its modules' own code (``metalcore.patch.core.OWN_CODE_DEVICES``) and would keep
exactly what the unpatched one keeps. The reference ops are registered with the same autograd as
the Triton kernels (same saved tensors); where the H100 calls torch's own op instead (``F.rms_norm``
at 8192 × 2048 bf16, by the measured selection table) torch saves the same ``x`` and ``rstd``.
Attention is transformers' ``sdpa`` in every variant, as on CUDA (``TORCH_ATTENTION_DEVICES``):
torch's flash kernel for the CPU keeps what CUDA's does — ``q``, ``k``, ``v`` (GQA not expanded,
no mask), the output (shared with ``o_proj``'s input) and an fp32 log-sum-exp per head and token.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import metalcore  # noqa: E402
from metalcore.patch import patch_model  # noqa: E402

LAYER = "model.layers.1"  # the middle one of three

# name -> patch_model options (None: unpatched). Attention stays transformers' sdpa, as on CUDA.
VARIANTS = {
    "unpatched": None,
    "metalcore-no-recompute": dict(attention=False, recompute_norms=False),
    "metalcore": dict(attention=False),
    "norms-only": dict(activations=False, rope=False, attention=False, cross_entropy=False),
    "norms-only-no-recompute": dict(activations=False, rope=False, attention=False, cross_entropy=False,
                                    recompute_norms=False),
    "mlp-only": dict(rms_norm=False, rope=False, attention=False, cross_entropy=False),
    "rope-only": dict(rms_norm=False, activations=False, attention=False, cross_entropy=False),
}


class _Allocations(TorchDispatchMode):
    """Every storage created by an op: (weak reference, bytes, module path, op, shape, dtype)."""

    def __init__(self, where: list[str], exclude: set[int]):
        super().__init__()
        self.where, self.exclude, self.made = where, exclude, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel():
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                seen = self.made.get(ptr)
                # The first op to output a storage made it (later ones return views or write in place),
                # unless that storage has died and the allocator handed its address out again.
                if ptr not in self.exclude and (seen is None or seen[0].expired()):
                    self.made[ptr] = (StorageWeakRef(storage), storage.nbytes(), self.where[-1], func.__name__,
                                      tuple(t.shape), t.dtype)
        return out


@contextlib.contextmanager
def _module_paths(model, where: list[str]):
    names = {m: n for n, m in model.named_modules()}

    def enter(module, args):
        where.append(names.get(module, where[-1]))

    def leave(module, args, out):
        where.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def kept(model, ids) -> list[tuple]:
    """Storages made in the forward and alive after it: (bytes, module path, op, shape, dtype)."""
    where = ["(outside)"]
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with _module_paths(model, where), _Allocations(where, state) as mode:
        loss = model(input_ids=ids, labels=ids).loss
    alive = [(nbytes, path, op, shape, dtype) for ref, nbytes, path, op, shape, dtype in mode.made.values()
             if not ref.expired()]
    del loss
    return alive


def build(dtype, patch):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=3,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).train()
    if patch is not None:
        patch_model(model, **patch)
    return model


def layer_bytes(alive, tokens: int) -> dict[tuple, int]:
    """Bytes per token of the middle layer, by (module relative to the layer, op, shape, dtype)."""
    rows: dict[tuple, int] = defaultdict(int)
    for nbytes, path, op, shape, dtype in alive:
        if path == LAYER or path.startswith(LAYER + "."):
            rows[(path[len(LAYER) + 1:] or "(layer)", op, shape, str(dtype).replace("torch.", ""))] += nbytes
    return {k: v // tokens for k, v in rows.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--detail", action="store_true", help="list every kept tensor of the layer")
    p.add_argument("--predict", default="8192x16", help="tokens x layers for the GiB column (H100 run: 4 x 2048, 16)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(0, 256, (1, args.tokens))
    tokens_at, layers_at = map(int, args.predict.split("x"))
    print(f"{args.tokens} tokens, {args.dtype}: bytes kept for the backward per decoder layer "
          f"(GiB at {tokens_at} tokens x {layers_at} layers)")
    totals = {}
    for name in args.variants.split(","):
        patch = VARIANTS[name]
        model = build(dtype, patch)
        with metalcore.use_backend("reference") if patch is not None else contextlib.nullcontext():
            rows = layer_bytes(kept(model, ids), args.tokens)
        total = totals[name] = sum(rows.values())
        print(f"  {name:>24}: {total:8,d} bytes/token  ({total * tokens_at * layers_at / 2**30:5.2f} GiB)")
        if args.detail:
            for (module, op, shape, dt), b in sorted(rows.items(), key=lambda kv: -kv[1]):
                print(f"      {b:7,d}  {module:<26} {op:<34} {str(shape):<20} {dt}")
    if "unpatched" in totals:
        for name, total in totals.items():
            print(f"  {name:>24}: {total / totals['unpatched']:.3f} x unpatched")


if __name__ == "__main__":
    main()
