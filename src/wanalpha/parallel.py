"""Sequence parallelism for sampling (Ulysses, as the official multi-GPU inference): the DiT's video tokens are split
into contiguous chunks, one per process; everything per-token (projections, norms, modulation, cross-attention, the
FFN, the head) runs on the local chunk, and self-attention exchanges chunks for heads with one all-to-all before and
one after it, so each process attends over the whole sequence for num_heads / world of the heads. Every process ends
a forward with the whole output (one all-gather), so the sampler runs unchanged and identically on all of them.

Inference only (no autograd through the collectives). Runs on torch.distributed: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class SequenceParallel:
    """The token split and the collectives of one process group."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shared(self, value):
        """Process 0's `value` on every process (a random choice made once per launch, e.g. the seed)."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def sizes(self, length: int) -> list[int]:
        """Chunk lengths of a `length`-token sequence, as torch.tensor_split: the first length % world get one more."""
        return [length // self.world + (1 if i < length % self.world else 0) for i in range(self.world)]

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This process's chunk of x along dim."""
        return torch.tensor_split(x, self.world, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Every process's chunk of (B, L_i, ...) back into (B, length, ...), on every process."""
        sizes = self.sizes(length)
        padded = x.new_zeros((x.shape[0], sizes[0], *x.shape[2:]))  # all_gather wants equal shapes
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:, :n] for part, n in zip(parts, sizes, strict=True)], dim=1)

    def _to_heads(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, L_local, H, d) sequence chunk → (B, L, H/world, d): all tokens for this process's heads."""
        b, n, h, d = x.shape
        send = x.reshape(b, n, self.world, h // self.world, d).permute(2, 1, 0, 3, 4).contiguous()
        recv = x.new_empty((sum(sizes), b, h // self.world, d))
        dist.all_to_all_single(
            recv, send.flatten(0, 1), output_split_sizes=sizes, input_split_sizes=[n] * self.world, group=self.group
        )
        return recv.permute(1, 0, 2, 3)

    def _to_sequence(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """(B, L, H/world, d) → (B, L_local, H, d): the inverse of `_to_heads`."""
        b, _, hp, d = x.shape
        n = sizes[self.rank]
        send = x.permute(1, 0, 2, 3).contiguous()
        recv = x.new_empty((self.world * n, b, hp, d))
        dist.all_to_all_single(
            recv, send, output_split_sizes=[n] * self.world, input_split_sizes=sizes, group=self.group
        )
        return recv.view(self.world, n, b, hp, d).permute(2, 1, 0, 3, 4).reshape(b, n, self.world * hp, d)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, kernel: str = "sdpa"
    ) -> torch.Tensor:
        """Full-sequence self-attention of sequence-chunked (B, L_local, H, d) q, k, v (on `kernel`, as
        wanalpha.models.layers.attention); returns the local chunk."""
        from wanalpha.models.layers import attention

        sizes = self.sizes(length)
        q, k = q.to(v.dtype), k.to(v.dtype)  # what attention() computes in; halves the traffic for bf16
        out = attention(*(self._to_heads(t, sizes) for t in (q, k, v)), kernel=kernel)
        return self._to_sequence(out, sizes)


def from_environment() -> SequenceParallel | None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group (NCCL on GPUs, each process on
    the GPU LOCAL_RANK names; gloo on the CPU) and return its SequenceParallel; otherwise None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return SequenceParallel()
