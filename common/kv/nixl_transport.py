"""KV over NIXL (the transfer library of vLLM, SGLang and Dynamo): one-sided WRITEs from the prefill pool straight
into the blocks the decode pool reserved, then a completion notification. No tier wiring here yet.

  decode   NixlKvAgent over its pool's tensors registers them once; metadata() and block_descs(reserved block ids)
           travel to prefill over the control plane; notified(prefill agent, message) says whether the transfer
           named by message is complete.
  prefill  NixlKvAgent over its own pool; connect(decode's metadata) -> the decode agent's name;
           KvBlockWriter(agent, name, descs).write(layers, local block ids) as each layer is computed;
           finish(message) once every layer is written; abort() on cancel.

A pool tensor has layout (layers, blocks * block_size, ...) (common/kv/pool.py: key and value, plus the scales of
quantised pools), so (tensor, layer, block) is one contiguous region; descriptors list those regions in
(tensor, layer, block) order. NIXL refuses any descriptor outside memory the remote agent registered.

Ordering: NIXL's UCX backend reports a WRITE DONE only after flushing its endpoint (the bytes are in the remote
memory), and sends a transfer's notification only from the call that finds it DONE. finish() therefore waits for
every write to be DONE before it notifies: a receiver never sees the notification before the data.
The NIXL agent is not thread-safe as built here (sync mode NONE): one thread per agent.

Progress (measured, nixl 1.5, UCX, two processes on one host): the writer needs NIXL's progress thread. A receiver
with one sees notifications 8-15 ms late; without one (progress_thread=False) it sees them within 0.1 ms of
notified() being polled, but with UCX's default error handling (peer; AM over TCP) a WRITE completes only while the
receiver is being polled. ucx_params={"ucx_error_handling_mode": "none"} makes writes complete without the
receiver (AM over shared memory) at the price of UCX not noticing a dead peer.
"""

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.basics.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument

INSTALL_HINT = "pip install --no-deps nixl nixl-cu12"  # plain `pip install nixl` would pull a CUDA build of torch
_HEADER = struct.Struct("<III")  # (tensors, layers, blocks) before the descriptors' raw bytes


def _nixl_api():
    """nixl._api, imported on first use: NIXL is an optional extra."""
    try:
        from nixl import _api
    except ImportError as error:
        raise ImportError(f"the NIXL KV transport needs NIXL: {INSTALL_HINT} ({error})") from error
    return _api


def pool_tensors(pool) -> list[torch.Tensor]:
    """The storage of a KvPool (common/kv/pool.py) that a transfer moves: K and V, and their scales if quantised."""
    scales = [pool.key_scale, pool.value_scale] if pool.quantised else []
    return [pool.key, pool.value, *scales]


@dataclass(frozen=True)
class BlockDescs:
    """Where some blocks of a pool lie: array (tensors, layers, blocks, 3) of uint64 (address, bytes, device)."""

    array: np.ndarray

    def __post_init__(self) -> None:
        if self.array.ndim != 4 or self.array.shape[3] != 3 or self.array.dtype != np.uint64:
            raise InvalidArgument(f"block descriptors must be uint64 (tensors, layers, blocks, 3); got "
                                  f"{self.array.dtype} {self.array.shape}")

    @property
    def num_blocks(self) -> int:
        return self.array.shape[2]

    def to_bytes(self) -> bytes:
        """Little-endian: the shape's first three sizes as uint32, then the descriptors (never pickle)."""
        return _HEADER.pack(*self.array.shape[:3]) + self.array.astype("<u8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "BlockDescs":
        if len(data) < _HEADER.size:
            raise InvalidArgument(f"NIXL block descriptors need a {_HEADER.size}-byte header; got {len(data)} bytes")
        shape = (*_HEADER.unpack_from(data), 3)
        expected = _HEADER.size + 8 * int(np.prod(shape))
        if len(data) != expected:
            raise InvalidArgument(f"NIXL block descriptors of shape {shape} need {expected} bytes; got {len(data)}")
        array = np.frombuffer(data, dtype="<u8", offset=_HEADER.size).reshape(shape).astype(np.uint64)
        return cls(array)


def merge_runs(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of (N, 3) descriptors with every run that is contiguous on both sides made one descriptor: blocks
    reserved in a row become one WRITE per tensor and layer instead of one per block."""
    if len(local) < 2:
        return local, remote
    ends_local, ends_remote = local[:-1, 0] + local[:-1, 1], remote[:-1, 0] + remote[:-1, 1]
    starts = np.ones(len(local), dtype=bool)
    starts[1:] = (local[1:, 0] != ends_local) | (remote[1:, 0] != ends_remote)
    first = np.flatnonzero(starts)
    lengths = np.add.reduceat(local[:, 1], first)
    merged_local, merged_remote = local[first].copy(), remote[first].copy()
    merged_local[:, 1] = merged_remote[:, 1] = lengths
    return merged_local, merged_remote


class NixlKvAgent:
    """One NIXL agent (UCX backend) with a pool's tensors registered: each (layers, blocks * block_size, ...),
    contiguous, on the CPU (DRAM)."""

    def __init__(self, name: str, tensors: Sequence[torch.Tensor], block_size: int,
                 ucx_params: dict[str, str] | None = None, progress_thread: bool = True) -> None:
        api = _nixl_api()
        for tensor in tensors:
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise InvalidArgument(f"NIXL registers contiguous CPU tensors here; got {tensor.device} "
                                      f"contiguous={tensor.is_contiguous()}")
            if tensor.shape[1] % block_size:
                raise InvalidArgument(f"{tensor.shape[1]} slots are not whole blocks of {block_size}")
        self.name = name
        self.block_size = block_size
        self.num_layers = tensors[0].shape[0]
        self.num_blocks = tensors[0].shape[1] // block_size
        self._tensors = list(tensors)  # kept alive: NIXL holds their addresses
        # The progress thread is needed: without it a WRITE completes only while the target's agent is polled.
        self._agent = api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=progress_thread, backends=[]))
        if "UCX" not in self._agent.plugin_list:
            raise Internal(f"NIXL has no UCX plugin here (plugins: {self._agent.plugin_list})")
        self._agent.create_backend("UCX", dict(ucx_params or {}))
        self._registered = self._agent.register_memory(self._tensors)
        self._notifs: dict[str, list[bytes]] = {}

    def metadata(self) -> bytes:
        """What a remote agent needs to write here (connection info and registrations); taken after registering."""
        return self._agent.get_agent_metadata()

    def connect(self, metadata: bytes) -> str:
        """Loads a remote agent's metadata (again, if it changed); returns its name."""
        name = self._agent.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else name

    def disconnect(self, name: str) -> None:
        self._agent.remove_remote_agent(name)

    def block_descs(self, block_ids: Sequence[int], layers: Sequence[int] | None = None) -> BlockDescs:
        """Descriptors of the regions of block_ids in every tensor, in `layers` (default all), in that order."""
        blocks = np.asarray(block_ids, dtype=np.uint64)
        if blocks.size and int(blocks.max()) >= self.num_blocks:
            raise InvalidArgument(f"block id {int(blocks.max())} is outside the pool's {self.num_blocks} blocks")
        layer_ids = np.arange(self.num_layers, dtype=np.uint64) if layers is None else np.asarray(layers, np.uint64)
        array = np.zeros((len(self._tensors), len(layer_ids), len(blocks), 3), dtype=np.uint64)
        for t, tensor in enumerate(self._tensors):
            layer_bytes = tensor[0].numel() * tensor.element_size()
            block_bytes = layer_bytes // self.num_blocks
            array[t, :, :, 0] = (tensor.data_ptr() + layer_ids[:, None] * np.uint64(layer_bytes)
                                 + blocks[None, :] * np.uint64(block_bytes))
            array[t, :, :, 1] = block_bytes
        return BlockDescs(array)

    def start_write(self, remote: str, local: BlockDescs, target: BlockDescs):
        """Posts one WRITE of local's regions onto target's (same shape); returns the NIXL handle."""
        if local.array.shape != target.array.shape or not np.array_equal(local.array[..., 1], target.array[..., 1]):
            raise FailedPrecondition(f"KV layout mismatch: local regions {local.array.shape} vs remote "
                                     f"{target.array.shape}, or their sizes differ; both tiers need the same "
                                     "model, --kv-dtype and --block-size")
        local_rows, remote_rows = merge_runs(local.array.reshape(-1, 3), target.array.reshape(-1, 3))
        local_list = self._agent.get_xfer_descs(local_rows, "DRAM")
        remote_list = self._agent.get_xfer_descs(remote_rows, "DRAM")
        handle = self._agent.initialize_xfer("WRITE", local_list, remote_list, remote)
        if self._agent.transfer(handle) == "ERR":
            handle.release()
            raise Internal(f"NIXL could not post a WRITE of {local.array.size // 3} regions to {remote}")
        return handle

    def write_state(self, handle) -> str:
        """"DONE", "PROC" or "ERR"; polling is what makes a transfer progress and its notification go."""
        return self._agent.check_xfer_state(handle)

    def notify(self, remote: str, message: bytes) -> None:
        self._agent.send_notif(remote, message)

    def notified(self, remote: str, message: bytes) -> bool:
        """Whether `remote` sent exactly `message` (consumed when found). NIXL's own check_remote_xfer_done
        matches prefixes, so b"kv h1" would also match b"kv h10"."""
        for name, messages in self._agent.get_new_notifs().items():
            name = name.decode() if isinstance(name, bytes) else name
            self._notifs.setdefault(name, []).extend(messages)
        waiting = self._notifs.get(remote, [])
        if message in waiting:
            waiting.remove(message)
            return True
        return False

    def close(self) -> None:
        self._agent.deregister_memory(self._registered)


class KvBlockWriter:
    """Writes one transfer's blocks into a remote reservation: target holds the reserved blocks' descriptors
    (every layer), local block i goes to reserved block first_target + i."""

    def __init__(self, agent: NixlKvAgent, remote: str, target: BlockDescs, timeout_s: float = 30.0) -> None:
        self._agent, self._remote, self._target = agent, remote, target
        self._timeout_s = timeout_s
        self._pending: list = []  # NIXL handles not yet DONE
        self.num_bytes = 0
        self.aborted = False

    def write(self, layers: Sequence[int], local_blocks: Sequence[int], first_target: int = 0) -> None:
        end = first_target + len(local_blocks)
        if end > self._target.num_blocks:
            raise InvalidArgument(f"blocks [{first_target}, {end}) exceed the {self._target.num_blocks} reserved")
        local = self._agent.block_descs(local_blocks, layers)
        target = BlockDescs(np.ascontiguousarray(self._target.array[:, list(layers), first_target:end]))
        self._pending.append(self._agent.start_write(self._remote, local, target))
        self.num_bytes += int(local.array[..., 1].sum())
        self.poll()

    def poll(self) -> int:
        """Progresses the writes in flight; returns how many are still in flight. Raises Internal on a failure."""
        still = []
        for handle in self._pending:
            state = self._agent.write_state(handle)
            if state == "ERR":
                self.abort()
                raise Internal(f"a NIXL WRITE to {self._remote} failed")
            if state == "DONE":
                handle.release()
            else:
                still.append(handle)
        self._pending = still
        return len(still)

    def finish(self, message: bytes) -> None:
        """Waits until every write is in the remote memory, then sends message (the completion notification)."""
        deadline = time.monotonic() + self._timeout_s
        while self.poll():
            if time.monotonic() > deadline:
                self.abort()
                raise DeadlineExceeded(f"NIXL writes to {self._remote} did not complete in {self._timeout_s} s")
            time.sleep(50e-6)
        self._agent.notify(self._remote, message)

    def abort(self) -> None:
        """Releases the writes in flight (NIXL cancels what it can); no notification is sent."""
        self.aborted = True
        for handle in self._pending:
            handle.release()
        self._pending = []
