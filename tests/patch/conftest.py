import pytest
import torch

import metalcore
from metalcore._op import observing


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


@pytest.fixture
def ran_ops():
    """Names of the metalcore ops that ran in the test (eager calls and the torch.library op alike)."""
    ops: set[str] = set()
    with observing(lambda op, backend: ops.add(op)):
        yield ops
