import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tolerances.py, oracle.py, cases.py

# In CI a backend that cannot run (no Triton interpreter, no shader executor) is a failure, never a
# skip: CI=true, or METALCORE_REQUIRE_BACKENDS=1 anywhere.
REQUIRE_BACKENDS = os.environ.get("CI") == "true" or os.environ.get("METALCORE_REQUIRE_BACKENDS") == "1"

# Under pytest-xdist every core already runs a worker; torch's own intra-op threads on top of that
# oversubscribe the machine (small-op tests ran 10-20x slower on 2 cores with 2 threads per worker).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
