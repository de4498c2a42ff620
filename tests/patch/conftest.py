import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by per-op overhead: on a loaded 2-core machine, intra-op threads
    make a 2x64 @ 64x96 linear take 3.3 ms instead of 28 us (measured), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
