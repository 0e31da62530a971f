"""KV over NIXL (the transfer library of vLLM, SGLang and Dynamo): one-sided WRITEs from the prefill pool straight
into the blocks the decode pool reserved. This module holds the NIXL side; common/kv/nixl_stream.py the gRPC
control stream around it (Decode.WriteKv) and the tiers' sender and receiver.

  decode   NixlKvAgent over its pool's tensors registers them once; its metadata() and layout() travel to the
           writer over the mutually authenticated control stream, with the reserved block ids.
  prefill  NixlKvAgent over its own pool; remote(metadata, layout) checks the decode pool's layout against its
           own and prepares descriptors of every (tensor, layer, block) there once per decode agent;
           write(remote, layer, local blocks, remote blocks) posts one WRITE of those blocks of one layer in every
           tensor; state(handle) polls it to DONE.

A pool tensor has layout (layers, blocks * block_size, ...) (common/kv/pool.py: key and value, plus the scales of
quantised pools), so (tensor, layer, block) is one contiguous region, and the descriptor lists are prepared once
(prep_xfer_dlist) and indexed per write (make_prepped_xfer): a write costs microseconds to post, where building
its descriptors each time cost ~0.3 ms. NIXL merges regions contiguous on both sides into one, and refuses any
descriptor outside memory the remote agent registered.

Ordering: NIXL's UCX backend reports a WRITE DONE only after flushing its endpoint (the bytes are in the remote
memory): the writer commits (over gRPC) only once every write is DONE, so decode never reads KV still in flight.

Progress (measured, nixl 1.5, UCX, two processes on one host): with UCX's default error handling (peer) a WRITE
completes only while the target agent makes progress, so both agents run NIXL's progress thread. NIXL's Python
wrapper starts that thread with no pause between rounds (pthrDelay 0): it spun a whole core per agent, idle or not,
and on a 2-core host halved prefill and decode. The agent here is built with a pause of PROGRESS_PAUSE_US instead
(about 3% of a core per idle agent; a 768 KiB WRITE still completed in 0.2 ms). The agent is not thread-safe as
built here (NIXL's sync mode NONE): every call goes under one lock.
"""

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.basics.config import NIXL_INSTALL as INSTALL_HINT
from common.basics.config import NIXL_MODULES
from common.basics.errors import FailedPrecondition, Internal, InvalidArgument

_LOCAL = "NIXL_INIT_AGENT"  # NIXL's name for the local side of a prepared descriptor list
PROGRESS_PAUSE_US = 1000  # between rounds of NIXL's progress thread


def nixl_api():
    """NIXL's Python API, imported on first use: NIXL is an optional extra. Raises FailedPrecondition naming the
    install."""
    errors = []
    for module in NIXL_MODULES:
        try:
            return importlib.import_module(f"{module}._api")
        except ImportError as error:
            errors.append(str(error))
    raise FailedPrecondition(f"--kv-transport nixl needs NIXL, which is not installed here: {INSTALL_HINT} "
                             f"({'; '.join(errors)})")


def nixl_installed() -> bool:
    try:
        nixl_api()
    except FailedPrecondition:
        return False
    return True


def pool_tensors(pool) -> list[torch.Tensor]:
    """The storage of a KvPool (common/kv/pool.py) that a transfer moves: K and V, and their scales if quantised."""
    scales = [pool.key_scale, pool.value_scale] if pool.quantised else []
    return [pool.key, pool.value, *scales]


@dataclass(frozen=True)
class PoolLayout:
    """Where a KV pool's tensors lie in their process: block b of layer l of tensor t starts at
    addresses[t] + l * layer_bytes[t] + b * layer_bytes[t] / num_blocks."""

    addresses: tuple[int, ...]
    layer_bytes: tuple[int, ...]
    num_layers: int
    num_blocks: int

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], num_blocks: int) -> "PoolLayout":
        return cls(tuple(t.data_ptr() for t in tensors), tuple(t[0].numel() * t.element_size() for t in tensors),
                   tensors[0].shape[0], num_blocks)

    def block_bytes(self) -> tuple[int, ...]:
        return tuple(size // self.num_blocks for size in self.layer_bytes)

    def descs(self) -> np.ndarray:
        """(tensors * layers * blocks, 3) uint64 (address, bytes, device 0), in (tensor, layer, block) order."""
        layers, blocks = np.arange(self.num_layers, dtype=np.uint64), np.arange(self.num_blocks, dtype=np.uint64)
        array = np.zeros((len(self.addresses), self.num_layers, self.num_blocks, 3), dtype=np.uint64)
        for t, (address, size, block) in enumerate(zip(self.addresses, self.layer_bytes, self.block_bytes())):
            array[t, :, :, 0] = (np.uint64(address) + layers[:, None] * np.uint64(size)
                                 + blocks[None, :] * np.uint64(block))
            array[t, :, :, 1] = block
        return array.reshape(-1, 3)

    def indices(self, layer: int, blocks: Sequence[int]) -> np.ndarray:
        """Positions in descs() of `blocks` of `layer` in every tensor, tensor-major."""
        blocks = np.asarray(blocks, dtype=np.int64)
        tensors = np.arange(len(self.addresses), dtype=np.int64)
        return ((tensors[:, None] * self.num_layers + layer) * self.num_blocks + blocks[None, :]).reshape(-1)

    def check_against(self, mine: "PoolLayout") -> None:
        """Raises FailedPrecondition unless a remote pool of this layout takes this process's blocks as they are."""
        if (len(self.addresses), self.num_layers) != (len(mine.addresses), mine.num_layers) or \
                self.block_bytes() != mine.block_bytes():
            raise FailedPrecondition(
                f"the decode pool's NIXL layout ({len(self.addresses)} tensors, {self.num_layers} layers, block bytes "
                f"{self.block_bytes()}) differs from this pool's ({len(mine.addresses)}, {mine.num_layers}, "
                f"{mine.block_bytes()}); run prefill and decode with the same model, --kv-dtype and --block-size")
        if self.num_blocks < 1 or any(size % self.num_blocks for size in self.layer_bytes) or not all(self.addresses):
            raise InvalidArgument(f"the decode pool's NIXL layout is malformed: {self}")


@dataclass(frozen=True)
class RemotePool:
    """A decode agent as this agent knows it: its name, its pool's layout, and its prepared descriptor list."""

    name: str
    layout: PoolLayout
    metadata: bytes
    dlist: object  # nixl_prepped_dlist_handle


class NixlKvAgent:
    """One NIXL agent (UCX backend) with a pool's tensors registered: each (layers, blocks * block_size, ...),
    contiguous, on the CPU (DRAM)."""

    def __init__(self, name: str, tensors: Sequence[torch.Tensor], block_size: int,
                 ucx_params: dict[str, str] | None = None) -> None:
        api = nixl_api()
        for tensor in tensors:
            if tensor.device.type != "cpu":
                raise FailedPrecondition(f"--kv-transport nixl moves KV pools in host memory (DRAM) only so far; this "
                                         f"pool is on {tensor.device}: use --kv-transport grpc, or --device cpu")
            if not tensor.is_contiguous():
                raise InvalidArgument("NIXL registers contiguous tensors: the pool's are not")
            if tensor.shape[1] % block_size:
                raise InvalidArgument(f"{tensor.shape[1]} slots are not whole blocks of {block_size}")
        self.name = name
        self.block_size = block_size
        self.pool_layout = PoolLayout.of(tensors, tensors[0].shape[1] // block_size)
        self._tensors = list(tensors)  # kept alive: NIXL holds their addresses
        self._lock = threading.Lock()
        self._api = api
        self._agent = _paced_agent(api, name)
        if "UCX" not in self._agent.plugin_list:
            raise Internal(f"NIXL has no UCX plugin here (plugins: {self._agent.plugin_list})")
        self._agent.create_backend("UCX", dict(ucx_params or {}))
        self._registered = self._agent.register_memory(self._tensors)
        self._local_dlist = None  # prepared on the first write: a decode agent never writes
        self._remotes: dict[str, RemotePool] = {}

    def metadata(self) -> bytes:
        """What a remote agent needs to write here (connection info and registrations); taken after registering."""
        with self._lock:
            return self._agent.get_agent_metadata()

    def remote(self, name: str, metadata: bytes, layout: PoolLayout) -> RemotePool:
        """The decode agent `name` ready to be written: its metadata loaded and its pool's descriptors prepared, once
        (again when its metadata changed: a restarted instance). Raises FailedPrecondition if its layout differs."""
        layout.check_against(self.pool_layout)
        with self._lock:
            known = self._remotes.get(name)
            if known is not None and known.metadata == metadata and known.layout == layout:
                return known
            if known is not None:
                self._agent.release_dlist_handle(known.dlist)
                self._agent.remove_remote_agent(name)
            loaded = self._agent.add_remote_agent(metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
            if loaded != name:
                if loaded not in self._remotes:
                    self._agent.remove_remote_agent(loaded)
                raise InvalidArgument(f"the NIXL metadata names agent {loaded!r}, the decode tier said {name!r}")
            try:
                dlist = self._agent.prep_xfer_dlist(name, self._agent.get_xfer_descs(layout.descs(), "DRAM"))
            except self._api.nixlBind.nixlNotFoundError:
                self._agent.remove_remote_agent(name)
                raise InvalidArgument(f"the decode pool's layout names memory that agent {name} has not registered "
                                      "with NIXL") from None
            self._remotes[name] = remote = RemotePool(name, layout, metadata, dlist)
            return remote

    def write(self, remote: RemotePool, layer: int, local_blocks: Sequence[int], remote_blocks: Sequence[int]):
        """Posts one WRITE of local_blocks of `layer` (every tensor) onto remote_blocks; returns the NIXL handle."""
        if len(local_blocks) != len(remote_blocks) or not local_blocks:
            raise InvalidArgument(f"{len(local_blocks)} local blocks for {len(remote_blocks)} remote ones")
        sides = ((local_blocks, self.pool_layout, "local"), (remote_blocks, remote.layout, "remote"))
        for blocks, layout, side in sides:
            if not 0 <= layer < layout.num_layers or min(blocks) < 0 or max(blocks) >= layout.num_blocks:
                raise InvalidArgument(f"layer {layer} or {side} blocks {min(blocks)}..{max(blocks)} are outside "
                                      f"the pool's {layout.num_layers} layers x {layout.num_blocks} blocks")
        with self._lock:
            if self._local_dlist is None:
                self._local_dlist = self._agent.prep_xfer_dlist(
                    _LOCAL, self._agent.get_xfer_descs(self.pool_layout.descs(), "DRAM"))
            handle = self._agent.make_prepped_xfer("WRITE", self._local_dlist,
                                                   self.pool_layout.indices(layer, local_blocks), remote.dlist,
                                                   remote.layout.indices(layer, remote_blocks))
            if self._agent.transfer(handle) == "ERR":
                self._agent.release_xfer_handle(handle)
                raise Internal(f"NIXL could not post a WRITE of {len(local_blocks)} blocks to {remote.name}")
        return handle

    def state(self, handle) -> str:
        """"DONE", "PROC" or "ERR"."""
        with self._lock:
            return self._agent.check_xfer_state(handle)

    def release(self, handle) -> None:
        with self._lock:
            self._agent.release_xfer_handle(handle)

    def close(self) -> None:
        with self._lock:
            for remote in self._remotes.values():
                self._agent.release_dlist_handle(remote.dlist)
            if self._local_dlist is not None:
                self._agent.release_dlist_handle(self._local_dlist)
            self._agent.deregister_memory(self._registered)
            self._remotes.clear()


def _paced_agent(api, name: str):
    """nixl_agent (the Python wrapper) over a core agent whose progress thread pauses PROGRESS_PAUSE_US between
    rounds: the wrapper offers no such setting, so its core agent, made without a progress thread, is replaced
    before any backend or memory is attached to it."""
    agent = api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=[]))
    config = api.nixlBind.nixlAgentConfig()
    config.useProgThread, config.pthrDelay = True, PROGRESS_PAUSE_US
    config.useListenThread, config.lthrDelay, config.captureTelemetry = False, 100_000, False
    config.syncMode = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE.value
    agent.agent = api.nixlBind.nixlAgent(name, config)
    return agent
