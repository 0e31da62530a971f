"""The paged KV pool: one K and one V tensor per layer, addressed by slot = block * block_size + offset.

Layout (layers, slots, kv_heads, head_dim), so a block is one contiguous run of memory: reads gather
whole blocks along the leading dimension (index_select), several times faster here than per-slot gathers.
Block ids come from a BlockManager (no torch); this module only holds and moves the tensors.

Quantised pools (int8, fp8 e4m3; common/kv/quant.py) store codes plus float32 scales of layout
(layers, slots, kv_heads). `write` quantises; reads gather codes and scales, then dequantise only what
they gathered, into the compute dtype. `write_rows` stores rows as they are (KV received from another
tier), so both tiers hold the same bytes. Float pools take none of these detours.
"""

import torch

from common.kv.quant import SCALE_DTYPE, KvRows, dequantise, is_quantised, quantise


class KvPool:
    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantised = is_quantised(dtype)
        self.compute_dtype = compute_dtype if self.quantised else dtype  # what reads return
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=self.device)  # (layers, slots, kv_heads, head_dim)
        self.value = torch.zeros(shape, dtype=dtype, device=self.device)
        self.key_scale: torch.Tensor | None = None  # (layers, slots, kv_heads) float32, quantised pools only
        self.value_scale: torch.Tensor | None = None
        if self.quantised:
            self.key_scale = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=self.device)
            self.value_scale = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=self.device)
        # Per-layer views made once: a decode step touches each layer's K and V several times, and each view
        # made on the spot is one more small torch call (30 layers x a few per step).
        as_blocks = (num_blocks, block_size, num_kv_heads, head_dim)
        self._key_layers, self._value_layers = self.key.unbind(0), self.value.unbind(0)  # (slots, kv_heads, head_dim)
        self._key_blocks = tuple(t.view(as_blocks) for t in self._key_layers)  # (blocks, block_size, ...)
        self._value_blocks = tuple(t.view(as_blocks) for t in self._value_layers)

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """K and V of one block in every layer, scales included."""
        row = head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if is_quantised(dtype) else 0)
        return 2 * num_layers * block_size * num_kv_heads * row

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of positions [start, end) of a sequence whose blocks are block_table."""
        positions = torch.arange(start, end, device=self.device)
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> KvRows:
        """key, value (tokens, kv_heads, head_dim) in any float dtype -> rows as this pool stores them."""
        key, value = _to(key, self.device), _to(value, self.device)
        if not self.quantised:
            return KvRows(_to(key, self.dtype), _to(value, self.dtype))
        (key_codes, key_scale), (value_codes, value_scale) = quantise(key, self.dtype), quantise(value, self.dtype)
        return KvRows(key_codes, value_codes, key_scale, value_scale)

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> KvRows:
        """key, value: (tokens, kv_heads, head_dim), stored at `slots`; returns the rows as stored."""
        rows = self.encode(key, value)
        self.write_rows(layer, slots, rows)
        return rows

    def write_rows(self, layer: int, slots: torch.Tensor, rows: KvRows) -> None:
        """Stores rows already in this pool's dtype (with scales when quantised) at `slots`, unchanged."""
        assert rows.key.dtype == self.dtype and (rows.key_scale is not None) == self.quantised, "rows of another pool"
        if not self.quantised:
            self._key_layers[layer].index_copy_(0, slots, _to(rows.key, self.device))
            self._value_layers[layer].index_copy_(0, slots, _to(rows.value, self.device))
            return
        # index_copy_ has no fp8 kernel on CPU: copy the codes as bytes.
        self.key[layer].view(torch.uint8).index_copy_(0, slots, rows.key.to(self.device).view(torch.uint8))
        self.value[layer].view(torch.uint8).index_copy_(0, slots, rows.value.to(self.device).view(torch.uint8))
        self.key_scale[layer].index_copy_(0, slots, rows.key_scale.to(self.device))
        self.value_scale[layer].index_copy_(0, slots, rows.value_scale.to(self.device))

    def read_rows(self, layer: int, slots: torch.Tensor) -> KvRows:
        """The stored rows at `slots`, codes and scales as they are: (len(slots), kv_heads, head_dim) each."""
        if not self.quantised:
            return KvRows(self.key[layer].index_select(0, slots), self.value[layer].index_select(0, slots))
        return KvRows(self._gather(self.key[layer], slots), self._gather(self.value[layer], slots),
                      self.key_scale[layer].index_select(0, slots), self.value_scale[layer].index_select(0, slots))

    def rows_in_place(self, layer: int, block_table: list[int], start: int, end: int) -> KvRows:
        """The stored rows of positions [start, end) of a sequence whose blocks are block_table: views of the pool
        where those positions' blocks are one run (no copy), else gathered."""
        first, last = start // self.block_size, (end - 1) // self.block_size
        run = block_table[first:last + 1]
        if run != list(range(run[0], run[0] + len(run))):
            return self.read_rows(layer, self.slots(block_table, start, end))
        rows = slice(run[0] * self.block_size + start % self.block_size,
                     run[0] * self.block_size + start % self.block_size + end - start)
        scales = (self.key_scale[layer, rows], self.value_scale[layer, rows]) if self.quantised else (None, None)
        return KvRows(self.key[layer, rows], self.value[layer, rows], *scales)

    def read_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(slots), kv_heads, head_dim) each, in the compute dtype."""
        if not self.quantised:
            return self.key[layer].index_select(0, slots), self.value[layer].index_select(0, slots)
        return self.read_rows(layer, slots).dequantised(self.compute_dtype)

    def read_blocks(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tables: (batch, blocks) -> (batch, blocks * block_size, kv_heads, head_dim) each, whole blocks."""
        batch, blocks = tables.shape
        as_blocks = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        out = (batch, blocks * self.block_size, self.num_kv_heads, self.head_dim)
        flat = tables.reshape(-1)
        if not self.quantised:
            return (self._key_blocks[layer].index_select(0, flat).view(out),
                    self._value_blocks[layer].index_select(0, flat).view(out))
        key = self._gather(self.key[layer].view(as_blocks), flat).view(out)
        value = self._gather(self.value[layer].view(as_blocks), flat).view(out)
        scale_blocks, scale_out = as_blocks[:3], out[:3]  # (blocks, block_size, kv_heads), (batch, context, kv_heads)
        key_scale = self.key_scale[layer].view(scale_blocks).index_select(0, flat).view(scale_out)
        value_scale = self.value_scale[layer].view(scale_blocks).index_select(0, flat).view(scale_out)
        return (dequantise(key, key_scale, self.compute_dtype), dequantise(value, value_scale, self.compute_dtype))

    def read_context(self, layer: int, run_start: int | None, block_table: torch.Tensor,
                     context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 .. context - 1 of one sequence -> (context, kv_heads, head_dim) each, in the compute
        dtype: views of the pool when its blocks are the run from block run_start (float pools), else gathered."""
        if run_start is None or self.quantised:
            k, v = self.read_blocks(layer, block_table[None])
            return k[0, :context], v[0, :context]
        rows = slice(run_start * self.block_size, run_start * self.block_size + context)
        return self._key_layers[layer][rows], self._value_layers[layer][rows]

    def _gather(self, codes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """codes[index] along dim 0, gathered as bytes: not every device has fp8 index kernels."""
        return codes.view(torch.uint8).index_select(0, index).view(self.dtype)


def _to(tensor: torch.Tensor, where: torch.device | torch.dtype) -> torch.Tensor:
    """tensor.to(where), without a torch call when it is already there (the common case, every layer)."""
    if isinstance(where, torch.dtype):
        return tensor if tensor.dtype == where else tensor.to(where)
    return tensor if tensor.device == where else tensor.to(where)
