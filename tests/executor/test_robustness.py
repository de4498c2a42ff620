"""A shader bug fails a launch with a Python exception, never the process or the test run.

Endless loops stop at the time limit or on Ctrl-C; threadgroup arrays are bounds-checked like device
buffers; stacks are sized from the shader's frames, and a stack overflow or a crash inside a kernel
is reported; compilation is time-limited. What crashed or hung the process before runs here in a
subprocess with a timeout, so that a regression fails one test instead of the run.
"""

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

kernel void spin(device float* out, uint i [[thread_position_in_grid]]) {
    while (true) {}
}

kernel void spin_for(device float* out, uint i [[thread_position_in_grid]]) {
    for (;;) {}
}

// Waits for a flag nobody sets (a cross-threadgroup spin-wait gone wrong).
kernel void wait_flag(device atomic_int* flag, uint i [[thread_position_in_grid]]) {
    do {} while (atomic_load_explicit(flag, memory_order_relaxed) == 0);
}

kernel void tg_neighbours(device float* out, constant uint& reach, uint tid [[thread_position_in_threadgroup]]) {
    threadgroup float a[4];
    threadgroup float b[4];
    b[tid % 4] = 7.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    a[tid * reach] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = b[tid % 4];
}

static float tg_sum(threadgroup const float* p, uint n) {
    float s = 0.0f;
    for (uint k = 0; k < n; ++k) s += p[k];
    return s;
}

kernel void tg_through_pointer(device float* out, constant uint& n, uint tid [[thread_position_in_threadgroup]]) {
    threadgroup float row[8];
    row[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = tg_sum(row, n);
}

kernel void tg_2d(device float* out, constant uint& col, uint2 t [[thread_position_in_threadgroup]]) {
    threadgroup float tile[4][5];
    tile[t.y][t.x] = float(t.x + 10 * t.y);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t.y * 4 + t.x] = tile[t.x + col][t.y];
}

// A local array of 256 KiB: more than the old fixed 64 KiB fiber stack.
kernel void big_locals(device float* out, constant uint& n, uint i [[thread_position_in_grid]]) {
    float scratch[65536];
    for (uint k = 0; k < n; ++k) scratch[k] = float((k + i) % 7u);
    float s = 0.0f;
    for (uint k = 0; k < n; ++k) s += scratch[(k * 7919u) % n];
    out[i] = s;
}

// Loops poll for cancellation, except in a constant evaluation.
constexpr uint triangle(uint n) {
    uint s = 0;
    for (uint k = 0; k <= n; ++k) s += k;
    return s;
}

kernel void constexpr_loop(device uint* out, uint i [[thread_position_in_grid]]) {
    constexpr uint t = triangle(10);
    out[i] = t + triangle(i);
}

kernel void wild_write(device float* out, constant long& offset, uint i [[thread_position_in_grid]]) {
    out[offset] = 1.0f;
}

kernel void write_second(device float* a, device float* b, uint i [[thread_position_in_grid]]) {
    device float* q = &b[0];          // a raw address: it finds its bounds again by lookup
    q[i] = float(i) + 100.0f;
}
"""

RECURSION = r"""
static float depth(float x, uint n) {
    volatile float pad[64];
    pad[n % 64] = x;
    return n == 0 ? pad[0] : depth(x + 1.0f, n - 1) + pad[n % 64];
}
kernel void recurse(device float* out, constant uint& n, uint i [[thread_position_in_grid]]) {
    out[i] = depth(1.0f, n);
}
"""


@pytest.fixture(scope="module")
def lib(executor):
    return executor.compile_shader(SOURCE)


def run_isolated(code: str, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the executor imported as ``ex``; ``SOURCE`` and ``RECURSION``
    defined) and return it; a hang fails the test after ``timeout`` seconds."""
    prelude = (f"import torch\nfrom metalcore import executor as ex\nSOURCE = {SOURCE!r}\n"
               f"RECURSION = {RECURSION!r}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **popen)


# ---- endless loops: time limit and Ctrl-C -----------------------------------------------------------

@pytest.mark.parametrize("kernel", ["spin", "spin_for"])
def test_endless_loop_stops_at_the_time_limit(executor, lib, monkeypatch, kernel):
    monkeypatch.setenv("METALCORE_EXECUTOR_TIMEOUT", "0.5")
    start = time.monotonic()
    with pytest.raises(executor.MetalTimeoutError, match=rf"kernel '{kernel}' ran longer than 0.5 s.*"
                                                         "METALCORE_EXECUTOR_TIMEOUT"):
        getattr(lib, kernel)(torch.zeros(64), threads=64, group_size=32)
    assert time.monotonic() - start < 5
    x = torch.zeros(4)
    lib.tg_through_pointer(x, 4, threads=4, group_size=4)  # the library still works afterwards
    assert torch.equal(x, torch.full((4,), 6.0))


def test_spin_wait_on_device_memory_stops_at_the_time_limit(executor, lib, monkeypatch):
    monkeypatch.setenv("METALCORE_EXECUTOR_TIMEOUT", "0.5")
    with pytest.raises(executor.MetalTimeoutError, match="wait_flag"):
        lib.wait_flag(torch.zeros(1, dtype=torch.int32), threads=256, group_size=64)


def test_ctrl_c_interrupts_an_endless_launch():
    code = """
    import os, sys
    lib = ex.compile_shader(SOURCE)
    os.environ["METALCORE_EXECUTOR_TIMEOUT"] = "0"   # no time limit: only Ctrl-C can stop it
    print("launching", flush=True)
    try:
        lib.spin(torch.zeros(64), threads=64, group_size=32)
    except KeyboardInterrupt as e:
        print("interrupted:", e, flush=True)
    x = torch.zeros(4)
    lib.tg_through_pointer(x, 4, threads=4, group_size=4)
    print("after:", x.tolist(), flush=True)
    """
    prelude = (f"import torch\nfrom metalcore import executor as ex\nSOURCE = {SOURCE!r}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 240)
        assert ready and proc.stdout.readline().strip() == "launching"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted: kernel 'spin' interrupted" in out
    assert "after: [6.0, 6.0, 6.0, 6.0]" in out


def test_loops_in_constant_evaluation_still_compile(lib):
    out = torch.zeros(5, dtype=torch.int32)
    lib.constexpr_loop(out)
    assert out.tolist() == [55 + i * (i + 1) // 2 for i in range(5)]


# ---- threadgroup memory ------------------------------------------------------------------------------

def test_small_threadgroup_overrun_is_reported_not_written_into_the_neighbour(executor, lib):
    out = torch.zeros(8)
    with pytest.raises(executor.MetalOutOfBoundsError,
                       match=r"threadgroup access in kernel 'tg_neighbours': threadgroup array 'a', byte "
                             r"offset 16, access of 4 bytes, array size 16 bytes"):
        lib.tg_neighbours(out, 1, threads=8, group_size=8)
    lib.tg_neighbours(out, 1, threads=4, group_size=4)  # in bounds: b keeps its values
    assert torch.equal(out[:4], torch.full((4,), 7.0))


def test_threadgroup_overrun_through_a_pointer_and_in_a_2d_array(executor, lib):
    out = torch.zeros(16)
    lib.tg_through_pointer(out, 8, threads=8, group_size=8)
    assert torch.equal(out[:8], torch.full((8,), 28.0))
    with pytest.raises(executor.MetalOutOfBoundsError, match=r"threadgroup array 'row', byte offset 32"):
        lib.tg_through_pointer(out, 9, threads=8, group_size=8)
    lib.tg_2d(out, 0, threads=(4, 4), group_size=(4, 4))  # tile[x][y] for x, y < 4
    assert torch.equal(out.view(4, 4), (torch.arange(4)[:, None] + 10 * torch.arange(4)[None, :]).float())
    with pytest.raises(executor.MetalOutOfBoundsError, match=r"threadgroup array 'tile'"):
        lib.tg_2d(out, 1, threads=(4, 4), group_size=(4, 4))  # row 4 of a 4-row tile


def test_large_threadgroup_overrun_is_an_error_not_a_crash():
    proc = run_isolated("""
    lib = ex.compile_shader(SOURCE)
    try:
        lib.tg_neighbours(torch.zeros(64), 100000, threads=64, group_size=64)
    except ex.MetalOutOfBoundsError as e:
        print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: out-of-bounds threadgroup access in kernel 'tg_neighbours'" in proc.stdout


def test_crash_in_unchecked_mode_is_an_error_not_a_crash():
    proc = run_isolated("""
    lib = ex.compile_shader(SOURCE, bounds_check=False)
    try:
        lib.wild_write(torch.zeros(4), 1 << 42, threads=4, group_size=4)  # 16 TiB away: never mapped
    except ex.MetalKernelError as e:
        print("caught:", e)
    x = torch.zeros(4)
    lib.tg_through_pointer(x, 4, threads=4, group_size=4)
    print("after:", x.tolist())
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "caught: kernel 'wild_write' crashed: segmentation fault" in proc.stdout
    assert "after: [6.0, 6.0, 6.0, 6.0]" in proc.stdout


# ---- stacks ------------------------------------------------------------------------------------------

def test_large_local_array_gets_a_stack_that_fits():
    proc = run_isolated("""
    lib = ex.compile_shader(SOURCE)
    n = 65536
    out = torch.zeros(64)
    lib.big_locals(out, n, threads=64, group_size=32)
    k = torch.arange(n, dtype=torch.float64)
    expected = torch.stack([((k + i) % 7).sum() for i in range(64)]).float()  # exact in float32
    print("ok" if torch.equal(out, expected) else f"wrong {out[:4]} {expected[:4]}")
    print("stack KiB:", lib.stack_bytes >> 10)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout.splitlines()
    assert int(proc.stdout.split("stack KiB:")[1]) >= 256 + 32


def test_local_array_beyond_the_stack_limit_is_a_limit_error(executor):
    source = ("kernel void huge(device float* out, uint i [[thread_position_in_grid]]) {\n"
              "    float big[4194304];\n    big[i] = 1.0f;\n    out[i] = big[(i * 31u) % 4194304u];\n}\n")
    with pytest.raises(executor.MetalLimitError, match=r"need up to 16384 KiB of stack per thread.*8 MiB"):
        executor.compile_shader(source)


def test_stack_overflow_is_an_error_not_a_crash():
    proc = run_isolated("""
    lib = ex.compile_shader(RECURSION)
    out = torch.zeros(32)
    lib.recurse(out, 10, threads=32, group_size=32)
    print("shallow:", out[0].item())
    try:
        lib.recurse(out, 1000000, threads=32, group_size=32)
    except ex.MetalKernelError as e:
        print("caught:", e)
    lib.recurse(out, 10, threads=32, group_size=32)
    print("after:", out[0].item())
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shallow:" in proc.stdout and "after:" in proc.stdout
    assert "caught: kernel 'recurse' overflowed its" in proc.stdout and "recursion" in proc.stdout


# ---- compilation ------------------------------------------------------------------------------------

def test_compilation_is_time_limited(executor, monkeypatch):
    monkeypatch.setenv("METALCORE_EXECUTOR_COMPILE_TIMEOUT", "0.001")
    with pytest.raises(executor.MetalCompileError, match=r"took longer than 0.001 s.*"
                                                         "METALCORE_EXECUTOR_COMPILE_TIMEOUT"):
        executor.compile_shader(SOURCE + "\n// a source not compiled yet\n")


# ---- arguments ---------------------------------------------------------------------------------------

def test_overlapping_views_are_not_a_false_out_of_bounds(lib, executor):
    t = torch.zeros(12)
    a, b = t[0:8], t[4:12]  # two parameters viewing one tensor; &b[0] lies inside a too
    lib.write_second(a, b, threads=8, group_size=8)
    assert torch.equal(t, torch.cat([torch.zeros(4), torch.arange(8.0) + 100]))
    with pytest.raises(executor.MetalOutOfBoundsError, match=r"buffer 0 \('a' and 'b'\), byte offset 48"):
        lib.write_second(a, b, threads=9, group_size=9)  # q[8] is past the end of both views
