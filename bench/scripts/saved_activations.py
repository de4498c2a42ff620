"""Bytes each decoder layer keeps for the backward: a Llama model unpatched against ``patch_model``.

    python bench/scripts/saved_activations.py [--tokens 8192] [--dtype bfloat16]

Counted exactly, on the CPU (saved tensors do not depend on the device): every tensor that autograd
saves during the forward is recorded through ``torch.autograd.graph.saved_tensors_hooks``, by
storage (a tensor saved twice, or two views of one buffer, count once), parameters excluded.
Per-layer bytes are the whole model's minus those of a copy with one layer fewer, so embedding,
final norm and LM head (and the RoPE ``cos``/``sin``, shared by all layers) drop out. The model is
the 0.85B-class Llama of ``hf_throughput.py`` (hidden 2048, intermediate 5632, 32/8 heads) with
two or three layers; ``--tokens`` is batch × sequence (one sequence). Attention stays torch's SDPA in
every variant: on the CPU metalcore's attention runs its reference, which saves more than the
flash kernel of the GPU would (the attention's saved tensors are the same on both paths there:
q, k, v, output and the log-sum-exp).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from metalcore.patch import patch_model  # noqa: E402


def saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def build(layers, dtype, **patch):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).train()
    if patch.pop("patched"):
        patch_model(model, **patch)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(0, 256, (1, args.tokens))
    variants = {
        "unpatched": dict(patched=False),
        "patched": dict(patched=True, attention=False),
        "patched, norms only": dict(patched=True, activations=False, rope=False, attention=False, cross_entropy=False),
        "patched, mlp only": dict(patched=True, rms_norm=False, rope=False, attention=False, cross_entropy=False),
        "patched, rope only": dict(patched=True, rms_norm=False, activations=False, attention=False,
                                   cross_entropy=False),
    }
    print(f"{args.tokens} tokens, {args.dtype}: bytes saved for backward per decoder layer")
    for name, patch in variants.items():
        per_layer = []
        for layers in (2, 3):
            per_layer.append(saved_bytes(build(layers, dtype, **dict(patch)), ids))
        layer = per_layer[1] - per_layer[0]
        print(f"  {name:>20}: {layer / 2**20:8.1f} MiB  ({layer / args.tokens:8.0f} bytes/token)")


if __name__ == "__main__":
    main()
