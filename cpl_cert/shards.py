"""Evaluations split over the processes of a ``torchrun`` job: batch k on process k mod N, every result in batch order.

Under ``torchrun --nproc-per-node N -m cpl_cert certify|attack`` (or a script of one's own) every process
runs the same evaluation inside ``with join(device) as shards:`` (NCCL with one GPU per process, gloo on
CPUs). ``Shards.map`` hands each batch to one process (the single-process batch boundaries, so that each
point is computed exactly as one process computes it) and gives every process all results in batch
order. Processes meet after every round of N batches: a failure on any of them travels with that
round's results, so that all stop together with its message (``JobFailed``); one process is the plain
loop with no meeting at all. See docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .device import resolve_device
from .distributed import DistInfo, env_info, setup, teardown
from .errors import CplCertError

T = TypeVar("T")
R = TypeVar("R")

POLL_SECONDS = 0.005
"""How often a process waiting for the others looks again: short waits keep it answering interrupts."""

MEETING_TIMEOUT = datetime.timedelta(days=7)
"""How long a process waits at a meeting before the backend gives up: as long as the longest batch may take
(an attack batch on a CPU can take hours). A process that dies is noticed at once (torchrun stops the
others, gloo sees the connection close), and a waiting process still answers interrupts."""

LOST_CONTACT = "lost contact with another process of this torchrun job (it ended without a message; see torchrun's report)"


class JobFailed(CplCertError):
    """Another process of the job failed: its message and its rank (every process raises it, or its own error)."""

    def __init__(self, rank: int, world_size: int, message: str) -> None:
        super().__init__(f"process {rank} of {world_size} failed: {message}")
        self.rank, self.message = rank, message


def describe(exc: BaseException) -> str:
    """An error in one sentence, as the command line says it: the message, with the type unless it is cpl-cert's own."""
    if isinstance(exc, CplCertError):
        return str(exc)
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


@dataclass
class Shards:
    """This process's place in an evaluation shared by the processes of a job (one process: all of it)."""

    info: DistInfo = field(default_factory=DistInfo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    state: str = "open"
    """``open``; ``closed``: the last meeting is over, or every process knows of a failure (no more
    meetings); ``broken``: a meeting was cut short (an interrupt, a process gone), so no collective can
    match any more."""

    @property
    def enabled(self) -> bool:
        return self.info.enabled

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def map(self, items: Sequence[T], compute: Callable[[T], R], offset: int = 0, on_done: Callable[[int], None] | None = None) -> list[R]:
        """``compute(item)`` for every item, in order; item ``i`` is batch ``offset + i`` and runs on its owner.

        Every process gets every result (tensors on its own device). ``on_done(count)`` follows the
        results known here: after each item (one process) or each round of N batches.
        """
        if not self.enabled:
            results = []
            for item in items:
                results.append(compute(item))
                if on_done is not None:
                    on_done(len(results))
            return results
        results, n, size = [], len(items), self.world_size
        for start in range(offset // size * size, offset + n, size):
            mine = start + self.rank - offset
            received = self._meet(("value", compute, items[mine]) if 0 <= mine < n else ("idle", None, None))
            for k, (kind, value) in enumerate(received):
                if 0 <= start + k - offset < n:
                    results.append(_move(value, self.device) if kind == "value" else _mismatch(self))
            if on_done is not None:
                on_done(len(results))
        return results

    def agree(self, value: Any, what: str) -> None:
        """Stop every process unless all hold the same ``value`` (a fingerprint of ``what`` they evaluate)."""
        if not self.enabled:
            return
        values = [v for _, v in self._meet(("value", lambda x: x, value))]
        if any(v != values[0] for v in values):
            self.state = "closed"
            ranks = ", ".join(str(r) for r, v in enumerate(values) if v != values[0])
            raise CplCertError(f"the processes of this job do not hold the same {what} (process {ranks} differs from process 0)")

    def _meet(self, task: tuple[str, Callable[[Any], Any] | None, Any]) -> list[tuple[str, Any]]:
        """Run this process's task, then trade its outcome (a value, nothing, or a failure) with every process."""
        kind, compute, item = task
        try:
            payload = (kind, _move(compute(item), torch.device("cpu")) if compute is not None else None)
        except Exception as exc:  # passed on to every process, then raised here
            self._share(exc)
            raise
        received = self._trade(payload)
        self._raise_failures(received)
        return received

    def _share(self, exc: BaseException) -> None:
        """Tell every process about this process's failure (at their next meeting)."""
        if self.enabled and self.state == "open" and not isinstance(exc, JobFailed):
            try:
                self._raise_failures(self._trade(("error", describe(exc))))
            except CplCertError:
                pass
            if self.state == "open":
                self.state = "closed"

    def _raise_failures(self, received: list[tuple[str, Any]]) -> None:
        for rank, (kind, message) in enumerate(received):
            if kind == "error":
                self.state = "closed"
                if rank != self.rank:
                    raise JobFailed(rank, self.world_size, message)

    def _trade(self, payload: tuple[str, Any]) -> list[tuple[str, Any]]:
        """Every process's payload, in rank order (an all-gather of pickled bytes that answers interrupts)."""
        data = pickle.dumps(payload)
        try:
            return [pickle.loads(b) for b in _all_gather_bytes(data, self.device)]
        except Exception:
            self.state = "broken"
            raise CplCertError(LOST_CONTACT) from None
        except BaseException:
            self.state = "broken"
            raise

    def leave(self) -> None:
        """The last meeting: every process has finished (or one failed, raised here as ``JobFailed``)."""
        if self.enabled and self.state == "open":
            received = self._trade(("done", None))
            self._raise_failures(received)
            if any(kind != "done" for kind, _ in received):
                _mismatch(self)
            self.state = "closed"


def _mismatch(shards: Shards) -> Any:
    shards.state = "closed"
    raise CplCertError("the processes of this job ran different evaluations (different data or options on some of them)")


def _all_gather_bytes(data: bytes, device: torch.device) -> list[bytes]:
    """Every process's bytes: the lengths first, then the bytes padded to the longest."""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    _wait(dist.all_gather(sizes, size, async_op=True))
    lengths = [int(s) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else padded[:0]
    padded = padded.to(device)
    gathered = [torch.empty_like(padded) for _ in lengths]
    _wait(dist.all_gather(gathered, padded, async_op=True))
    return [bytes(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, lengths, strict=True)]


def _wait(work: Any) -> None:
    """Wait for a collective in short sleeps, so that an interrupt reaches Python at once (not after it)."""
    while not work.is_completed():
        time.sleep(POLL_SECONDS)
    work.wait()


def _move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (also inside lists, tuples, dicts and dataclasses) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {f.name: _move(getattr(value, f.name), device) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **{k: v for k, v in moved.items() if _is_init(value, k)})
    return value


def _is_init(value: Any, name: str) -> bool:
    return next(f.init for f in dataclasses.fields(value) if f.name == name)


@contextmanager
def join(device: str | torch.device | None = "auto") -> Iterator[Shards]:
    """This process's part of a torchrun job (``WORLD_SIZE`` > 1), or the whole of a single-process run.

    Joins the process group (NCCL with one GPU per process, ``cuda:LOCAL_RANK``, or gloo on CPUs). An error
    leaving the block is passed on to every process first (they raise ``JobFailed`` at their next
    meeting); after an interrupt nothing is traded (every process of the job is interrupted). At the end
    every process meets once more, so none leaves while another still works.
    """
    info = env_info()
    shards = Shards(info, setup(info, resolve_device(device), timeout=MEETING_TIMEOUT))
    try:
        yield shards
    except Exception as exc:
        shards._share(exc)
        raise
    except BaseException:
        shards.state = "broken"
        raise
    else:
        shards.leave()
    finally:
        if shards.state != "broken":
            teardown(info)
