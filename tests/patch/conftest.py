import pytest
import torch

import metalcore


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by per-op overhead: on a loaded 2-core machine, intra-op threads
    make a 2x64 @ 64x96 linear take 3.3 ms instead of 28 us (measured), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _metalcore_code():
    """On the CPU a patched model runs its modules' own code (metalcore has nothing faster there); an
    explicit backend runs metalcore's, which is what these tests check against the unpatched model.
    Tests of the automatic choice itself open ``use_backend("auto")``."""
    with metalcore.use_backend("reference"):
        yield


class OpRecorder:
    """Names of the metalcore ops that ran (eager fast path or the torch.library op alike): every call
    goes through the one dispatcher, MetalcoreOp._select."""

    def __init__(self, monkeypatch):
        from metalcore._op import MetalcoreOp

        self.ops: set[str] = set()
        select = MetalcoreOp._select
        recorder = self

        def recording_select(op, args, kwargs):
            recorder.ops.add(op.name)
            return select(op, args, kwargs)

        monkeypatch.setattr(MetalcoreOp, "_select", recording_select)


@pytest.fixture
def ran_ops(monkeypatch):
    return OpRecorder(monkeypatch).ops
