"""A ring of host buffers that are allocated once and reused, batch after batch.

Fresh large host buffers cost page faults on first touch: a float16->float32 cast into a preallocated tensor runs
at ~9 GB/s here, `.float()` into a fresh one at ~0.8 GB/s (DESIGN.md, Performance targets). And a fresh pinned
buffer per batch (what PyG's PrefetchLoader and DataLoader's pin thread do) adds a full extra copy and a
`cudaHostAlloc` under a driver lock (../shared/notes/zarr-and-torch.md 4.2-4.3). So the loader fills a small ring:

* with CUDA: pinned float16 staging buffers. Slot k % n is refilled only after the CUDA event recorded after its
  last host-to-device copy has completed, so a copy still in flight never sees its source overwritten.
* without CUDA: plain float32 output buffers (the batches the caller gets). `pin_memory` is never called
  without CUDA: on a CPU-only torch it raises. These are handed to the caller, who may keep them (`list(loader)`):
  before a slot is refilled, `renew_if_held` checks whether anything besides the ring still references its
  storage -- the handed-out tensor, a view `b[0]` or slice, a `.numpy()` array, an autograd graph that saved it
  -- and if so gives that buffer away and puts a fresh one in the slot. A loop that drops each batch never pays
  for a fresh buffer; one that keeps them pays what a fresh batch costs anyway, and the ring stays `slots` long.
"""

from __future__ import annotations

import sys

import torch

#: torch's count of references to a storage (every tensor or view sharing it holds one); private, so looked up
#: once: without it every handed-out buffer counts as held, which is correct, only slower
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_refs(t: torch.Tensor) -> tuple[int, int]:
    """(tensors sharing t's storage, Python references to its storage object): both grow when something
    outside the ring keeps the storage alive. Measured the same way on a fresh buffer, they give the baseline."""
    st = t.untyped_storage()
    if _use_count is None:
        return 0, 0
    return int(_use_count(st._cdata)), sys.getrefcount(st)


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

    Contract: `acquire(k)` waits for the event recorded by `release(k - slots, ...)`; the loader schedules batch
    k + slots only after batch k was handed over, and calls `renew_if_held(k + slots)` first when the buffers
    are handed to the caller (the CPU ring), so that a batch the caller still holds is never overwritten.
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
        self._free = [_storage_refs(b) for b in self._bufs]
        #: bumped when a slot gets a fresh buffer (worker processes holding the old one must be sent the new one)
        self.generation = [0] * slots
        self.renewed = 0  # buffers given away to the caller so far
        self.next = 0  # the batch number (mod slots) an iteration starts at: where the last one stopped
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

    def held(self, k: int) -> bool:
        """True when something besides the ring references the buffer of batch k's slot."""
        slot = k % len(self._bufs)
        return _use_count is None or _storage_refs(self._bufs[slot]) != self._free[slot]

    def renew_if_held(self, k: int) -> bool:
        """Before batch k is written: if the caller still holds its slot's buffer (from batch k - slots), leave
        that buffer to the caller and put a fresh one in the slot. True when the slot got a fresh buffer."""
        if not self.held(k):
            return False
        slot = k % len(self._bufs)
        buf = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pinned)
        if self.shared:
            buf = buf.share_memory_()
        self._bufs[slot] = buf
        self._free[slot] = _storage_refs(buf)
        self.generation[slot] += 1
        self.renewed += 1
        return True

    def buffer(self, k: int) -> torch.Tensor:
        """The whole buffer of batch k's slot (for sending to worker processes)."""
        return self._bufs[k % len(self._bufs)]

    def release(self, k: int, event: torch.cuda.Event | None) -> None:
        """Record the event after which slot k % slots may be overwritten (None: at once)."""
        self._events[k % len(self._bufs)] = event

    @property
    def buffers(self) -> list[torch.Tensor]:
        return list(self._bufs)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs)
