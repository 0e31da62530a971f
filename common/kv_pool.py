"""The paged KV pool: one K and one V tensor per layer, addressed by slot = block * block_size + offset.

Block ids come from a BlockManager (no torch); this module only holds and moves the tensors.
"""

import torch


class KvPool:
    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=self.device)  # (layers, slots, kv_heads, head_dim)
        self.value = torch.zeros(shape, dtype=dtype, device=self.device)

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of positions [start, end) of a sequence whose blocks are block_table."""
        positions = torch.arange(start, end, device=self.device)
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key[layer].index_copy_(0, slots, key.to(self.device, self.dtype))
        self.value[layer].index_copy_(0, slots, value.to(self.device, self.dtype))
