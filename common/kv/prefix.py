"""Prefix hashes: the name of a full KV block in every tier's prefix cache and in the gateway's prefix index.
No torch.

Block i of a prompt is named by a 64-bit hash chained over (the hash of block i - 1, block i's token ids),
starting from a root derived from the compatibility fingerprint: equal names mean the same tokens at the same
positions after the same prefix, for the same model and KV layout. Only full blocks are named. 64 bits can
collide, so a name is never trusted alone: a tier confirms a hit by comparing the block's token ids
(common/kv/block_manager.py), and the gateway only uses names to guess where a prefix lives.
"""

import hashlib
import struct
from collections.abc import Callable, Sequence

# (parent hash, the block's token ids) -> the block's hash
ChainHash = Callable[[int, Sequence[int]], int]


def root_hash(fingerprint: str) -> int:
    """The parent of a prompt's first block: the KV layout's fingerprint folded to 64 bits."""
    return int.from_bytes(hashlib.blake2b(fingerprint.encode(), digest_size=8).digest(), "little")


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    data = struct.pack(f"<Q{len(token_ids)}I", parent, *token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, root: int, hash_fn: ChainHash = chain_hash) -> list[int]:
    """The names of the full blocks of token_ids, in order (a trailing partial block has none)."""
    hashes, parent = [], root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_fn(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes
