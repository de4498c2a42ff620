"""Pieces shared by the recipes: an offline corpus, a locally trained tokenizer, argument checks,
device choice, atomic checksummed checkpoints with every RNG, and the loss-curve plot.

Everything here runs without a network: the corpus is the docstrings of Python's own standard
library, read with ``ast`` from the installed sources (nothing is imported or executed), in sorted
file order, so that two runs on one installation build byte-identical data.

This module imports no torch at load time: a recipe checks its arguments first and answers a bad
one in well under a second, before ``import torch`` (~1.5 s) and transformers (~5 s).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

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
    ``out_dir`` as a ``transformers`` fast tokenizer (so ``AutoTokenizer.from_pretrained`` loads it).
    The folder appears complete or not at all (:func:`save_dir_atomic`)."""
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
    save_dir_atomic(out_dir, fast.save_pretrained)
    return fast


def load_or_train_tokenizer(texts: Callable[[], list[str]], vocab_size: int, out_dir: Path):
    """The tokenizer in ``out_dir`` if a previous run finished writing it, else one trained on
    ``texts()``. Callers key ``out_dir`` on every argument that shapes the tokenizer
    (:func:`tokenizer_dir`), so a changed ``--vocab-size`` never reuses an old one."""
    if (out_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(out_dir)
    return train_tokenizer(texts(), vocab_size, out_dir)


def tokenizer_dir(data_dir: Path, vocab_size: int, corpus_bytes: int) -> Path:
    return data_dir / f"tokenizer-v{vocab_size}-c{corpus_bytes}"


# ------------------------------------------------------------------------------ argument checks

def fail(message: str) -> None:
    """End the run with one line naming the bad argument or file (on stderr, exit status 1)."""
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with its errors (an unknown choice, a non-number) in the same one-line form
    as :func:`fail` (argparse prints the whole usage first)."""

    def error(self, message: str) -> None:
        fail(f"{message} (--help lists the options)")


def check_at_least(args, minimums: dict[str, int]) -> None:
    """``minimums``: argument name (``batch_size``) → smallest valid value; ``None`` values pass."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            fail(f"--{name.replace('_', '-')} must be at least {low}; got {value}")


def check_positive_float(args, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            fail(f"--{name.replace('_', '-')} must be a positive finite number; got {value}")


def check_llama_shape(hidden_size: int, heads: int, kv_heads: int) -> None:
    """The default model's attention shape: heads divide the width into even head dimensions (RoPE
    rotates pairs) and key/value heads divide the heads (grouped-query attention)."""
    if hidden_size % heads or (hidden_size // heads) % 2 or heads % kv_heads:
        fail(f"--hidden-size {hidden_size} gives {heads} attention heads and {kv_heads} key/value heads, which do not "
             "divide it into even head dimensions; choose a multiple of 128 (e.g. 128, 256, 512) or an even size below 128")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(name: str) -> None:
    """``--device``: one of auto, cpu, cuda, cuda:N, mps, and present on this machine. Only a CUDA
    request imports torch (to ask it); mps is decided by the platform."""
    if not _DEVICE.fullmatch(name):
        fail(f"--device must be one of auto, cpu, cuda, cuda:N, mps; got {name!r}")
    if name == "mps":
        import platform

        if sys.platform != "darwin" or platform.machine() != "arm64":
            fail(f"--device mps: no Apple GPU on this machine ({sys.platform}, {platform.machine()}); use --device auto or cpu")
    if name.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            built = "this torch build has no CUDA" if torch.version.cuda is None else f"{count} CUDA device(s) visible"
            fail(f"--device {name}: not available ({built}); use --device auto or cpu")


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_model(name: str) -> None:
    """``--model``: a local Hugging Face checkpoint folder (config, weights, tokenizer), or a hub
    name that is cached (then loaded with ``HF_HUB_OFFLINE=1``: no network call at all) or
    downloadable now. An unreachable hub is found by one 3 s connection attempt, not by
    transformers' retries (53 s measured)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            fail(f"--model {name}: a file, not a checkpoint folder (expected config.json, weights and tokenizer files)")
        missing = [what for what, files in (("config.json", ("config.json",)), ("weights (" + ", ".join(_WEIGHTS[::2]) + ")", _WEIGHTS),
                                             ("tokenizer files (tokenizer.json, ...)", _TOKENIZER))
                   if not any((path / f).exists() for f in files)]
        if missing:
            fail(f"--model {name}: not a Hugging Face checkpoint folder: no {' and no '.join(missing)}")
        return
    if name.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(name):
        fail(f"--model {name}: no such folder")
    snapshots = _hub_cache() / f"models--{name.replace('/', '--')}" / "snapshots"
    if any(snapshots.glob("*/config.json")):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        fail(f"--model {name}: not a local folder, not in the Hugging Face cache ({_hub_cache()}), and the hub is not "
             "reachable; pass a checkpoint folder")


# ---------------------------------------------------------------------------------- devices

def pick_device(name: str):
    import torch

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
    import torch

    if requested:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


def current_memory(device) -> int:
    """Bytes in use now: the caching allocator's on CUDA/MPS, the process's resident set on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.current_allocated_memory()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ------------------------------------------------------------------------------ atomic writes
#
# Every artifact goes to a temporary name beside its destination (``.NAME.tmpPID``), is fsync'd,
# then renamed over it: a run killed at any moment leaves the previous version or the new one,
# never a torn file. A killed save leaves its temporary behind; :func:`remove_orphans` deletes
# those whose process is gone.

# Test hook: ``METALCORE_RECIPES_SAVE_PAUSE=NAME:SECONDS`` sleeps inside the save of the artifact
# called NAME, after its bytes are written and before the rename, so a test can kill the process
# at exactly that point (tests/recipes/test_recipe_files.py).
_PAUSE_ENV = "METALCORE_RECIPES_SAVE_PAUSE"
_ORPHAN = re.compile(r"\..+\.(tmp|old)(\d+)")


def _pause_if_asked(name: str) -> None:
    target, _, seconds = os.environ.get(_PAUSE_ENV, "").partition(":")
    if target == name:
        time.sleep(float(seconds))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        _pause_if_asked(path.name)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json_atomic(obj: Any, path: Path) -> None:
    write_bytes_atomic(path, [(json.dumps(obj, indent=2) + "\n").encode()])


def save_dir_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(folder)`` fills a temporary folder, which then replaces ``path`` by renames: a reader
    finds the old folder or the complete new one. (A kill between the two renames of a replacement
    leaves no ``path``; the recipes rebuild it.)"""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _pause_if_asked(path.name)
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporaries of killed saves under ``folder`` (their process no longer runs)."""
    removed = []
    if not folder.exists():
        return removed
    for f in sorted(folder.rglob(".*")):
        match = _ORPHAN.fullmatch(f.name)
        if match and int(match[2]) != os.getpid() and not _process_alive(int(match[2])):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            removed.append(f)
    return removed


# --------------------------------------------------------------------------------- checkpoints
#
# File format: one header line ``metalcore-recipe-checkpoint v1 sha256=<hex>`` then the bytes of
# ``torch.save(obj)``. The digest covers the payload, so flipped bytes are caught before unpickling;
# the payload holds only tensors, numbers, strings, lists, tuples and dicts, so it loads with
# ``weights_only=True`` (no code from the file runs). The payload is built in memory: twice the
# checkpoint's size transiently, fine for the models these recipes train on one device.

_MAGIC = b"metalcore-recipe-checkpoint v1 sha256="


class CheckpointError(SystemExit):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    write_bytes_atomic(path, [_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n", payload])


def load_checkpoint(path: Path, device) -> dict[str, Any]:
    import torch

    data = path.read_bytes()
    advice = "pass another --out, or delete it to start over"
    if not data:
        raise CheckpointError(f"{path}: empty file, not a checkpoint; {advice}")
    if not data.startswith(_MAGIC):
        head = data[:4096]
        if head.startswith(b"PK"):
            what = "a PyTorch file, but not a checkpoint of this recipe (or one from an older version)"
        elif b"\0" not in head:  # binary formats (zip, pickle, safetensors) all hold zero bytes early
            what = "a text file, not a checkpoint"
        else:
            what = "not a checkpoint of this recipe"
        raise CheckpointError(f"{path}: {what}; {advice}")
    newline = data.find(b"\n")
    digest, payload = data[len(_MAGIC): newline].decode(errors="replace"), memoryview(data)[newline + 1:]
    if newline < 0 or hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch: the file changed after it was written (disk or copy "
                              f"error); {advice}")
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means the same thing here)
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}); {advice}") from None
    bad = first_nonfinite(ckpt.get("model", {}))
    if bad:
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinity; refusing to resume from it; {advice}")
    return ckpt


def first_nonfinite(state: dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor in ``state`` with a NaN or infinity, else None
    (one host sync per tensor: called at save and load, not per step)."""
    import torch

    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, [buffer.getvalue()])
