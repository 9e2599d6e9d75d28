"""The greedy batcher of the model replicas (serve_app.batching), without Ray or a model.

A fake forward pass that blocks until the test releases it makes the batching decisions
observable: what queues while a batch runs forms the next batch, and nothing else."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from serve_app.batching import GreedyBatcher


class Gate:
    """A forward pass that records its inputs and waits for ``release()`` (on the model
    thread, as in a replica)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list[float]]] = []
        self.started = threading.Event()
        self._go = threading.Semaphore(0)
        self.fail_next = False

    def __call__(self, key: object, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((key, x[:, 0].tolist()))
        self.started.set()
        self._go.acquire()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return x * 10

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._go.release()


async def _until(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


def rows(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


def test_what_queues_during_a_forward_pass_is_the_next_batch() -> None:
    async def main() -> None:
        gate = Gate()
        b = GreedyBatcher(gate, max_batch_size=8)
        first = asyncio.ensure_future(b.submit("m", rows(1)))
        await _until(gate.started.is_set)  # batch 1 = the lone first request, no waiting
        rest = [asyncio.ensure_future(b.submit("m", rows(v))) for v in (2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.release(2)
        out = await asyncio.gather(first, *rest)
        assert [c[1] for c in gate.calls] == [[1.0], [2.0, 3.0, 4.0]]
        assert [t.item() for t in out] == [10.0, 20.0, 30.0, 40.0]  # each caller its own rows
        assert (b.stats.batches, b.stats.images) == (2, 4)
        b.close()
    asyncio.run(main())


def test_max_batch_size_counts_images_and_keeps_order() -> None:
    async def main() -> None:
        gate = Gate()
        b = GreedyBatcher(gate, max_batch_size=4)
        blocker = asyncio.ensure_future(b.submit("m", rows(0)))
        await _until(gate.started.is_set)
        futs = [asyncio.ensure_future(b.submit("m", rows(*vals)))
                for vals in ((1, 2), (3, 4), (5,), (6, 7, 8, 9, 10))]
        await asyncio.sleep(0.05)
        gate.release(4)
        out = await asyncio.gather(blocker, *futs)
        # 4-image batches in arrival order; a request larger than the batch runs alone
        assert [c[1] for c in gate.calls] == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0],
                                              [6.0, 7.0, 8.0, 9.0, 10.0]]
        assert out[4].squeeze(1).tolist() == [60.0, 70.0, 80.0, 90.0, 100.0]
        b.close()
    asyncio.run(main())


def test_batches_never_mix_keys() -> None:
    async def main() -> None:
        gate = Gate()
        b = GreedyBatcher(gate, max_batch_size=8)
        old, new = object(), object()  # two checkpoints during a hot swap
        blocker = asyncio.ensure_future(b.submit(old, rows(0)))
        await _until(gate.started.is_set)
        futs = [asyncio.ensure_future(b.submit(k, rows(v)))
                for k, v in ((old, 1), (new, 2), (old, 3), (new, 4))]
        await asyncio.sleep(0.05)
        gate.release(3)
        await asyncio.gather(blocker, *futs)
        assert [(k is old, v) for k, v in gate.calls] == [
            (True, [0.0]), (True, [1.0, 3.0]), (False, [2.0, 4.0])]
        b.close()
    asyncio.run(main())


def test_a_failed_batch_fails_only_its_callers_and_cancelled_callers_are_skipped() -> None:
    async def main() -> None:
        gate = Gate()
        b = GreedyBatcher(gate, max_batch_size=8)
        gate.fail_next = True
        doomed = asyncio.ensure_future(b.submit("m", rows(1)))
        await _until(gate.started.is_set)
        gone = asyncio.ensure_future(b.submit("m", rows(2)))
        kept = asyncio.ensure_future(b.submit("m", rows(3)))
        await asyncio.sleep(0.02)
        gone.cancel()  # a client that disconnected while queued
        gate.release(2)
        with pytest.raises(RuntimeError, match="boom"):
            await doomed
        assert (await kept).item() == 30.0
        assert [c[1] for c in gate.calls] == [[1.0], [3.0]]  # no work for the cancelled one
        assert b.stats.batches == 1  # the failed pass is not counted
        b.close()
    asyncio.run(main())


def test_wait_lets_a_batch_gather_company_only_while_not_full() -> None:
    async def main() -> None:
        calls: list[int] = []

        def forward(key: object, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return x

        b = GreedyBatcher(forward, max_batch_size=3, wait_s=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = asyncio.ensure_future(b.submit("m", rows(1)))
        await asyncio.sleep(0.02)
        others = [asyncio.ensure_future(b.submit("m", rows(v))) for v in (2, 3)]
        await asyncio.gather(first, *others)
        assert calls == [3]  # the first waited for the others, and the full batch left early
        assert loop.time() - t0 < 0.15
        b.max_batch_size, b.wait_s = 8, 0.0  # live reconfiguration
        await b.submit("m", rows(4))
        assert calls == [3, 1]
        b.close()
    asyncio.run(main())


def test_call_runs_on_the_model_thread_in_order_with_forward_passes() -> None:
    async def main() -> None:
        gate = Gate()
        b = GreedyBatcher(gate, max_batch_size=8)
        names: list[str] = []
        fwd = asyncio.ensure_future(b.submit("m", rows(1)))
        await _until(gate.started.is_set)
        one_off = asyncio.ensure_future(b.call(lambda: names.append(
            threading.current_thread().name) or "done"))
        await asyncio.sleep(0.05)
        assert not one_off.done()  # waits for the forward pass in progress
        gate.release()
        assert await one_off == "done" and (await fwd).item() == 10.0
        assert names[0].startswith("mve-model")
        b.close()
    asyncio.run(main())
