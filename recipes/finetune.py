"""Supervised fine-tuning of a causal language model with metalcore patched in.

    python recipes/finetune.py                        # offline demo: ~4 min on 2 CPU cores
    python recipes/finetune.py --compare              # both sides from step 0, patched and plain PyTorch: speed and memory ratios
    python recipes/finetune.py --model PATH --device auto --steps 1000 --batch-size 16 --seq-len 512

The default needs no download: the data are instruction pairs built from the docstrings of Python's
standard library ("Explain what `json.dumps(...)` does." → its docstring), the tokenizer is a byte-level
BPE trained on them with ``tokenizers``, and the model is a small Llama built from a ``LlamaConfig``
(random initialisation: the demo teaches it the task and the language from scratch). With ``--model``
any local Hugging Face checkpoint (and its tokenizer) is fine-tuned instead.

The loss is computed on the response tokens only (prompt and padding are labelled -100). The mean loss
on a held-out split (1 example in 20, fixed by hash) is measured before the first step and every
``--eval-every`` steps; a greedy answer to one held-out prompt is generated before training and after.
Checkpoints (model, optimizer, every RNG, step, data position, loss history) are written atomically
with a checksum to ``OUT/checkpoint.pt``; rerunning the same command resumes from it. The loss curves
go to ``OUT/loss_curve.png``, a summary to ``OUT/summary.json`` and the final model to ``OUT/final/``
(loadable with ``--model OUT/final``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the recipes' shared helpers, next to this file; imports no torch)
import distributed  # noqa: E402  (--fsdp: process group, sharding, DCP checkpoints; imports no torch)

# Arguments that define the run: a checkpoint written under other values is refused, not resumed.
_RUN_DEFINING = ("model", "seed", "batch_size", "seq_len", "lr", "optimizer", "warmup", "weight_decay", "vocab_size",
                 "hidden_size", "layers", "corpus_bytes", "steps", "no_patch", "fsdp")
# The default model's positions; --seq-len beyond it would index past the RoPE table.
DEFAULT_MAX_POSITIONS = 1024
SAMPLE_TOKENS = 32


def parse_args(argv=None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (or a cached hub name) to "
                   "fine-tune (default: a small Llama built from a config, with a tokenizer trained locally)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="examples are truncated to this many tokens")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up, cosine decay to 10%%)")
    p.add_argument("--warmup", type=int, default=16, help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--optimizer", choices=["adamw"], default="adamw", help="adamw: metalcore.optim.MetalAdamW")
    p.add_argument("--out", default="runs/finetune", help="output folder (checkpoint, PNG, summary, final model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--compare", action="store_true",
                   help="train two fresh runs in OUT/compare/: the patched model with MetalAdamW and the unpatched "
                        "one with torch.optim.AdamW (same seed, data and initial weights), and print the speed and "
                        "memory ratios, both measured in this process")
    p.add_argument("--no-patch", action="store_true", help="train without metalcore (the baseline)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 over the processes started by torchrun (NCCL on CUDA, gloo on "
                        "the CPU); --batch-size is per process; checkpoints through torch.distributed.checkpoint "
                        "(recipes/distributed.py)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    # Size of the default model and tokenizer (ignored with --model).
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--corpus-bytes", type=int, default=3_000_000, help="cap on the docstring text collected")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (as if killed) after this step, having saved a checkpoint; for testing resumption")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: every core, or 1 when the machine is already busy; see threads_for)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before anything slow: one line naming the first bad one."""
    common.check_at_least(args, {"steps": 1, "batch_size": 1, "seq_len": 8, "warmup": 0, "eval_every": 1,
                                 "eval_batches": 1, "save_every": 1, "corpus_bytes": 10_000, "stop_after": 1,
                                 "threads": 1, "seed": 0})
    common.check_positive_float(args, ["lr"])
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        common.fail(f"--weight-decay must be a finite number >= 0; got {args.weight_decay}")
    if args.compare and args.no_patch:
        common.fail("--compare already trains the unpatched side; drop --no-patch")
    if args.compare and args.fsdp:
        common.fail("--compare runs both sides in one process; with --fsdp run the two sides separately (--no-patch)")
    if args.model is None:
        # The byte-level alphabet (256) and the 5 special tokens come first; merges need room beyond.
        common.check_at_least(args, {"vocab_size": 262, "hidden_size": 16, "layers": 1})
        common.check_llama_shape(args.hidden_size, *attention_heads(args.hidden_size))
        if args.seq_len > DEFAULT_MAX_POSITIONS:
            common.fail(f"--seq-len must be at most {DEFAULT_MAX_POSITIONS} for the default model; got {args.seq_len}")
    common.check_device(args.device)
    if args.model is not None:
        common.check_model(args.model)


def attention_heads(hidden_size: int) -> tuple[int, int]:
    """Heads of 64 and grouped-query key/value heads of 128 (GQA 2:1), at least one of each."""
    return max(1, hidden_size // 64), max(1, hidden_size // 128)


# ------------------------------------------------------------------------------------------- data

def load_examples(args, data_dir: Path) -> list[dict[str, str]]:
    """The SFT pairs, built once per ``--corpus-bytes`` and cached in ``OUT/data`` (a resumed run
    reuses the same file)."""
    path = data_dir / f"examples-c{args.corpus_bytes}.json"
    if path.exists():
        return json.loads(path.read_text())
    examples = common.sft_examples(common.stdlib_docstrings(args.corpus_bytes))
    common.write_json_atomic(examples, path)
    return examples


def load_model_and_tokenizer(args, data_dir: Path, examples, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        return model.to(device), tokenizer
    tokenizer = common.load_or_train_tokenizer(
        lambda: [common.format_chat(e["prompt"], e["response"]) for e in examples], args.vocab_size,
        common.tokenizer_dir(data_dir, args.vocab_size, args.corpus_bytes))
    heads, kv_heads = attention_heads(args.hidden_size)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=int(args.hidden_size * 8 / 3) // 16 * 16,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=DEFAULT_MAX_POSITIONS, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    return model.to(device), tokenizer


def encode(examples, tokenizer, seq_len: int) -> list[tuple[list[int], int]]:
    """Each example as (token ids, number of prompt tokens), truncated to ``seq_len``; a prompt longer
    than half of it keeps its end (the question's tail and the assistant marker)."""
    eos = tokenizer.eos_token if tokenizer.eos_token else ""
    out = []
    for e in examples:
        prompt = tokenizer(common.format_chat(e["prompt"]), add_special_tokens=False)["input_ids"]
        response = tokenizer(e["response"] + (common.END if common.END in tokenizer.get_vocab() else eos),
                             add_special_tokens=False)["input_ids"]
        prompt = prompt[-(seq_len // 2):]
        ids = (prompt + response)[:seq_len]
        out.append((ids, len(prompt)))
    return out


def collate(batch, pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class Sampler:
    """Epochs of seeded permutations; the position (epoch, index) is all the state there is."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.index])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


# -------------------------------------------------------------------------------------- training

def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class RunResult:
    label: str
    steps: int = 0
    train: list = field(default_factory=list)   # (step, loss)
    eval: list = field(default_factory=list)    # (step, loss); step 0 is the model before training
    sample: dict = field(default_factory=dict)  # greedy answer to one held-out prompt: prompt, before, after
    checkpoint: str = ""
    resumed_from: int = 0
    # Measured in this process only (a resumed run does not inherit the old run's speed or memory):
    tokens: int = 0                             # non-padding input tokens trained on
    train_seconds: float = 0.0                  # time in training steps (excludes evaluation and saving)
    peak_memory: int = 0                        # bytes; see common.current_memory

    @property
    def tokens_per_second(self):
        return self.tokens / self.train_seconds if self.train_seconds else None


def evaluate(model, heldout, args, pad_id, device, autocast) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, min(len(heldout), args.eval_batches * args.batch_size), args.batch_size):
            batch = {k: v.to(device) for k, v in collate(heldout[b: b + args.batch_size], pad_id).items()}
            with autocast():
                loss = model(**batch).loss
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(1, count)


def greedy_answer(model, tokenizer, prompt: str, device, autocast, max_new_tokens: int = SAMPLE_TOKENS,
                  ranks=None) -> str:
    """The model's most likely continuation of the chat-formatted ``prompt`` (no cache: the recipe's
    models are small and the answer short), up to the end-of-turn token."""
    import torch

    ids = tokenizer(common.format_chat(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    stop = tokenizer.eos_token_id
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            with autocast():
                nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            if ranks:  # rank 0's token everywhere: a rank stopping alone would leave the others in a collective
                distributed.broadcast_from_main(nxt)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == stop:
                break
    model.train()
    n_prompt = len(tokenizer(common.format_chat(prompt), add_special_tokens=False)["input_ids"])
    return tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()


def make_optimizer(model, args, patched: bool):
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if patched:
        from metalcore.optim import MetalAdamW

        return MetalAdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def run(args, out_dir: Path, patched: bool, label: str, ranks=None) -> RunResult:
    """One training run; ``ranks`` (recipes/distributed.py) when sharded with --fsdp, else None."""
    import torch
    from tqdm import tqdm

    say = (lambda *a, **k: None) if args.quiet else print
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    device = ranks.device if ranks else common.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(common.threads_for(args.threads))
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.out) / "data"
    with distributed.main_first(ranks) if ranks else contextlib.nullcontext():
        examples = load_examples(args, data_dir)
        torch.manual_seed(args.seed)
        model, tokenizer = load_model_and_tokenizer(args, data_dir, examples, device)
    train_set = encode([e for e in examples if not common.is_heldout(e)], tokenizer, args.seq_len)
    heldout_examples = [e for e in examples if common.is_heldout(e)]
    heldout = encode(heldout_examples, tokenizer, args.seq_len)
    pad_id = tokenizer.pad_token_id
    if not train_set or not heldout:
        common.fail(f"no training or held-out examples ({len(train_set)}/{len(heldout)}): raise --corpus-bytes")

    report = None
    if patched:
        import metalcore.patch

        report = metalcore.patch.patch_model(model)
    if ranks:
        distributed.shard(model, ranks)  # after patch_model: FSDP2 wraps the forwards that will run
    model.train()
    optimizer = make_optimizer(model, args, patched)
    sampler = Sampler(len(train_set), args.seed)
    ckpt_path = out_dir / "checkpoint.pt"
    result = RunResult(label=label, checkpoint=str(ckpt_path))

    run_args = {k: getattr(args, k) for k in _RUN_DEFINING}
    saved_step = 0
    if ckpt_path.exists():
        ckpt = common.load_checkpoint(ckpt_path, device)
        if ckpt["args"] != run_args:
            diff = {k: (ckpt["args"].get(k), v) for k, v in run_args.items() if ckpt["args"].get(k) != v}
            common.fail(f"{ckpt_path} was written by a different run {diff} (checkpoint, now); "
                        "pass another --out or delete it")
        if ranks:
            distributed.load(out_dir / ckpt["dcp"], model, optimizer)
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        sampler = Sampler(len(train_set), args.seed, **ckpt["sampler"])
        common.set_rng_state(ckpt["rng"])
        for k in ("steps", "train", "eval", "sample"):
            setattr(result, k, ckpt["result"][k])
        result.train, result.eval = [tuple(x) for x in result.train], [tuple(x) for x in result.eval]
        result.resumed_from = saved_step = result.steps

    def save() -> None:
        if ranks:
            bad = "of some rank's shard" if distributed.any_nonfinite(model) else None
        else:
            bad = common.first_nonfinite(model.state_dict())
        if bad:
            common.fail(f"[{label}] step {result.steps}: weight {bad} is NaN or infinite (training diverged); the "
                        f"checkpoint of step {saved_step} is kept; lower --lr")
        state = {"sampler": sampler.state(), "rng": common.rng_state(), "args": run_args, "result": asdict(result)}
        if not ranks:
            common.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state},
                                   ckpt_path)
            return
        # The shards go to a folder of their own step, which checkpoint.pt names once it is written:
        # a kill at any point leaves checkpoint.pt and the folder it names consistent.
        folder = f"dcp-step{result.steps:07d}"
        distributed.save(out_dir / folder, model, optimizer, ranks)
        if ranks.is_main:
            common.save_checkpoint({**state, "dcp": folder}, ckpt_path)
            for old in out_dir.glob("dcp-step*"):
                if old.name != folder:
                    shutil.rmtree(old, ignore_errors=True)

    if report is not None and result.resumed_from == 0:
        say(report)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"[{label}] {type(model).__name__} {n_params / 1e6:.1f}M parameters on {device}"
        f"{' (bf16 autocast)' if use_bf16 else ''}; {len(train_set)} train / {len(heldout)} held-out examples"
        + (f"; resuming at step {result.steps}" if result.resumed_from else ""))
    if result.steps == 0:
        # Before any step (outside the timed region): the baseline the eval curve and sample start from.
        result.eval.append((0, evaluate(model, heldout, args, pad_id, device, autocast)))
        prompt = heldout_examples[0]["prompt"]
        result.sample = {"prompt": prompt,
                         "before": greedy_answer(model, tokenizer, prompt, device, autocast, ranks=ranks)}
        say(f"[{label}] step 0: eval loss {result.eval[-1][1]:.3f}")

    bar = tqdm(total=args.steps, initial=result.steps, desc=label, disable=args.quiet, dynamic_ncols=True)
    base_memory = common.current_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while result.steps < args.steps:
            step = result.steps
            world, rank = (ranks.world_size, ranks.rank) if ranks else (1, 0)
            picks = sampler.take(args.batch_size * world)[rank * args.batch_size: (rank + 1) * args.batch_size]
            batch = collate([train_set[i] for i in picks], pad_id)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            t0 = time.perf_counter()
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # One sync per step: the loss is logged every step (with --fsdp, the mean over the ranks).
            loss_value = distributed.mean_across(loss, ranks) if ranks else float(loss.detach())
            result.train_seconds += time.perf_counter() - t0
            result.tokens += int(batch["attention_mask"].sum())
            result.steps = step + 1
            result.train.append((result.steps, loss_value))
            if device.type == "cuda":
                result.peak_memory = max(result.peak_memory, torch.cuda.max_memory_allocated(device))
            else:
                result.peak_memory = max(result.peak_memory, common.current_memory(device) - base_memory)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{result.tokens_per_second:,.0f}")
            last = result.steps == args.steps
            if result.steps % args.eval_every == 0 or last:
                result.eval.append((result.steps, evaluate(model, heldout, args, pad_id, device, autocast)))
                if not args.quiet:
                    bar.write(f"[{label}] step {result.steps}: train loss {loss_value:.3f}, "
                              f"eval loss {result.eval[-1][1]:.3f}")
            stopping = args.stop_after is not None and result.steps >= args.stop_after
            if last:
                result.sample["after"] = greedy_answer(model, tokenizer, result.sample["prompt"], device, autocast,
                                                        ranks=ranks)
            if result.steps % args.save_every == 0 or last or stopping:
                save()
                saved_step = result.steps
            if stopping:
                break
    except KeyboardInterrupt:
        bar.close()
        where = f"step {saved_step} ({ckpt_path})" if saved_step else "step 0 (no checkpoint saved yet)"
        print(f"\n[{label}] interrupted at step {result.steps}; rerun the same command to resume from {where}",
              file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    if result.steps == args.steps:
        full = distributed.full_state_dict(model) if ranks else None  # every rank takes part in the gather
        if report is not None and not ranks:
            report.undo()  # save the plain HF model: patching is a runtime choice, not part of the weights

        def write_final(folder: Path) -> None:
            if ranks:  # the gathered weights in a fresh, unpatched and unsharded model of the same config
                from transformers import AutoModelForCausalLM

                plain = AutoModelForCausalLM.from_config(model.config)
                plain.load_state_dict(full)
                plain.save_pretrained(folder)
            else:
                model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        if not ranks or ranks.is_main:
            common.save_dir_atomic(out_dir / "final", write_final)
    return result


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _fmt_rate(tokens_per_second) -> str:
    return f"{tokens_per_second:,.0f} tokens/s" if tokens_per_second else "no step trained now"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.fsdp:
        return train_and_report(args)
    ranks = distributed.setup(args.device)
    if not ranks.is_main:
        args.quiet = True  # one voice: rank 0 prints and writes the summary
    try:
        return train_and_report(args, ranks)
    finally:
        distributed.teardown()


def train_and_report(args, ranks=None) -> dict:
    out = Path(args.out)
    say = (lambda *a, **k: None) if args.quiet else print
    started = time.time()
    if not ranks or ranks.is_main:
        for path in common.remove_orphans(out):
            say(f"removed {path}, left by a save that was killed")
    if args.compare:
        # Both sides from step 0 in this process: a checkpoint would bring back an old run's speed.
        shutil.rmtree(out / "compare", ignore_errors=True)
        say(f"--compare: training both sides from step 0 in {out / 'compare'} (the checkpoint in {out} is not used)")
        runs = [run(args, out / "compare" / "metalcore", True, "metalcore"),
                run(argparse.Namespace(**{**vars(args), "no_patch": True}), out / "compare" / "pytorch", False, "pytorch")]
    else:
        runs = [run(args, out, not args.no_patch, "pytorch" if args.no_patch else "metalcore", ranks)]
    main_run = runs[0]
    summary = {"steps": main_run.steps, "finished": main_run.steps == args.steps}
    for r in runs:
        summary[r.label] = {
            "final_train_loss": sum(l for _, l in r.train[-10:]) / max(1, len(r.train[-10:])),
            "initial_eval_loss": r.eval[0][1] if r.eval and r.eval[0][0] == 0 else None,
            "final_eval_loss": r.eval[-1][1] if r.eval else None,
            "tokens_per_second": r.tokens_per_second, "peak_memory_bytes": r.peak_memory,
            "measured_steps": [r.resumed_from + 1, r.steps] if r.steps > r.resumed_from else None,
            "sample": r.sample, "checkpoint": r.checkpoint, "resumed_from": r.resumed_from,
        }
    if ranks:
        summary["world_size"] = ranks.world_size
        summary["ranks"] = distributed.gather_stats({"tokens_per_second": main_run.tokens_per_second,
                                                     "peak_memory_bytes": main_run.peak_memory}, ranks)
        if not ranks.is_main:
            return summary
    png = out / "loss_curve.png"
    common.plot_losses({r.label: {"train": r.train, "eval": r.eval} for r in runs}, png,
                       f"SFT of {args.model or 'a small Llama'} on standard-library docstrings")
    summary["loss_curve"] = str(png)
    summary["wall_seconds"] = time.time() - started
    common.write_json_atomic(summary, out / "summary.json")
    if not args.quiet:
        print_summary(args, runs, summary)
        if ranks:
            print(f"per rank ({ranks.world_size} processes, FSDP2):\n{distributed.format_ranks(summary['ranks'])}")
    return summary


def print_summary(args, runs, summary) -> None:
    out, main_run = Path(args.out), runs[0]
    print()
    if not summary["finished"]:
        print(f"Stopped at step {main_run.steps} of {args.steps} (--stop-after); rerun the same command "
              f"without it to resume from {main_run.checkpoint}.")
    for r in runs:
        s = summary[r.label]
        ev = f"{s['final_eval_loss']:.3f}" if s["final_eval_loss"] is not None else "n/a"
        start = f" (step 0: {s['initial_eval_loss']:.3f})" if s["initial_eval_loss"] is not None else ""
        measured = (f"steps {s['measured_steps'][0]}-{s['measured_steps'][1]} measured now"
                    if r.resumed_from and s["measured_steps"] else "")
        if r.resumed_from and not s["measured_steps"]:
            measured = f"already finished at step {r.steps}: nothing trained now"
        print(f"{r.label:>9}: final train loss {s['final_train_loss']:.3f} (mean of last 10 steps), eval loss {ev}{start}, "
              f"{_fmt_rate(s['tokens_per_second'])}, peak memory {_fmt_bytes(s['peak_memory_bytes'])}"
              + (f" [{measured}]" if measured else ""))
    if len(runs) == 2:
        a, b = summary["metalcore"], summary["pytorch"]
        mem = f"{a['peak_memory_bytes'] / b['peak_memory_bytes']:.2f}x" if b["peak_memory_bytes"] > 0 else "n/a"
        cpu = common.pick_device(args.device).type == "cpu"
        print(f"metalcore vs plain PyTorch (unpatched + torch.optim.AdamW), both from step 0 in this process: "
              f"{a['tokens_per_second'] / b['tokens_per_second']:.2f}x tokens/s, peak memory {mem}"
              + (" (CPU: resident-set growth, a rough measure)" if cpu else ""))
    sample = main_run.sample
    if sample.get("after") is not None:
        print(f"sample (greedy, held-out prompt): {sample['prompt']}\n  before training: {sample['before']!r}\n"
              f"  after training:  {sample['after']!r}")
    print(f"checkpoint: {main_run.checkpoint}")
    if summary["finished"]:
        print(f"final model: {Path(main_run.checkpoint).parent / 'final'}  (fine-tune further with --model "
              f"{Path(main_run.checkpoint).parent / 'final'})")
    print(f"loss curve: {out / 'loss_curve.png'}\nsummary:    {out / 'summary.json'}  ({summary['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
    if "LOCAL_RANK" in os.environ:  # a rank under torchrun (--fsdp): see distributed.exit_cleanly
        distributed.exit_cleanly()
