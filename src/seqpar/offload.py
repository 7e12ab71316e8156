"""Host memory for offloaded activations, and FPDT's chunk store.

`host_store(device)`: pinned buffers copied on a side stream on CUDA, numpy-owned copies on
CPU (outside torch's allocator, so the memory benchmark's device meter does not count them);
`HOST_BYTES` meters every CPU host buffer of the process. `ChunkStore` keeps an FPDT call's
chunks by key, on the device or offloaded, with prefetch (double buffer); `streamed` yields
groups of chunks while the next group is prefetched. Used by attention/fpdt.py,
attention/fpdt_block.py and chunked.offloaded_checkpoint.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Hashable, Iterator

import torch
from torch import Tensor

__all__ = ["OffloadStats", "HostBytes", "HOST_BYTES", "host_store", "ChunkStore", "streamed"]


@dataclass
class OffloadStats:
    """Bytes held and moved by one ChunkStore (one attention call)."""

    host_bytes: int = 0      # currently in host buffers
    host_peak: int = 0
    device_bytes: int = 0    # store contents kept on the device (offload off)
    device_peak: int = 0
    to_host: int = 0         # device -> host copies
    to_device: int = 0       # host -> device copies (fetches and prefetches)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class HostBytes:
    """Live and peak bytes of every CPU host-offload buffer of this process (the chunk stores'
    and `offloaded_checkpoint`'s), counted from allocation to garbage collection."""

    def __init__(self):
        self.live = self.peak = 0

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def release(self, n: int) -> None:
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live


HOST_BYTES = HostBytes()


class _NumpyHost:
    """Host memory without CUDA: numpy-owned byte arrays, outside torch's allocator.

    On a CPU-only machine host and device are the same RAM; keeping offloaded chunks out
    of torch's allocator keeps them apart from the tensors that stand in for device
    memory (what the memory benchmark measures), and every fetch is a real copy.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def to_host(self, t: Tensor):
        flat = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        data = flat.numpy().copy()
        HOST_BYTES.add(data.nbytes)
        weakref.finalize(data, HOST_BYTES.release, data.nbytes)
        return data, t.dtype, t.shape

    def to_device(self, handle) -> tuple[Tensor, None]:
        data, dtype, shape = handle
        return torch.from_numpy(data).view(dtype).view(shape).to(self.device, copy=True), None

    def ready(self, t: Tensor, event) -> None:
        pass


class _PinnedHost:
    """CUDA host memory: pinned buffers; copies run on a side stream, ordered by events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, t: Tensor) -> Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is ready
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # t's memory is not reused before the copy ends
        return host

    def to_device(self, host: Tensor) -> tuple[Tensor, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def ready(self, t: Tensor, event: torch.cuda.Event) -> None:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        t.record_stream(current)  # allocated on the side stream, used on the current one


def host_store(device: torch.device):
    """The host memory for offloads from `device`: pinned + side stream on CUDA, numpy on CPU."""
    device = torch.device(device)
    return _PinnedHost(device) if device.type == "cuda" else _NumpyHost(device)


class ChunkStore:
    """Tensors of one FPDT call by key, on the device or offloaded to host memory.

    `put(key, t)` stores t (a host copy when offloading); `prefetch(key)` starts copying
    a stored chunk back to the device; `get(key)` returns it on the device (waiting for
    its prefetch); keys absent from the store are ignored by prefetch. Without offload
    the store keeps the device tensors themselves and get returns them.
    """

    def __init__(self, device: torch.device, offload: bool):
        self.device, self.offload = torch.device(device), offload
        self.stats = OffloadStats()
        self._items: dict[Hashable, tuple[object, int]] = {}
        self._prefetched: dict[Hashable, tuple[Tensor, object]] = {}
        self._host = host_store(self.device) if offload else None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def put(self, key: Hashable, t: Tensor) -> None:
        self.discard(key)
        n = _nbytes(t)
        s = self.stats
        if self._host is None:
            self._items[key] = (t, n)
            s.device_bytes += n
            s.device_peak = max(s.device_peak, s.device_bytes)
        else:
            self._items[key] = (self._host.to_host(t), n)
            s.host_bytes += n
            s.host_peak = max(s.host_peak, s.host_bytes)
            s.to_host += n

    def prefetch(self, key: Hashable) -> None:
        if self._host is None or key not in self._items or key in self._prefetched:
            return
        handle, n = self._items[key]
        self._prefetched[key] = self._host.to_device(handle)
        self.stats.to_device += n

    def get(self, key: Hashable) -> Tensor:
        if key not in self._items:
            raise KeyError(f"chunk {key!r} is not in the store")
        if self._host is None:
            return self._items[key][0]
        self.prefetch(key)
        t, event = self._prefetched.pop(key)
        self._host.ready(t, event)
        return t

    def discard(self, key: Hashable) -> None:
        self._prefetched.pop(key, None)
        if key in self._items:
            _, n = self._items.pop(key)
            if self._host is None:
                self.stats.device_bytes -= n
            else:
                self.stats.host_bytes -= n

    def clear(self) -> None:
        for key in list(self._items):
            self.discard(key)


def streamed(store: ChunkStore, groups: list[tuple[Hashable, ...]]) -> Iterator[list[Tensor | None]]:
    """Yield each group's chunks (None for absent keys) while the next group is prefetched."""
    for key in groups[0] if groups else ():
        store.prefetch(key)
    for n, group in enumerate(groups):
        for key in groups[n + 1] if n + 1 < len(groups) else ():
            store.prefetch(key)
        yield [store.get(key) if key in store else None for key in group]
