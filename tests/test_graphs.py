"""CUDA-graph replay of launch-bound paths (metalcore/_graphs.py): eager off CUDA; on CUDA, replays
that equal the eager call on new data, from another stream, and at most MAX_GRAPHS graphs kept."""

import warnings

import pytest
import torch

from metalcore import _graphs


def test_replay_runs_eagerly_off_cuda():
    calls = []

    def fn(x):
        calls.append(x)
        return (x * 2,)

    x = torch.arange(4.0)
    (y,) = _graphs.replay(fn, x)
    assert torch.equal(y, x * 2) and len(calls) == 1 and calls[0] is x
    assert not _graphs._graphs


def _plus_one(x):
    return (x + 1,)


@pytest.fixture
def fresh_graphs():
    _graphs.clear()
    yield
    _graphs.clear()


@pytest.mark.gpu
def test_gpu_replay_equals_the_eager_call_on_new_data(fresh_graphs, device):
    """Captured on the first call, replayed on the next ones: each replay sees its own inputs (copied
    into the static buffers) and returns outputs the next replay does not overwrite."""
    def fn(A, b):
        # solve_ex: torch.linalg.solve checks its info on the host, a synchronisation no capture takes.
        return (torch.linalg.solve_ex(A @ A.mT + torch.eye(8, device=A.device), b)[0], A.sum(-1))

    inputs = [(torch.randn(4, 8, 8, device=device), torch.randn(4, 8, 1, device=device)) for _ in range(3)]
    outs = [_graphs.replay(fn, *xs) for xs in inputs]
    assert len(_graphs._graphs) == 1
    for xs, out in zip(inputs, outs):
        for got, want in zip(out, fn(*xs)):
            torch.testing.assert_close(got, want)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        from_side = _graphs.replay(fn, *inputs[0])
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(from_side[0], outs[0][0])


@pytest.mark.gpu
def test_gpu_replay_keeps_at_most_max_graphs(fresh_graphs, device, monkeypatch):
    """The least recently used graph goes first; inputs above MAX_ELEMENTS are never captured."""
    monkeypatch.setattr(_graphs, "MAX_GRAPHS", 2)
    monkeypatch.setattr(_graphs, "MAX_ELEMENTS", 5)
    for n in (3, 4, 5, 6):
        (y,) = _graphs.replay(_plus_one, torch.zeros(n, device=device))
        assert torch.equal(y.cpu(), torch.ones(n))
    assert [key[1][0] for key in _graphs._graphs] == [torch.Size([4]), torch.Size([5])]


def _synchronising(x):
    return (x * float(x.sum()),)     # float() reads the device: a capture refuses it


@pytest.mark.gpu
def test_gpu_failed_capture_warns_once_and_stays_eager(fresh_graphs, device):
    x = torch.ones(3, device=device)
    with pytest.warns(RuntimeWarning, match="capture of _synchronising failed"):
        (y,) = _graphs.replay(_synchronising, x)
    assert torch.equal(y.cpu(), torch.full((3,), 3.0)) and not _graphs._graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (y,) = _graphs.replay(_synchronising, 2 * x)
    assert torch.equal(y.cpu(), torch.full((3,), 12.0))
