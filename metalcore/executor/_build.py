"""Building a shader: find clang, preprocess, translate, compile, size the stacks, cache.

Shader source is trusted code: it compiles to native code that runs in this process. What the
executor guards against is code that did not come from the caller — a file planted in a shared
cache (see ``_cache.py``) or a header pulled in from elsewhere on the machine (``#include`` of an
absolute path or one that climbs out with ``..`` is refused, and the preprocessed output may come
from no file but the shader and the executor's empty stand-ins for ``<metal_stdlib>``).

The cache key is the SHA-256 of exactly what is compiled and linked: the translated C++ text, the
executor's headers, the runtime object's digest, the compiler's full ``--version`` and path, and the
flags.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from metalcore.executor import _cache
from metalcore.executor._errors import MetalCompileError, MetalLimitError
from metalcore.executor._translate import KernelInfo, translate

HERE = Path(__file__).resolve().parent
_FORMAT_VERSION = "2"

# Searched in this order on PATH; METALCORE_CLANG names another. clang >= 17 for __bf16 arithmetic.
COMPILER_CANDIDATES = ("clang++-19", "clang++-20", "clang++-21", "clang++-18", "clang++-17", "clang++")
_MIN_CLANG = 17

_CXXFLAGS = (
    "-std=c++17", "-fPIC", "-w",
    # half and bfloat arithmetic rounds every operation to 16 bits, as on the GPU.
    "-fexcess-precision=16",
    # No implicit bit-casts between vector types: Metal converts element-wise, explicitly.
    "-flax-vector-conversions=none",
    "-fno-math-errno",
    # A frame larger than a page touches every page on its way down, so that a large local array
    # hits the guard page below the fiber's stack instead of jumping over it into a neighbour's.
    "-fstack-clash-protection",
)
_SHADER_OPT = "-O1"    # compile time matters as much as run time for a test vehicle
_RUNTIME_OPT = "-O2"

# Fiber stacks: the shader's frames (an upper bound on any call chain, since Metal has no recursion)
# plus room for the runtime's own calls (error formatting: about 3 KiB) and libm; never less than
# 64 KiB, never more than 8 MiB per thread (1024 threads of 8 MiB is 8 GiB of address space).
_STACK_MARGIN = 32 << 10
_STACK_MIN = 64 << 10
_STACK_MAX = 8 << 20

_STUB_HEADERS = ("metal_stdlib", "metal_math", "metal_simdgroup", "metal_atomic", "metal_compute",
                 "metal_integer", "metal_common", "metal_relational", "metal_geometric")
_PREPROCESSOR_FILES = {"shader.metal", "<built-in>", "<command line>", "<scratch space>"} | {
    f"include/{name}" for name in _STUB_HEADERS}
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]*)[>"]', re.M)
_LINE_MARKER_RE = re.compile(r'^#\s+\d+\s+"((?:[^"\\]|\\.)*)"', re.M)

_build_lock = threading.Lock()


@dataclass
class Built:
    path: Path
    kernels: list[KernelInfo]
    stack_bytes: int


def compile_timeout() -> float:
    """Seconds one compiler run may take (``METALCORE_EXECUTOR_COMPILE_TIMEOUT``, default 300)."""
    return float(os.environ.get("METALCORE_EXECUTOR_COMPILE_TIMEOUT", "300"))


def find_compiler() -> str | None:
    """A clang++ that can build shaders (clang >= 17), or None. ``METALCORE_CLANG`` names one."""
    return _find_compiler_cached(os.environ.get("METALCORE_CLANG", ""))


_compiler_cache: dict[str, str | None] = {}
_version_cache: dict[str, str] = {}


def _version(cxx: str) -> str:
    if cxx not in _version_cache:
        _version_cache[cxx] = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                             timeout=30).stdout
    return _version_cache[cxx]


def _find_compiler_cached(explicit: str) -> str | None:
    if explicit in _compiler_cache:
        return _compiler_cache[explicit]
    found = None
    for name in ([explicit] if explicit else COMPILER_CANDIDATES):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            m = re.search(r"clang version (\d+)", _version(path))
        except (OSError, subprocess.SubprocessError):
            continue
        if m and int(m.group(1)) >= _MIN_CLANG:
            found = path
            break
    _compiler_cache[explicit] = found
    return found


def missing_compiler_message() -> str:
    explicit = os.environ.get("METALCORE_CLANG")
    if explicit:
        return f"METALCORE_CLANG={explicit} is not a clang++ >= {_MIN_CLANG} on PATH"
    return (f"clang++ >= {_MIN_CLANG} was not found (searched on PATH: {', '.join(COMPILER_CANDIDATES)}); install "
            f"one (Debian/Ubuntu: `apt-get install clang-19`) or set METALCORE_CLANG=/path/to/clang++")


def _trim(text: str, lines: int = 60) -> str:
    out = text.strip().splitlines()
    return "\n".join(out[:lines] + ([f"... ({len(out) - lines} more lines)"] if len(out) > lines else []))


def _run(cmd: list[str], what: str, cwd: Path) -> str:
    timeout = compile_timeout()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise MetalCompileError(f"{what} took longer than {timeout:g} s and was stopped (set "
                                f"METALCORE_EXECUTOR_COMPILE_TIMEOUT to allow more)") from e
    if proc.returncode != 0:
        raise MetalCompileError(f"{what} failed:\n{_trim(proc.stderr)}")
    return proc.stdout


def _key(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join([_FORMAT_VERSION.encode(), *parts])).hexdigest()[:32]


def _compiler_parts(cxx: str) -> list[bytes]:
    return [os.path.realpath(cxx).encode(), _version(cxx).encode(), " ".join(_CXXFLAGS).encode()]


def _runtime_object(cxx: str) -> tuple[Path, str]:
    """The compiled runtime (cached) and its SHA-256."""
    sources = [(HERE / n).read_bytes() for n in ("metal_runtime.cpp", "metal_rt_abi.h")]
    stem = f"runtime-{_key(*_compiler_parts(cxx), _RUNTIME_OPT.encode(), *sources)}"
    found = _cache.load(stem)
    if found is None:
        with tempfile.TemporaryDirectory(prefix="metalcore-runtime-") as tmp:
            work = Path(tmp)
            (work / "metal_runtime.cpp").write_bytes(sources[0])
            (work / "metal_rt_abi.h").write_bytes(sources[1])
            _run([cxx, *_CXXFLAGS, _RUNTIME_OPT, "-c", "metal_runtime.cpp", "-o", "runtime.o"],
                 "building the executor runtime", work)
            data = (work / "runtime.o").read_bytes()
            _cache.store(stem, ".o", data, {})
        found = _cache.load(stem)
    path, _ = found
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _refuse_outside_includes(source: str) -> None:
    for m in _INCLUDE_RE.finditer(source):
        target = m.group(1)
        if target.startswith("/") or ".." in Path(target).parts:
            raise MetalCompileError(f"#include of {target!r} refused: the executor compiles one source string "
                                    f"and includes no files from the machine (absolute paths and '..' are "
                                    f"refused); paste the header into the source, as torch.mps.compile_shader "
                                    f"also requires")


def _preprocess(source: str, cxx: str, work: Path) -> str:
    """clang -E with empty stand-ins for <metal_stdlib> & co. (the real header comes at compile time)."""
    _refuse_outside_includes(source)
    (work / "include").mkdir()
    for name in _STUB_HEADERS:
        (work / "include" / name).write_text("")
    (work / "shader.metal").write_text(source)
    pre = _run([cxx, "-E", "-x", "c++", "-std=c++17", "-nostdinc", "-nostdinc++", "-isystem", "include",
                "-D__METAL_VERSION__=310", "-D__METALCORE_EXECUTOR__=1", "-D__HAVE_BFLOAT__=1", "shader.metal"],
               "preprocessing the shader", work)
    for m in _LINE_MARKER_RE.finditer(pre):
        if m.group(1) not in _PREPROCESSOR_FILES:
            raise MetalCompileError(f"#include of {m.group(1)!r} refused: a shader may include only "
                                    f"<metal_stdlib> and the other Metal headers")
    return pre


def _stack_need(su_text: str) -> int:
    """Bytes of stack the shader's own frames can use at most (``-fstack-usage`` output: one line per
    function, ``location<TAB>bytes<TAB>static|dynamic[,bounded]``)."""
    return sum(int(line.rsplit("\t", 2)[1]) for line in su_text.splitlines() if line.count("\t") >= 2)


def stack_bytes(need: int, kernels: list[KernelInfo]) -> int:
    """The fiber stack for a shader whose frames need ``need`` bytes (``METALCORE_EXECUTOR_STACK_KB``
    raises the 64 KiB floor)."""
    env = os.environ.get("METALCORE_EXECUTOR_STACK_KB")
    floor = int(env) << 10 if env else _STACK_MIN
    size = max(floor, need + _STACK_MARGIN)
    if size > _STACK_MAX:
        names = ", ".join(k.name for k in kernels)
        raise MetalLimitError(f"the shader's functions ({names}) need up to {need >> 10} KiB of stack per thread "
                              f"(large local arrays?); the executor allows {_STACK_MAX >> 20} MiB: move large "
                              f"arrays to threadgroup or device memory")
    return (size + 4095) // 4096 * 4096


def build(source: str, checked: bool) -> Built:
    """Compile ``source`` (or find it in the cache) into a verified shared library."""
    cxx = find_compiler()
    if cxx is None:
        raise MetalCompileError(missing_compiler_message())
    with tempfile.TemporaryDirectory(prefix="metalcore-shader-") as tmp:
        work = Path(tmp)
        cpp, kernels = translate(_preprocess(source, cxx, work))
        unit = f'#include "metal_stdlib.h"\n{cpp}'
        headers = [(HERE / n).read_bytes() for n in ("metal_stdlib.h", "metal_rt_abi.h")]
        with _build_lock:
            runtime, runtime_sha = _runtime_object(cxx)
            stem = "shader-" + _key(*_compiler_parts(cxx), _SHADER_OPT.encode(), str(checked).encode(),
                                    unit.encode(), *headers, runtime_sha.encode())
            found = _cache.load(stem)
            if found is None:
                (work / "shader.cpp").write_text(unit)
                _run([cxx, *_CXXFLAGS, _SHADER_OPT, f"-DMTL_CHECKED={int(checked)}", "-I", str(HERE),
                      "-fstack-usage", "-c", "shader.cpp", "-o", "shader.o"],
                     "compiling the shader as C++ (the executor's stand-in for Apple's compiler)", work)
                need = _stack_need((work / "shader.su").read_text())
                _run([cxx, "-shared", "shader.o", str(runtime), "-o", "shader.so", "-lm", "-lpthread"],
                     "linking the shader", work)
                _cache.store(stem, ".so", (work / "shader.so").read_bytes(),
                             {"kernels": [k.to_json() for k in kernels], "stack_need": need})
                found = _cache.load(stem)
    path, meta = found
    kernels = [KernelInfo.from_json(d) for d in meta["kernels"]]
    return Built(path, kernels, stack_bytes(int(meta["stack_need"]), kernels))
