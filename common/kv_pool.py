"""The paged KV pool: one K and one V tensor per layer, addressed by slot = block * block_size + offset.

Layout (layers, slots, kv_heads, head_dim), so a block is one contiguous run of memory: reads gather
whole blocks along the leading dimension (index_select), several times faster here than per-slot gathers.
Block ids come from a BlockManager (no torch); this module only holds and moves the tensors.
"""

import torch


class KvPool:
    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
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
        """key, value: (tokens, kv_heads, head_dim), stored at `slots`."""
        self.key[layer].index_copy_(0, slots, key.to(self.device, self.dtype))
        self.value[layer].index_copy_(0, slots, value.to(self.device, self.dtype))

    def read_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(slots), kv_heads, head_dim) each."""
        return self.key[layer].index_select(0, slots), self.value[layer].index_select(0, slots)

    def read_blocks(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tables: (batch, blocks) -> (batch, blocks * block_size, kv_heads, head_dim) each, whole blocks."""
        batch, blocks = tables.shape
        as_blocks = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        out = (batch, blocks * self.block_size, self.num_kv_heads, self.head_dim)
        flat = tables.reshape(-1)
        return (self.key[layer].view(as_blocks).index_select(0, flat).view(out),
                self.value[layer].view(as_blocks).index_select(0, flat).view(out))
