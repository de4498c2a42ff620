"""Hugging Face ``transformers.Trainer`` integration: metalcore's optimizers from ``TrainingArguments``.

The Trainer path takes three lines — patch the model, build the optimizer, hand both over::

    metalcore.patch_model(model)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=metalcore.hf.optimizers_from_args(model, args))          # MetalAdamW
    # or optimizers_from_args(model, args, optimizer="muon"): MuonWithAuxAdamW

The Trainer builds its learning-rate scheduler (``lr_scheduler_type``, ``warmup_steps``) around the
returned optimizer and saves and restores its state in checkpoints; gradient accumulation normalises
the loss by ``num_items_in_batch`` inside the model, which ``patch_model`` leaves untouched
(``recipes/finetune_trainer.py``, ``tests/test_hf.py``). Importing this module needs no
``transformers``: it only reads the ``TrainingArguments`` attributes named below.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metalcore.optim import MetalAdamW, MuonWithAuxAdamW, muon_param_groups

OPTIMIZERS = ("adamw", "muon")


def optimizers_from_args(model: nn.Module, args: Any, optimizer: str = "adamw") -> tuple[Any, None]:
    """``(optimizer, None)`` for ``Trainer(optimizers=...)``, from ``args`` (a ``TrainingArguments``):
    ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``.

    * ``"adamw"``: :class:`~metalcore.optim.MetalAdamW`, weight decay on parameters with ≥ 2
      dimensions only (not on norms and biases), as the recipes do;
    * ``"muon"``: :class:`~metalcore.optim.MuonWithAuxAdamW` over
      :func:`~metalcore.optim.muon_param_groups` — Muon on hidden matrices with
      ``adjust_lr_fn="match_rms_adamw"`` (so the one ``learning_rate`` suits both), AdamW on
      embeddings, the head, norms and biases.

    The ``None`` lets the Trainer create its scheduler for the returned optimizer.

    >>> trainer = Trainer(model, args, train_dataset=ds, optimizers=optimizers_from_args(model, args, "muon"))
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"metalcore.hf.optimizers_from_args: optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    lr, wd = args.learning_rate, args.weight_decay
    betas, eps = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    if optimizer == "muon":
        groups = muon_param_groups(model, lr=lr, adamw_lr=lr, weight_decay=wd, adamw_betas=betas, adamw_eps=eps,
                                   adjust_lr_fn="match_rms_adamw")
        return MuonWithAuxAdamW(groups), None
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return MetalAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps), None
