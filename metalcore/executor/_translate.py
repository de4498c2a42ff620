"""Metal Shading Language -> C++ for ``metal_stdlib.h``: the executor's source translation.

The input has been through clang's preprocessor (so macro-instantiated kernels appear, and ``#``
line markers name the origin of each line). Each ``kernel void f(...)`` becomes a plain C++ function
plus an ``extern "C"`` entry wrapper binding its buffers and thread-position attributes; threadgroup
declarations become bounds-checked views of the threadgroup's storage; device, constant and
threadgroup pointers become ``mtl::dptr<T>``; every loop condition polls the runtime, so that a
launch can be interrupted or timed out. A construct the executor does not implement raises
:class:`UnsupportedMetalError` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from metalcore.executor._errors import MetalCompileError, MetalLimitError, UnsupportedMetalError

MAX_BUFFERS = 31
MAX_THREADS_PER_THREADGROUP = 1024

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
_PTR_RE = re.compile(rf"(\bconst\s+)?\b(device|constant|threadgroup)\s+(const\s+)?({_TYPE})\b\s*(const\s*)?\*")
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
    max_threads: int = MAX_THREADS_PER_THREADGROUP

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
        info.max_threads = min(int(m.group(2)), MAX_THREADS_PER_THREADGROUP)
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
        if p.buffer is not None and p.buffer >= MAX_BUFFERS:
            raise MetalLimitError(f"kernel '{name}' parameter '{p.name}' uses buffer index {p.buffer}; Apple "
                                  f"GPUs allow at most {MAX_BUFFERS} buffers (indices 0-{MAX_BUFFERS - 1})")
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


def _closing_paren(text: str, open_pos: int) -> int:
    """Index of the ')' matching the '(' at ``open_pos``."""
    depth = 0
    for i in range(open_pos, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise MetalCompileError(f"unbalanced parentheses after {text[max(0, open_pos - 20):open_pos + 1]!r}")


def _top_level_semicolons(s: str) -> list[int]:
    depth, out = 0, []
    for i, ch in enumerate(s):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == ";" and depth == 0:
            out.append(i)
    return out


def _poll_in_loops(text: str) -> str:
    """Every ``while``/``do-while``/``for`` condition first polls the runtime (``MTL_POLL()``: one load
    and a branch), so that an endless loop stops when its launch is interrupted or timed out.

    A range-for has no condition and iterates over a finite array; it is left as it is."""
    out, pos = [], 0
    for m in re.finditer(r"\b(for|while)\s*\(", text):
        if m.start() < pos:
            continue
        open_pos = m.end() - 1
        close = _closing_paren(text, open_pos)
        inner = text[open_pos + 1:close]
        if m.group(1) == "while":
            new = f"MTL_POLL() && ({inner})"
        else:
            semis = _top_level_semicolons(inner)
            if len(semis) != 2:
                out.append(text[pos:close])
                pos = close
                continue
            a, b = semis
            cond = inner[a + 1:b].strip() or "true"
            new = f"{inner[:a + 1]} MTL_POLL() && ({cond});{inner[b + 1:]}"
        out.append(text[pos:open_pos + 1] + new)
        pos = close
    out.append(text[pos:])
    return "".join(out)


def translate(pre: str) -> tuple[str, list[KernelInfo]]:
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

    # threadgroup T name[...]; -> the threadgroup's storage for it: a bounds-checked view of an array
    # (in bounds-checked mode), a reference to a scalar.
    counter = iter(range(1 << 30))

    def tg_decl(m: re.Match) -> str:
        k = next(counter)
        return (f"using __mtl_tg{k} = {m.group(1)} {m.group(3).strip()}; "
                f'auto&& {m.group(2)} = mtl::tg_var<__mtl_tg{k}, {k}>("{m.group(2)}");')

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

    text = _poll_in_loops(text)

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

