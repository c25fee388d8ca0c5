"""Block streaming for GPUs smaller than the model (24–48 GB cards): the DiT's blocks stay in pinned CPU memory and
each is copied to the GPU only for its own forward. Kept outside the model (DESIGN §7.2): it swaps parameter (and
buffer: an FP8 linear's weight and scales) storage around each block's call and never changes what a block
computes."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def _tensors(block: nn.Module):
    return itertools.chain(block.parameters(), block.buffers())


class BlockStreamer:
    """Stream `model.blocks` to `device` one block at a time; everything else lives on `device`.

    Use as a context manager: on exit every parameter points at its CPU copy again."""

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.model, self.device = model, torch.device(device)
        self.handles: list = []
        self.cpu: dict[torch.Tensor, torch.Tensor] = {}  # a block's parameter or buffer → its CPU copy

    def __enter__(self) -> BlockStreamer:
        blocks = set(self.model.blocks)
        for name, child in self.model.named_children():
            if name != "blocks":
                child.to(self.device)
        pin = self.device.type == "cuda"
        for block in blocks:
            for param in _tensors(block):
                cpu = param.data.to("cpu")
                self.cpu[param] = cpu.pin_memory() if pin else cpu
                param.data = self.cpu[param]
            self.handles.append(block.register_forward_pre_hook(self._load))
            self.handles.append(block.register_forward_hook(self._unload))
        return self

    def _load(self, block: nn.Module, args) -> None:
        for param in _tensors(block):
            param.data = self.cpu[param].to(self.device, non_blocking=True)

    def _unload(self, block: nn.Module, args, output) -> None:
        for param in _tensors(block):
            param.data = self.cpu[param]  # the GPU copy is freed; the CPU copy was never changed

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
