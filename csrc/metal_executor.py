"""The CPU executor for Metal shaders: ``torch.mps.compile_shader``'s interface on CPU tensors.

>>> lib = compile_shader('''
... kernel void fill(device float* out, constant float& v, uint i [[thread_position_in_grid]]) {
...     out[i] = v;
... }''')
>>> x = torch.zeros(16)
>>> lib.fill(x, 3.0)                  # threads defaults to the first tensor's numel, as on MPS
>>> lib.fill(x, 1.0, threads=16, group_size=4)

How: the Metal source goes through clang's preprocessor (so macro-instantiated kernels appear), then
through a small translation (``_translate``) into C++ that compiles against ``metal_stdlib.h``; clang
builds it into a shared library with the fiber runtime (``metal_runtime.cpp``), cached under
``$METALCORE_CACHE/executor`` (default ``~/.cache/metalcore/executor``) by the hash of everything that
goes into it, and ctypes calls it. Apple's limits are enforced (1024 threads per threadgroup, 32 KiB
of threadgroup memory, 31 buffers), and in bounds-checked mode (the default; set
``METALCORE_EXECUTOR_BOUNDS_CHECK=0`` or pass ``bounds_check=False`` to turn it off) every
device/constant pointer access is checked against its buffer.

Semantics follow ``torch.mps.compile_shader``: ``threads`` is the total number of threads per
dimension (``dispatchThreads``: edge threadgroups are partial), ``group_size`` the threadgroup size;
tensors bind as buffers in argument order, Python floats as 4-byte floats, ints as 8-byte ints,
lists of numbers as arrays and lists of tensors as arrays of device pointers.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
_FORMAT_VERSION = "1"
_MAX_BUFFERS = 31
_MAX_THREADS_PER_THREADGROUP = 1024
_SIMD_WIDTH = 32


class MetalCompileError(RuntimeError):
    """The shader does not compile (with the executor's C++ compiler)."""


class UnsupportedMetalError(MetalCompileError):
    """The shader uses a Metal construct the executor does not implement."""


class MetalLimitError(ValueError):
    """A launch exceeds one of Apple's limits (threads per threadgroup, threadgroup memory, buffers)."""


class MetalOutOfBoundsError(IndexError):
    """A kernel accessed a device buffer out of bounds (bounds-checked mode)."""


class MetalKernelError(RuntimeError):
    """A kernel failed while running (e.g. a barrier in divergent control flow)."""


# ---------------------------------------------------------------------------------------------------
# Compiler and cache
# ---------------------------------------------------------------------------------------------------

_COMPILER_CANDIDATES = ("clang++-19", "clang++-20", "clang++-18", "clang++-17", "clang++")


def find_compiler() -> str | None:
    """A clang++ that can build shaders (clang >= 17 for __bf16 arithmetic), or None.

    ``METALCORE_CLANG`` names one explicitly.
    """
    return _find_compiler_cached(os.environ.get("METALCORE_CLANG", ""))


_compiler_cache: dict[str, str | None] = {}


def _find_compiler_cached(explicit: str) -> str | None:
    if explicit in _compiler_cache:
        return _compiler_cache[explicit]
    found = None
    for name in ([explicit] if explicit else _COMPILER_CANDIDATES):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.search(r"clang version (\d+)", out)
        if m and int(m.group(1)) >= 17:
            found = path
            break
    _compiler_cache[explicit] = found
    return found


def available() -> bool:
    """Whether shaders can be built here (a suitable clang and a supported platform)."""
    return os.name == "posix" and find_compiler() is not None


def cache_dir() -> Path:
    root = os.environ.get("METALCORE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "metalcore"
    path = base / "executor"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else cxx


_CXXFLAGS = (
    "-std=c++17", "-fPIC", "-w",
    # half and bfloat arithmetic rounds every operation to 16 bits, as on the GPU.
    "-fexcess-precision=16",
    # No implicit bit-casts between vector types: Metal converts element-wise, explicitly.
    "-flax-vector-conversions=none",
    "-fno-math-errno",
)
_SHADER_OPT = "-O1"    # compile time matters as much as run time for a test vehicle
_RUNTIME_OPT = "-O2"

_build_lock = threading.Lock()


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MetalCompileError(f"{what} failed:\n{_trim(proc.stderr)}")


def _trim(text: str, lines: int = 60) -> str:
    out = text.strip().splitlines()
    return "\n".join(out[:lines] + ([f"... ({len(out) - lines} more lines)"] if len(out) > lines else []))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _runtime_object(cxx: str) -> Path:
    sources = [(HERE / "metal_runtime.cpp").read_bytes(), (HERE / "metal_rt_abi.h").read_bytes()]
    key = hashlib.sha256(b"\0".join([_FORMAT_VERSION.encode(), _compiler_id(cxx).encode(),
                                     " ".join(_CXXFLAGS).encode(), *sources])).hexdigest()[:24]
    obj = cache_dir() / f"runtime-{key}.o"
    if not obj.exists():
        tmp = obj.with_name(obj.name + f".{os.getpid()}.tmp")
        _run([cxx, *_CXXFLAGS, _RUNTIME_OPT, "-c", str(HERE / "metal_runtime.cpp"), "-o", str(tmp)],
             "building the executor runtime")
        os.replace(tmp, obj)
    return obj


def _stub_include_dir() -> Path:
    """Empty stand-ins for <metal_stdlib> & co. during preprocessing (the real header comes later)."""
    path = cache_dir() / "include"
    path.mkdir(exist_ok=True)
    for name in ("metal_stdlib", "metal_math", "metal_simdgroup", "metal_atomic", "metal_compute",
                 "metal_integer", "metal_common", "metal_relational", "metal_geometric"):
        stub = path / name
        if not stub.exists():
            stub.write_text("")
    return path


# ---------------------------------------------------------------------------------------------------
# Source translation
# ---------------------------------------------------------------------------------------------------

_VECTOR_IDS = {
    "thread_position_in_grid": "grid",
    "thread_position_in_threadgroup": "tg",
    "threadgroup_position_in_grid": "tgpos",
    "threads_per_threadgroup": "tptg",
    "threads_per_grid": "tpgrid",
    "threadgroups_per_grid": "tgpergrid",
    "dispatch_threads_per_threadgroup": "dtptg",
}
_SCALAR_IDS = {
    "thread_index_in_threadgroup": "ids->index_in_tg",
    "thread_index_in_simdgroup": "ids->lane",
    "simdgroup_index_in_threadgroup": "ids->simd_id",
    "simdgroups_per_threadgroup": "ids->simds_per_tg",
    "dispatch_simdgroups_per_threadgroup":
        "(ids->dtptg[0] * ids->dtptg[1] * ids->dtptg[2] + 31u) / 32u",
    "thread_execution_width": "32u",
    "threads_per_simdgroup": "32u",
}

# Constructs that exist in Metal but not in the executor, with the reason given to the user.
_UNSUPPORTED = [
    (r"\b(texture[123]d(?:_array|_ms)?|texturecube(?:_array)?|texture_buffer|depth[23]d\w*|sampler)\b",
     "textures and samplers are not implemented by the CPU executor"),
    (r"\b(simdgroup_(?:float|half|bfloat)\d+x\d+|simdgroup_matrix\w*|simdgroup_load|simdgroup_store|"
     r"simdgroup_multiply(?:_accumulate)?)\b",
     "simdgroup matrices are not implemented by the CPU executor"),
    (r"\b(quad_\w+)\s*\(", "quad-group functions are not implemented by the CPU executor"),
    (r"\b(simd_shuffle_rotate_\w+|simd_shuffle_and_fill_\w+)\s*\(",
     "this SIMD-group function is not implemented by the CPU executor"),
    (r"\b(imageblock\w*|visible_function_table|intersection_function_table|acceleration_structure|"
     r"raytracing|indirect_command_buffer|render_pipeline_state)\b",
     "this Metal feature is not implemented by the CPU executor"),
    (r"\b(vertex|fragment)\s+[\w:<>]+\s+\w+\s*\(", "only compute kernels are supported"),
    (r"\b(packed_\w+)\b", "packed vector types are not implemented by the CPU executor"),
]
_CXX_ATTRIBUTES = {"maybe_unused", "likely", "unlikely", "fallthrough", "nodiscard"}

_VEC_ELEMS = "float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool"
_TYPE = r"(?:metal::|mtl::)?[A-Za-z_]\w*(?:\s*<[^<>;{}()]*(?:<[^<>;{}()]*>[^<>;{}()]*)*>)?"

_KERNEL_RE = re.compile(
    r"(\[\[\s*max_total_threads_per_threadgroup\s*\(\s*(\d+)\s*\)\s*\]\]\s*)?\bkernel\s+void\s+([A-Za-z_]\w*)\s*\(")
_PTR2_RE = re.compile(
    rf"(\bconst\s+)?\b(device|constant)\s+(const\s+)?({_TYPE})\b\s*(const\s*)?\*\s*(const\s+)?"
    rf"\b(device|constant)\s*(const\s*)?\*")
_PTR_RE = re.compile(rf"(\bconst\s+)?\b(device|constant)\s+(const\s+)?({_TYPE})\b\s*(const\s*)?\*")
_REINTERPRET_RE = re.compile(r"reinterpret_cast\s*<\s*mtl::dptr<([^<>]*(?:<[^<>]*>[^<>]*)*)>\s*>\s*\(")
_TG_DECL_RE = re.compile(
    rf"\bthreadgroup\s+((?:const\s+)?{_TYPE})\s+([A-Za-z_]\w*)\s*((?:\[[^\[\];]*\]\s*)*);")
_VEC_CTOR_RE = re.compile(rf"(?<![\w.:])(?:metal::)?({_VEC_ELEMS})([234])\s*\(")
_VEC_TEMPLATE_CTOR_RE = re.compile(r"(?<![\w.:])(?:metal::)?vec\s*<([^<>;()]*)>\s*\(")
_VEC_STATIC_CAST_RE = re.compile(rf"static_cast\s*<\s*(?:metal::)?({_VEC_ELEMS})([234])\s*>\s*\(")
_VEC_C_CAST_RE = re.compile(rf"\(\s*(?:metal::)?(?:{_VEC_ELEMS})[234]\s*\)\s*[\w(]")
_HALF_LITERAL_RE = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)[hH]\b")
_LINE_MARKER_RE = re.compile(r'^#\s+(\d+)\s+"([^"]*)"')


@dataclass
class Param:
    name: str
    type: str
    buffer: int | None = None  # [[buffer(n)]] index
    builtin: str | None = None  # C++ expression of the value, for attribute parameters


@dataclass
class KernelInfo:
    name: str
    params: list[Param] = field(default_factory=list)
    max_threads: int = _MAX_THREADS_PER_THREADGROUP

    def to_json(self) -> dict:
        return {"name": self.name, "max_threads": self.max_threads,
                "params": [p.__dict__ for p in self.params]}

    @classmethod
    def from_json(cls, d: dict) -> KernelInfo:
        return cls(d["name"], [Param(**p) for p in d["params"]], d["max_threads"])


def _origin(text: str, pos: int) -> str:
    """'file:line' of position ``pos`` in preprocessed text (which carries # line markers)."""
    file, line = "shader", 1
    for raw in text[:pos].split("\n")[:-1]:
        m = _LINE_MARKER_RE.match(raw)
        if m:
            line, file = int(m.group(1)), m.group(2)
        else:
            line += 1
    return f"{file}:{line}"


def _unsupported(text: str, pos: int, what: str, why: str) -> UnsupportedMetalError:
    return UnsupportedMetalError(f"unsupported Metal construct '{what}' at {_origin(text, pos)}: {why}")


def _split_params(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [p for p in out if p.strip() and p.strip() != "void"]


def _blank(s: str) -> str:
    """Spaces in place of s, keeping its newlines (so that line numbers do not move)."""
    return re.sub(r"[^\n]", " ", s)


def _parse_kernel(text: str, m: re.Match) -> tuple[KernelInfo, int, str]:
    """Parse one kernel signature; return its info, the end of the parameter list and the C++ text."""
    name = m.group(3)
    start = m.end()  # just after '('
    depth, i = 1, start
    while depth:
        if i >= len(text):
            raise MetalCompileError(f"kernel '{name}': unbalanced parentheses in its signature")
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    params_text = text[start:i - 1]
    info = KernelInfo(name)
    if m.group(2):
        info.max_threads = min(int(m.group(2)), _MAX_THREADS_PER_THREADGROUP)
    used: set[int] = set()
    pending: list[Param] = []
    cxx_params = []
    for raw in _split_params(params_text):
        attr_m = re.search(r"\[\[(.*?)\]\]", raw, re.S)
        decl = (raw[:attr_m.start()] + _blank(attr_m.group(0)) + raw[attr_m.end():]) if attr_m else raw
        cxx_params.append(decl)
        name_m = re.search(r"([A-Za-z_]\w*)\s*$", decl)
        if not name_m:
            raise MetalCompileError(f"kernel '{name}': cannot parse parameter '{raw.strip()}'")
        ptype = " ".join(decl[:name_m.start()].split())
        p = Param(name_m.group(1), ptype)
        attr = " ".join(attr_m.group(1).split()) if attr_m else ""
        buf_m = re.fullmatch(r"buffer\s*\(\s*(\d+)\s*\)", attr)
        scalar_type = re.sub(r"\bconst\b", "", ptype).strip()
        if not attr:
            pending.append(p)
        elif buf_m:
            p.buffer = int(buf_m.group(1))
            used.add(p.buffer)
        elif attr in _VECTOR_IDS:
            p.builtin = f"mtl::builtin<{scalar_type}>(ids->{_VECTOR_IDS[attr]})"
        elif attr in _SCALAR_IDS:
            p.builtin = f"mtl::builtin<{scalar_type}>(uint32_t({_SCALAR_IDS[attr]}))"
        else:
            raise _unsupported(text, m.start(), f"[[{attr}]]",
                               f"kernel '{name}' parameter '{p.name}': this attribute is not implemented "
                               "by the CPU executor")
        info.params.append(p)
    next_index = 0
    for p in pending:  # unattributed buffers take the free indices in order, as Metal assigns them
        while next_index in used:
            next_index += 1
        p.buffer = next_index
        used.add(next_index)
    for p in info.params:
        if p.buffer is not None and p.buffer >= _MAX_BUFFERS:
            raise MetalLimitError(f"kernel '{name}' parameter '{p.name}' uses buffer index {p.buffer}; Apple "
                                  f"GPUs allow at most {_MAX_BUFFERS} buffers (indices 0-{_MAX_BUFFERS - 1})")
    head = f"static void __mtl_k_{name}(" + "\n" * text[m.start():start].count("\n")
    return info, i, head + ",".join(cxx_params) + ")"


def _rewrite_pointers(text: str) -> str:
    def ptr2(m: re.Match) -> str:
        inner_const = "const " if (m.group(1) or m.group(3) or m.group(5) or m.group(2) == "constant") else ""
        outer_const = "const " if (m.group(6) or m.group(8) or m.group(7) == "constant") else ""
        return f"mtl::dptr<{outer_const}mtl::devptr<{inner_const}{m.group(4)}>>"

    def ptr(m: re.Match) -> str:
        const = "const " if (m.group(1) or m.group(3) or m.group(5) or m.group(2) == "constant") else ""
        return f"mtl::dptr<{const}{m.group(4)}>"

    text = _PTR2_RE.sub(ptr2, text)
    text = _PTR_RE.sub(ptr, text)
    return _REINTERPRET_RE.sub(r"mtl::ptr_cast<\1>(", text)


def _translate(pre: str) -> tuple[str, list[KernelInfo]]:
    """Metal source (already through the C preprocessor) -> C++ for metal_stdlib.h, and its kernels."""
    body = pre
    for pattern, why in _UNSUPPORTED:
        um = re.search(pattern, body)
        if um:
            raise _unsupported(body, um.start(), um.group(1), why)

    # Kernel signatures -> plain functions (attributes blanked; line numbers kept).
    kernels: list[KernelInfo] = []
    out, pos = [], 0
    for m in _KERNEL_RE.finditer(body):
        if m.start() < pos:
            continue
        info, end, cxx = _parse_kernel(body, m)
        kernels.append(info)
        out.append(body[pos:m.start()])
        out.append(cxx)
        pos = end
    out.append(body[pos:])
    text = "".join(out)

    for am in re.finditer(r"\[\[\s*([^\]]*?)\s*\]\]", text):
        attr = am.group(1)
        if attr not in _CXX_ATTRIBUTES:
            raise _unsupported(text, am.start(), f"[[{attr}]]", "this attribute is not implemented by the CPU "
                               "executor (kernel parameters support buffer(n) and the thread-position "
                               "attributes)")

    # threadgroup T name[...]; -> a reference into the threadgroup's shared storage.
    counter = iter(range(1 << 30))

    def tg_decl(m: re.Match) -> str:
        k = next(counter)
        return (f"using __mtl_tg{k} = {m.group(1)} {m.group(3).strip()}; "
                f"__mtl_tg{k}& {m.group(2)} = mtl::tg_var<__mtl_tg{k}, {k}>();")

    text = _TG_DECL_RE.sub(tg_decl, text)
    for tm in re.finditer(r"\bthreadgroup\b([^;{}()=,]*)", text):
        if not re.search(r"[*&]", tm.group(1)):
            raise _unsupported(text, tm.start(), "threadgroup" + tm.group(1).rstrip(),
                               "the executor understands one `threadgroup T name[N]...;` per declaration, "
                               "and threadgroup pointers/references")

    cm = _VEC_C_CAST_RE.search(text)
    if cm:
        raise _unsupported(text, cm.start(), cm.group(0)[:-1].strip(),
                           "C-style casts to vector types are not implemented: write float4(x)")
    text = _VEC_STATIC_CAST_RE.sub(r"mtl::make<\1, \2>(", text)
    text = _VEC_CTOR_RE.sub(r"mtl::make<\1, \2>(", text)
    text = _VEC_TEMPLATE_CTOR_RE.sub(r"mtl::make<\1>(", text)
    text = _HALF_LITERAL_RE.sub(r"half(\1)", text)
    text = re.sub(r"\bconst\s+constant\b|\bconstant\s+const\b", "constant", text)
    text = _rewrite_pointers(text)
    for lm in re.finditer(r"\b(device|constant)\b([^;{}()=,]*)", text):
        if "*" in lm.group(2):
            raise _unsupported(text, lm.start(), (lm.group(1) + lm.group(2)).strip(),
                               "pointer declaration the executor cannot parse (write `device T* name`)")

    wrappers = ['\n#line 1 "<executor entry wrappers>"']
    for k in kernels:
        args = []
        for p in k.params:
            if p.builtin is None:
                p.type = _rewrite_pointers(re.sub(r"\bconst\s+constant\b|\bconstant\s+const\b", "constant", p.type))
            args.append(p.builtin if p.builtin else f"mtl::arg<{p.type}>(args, {p.buffer})")
        wrappers.append(
            f'extern "C" __attribute__((visibility("default"))) void __mtl_entry_{k.name}('
            f"const mtl_rt::ThreadIds* ids, const mtl_rt::LaunchArgs* args) {{\n"
            f"  (void)ids; (void)args;\n  __mtl_k_{k.name}({', '.join(args)});\n}}")
    return text + "\n".join(wrappers) + "\n", kernels


def _preprocess(source: str, cxx: str, workdir: Path) -> str:
    src = workdir / "shader.metal"
    src.write_text(source)
    proc = subprocess.run(
        [cxx, "-E", "-x", "c++", "-std=c++17", "-nostdinc", "-nostdinc++", "-isystem", str(_stub_include_dir()),
         "-D__METAL_VERSION__=310", "-D__METALCORE_EXECUTOR__=1", "-D__HAVE_BFLOAT__=1", src.name],
        capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise MetalCompileError(f"preprocessing the shader failed:\n{_trim(proc.stderr)}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------------------------------

def _build(source: str, checked: bool) -> tuple[Path, list[KernelInfo]]:
    cxx = find_compiler()
    if cxx is None:
        raise MetalCompileError("the Metal shader executor needs clang++ >= 17 (e.g. `apt-get install clang-19`, "
                                "or set METALCORE_CLANG)")
    headers = [(HERE / n).read_bytes() for n in ("metal_stdlib.h", "metal_rt_abi.h", "metal_runtime.cpp",
                                                 "metal_executor.py")]
    key = hashlib.sha256(b"\0".join([_FORMAT_VERSION.encode(), _compiler_id(cxx).encode(),
                                     str(checked).encode(), source.encode(), *headers])).hexdigest()[:32]
    so, meta = cache_dir() / f"shader-{key}.so", cache_dir() / f"shader-{key}.json"
    if so.exists() and meta.exists():
        return so, [KernelInfo.from_json(d) for d in json.loads(meta.read_text())]
    with _build_lock, tempfile.TemporaryDirectory(prefix="metalcore-shader-") as tmp:
        work = Path(tmp)
        pre = _preprocess(source, cxx, work)
        cpp, kernels = _translate(pre)
        unit = work / "shader.cpp"
        unit.write_text(f'#include "metal_stdlib.h"\n{cpp}')
        out = work / "shader.so"
        _run([cxx, *_CXXFLAGS, _SHADER_OPT, f"-DMTL_CHECKED={int(checked)}", "-I", str(HERE), "-shared",
              str(unit), str(_runtime_object(cxx)), "-o", str(out), "-lm", "-lpthread"],
             "compiling the shader as C++ (the executor's stand-in for Apple's compiler)")
        _atomic_write(so, out.read_bytes())
        _atomic_write(meta, json.dumps([k.to_json() for k in kernels]).encode())
    return so, kernels


class _Region(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("size", ctypes.c_uint64), ("buffer", ctypes.c_int32),
                ("element", ctypes.c_int32), ("name", ctypes.c_char_p)]


class _Buffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_uint64), ("region", ctypes.c_void_p)]


class _LaunchArgs(ctypes.Structure):
    _fields_ = [("bufs", _Buffer * _MAX_BUFFERS), ("nbufs", ctypes.c_uint32), ("nregions", ctypes.c_uint32),
                ("regions", ctypes.POINTER(_Region)), ("kernel", ctypes.c_char_p)]


_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32, "int16": torch.int16,
          "int8": torch.int8, "uint8": torch.uint8}


def _workers() -> int:
    env = os.environ.get("METALCORE_EXECUTOR_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 8))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 8))


def _span_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _dims(value: Any, what: str) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints; got {value!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"{what} must be non-negative; got {value!r}")
    return dims


class Kernel:
    """One kernel of a compiled library; call it like torch.mps's kernels."""

    def __init__(self, lib: Library, info: KernelInfo):
        self._lib = lib
        self.info = info
        self._entry = ctypes.cast(getattr(lib._dll, f"__mtl_entry_{info.name}"), ctypes.c_void_p)
        self._names = {p.buffer: p.name.encode() for p in info.params if p.buffer is not None}

    @property
    def max_threads_per_threadgroup(self) -> int:
        return self.info.max_threads

    @property
    def thread_execution_width(self) -> int:
        return _SIMD_WIDTH

    def __repr__(self) -> str:
        return f"<executor kernel {self.info.name}>"

    def __call__(self, *args: Any, threads: Any = None, group_size: Any = None, arg_casts: Any = None) -> None:
        name = self.info.name
        if len(args) > _MAX_BUFFERS:
            raise MetalLimitError(f"kernel '{name}' got {len(args)} arguments; Apple GPUs allow at most "
                                  f"{_MAX_BUFFERS} buffers per kernel")
        keep: list[Any] = []
        regions: list[tuple[int, int, int, int]] = []  # base, size, buffer, element
        bufs: list[tuple[int, int, int]] = []          # ptr, size, region index
        for idx, a in enumerate(args):
            cast = (arg_casts.get(idx) if isinstance(arg_casts, dict) else arg_casts) if arg_casts else None
            if isinstance(a, torch.Tensor):
                if a.device.type != "cpu":
                    raise TypeError(f"kernel '{name}' argument {idx}: the CPU executor runs on CPU tensors; "
                                    f"got a tensor on {a.device}")
                if threads is None:
                    threads = a.numel()
                regions.append((a.data_ptr(), _span_bytes(a), idx, -1))
                bufs.append((a.data_ptr(), _span_bytes(a), len(regions) - 1))
                continue
            if isinstance(a, (list, tuple)):
                if len(a) == 0:
                    raise ValueError(f"kernel '{name}' argument {idx}: empty list/tuple")
                if all(isinstance(t, torch.Tensor) for t in a):
                    ptrs = torch.tensor([t.data_ptr() for t in a], dtype=torch.int64)
                    for k, t in enumerate(a):
                        if t.device.type != "cpu":
                            raise TypeError(f"kernel '{name}' argument {idx}: tensors must be on the CPU")
                        regions.append((t.data_ptr(), _span_bytes(t), idx, k))
                    data = ptrs
                elif isinstance(a[0], bool) or isinstance(a[0], int):
                    data = torch.tensor(list(a), dtype=_CASTS[cast] if cast else torch.int64)
                elif isinstance(a[0], float):
                    data = torch.tensor(list(a), dtype=_CASTS[cast] if cast else torch.float32)
                else:
                    raise TypeError(f"kernel '{name}' argument {idx}: unsupported list element {type(a[0])}")
            elif isinstance(a, (bool, int)):
                data = torch.tensor([int(a)], dtype=_CASTS[cast] if cast else torch.int64)
            elif isinstance(a, float):
                data = torch.tensor([a], dtype=_CASTS[cast] if cast else torch.float32)
            else:
                raise TypeError(f"kernel '{name}' argument {idx}: unsupported argument type {type(a).__name__}")
            keep.append(data)
            regions.append((data.data_ptr(), data.numel() * data.element_size(), idx, -1))
            bufs.append((data.data_ptr(), data.numel() * data.element_size(), len(regions) - 1))

        for p in self.info.params:
            if p.buffer is not None and p.buffer >= len(args):
                raise TypeError(f"kernel '{name}' reads buffer {p.buffer} ('{p.name}') but was given "
                                f"{len(args)} arguments")
        if threads is None:
            raise ValueError(f"kernel '{name}': threads is undefined (no tensor argument to take it from)")
        tdims = _dims(threads, "threads")
        if group_size is None:
            gdims = (min(tdims[0], self.info.max_threads),) if len(tdims) == 1 else (
                (self.info.max_threads,) + (1,) * (len(tdims) - 1))
        else:
            gdims = _dims(group_size, "group_size")
            if len(gdims) != len(tdims):
                raise ValueError(f"kernel '{name}': threads {tdims} and group_size {gdims} must have the same "
                                 "number of dimensions")
        if math.prod(gdims) > self.info.max_threads:
            raise MetalLimitError(f"kernel '{name}': threadgroup size {gdims} has {math.prod(gdims)} threads; "
                                  f"Apple GPUs allow at most {self.info.max_threads} per threadgroup")
        if math.prod(tdims) == 0:
            return
        if 0 in gdims:
            raise ValueError(f"kernel '{name}': group_size must be positive; got {gdims}")
        t3 = (ctypes.c_uint32 * 3)(*(tdims + (1,) * (3 - len(tdims))))
        g3 = (ctypes.c_uint32 * 3)(*(gdims + (1,) * (3 - len(gdims))))

        region_arr = (_Region * max(1, len(regions)))()
        for i, (base, size, b, e) in enumerate(regions):
            region_arr[i] = _Region(base, size, b, e, self._names.get(b, b"?"))
        la = _LaunchArgs()
        la.nbufs = len(bufs)
        la.nregions = len(regions)
        la.regions = region_arr
        la.kernel = name.encode()
        base_addr = ctypes.addressof(region_arr)
        for i, (ptr, size, r) in enumerate(bufs):
            la.bufs[i] = _Buffer(ptr, size, base_addr + r * ctypes.sizeof(_Region))
        err = ctypes.create_string_buffer(2048)
        rc = self._lib._launch(self._entry, ctypes.byref(la), t3, g3, _workers(), err, len(err))
        if rc:
            msg = err.value.decode(errors="replace")
            category, _, text = msg.partition(" ")
            exc = {"[oob]": MetalOutOfBoundsError, "[limit]": MetalLimitError}.get(category, MetalKernelError)
            raise exc(text)


class Library:
    """A compiled shader source: its kernels are attributes (``lib.rms_norm_fwd_float(...)``)."""

    def __init__(self, path: Path, kernels: list[KernelInfo], checked: bool):
        self._dll = ctypes.CDLL(str(path))
        self._launch = self._dll.mtl_launch
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_void_p, ctypes.POINTER(_LaunchArgs), ctypes.POINTER(ctypes.c_uint32),
                                 ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_char_p,
                                 ctypes.c_uint64]
        self.bounds_checked = checked
        self._kernels = {k.name: Kernel(self, k) for k in kernels}

    def __getattr__(self, name: str) -> Kernel:
        kernels = self.__dict__.get("_kernels", {})
        if name in kernels:
            return kernels[name]
        raise AttributeError(f"shader library has no kernel '{name}' (it has: {', '.join(sorted(kernels))})")

    def __dir__(self) -> list[str]:
        return sorted(self._kernels)


_libraries: dict[tuple[str, bool], Library] = {}


def bounds_check_default() -> bool:
    return os.environ.get("METALCORE_EXECUTOR_BOUNDS_CHECK", "1") != "0"


def compile_shader(source: str, *, bounds_check: bool | None = None) -> Library:
    """Compile Metal source for the CPU; cached in-process and on disk by the source's hash."""
    checked = bounds_check_default() if bounds_check is None else bool(bounds_check)
    key = (hashlib.sha256(source.encode()).hexdigest(), checked)
    lib = _libraries.get(key)
    if lib is None:
        path, kernels = _build(source, checked)
        lib = _libraries[key] = Library(path, kernels, checked)
    return lib
