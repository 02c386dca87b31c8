"""A ring of host buffers that are allocated once and reused, batch after batch.

Fresh large host buffers cost page faults on first touch: a float16->float32 cast into a preallocated tensor runs
at ~9 GB/s here, `.float()` into a fresh one at ~0.8 GB/s (DESIGN.md, Performance targets). And a fresh pinned
buffer per batch (what PyG's PrefetchLoader and DataLoader's pin thread do) adds a full extra copy and a
`cudaHostAlloc` under a driver lock (../shared/notes/zarr-and-torch.md 4.2-4.3). So the loader fills a small ring:

* with CUDA: pinned float16 staging buffers. Slot k % n is refilled only after the CUDA event recorded after its
  last host-to-device copy has completed, so a copy still in flight never sees its source overwritten.
* without CUDA: plain float32 output buffers (the batches the caller gets). `pin_memory` is never called
  without CUDA: on a CPU-only torch it raises.
"""

from __future__ import annotations

import torch


def cuda_usable() -> bool:
    """True when this torch has CUDA and a device is present (pinning needs both)."""
    return bool(torch.cuda.is_available())


class BufferRing:
    """`slots` host tensors of `shape` and `dtype`, handed out round-robin by batch number.

    Parameters
    ----------
    slots : number of buffers; batch k uses slot k % slots.
    shape : shape of one buffer (the largest batch); a smaller batch uses a leading slice.
    dtype : element type.
    pin : pin the buffers (page-locked, for asynchronous copies to the GPU). Ignored unless CUDA is usable.
    shared : put the buffers in shared memory, for worker processes to fill (allocated once, never per batch).

    Contract: the caller never has more than `slots` batches alive at once (the loader schedules batch k + slots
    only after batch k was handed over); `acquire(k)` waits for the event recorded by `release(k - slots, ...)`.
    """

    def __init__(self, slots: int, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool = False,
                 shared: bool = False) -> None:
        if slots < 1:
            raise ValueError(f"slots={slots}: a ring needs at least one buffer")
        if pin and shared:
            raise ValueError("a ring is either pinned (filled in this process) or shared (filled by worker processes)")
        self.shape = tuple(shape)
        self.dtype = dtype
        self.pinned = bool(pin and cuda_usable())
        self.shared = shared
        # torch.empty(pin_memory=True) raises on a CPU-only build; only ask for it when CUDA is there
        self._bufs = [torch.empty(self.shape, dtype=dtype, pin_memory=self.pinned) for _ in range(slots)]
        if shared:
            self._bufs = [b.share_memory_() for b in self._bufs]
        self._events: list[torch.cuda.Event | None] = [None] * slots

    def __len__(self) -> int:
        return len(self._bufs)

    def acquire(self, k: int, rows: int) -> torch.Tensor:
        """The buffer of batch k, its first `rows` rows, once the device is done reading it."""
        slot = k % len(self._bufs)
        ev = self._events[slot]
        if ev is not None:
            ev.synchronize()  # the H2D copy of batch k - slots from this slot has finished
            self._events[slot] = None
        return self._bufs[slot][:rows]

    def release(self, k: int, event: torch.cuda.Event | None) -> None:
        """Record the event after which slot k % slots may be overwritten (None: at once)."""
        self._events[k % len(self._bufs)] = event

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self._bufs)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs)
