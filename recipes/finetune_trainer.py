"""Supervised fine-tuning with ``transformers.Trainer`` and metalcore: the same data, tokenizer and
model as recipes/finetune.py, trained by the Trainer most fine-tuning code already uses.

    python recipes/finetune_trainer.py                          # offline: the default small Llama, MetalAdamW
    python recipes/finetune_trainer.py --optimizer muon --grad-accum 4
    python recipes/finetune_trainer.py --model PATH --device auto --steps 1000 --batch-size 4 --grad-accum 4

What metalcore adds to a Trainer script is three lines: ``metalcore.patch_model(model)`` before the
model is handed over, and ``optimizers=metalcore.hf.optimizers_from_args(model, training_args)``
(MetalAdamW, or ``optimizer="muon"`` for MuonWithAuxAdamW); the Trainer keeps its scheduler, logging,
evaluation and checkpoints. Gradient accumulation is the Trainer's: the loss of every micro-batch is
normalised by ``num_items_in_batch`` (the response tokens of the whole accumulated batch), so
``--batch-size 2 --grad-accum 4`` computes the update of ``--batch-size 8``.

Checkpoints are the Trainer's (``OUT/checkpoint-N/`` every ``--save-every`` steps, the last two
kept); rerunning the same command resumes from the newest. The final model, unpatched, goes to
``OUT/final/`` and a summary with the step-0 and final held-out losses and a greedy sample before and
after training to ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (imports no torch)
import finetune  # noqa: E402  (data, tokenizer, model and batches are finetune.py's)

OPTIMIZERS = ("adamw", "muon")


def parse_args(argv=None) -> argparse.Namespace:
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (or a cached hub name); "
                   "default: the small Llama of recipes/finetune.py")
    p.add_argument("--device", default="auto", help="auto (the Trainer's choice: cuda, then mps, then cpu) or cpu")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (max_steps)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (per_device_train_batch_size)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw: MetalAdamW; muon: MuonWithAuxAdamW (Muon on hidden matrices, AdamW on the rest)")
    p.add_argument("--no-patch", action="store_true",
                   help="the plain model with torch.optim.AdamW over the same parameter groups (the baseline)")
    p.add_argument("--out", default="runs/finetune_trainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--corpus-bytes", type=int, default=3_000_000)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this step, having saved; for testing resumption")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    common.check_at_least(args, {"steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 8, "warmup": 0,
                                 "eval_every": 1, "eval_batches": 1, "save_every": 1, "corpus_bytes": 10_000,
                                 "stop_after": 1, "threads": 1, "seed": 0})
    common.check_positive_float(args, ["lr"])
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        common.fail(f"--weight-decay must be a finite number >= 0; got {args.weight_decay}")
    if args.model is None:
        common.check_at_least(args, {"vocab_size": 262, "hidden_size": 16, "layers": 1})
        common.check_llama_shape(args.hidden_size, *finetune.attention_heads(args.hidden_size))
        if args.seq_len > finetune.DEFAULT_MAX_POSITIONS:
            common.fail(f"--seq-len must be at most {finetune.DEFAULT_MAX_POSITIONS} for the default model; got {args.seq_len}")
    common.check_device(args.device)
    if args.device not in ("auto", "cpu"):
        common.fail(f"--device {args.device}: the Trainer picks the accelerator itself; use --device auto or cpu")
    if args.no_patch and args.optimizer != "adamw":
        common.fail(f"--no-patch trains with torch.optim.AdamW; drop --optimizer {args.optimizer}")
    if args.model is not None:
        common.check_model(args.model)


def build_trainer(args, out: Path):
    """The model (patched unless ``--no-patch``), its tokenizer and a ``Trainer`` over the recipe's data."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    import metalcore.hf
    import metalcore.patch

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if args.device == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        torch.set_num_threads(common.threads_for(args.threads))
    examples = finetune.load_examples(args, out / "data")
    model, tokenizer = finetune.load_model_and_tokenizer(args, out / "data", examples, "cpu")
    train_set = finetune.encode([e for e in examples if not common.is_heldout(e)], tokenizer, args.seq_len)
    heldout_examples = [e for e in examples if common.is_heldout(e)]
    heldout = finetune.encode(heldout_examples, tokenizer, args.seq_len)[: args.eval_batches * args.batch_size]
    report = None if args.no_patch else metalcore.patch.patch_model(model)
    use_cuda = args.device == "auto" and torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=args.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        eval_strategy="steps", eval_steps=args.eval_every, save_strategy="steps", save_steps=args.save_every,
        save_total_limit=2, logging_steps=1, report_to="none", disable_tqdm=args.quiet, bf16=use_cuda,
        use_cpu=args.device == "cpu", remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=use_cuda)
    if report is not None:
        optimizers = metalcore.hf.optimizers_from_args(model, training_args, args.optimizer)
    else:  # the baseline: torch's AdamW over the same groups, so the two runs differ only by metalcore
        groups = metalcore.hf.optimizers_from_args(model, training_args)[0].param_groups
        optimizers = (torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                        lr=args.lr, betas=(0.9, 0.95), eps=training_args.adam_epsilon), None)
    callbacks = [] if args.stop_after is None else [_StopAfter(args.stop_after, TrainerCallback)]
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=heldout,
                      data_collator=lambda batch: finetune.collate(batch, tokenizer.pad_token_id),
                      optimizers=optimizers, callbacks=callbacks)
    if args.quiet:
        trainer.remove_callback(PrinterCallback)  # prints every log dict when the progress bar is off
    return trainer, tokenizer, report, heldout_examples[0]["prompt"]


def _StopAfter(step: int, base):
    """A callback stopping the run after ``step``, with a checkpoint saved there (as a kill would find it)."""

    class StopAfter(base):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_save = control.should_training_stop = True
            return control

    return StopAfter()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.remove_orphans(out)
    say = (lambda *a, **k: None) if args.quiet else print
    started = time.time()
    trainer, tokenizer, report, prompt = build_trainer(args, out)
    model = trainer.model
    device = next(model.parameters()).device
    resume = get_last_checkpoint(str(out))
    summary_path = out / "summary.json"
    before = common.read_json(summary_path) if resume and summary_path.exists() else {}
    if resume is None:
        if report is not None:
            say(report)
        before = {"initial_eval_loss": trainer.evaluate()["eval_loss"],
                  "sample": {"prompt": prompt, "before": finetune.greedy_answer(model, tokenizer, prompt, device,
                                                                                contextlib.nullcontext)}}
        common.write_json_atomic(before, summary_path)  # the step-0 numbers, for a resumed run's summary
        say(f"step 0: eval loss {before['initial_eval_loss']:.3f}")
    else:
        say(f"resuming from {resume}")
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {trainer.state.global_step}; rerun the same command to resume from the newest "
              f"{out}/checkpoint-N (every --save-every {args.save_every} steps)", file=sys.stderr)
        raise SystemExit(130) from None
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    finished = trainer.state.global_step >= args.steps
    summary = {**before, "steps": trainer.state.global_step, "finished": finished, "patched": report is not None,
               "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                 else trainer.optimizer).__name__,
               "train_loss_last": train_losses[-1] if train_losses else None, "eval": evals,
               "train_runtime_seconds": result.metrics.get("train_runtime")}
    if finished:
        summary["final_eval_loss"] = trainer.evaluate()["eval_loss"]
        summary["sample"]["after"] = finetune.greedy_answer(model, tokenizer, prompt, device, contextlib.nullcontext)
        if report is not None:
            report.undo()  # the saved model is the plain HF one: patching is a runtime choice

        def write_final(folder: Path) -> None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        common.save_dir_atomic(out / "final", write_final)
    summary["wall_seconds"] = time.time() - started
    common.write_json_atomic(summary, summary_path)
    if not args.quiet and finished:
        print(f"\n{summary['optimizer']}{' (metalcore-patched model)' if report is not None else ''}: eval loss "
              f"{summary['initial_eval_loss']:.3f} at step 0 -> {summary['final_eval_loss']:.3f} at step {args.steps}")
        print(f"sample (greedy, held-out prompt): {prompt}\n  before training: {summary['sample']['before']!r}\n"
              f"  after training:  {summary['sample']['after']!r}")
        print(f"final model: {out / 'final'}\nsummary:     {summary_path}  ({summary['wall_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
