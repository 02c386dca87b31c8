"""Moving a batch to its device: float16 over the bus, float32 on arrival.

With CUDA (../shared/notes/zarr-and-torch.md 4.1, 4.4): the pinned, contiguous float16 buffer is copied with
`non_blocking=True` on a side stream, then cast to float32 by a kernel on that stream. (`.to(cuda, float32)` with
`non_blocking=False` would cast on the CPU into a pageable float32 temporary: twice the bytes, no overlap.) An
event recorded after the cast tells the consumer's stream when the batch is ready (`wait_event`, the per-batch
form of `wait_stream`: reader threads share the side stream, so waiting on the whole stream would also wait for
batches queued behind this one), and another tells the host ring when its pinned slot may be refilled.
`record_stream` keeps the caching allocator from reusing the batch's device memory while the consumer's stream
still uses it.

Without CUDA there is nothing to move: the reader has already cast into a reused float32 buffer (one pass).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TracestoreError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda (current device) when available, else cpu. Asking for CUDA without it raises, naming the fix."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TracestoreError(f"device={str(device)!r}: this torch ({torch.__version__}) sees no CUDA device; pass "
                                  f"device='cpu' or device=None (picks cuda when available)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise TracestoreError(f"device={str(device)!r}: TraceLoader delivers to 'cpu' or 'cuda' devices; pass one of "
                              f"those")
    return dev


class DeviceMover:
    """Copies host float16 batches to a CUDA device on a side stream and casts them there.

    One per loader; thread-safe (each call enters the side stream in its own thread)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"DeviceMover is for CUDA devices, not {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def upload(self, host16: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> tuple[
            torch.Tensor, dict[str, torch.Tensor], torch.cuda.Event]:
        """Queue the copy of `host16` (pinned, contiguous float16) and its float32 cast on the side stream; also
        move the small `extra` tensors. Returns (float32 tensor, moved extras, event recorded after all of it).
        The host buffer may be refilled once the event has completed."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            d16 = host16.to(self.device, non_blocking=True)
            d32 = d16.float()
            moved = {k: v.to(self.device, non_blocking=True) for k, v in (extra or {}).items()}
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return d32, moved, ev

    def run_on_side_stream(self, fn: Any, *args: Any) -> tuple[Any, torch.cuda.Event]:
        """Run `fn(*args)` with the side stream current (for graph batches), and record an event after it."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = fn(*args)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return out, ev

    def hand_over(self, event: torch.cuda.Event, tensors: list[torch.Tensor]) -> None:
        """Make the consumer's current stream wait for `event`, and tell the allocator it uses `tensors`."""
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(event)
        for t in tensors:
            t.record_stream(cur)
