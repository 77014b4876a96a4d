"""The CUDA-graph cache's logic, checked without CUDA through a stand-in capture backend that
records captures and replays the function on its static buffers (what a graph does)."""

import pytest
import torch

from dopsd_fast.graphs import GraphCache, GraphEntry, GraphStructureError


class FakeBackend:
    def __init__(self):
        self.captured = 0

    def capture(self, fn, inputs):
        self.captured += 1
        static = [x.clone() for x in inputs]
        outs = list(fn(*static))

        def replay():  # recompute into the same output buffers, from the static inputs
            with torch.no_grad():
                for o, new in zip(outs, fn(*static)):
                    o.copy_(new)

        return GraphEntry(static, tuple(outs), replay)


def test_capture_once_per_structure_replay_with_new_values_and_limit():
    w = torch.nn.Parameter(torch.randn(4, 4))
    fn = lambda x: (x @ w,)  # noqa: E731
    cache = GraphCache(fn, lambda: [w], max_graphs=2, backend=FakeBackend())
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cache("a", x1)[0], x1 @ w.detach())
    torch.testing.assert_close(cache("a", x2)[0], x2 @ w.detach())  # replay reads the new input values
    assert (cache.captures, cache.replays) == (1, 2)
    cache("a", torch.randn(5, 4))  # new shape: new graph
    assert cache.captures == 2
    y = cache("b", x1)[0]  # over the limit: eager, still correct
    torch.testing.assert_close(y, x1 @ w.detach())
    assert cache.eager_calls == 1 and cache.captures == 2
    # in-place parameter updates (optimizer / EMA) are seen by the graph
    with torch.no_grad():
        w.mul_(2)
    torch.testing.assert_close(cache("a", x1)[0], x1 @ w.detach())


def test_replaced_parameter_raises_and_clear_recovers():
    lin = torch.nn.Linear(4, 4)
    cache = GraphCache(lambda x: (lin(x),), lambda: list(lin.parameters()), backend=FakeBackend())
    x = torch.randn(2, 4)
    cache("k", x)
    lin.weight = torch.nn.Parameter(torch.randn(4, 4))  # structure change: a new tensor
    with pytest.raises(GraphStructureError, match="replaced"):
        cache("k", x)
    cache.clear()
    torch.testing.assert_close(cache("k", x)[0], lin(x).detach())


def test_outputs_are_not_aliased_to_the_graph_buffers():
    w = torch.randn(3, 3)
    cache = GraphCache(lambda x: (x @ w,), lambda: [w], backend=FakeBackend())
    a = cache("k", torch.ones(2, 3))[0]
    cache("k", torch.zeros(2, 3))
    assert a.abs().sum() > 0  # the first result survived the second replay
