"""Pieces shared by the recipes: an offline corpus, a locally trained tokenizer, device choice,
atomic checkpoints with every RNG, and the loss-curve plot.

Everything here runs without a network: the corpus is the docstrings of Python's own standard
library, read with ``ast`` from the installed sources (nothing is imported or executed), in sorted
file order, so that two runs on one installation build byte-identical data.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import random
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# Standard-library folders that are tests, demos, vendored tools or platform shims: not prose.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "dist-packages",
              "tkinter", "pydoc_data", "__pycache__", "venv", "msilib", "encodings"}

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
PAD, UNK = "<|pad|>", "<|unk|>"


@dataclass(frozen=True)
class DocRecord:
    name: str        # e.g. "json.decoder.JSONDecoder.raw_decode"
    signature: str   # e.g. "(self, s, idx=0)"
    doc: str         # cleaned docstring: its first paragraphs, at most ~600 characters


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith(("test_", "_")) for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(("test_", "_")) and rel.name != "__init__.py":
            continue
        files.append(path)
    return files


def _module_name(path: Path) -> str:
    rel = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _clean(doc: str, limit: int = 600) -> str:
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in inspect.cleandoc(doc).split("\n\n")]
    out = ""
    for p in paragraphs:
        if not p or p.startswith((">>>", "..", ":")):
            break
        if out and len(out) + len(p) > limit:
            break
        out = f"{out}\n\n{p}" if out else p
    if len(out) > limit:  # one long paragraph: cut at the last sentence end that fits
        cut = out[:limit].rfind(". ")
        out = out[: cut + 1] if cut > limit // 3 else out[:limit]
    return out


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return ""
    try:
        return f"({ast.unparse(node.args)})"
    except (ValueError, AttributeError):
        return "(...)"


def stdlib_docstrings(max_bytes: int = 3_000_000) -> list[DocRecord]:
    """Public functions, classes and methods of the standard library that have a docstring of at least
    a sentence, until their text reaches ``max_bytes``. Deterministic for one Python installation."""
    records, total = [], 0
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = _module_name(path)
        stack = [(module, n) for n in tree.body]
        while stack:
            prefix, node = stack.pop(0)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node, clean=False)
            if doc:
                text = _clean(doc)
                if len(text) >= 40:
                    records.append(DocRecord(name, _signature(node), text))
                    total += len(name) + len(text)
                    if total >= max_bytes:
                        return records
            if isinstance(node, ast.ClassDef):
                stack.extend((name, n) for n in node.body)
    return records


_PROMPTS = (
    "Explain what the Python function `{name}{sig}` does.",
    "What is `{name}` in the Python standard library for?",
    "Describe `{name}{sig}` in a few sentences.",
    "I found `{name}` in some code. What does it do?",
)


def sft_examples(records: list[DocRecord]) -> list[dict[str, str]]:
    """Instruction-style pairs: a question about a standard-library object → its docstring."""
    out = []
    for r in records:
        template = _PROMPTS[zlib.crc32(r.name.encode()) % len(_PROMPTS)]
        sig = r.signature if len(r.signature) <= 60 else "(...)"
        out.append({"prompt": template.format(name=r.name, sig=sig), "response": r.doc})
    return out


def is_heldout(example: dict[str, str], every: int = 20) -> bool:
    """A fixed split (1 in ``every``), by hash of the prompt: independent of the run's seed."""
    return zlib.crc32(example["prompt"].encode()) % every == 0


def format_chat(prompt: str, response: Optional[str] = None) -> str:
    head = f"{USER}\n{prompt}\n{ASSISTANT}\n"
    return head if response is None else f"{head}{response}{END}"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer trained on ``texts`` with the ``tokenizers`` library, saved to
    ``out_dir`` as a ``transformers`` fast tokenizer (so ``AutoTokenizer.from_pretrained`` loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[PAD, UNK, USER, ASSISTANT, END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=END,
                                   additional_special_tokens=[USER, ASSISTANT])
    fast.save_pretrained(out_dir)
    return fast


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def threads_for(requested: Optional[int]) -> int:
    """CPU threads for training: ``requested``, else every core unless the machine is already busy.

    When other processes keep the cores busy (1-minute load average ≥ cores), intra-op threads spin
    waiting for each other: measured on 2 shared cores at load 7, one training step of the default
    model took 5.2 s with 2 threads and 1.5 s with 1.
    """
    if requested:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


# ---------------------------------------------------------------------------------- checkpoints

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a run killed while
    saving leaves the previous checkpoint intact, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def current_memory(device: torch.device) -> int:
    """Bytes in use now: the caching allocator's on CUDA/MPS, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.current_allocated_memory()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def plot_losses(runs: dict[str, dict[str, list]], path: Path, title: str) -> None:
    """``runs``: label → {"train": [(step, loss)], "eval": [(step, loss)]}; writes a PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, curves) in enumerate(runs.items()):
        color = f"C{i}"
        if curves.get("train"):
            steps, losses = zip(*curves["train"])
            ax.plot(steps, losses, color=color, alpha=0.35, lw=0.8)
            k = max(1, len(losses) // 30)
            smooth = [sum(losses[max(0, j - k + 1): j + 1]) / len(losses[max(0, j - k + 1): j + 1])
                      for j in range(len(losses))]
            ax.plot(steps, smooth, color=color, lw=1.6, label=f"{label} train")
        if curves.get("eval"):
            steps, losses = zip(*curves["eval"])
            ax.plot(steps, losses, "o--", color=color, ms=4, label=f"{label} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
