"""Pre-train a small decoder-only language model from scratch with metalcore, one run per optimizer,
and plot their loss curves on one chart.

    python recipes/pretrain_gpt.py                            # offline: MetalAdamW vs metalcore's Muon, several minutes on 2 cores (Muon's bf16 Newton–Schulz is slow on a CPU)
    python recipes/pretrain_gpt.py --device cuda --steps 300  # 300-step AdamW vs Muon curves on a GPU
    python recipes/pretrain_gpt.py --optimizers adamw --steps 2000 --device auto

The text is the standard library's docstrings (recipes/common.py), tokenised with a byte-level BPE
trained locally, concatenated with an end-of-text token and cut into ``--seq-len`` windows. The model
is a Llama-architecture GPT built from a ``LlamaConfig`` and patched with
``metalcore.patch.patch_model``. Every optimizer starts from the same initial weights and sees the
same batches, so the curves differ only by the optimizer:

* ``adamw``: ``metalcore.optim.MetalAdamW`` on every parameter;
* ``muon``: ``metalcore.optim.MuonWithAuxAdamW`` over ``metalcore.optim.muon_param_groups(model)``:
  Muon (Newton–Schulz orthogonalised momentum, same-shape matrices in one batched call;
  ``adjust_lr_fn="match_rms_adamw"`` so one learning rate suits both) on the hidden 2-D weight
  matrices, AdamW on the embeddings (tied with the output head), norms and biases — the usual split,
  one optimizer object;
* ``soap``: ``metalcore.optim.SOAP`` on every parameter (bases refreshed every 10 steps; dimensions
  above 2048 — the vocabulary side of the embedding — stay diagonal);
* ``shampoo``: ``metalcore.optim.Shampoo`` on every parameter (blocks of 1024, inverse roots every
  10 steps from step 10, Adam grafting with AdamW's betas);
* ``heavyball_soap``: heavyball's ``SOAP`` with the same hyperparameters, eager, as the peer
  implementation to compare the ``soap`` curve with (needs ``pip install heavyball``).

Training runs in fp32 on every device (the default model is small enough that a 300-step run takes
well under a minute on a GPU; Muon's iteration is bf16 internally either way).

Outputs in ``--out``: ``loss_curves.png`` and ``summary.json``, both written atomically. There is no
resumption here (runs are minutes long); recipes/finetune.py shows the checkpointing pattern.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (imports no torch: arguments are checked before anything slow)
import distributed  # noqa: E402  (--fsdp: process group, sharding, per-rank reports; imports no torch)

OPTIMIZERS = ("adamw", "muon", "soap", "shampoo", "heavyball_soap")  # the last: a peer, when heavyball is installed


def parse_args(argv=None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", default="adamw,muon", help=f"comma-separated: {', '.join(OPTIMIZERS)}")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpus-bytes", type=int, default=3_000_000)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/pretrain_gpt")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--fsdp", action="store_true",
                   help="shard each model with FSDP2 over the processes started by torchrun (NCCL on CUDA, gloo on "
                        "the CPU); --batch-size is per process (recipes/distributed.py)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before anything slow: one line naming the first bad one."""
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if not names or unknown:
        common.fail(f"--optimizers: unknown or empty {unknown or args.optimizers!r}; choose from {', '.join(OPTIMIZERS)}")
    args.optimizer_names = names
    common.check_at_least(args, {"steps": 1, "batch_size": 1, "seq_len": 8, "warmup": 0, "hidden_size": 16,
                                 "layers": 1, "vocab_size": 262, "corpus_bytes": 10_000, "eval_every": 1,
                                 "threads": 1, "seed": 0})
    common.check_positive_float(args, ["lr"])
    heads = max(1, args.hidden_size // 64)
    common.check_llama_shape(args.hidden_size, heads, heads)
    common.check_device(args.device)


def token_stream(args, out: Path) -> torch.Tensor:
    """All documents as one 1-D tensor of token ids, each followed by the end-of-text token."""
    import torch

    records = common.stdlib_docstrings(args.corpus_bytes)
    texts = [f"{r.name}{r.signature}\n{r.doc}" for r in records]
    tokenizer = common.load_or_train_tokenizer(lambda: texts, args.vocab_size,
                                               common.tokenizer_dir(out, args.vocab_size, args.corpus_bytes))
    ids = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long), len(tokenizer)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = (len(stream) - 1) // seq_len
    return stream[: n * seq_len + 1], n


def make_optimizer(name: str, model, args):
    from metalcore.optim import SOAP, MetalAdamW, MuonWithAuxAdamW, Shampoo, muon_param_groups

    if name == "adamw":
        return [MetalAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)]
    if name == "muon":
        groups = muon_param_groups(model, lr=args.lr, adamw_lr=args.lr, weight_decay=0.1, adamw_betas=(0.9, 0.95),
                                   adjust_lr_fn="match_rms_adamw")
        return [MuonWithAuxAdamW(groups)]
    if name == "soap":
        return [SOAP(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, precondition_frequency=10,
                     max_precond_dim=2048)]
    if name == "shampoo":
        return [Shampoo(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, precondition_frequency=10,
                        max_preconditioner_dim=1024, grafting="adam", grafting_beta2=0.95)]
    if name == "heavyball_soap":  # the peer SOAP, same hyperparameters, eager (no minutes of compiling)
        try:
            import heavyball
        except ImportError:
            common.fail("--optimizers heavyball_soap needs the heavyball package (pip install heavyball)")
        heavyball.utils.compile_mode = None
        return [heavyball.SOAP(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                               precondition_frequency=10, max_precond_dim=2048)]
    raise ValueError(f"unknown optimizer {name!r}")  # check_args admits only OPTIMIZERS


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def evaluate(model, data, starts, args, device) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for b in range(0, len(starts), args.batch_size):
            x = torch.stack([data[s: s + args.seq_len + 1] for s in starts[b: b + args.batch_size]]).to(device)
            losses.append(float(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss))
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ranks = distributed.setup(args.device) if args.fsdp else None
    if ranks and not ranks.is_main:
        args.quiet = True  # one voice: rank 0 prints and writes the summary
    try:
        return train_all(args, ranks)
    except KeyboardInterrupt:
        print("\ninterrupted; this recipe keeps no checkpoint (runs are minutes long): rerun the same command to "
              "start over", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if ranks:
            distributed.teardown()


def train_all(args, ranks=None) -> dict:
    """Every optimizer's run; ``ranks`` (recipes/distributed.py) when sharded with --fsdp."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import metalcore.patch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not ranks or ranks.is_main:
        common.remove_orphans(out)
    device = ranks.device if ranks else common.pick_device(args.device)
    world, rank = (ranks.world_size, ranks.rank) if ranks else (1, 0)
    if device.type == "cpu":
        torch.set_num_threads(common.threads_for(args.threads))
    with distributed.main_first(ranks) if ranks else contextlib.nullcontext():
        stream, vocab = token_stream(args, out)
    data, n_windows = windows(stream, args.seq_len)
    # Fixed held-out windows (every 20th), the rest for training, in one seeded order for all runs.
    heldout = [i * args.seq_len for i in range(0, n_windows, 20)][:32]
    train = [i * args.seq_len for i in range(n_windows) if i % 20]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()

    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden_size,
                         intermediate_size=int(args.hidden_size * 8 / 3) // 16 * 16, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden_size // 64), num_key_value_heads=max(1, args.hidden_size // 64),
                         max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    initial = LlamaForCausalLM(config)
    curves, summary = {}, {"tokens_per_step": args.batch_size * args.seq_len}
    for name in args.optimizer_names:
        model = copy.deepcopy(initial).to(device).train()
        metalcore.patch.patch_model(model)
        if ranks:
            distributed.shard(model, ranks)  # after patch_model: FSDP2 wraps the forwards that will run
        optimizers = make_optimizer(name, model, args)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_curve, eval_curve, seconds = [], [(0, evaluate(model, data, heldout, args, device))], 0.0
        bar = tqdm(range(args.steps), desc=name, disable=args.quiet, dynamic_ncols=True)
        for step in bar:
            # Each step draws world × batch windows; this rank trains on its slice of them.
            idx = [order[((step * world + rank) * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
            x = torch.stack([data[train[i]: train[i] + args.seq_len] for i in idx]).to(device)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, args)
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            value = distributed.mean_across(loss, ranks) if ranks else float(loss.detach())
            seconds += time.perf_counter() - t0
            train_curve.append((step + 1, value))
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{(step + 1) * args.batch_size * args.seq_len / seconds:,.0f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                eval_curve.append((step + 1, evaluate(model, data, heldout, args, device)))
        curves[name] = {"train": train_curve, "eval": eval_curve}
        summary[name] = {"optimizers": [type(opt).__name__ for opt in optimizers],
                         "initial_eval_loss": eval_curve[0][1], "final_eval_loss": eval_curve[-1][1],
                         "final_train_loss": sum(v for _, v in train_curve[-10:]) / len(train_curve[-10:]),
                         "tokens_per_second": args.steps * args.batch_size * args.seq_len / seconds,
                         # peak allocator memory on CUDA; on other devices the memory in use at the end
                         "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                               else common.current_memory(device))}
    if ranks:
        summary["world_size"] = world
        summary["ranks"] = distributed.gather_stats({
            "tokens_per_second": sum(summary[n]["tokens_per_second"] for n in curves) / len(curves),
            "peak_memory_bytes": max(summary[n]["peak_memory_bytes"] for n in curves)}, ranks)
        if not ranks.is_main:
            return summary
    png = out / "loss_curves.png"
    common.plot_losses(curves, png, f"Pre-training a {sum(p.numel() for p in initial.parameters()) / 1e6:.1f}M-parameter "
                       "GPT (Llama architecture), metalcore-patched")
    summary["loss_curves"] = str(png)
    common.write_json_atomic(summary, out / "summary.json")
    if not args.quiet:
        for name in curves:
            s = summary[name]
            print(f"{name:>7}: eval loss {s['final_eval_loss']:.3f} (step 0: {s['initial_eval_loss']:.3f}), train loss {s['final_train_loss']:.3f} "
                  f"(last 10 steps), {s['tokens_per_second']:,.0f} tokens/s")
        print(f"loss curves: {png}")
        if ranks:
            print(f"per rank ({world} processes, FSDP2; tokens/s averaged over the optimizers):\n"
                  f"{distributed.format_ranks(summary['ranks'])}")
    return summary


if __name__ == "__main__":
    main()
    if "LOCAL_RANK" in os.environ:  # a rank under torchrun (--fsdp): see distributed.exit_cleanly
        distributed.exit_cleanly()
