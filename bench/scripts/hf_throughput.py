"""Issue 8's benchmark: training throughput and peak memory of a ~1B-parameter Llama, one process,
four configurations measured back to back on the same GPU:

* ``unpatched``: transformers' model with sdpa attention;
* ``metalcore``: the same model after ``metalcore.patch.patch_model`` (its training loss from the
  fused linear cross-entropy: no logits);
* ``metalcore_no_flce``: the same with ``patch_model(cross_entropy=False)`` (materialized logits and
  Hugging Face's loss), which isolates the fused loss's share of time and memory;
* ``metalcore_no_recompute``: the same with ``patch_model(recompute_norms=False)`` (the RMSNorm
  outputs kept for the backward instead of recomputed there): the recompute's saving and its time;
* ``metalcore_torch_adamw``: ``metalcore`` with torch's fused AdamW, as the baselines use: MetalAdamW
  keeps float32 moments for bf16 parameters (8 B a parameter against torch's 4), 3.2 GiB more at
  853M parameters, which this row takes out of the comparison;
* ``liger``: the same model class after Liger Kernel's ``apply_liger_kernel_to_llama`` (skipped, and
  said so, when ``liger_kernel`` is not importable).

Model: LlamaConfig(hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 5632, vocab 32000 or
``--vocab``, e.g. 128256 for Llama 3's tokenizer) ≈ 1.1B parameters at 32k, random init, bf16 weights,
sequence 2048, AdamW (torch fused for the baselines; MetalAdamW for metalcore unless
``--optimizer torch``), activation memory as in training (no checkpointing). Each configuration:
``--warmup`` steps, then ``--steps`` timed with CUDA events;
the median step gives tokens/s; peak memory is ``torch.cuda.max_memory_allocated`` after a reset;
``state`` is the memory allocated between steps (parameters and optimizer state: gradients are set to
None), so ``peak - state`` is what the step itself adds (activations, gradients, workspaces).

    python bench/scripts/hf_throughput.py --json out.json           # on the H100
    python bench/scripts/hf_throughput.py --vocab 128256 --seq-len 4096 --batch-size 2 --json out.json
    python bench/scripts/hf_throughput.py --tiny --device cpu       # smoke test of the script itself

Liger on the device machine travels as a wheel (see the device README): in the repo root,
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux2014_x86_64 -d .whl liger-kernel==<version>`` and start the command with the
``pip install --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`` line given there.
Targets (issue 8): metalcore ≥ 1.25× unpatched tokens/s, ≥ Liger's, peak memory ≤ unpatched.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(vocab_size=args.vocab or 512, hidden_size=128, intermediate_size=352,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=args.seq_len)
    else:
        cfg = LlamaConfig(vocab_size=args.vocab or 32000, hidden_size=2048, intermediate_size=5632,
                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=args.seq_len,
                          tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


# metalcore configurations: patch_model's options, and whether the optimizer is always torch's.
METALCORE = {"metalcore": ({}, False), "metalcore_no_flce": (dict(cross_entropy=False), False),
             "metalcore_no_recompute": (dict(recompute_norms=False), False), "metalcore_torch_adamw": ({}, True)}


def measure(name, args, device):
    if name == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Liger patches transformers' Llama classes globally: build the model after patching, and run
        # this configuration last (main() orders it so), as nothing un-does it.
        apply_liger_kernel_to_llama()
    model = build(args, device).train()
    note = ""
    if name in METALCORE:
        import metalcore.patch

        report = metalcore.patch.patch_model(model, **METALCORE[name][0])
        note = str(report).splitlines()[0]
    if name in METALCORE and args.optimizer == "metalcore" and not METALCORE[name][1]:
        from metalcore.optim import MetalAdamW

        opt = MetalAdamW(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # Untimed, so read on the host: every configuration starts from the same weights and batch, so the
    # first loss is the same forward and the later ones follow the gradients (a broken backward shows).
    warmup_losses = [step().item() for _ in range(args.warmup)]
    times = []
    state = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        state = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated()
    else:
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        peak = 0
    median = statistics.median(times)
    result = {"tokens_per_second": args.batch_size * args.seq_len / median, "median_step_s": median,
              "peak_memory_bytes": peak, "state_memory_bytes": state,
              "params": sum(p.numel() for p in model.parameters()), "optimizer": type(opt).__name__,
              "warmup_losses": warmup_losses, "note": note}
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--optimizer", choices=["metalcore", "torch"], default="metalcore",
                   help="AdamW of the metalcore configuration (torch: fused torch AdamW, to isolate the patch)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000; --tiny: 512)")
    p.add_argument("--configs", default="unpatched,metalcore,metalcore_no_flce,metalcore_no_recompute,"
                                        "metalcore_torch_adamw,liger")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, to check the script anywhere")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    import transformers

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
           "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except ImportError:
        env["liger_kernel"] = None
    configs = [c for c in args.configs.split(",") if c != "liger"] + (["liger"] if "liger" in args.configs else [])
    results = {}
    for name in configs:
        if name == "liger" and env["liger_kernel"] is None:
            results[name] = {"skipped": "liger_kernel is not installed"}
            continue
        results[name] = measure(name, args, device)
    base = results["unpatched"]
    print(f"{env}\nbatch {args.batch_size} x seq {args.seq_len}, vocab {args.vocab or 'default'}, "
          f"median of {args.steps} steps")
    gib = 2**30
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:>22}: skipped ({r['skipped']})")
            continue
        mem = r["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] else float("nan")
        step = r["peak_memory_bytes"] - r["state_memory_bytes"]
        base_step = base["peak_memory_bytes"] - base["state_memory_bytes"]
        speed = r["tokens_per_second"] / base["tokens_per_second"]
        print(f"{name:>22}: {r['tokens_per_second']:>10,.0f} tokens/s  {speed:.2f}x"
              f"   peak {r['peak_memory_bytes'] / gib:6.2f} GiB  {mem:.2f}x"
              f"   state {r['state_memory_bytes'] / gib:5.2f} + step {step / gib:5.2f} GiB"
              f" ({step / base_step if base_step else float('nan'):.2f}x)   {r['optimizer']}"
              f"   warm-up losses {' '.join(f'{v:.5f}' for v in r['warmup_losses'])}   {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
