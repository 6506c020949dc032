"""Pinned host buffers that a step's packed inputs are written into and copied to the GPU from.

Page-locking a fresh array every step (torch.Tensor.pin_memory()) was about half of the engine thread's time at 64
streams on the H100 host (py-spy, session 24; docs/serving.md), and the engine thread is what a small model's
serving throughput waits on. The buffers here are page-locked once and reused in turn.
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """A ring of `depth` uint8 buffers feeding `device` (pinned for a GPU). buffer(n) hands out the next one
    (grown to n bytes if needed) once the copy last enqueued from it has run; the caller writes it, enqueues its
    host->device copy, then calls sent(), which records that copy's completion for the buffer's next turn."""

    # depth: a step enqueues up to ~5 uploads (its packed inputs, a prefill chunk's, row gathers, a sampled step's
    # parameters), and an overlapped engine runs one step ahead of the GPU: 32 buffers (64 KB each to start) come
    # round again only after ~6 steps, whose copies have run, so buffer() does not wait on the GPU.
    def __init__(self, device: torch.device | str, depth: int = 32, nbytes: int = 1 << 16):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"  # (a CPU engine: plain buffers, the same ring)
        self.bufs = [self._alloc(nbytes) for _ in range(depth)]
        # each buffer's last copy out of it (an event never recorded is complete)
        self.events = [torch.cuda.Event() for _ in range(depth)] if self.pinned else None
        self.turn = -1

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def buffer(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes], pinned: the ring's next buffer, free to overwrite."""
        self.turn = (self.turn + 1) % len(self.bufs)
        if self.events is not None:  # its copy was enqueued `depth` buffers ago: long done, unless the GPU is behind
            self.events[self.turn].synchronize()
        if self.bufs[self.turn].numel() < nbytes:  # grown in powers of two: after warm-up, every size was seen
            self.bufs[self.turn] = self._alloc(1 << (nbytes - 1).bit_length())
        return self.bufs[self.turn][:nbytes]

    def sent(self) -> None:
        """The copy out of the last buffer() is enqueued on the current stream."""
        if self.events is not None:
            self.events[self.turn].record()

    def upload(self, arr: np.ndarray) -> torch.Tensor:
        """arr on the device, by an asynchronous copy through the ring."""
        src = torch.from_numpy(arr)
        host = self.buffer(src.nbytes).view(src.dtype).view(src.shape)
        host.copy_(src)
        out = host.to(self.device, non_blocking=True, copy=True)  # (copy: on the CPU, not the ring's buffer itself)
        self.sent()
        return out
