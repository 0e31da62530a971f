"""How a prompt's KV travels from the prefill engine to the decode engine: two small protocols.

  KvSender   (prefill side): source(block_table) once the prompt has local blocks; send(layer, start, rows) as
             each layer of a chunk is computed; close() after the last; abort() on cancel; release_source(free)
             when the engine is done with the prompt (free() frees its local blocks: at once where the rows were
             copied, once no WRITE reads them for a one-sided transport); wait() for the receiver's
             acknowledgement (a KvAck).
  KvReceiver (decode side): receive_kv(handle, layer, start, rows) stores rows into the reserved blocks,
             in token order per layer; transfer_complete(handle) once every layer has every prompt token.

A sender moves SENDING -> CLOSED -> (acknowledged), or to ABORTED from either. Rows travel as the prefill pool
stored them (int8 / fp8 codes with their scales). Three implementations: gRPC (common/kv/grpc_transport.py:
Decode.PushKv, a client stream of checksummed chunks) and NIXL (common/kv/nixl_stream.py: one-sided writes from
the local blocks that source() named, controlled by Decode.WriteKv) between processes, and InProcessKvSender
below, which hands rows straight to a receiver in the same process (unit tests of the engines, no sockets).
"""

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from common.basics.errors import FailedPrecondition, PdserveError
from common.kv.quant import KvRows


class SenderState(enum.Enum):
    SENDING = "sending"  # accepting chunks
    CLOSED = "closed"  # every chunk handed over; waiting for the receiver's acknowledgement
    ABORTED = "aborted"  # cancelled or refused; the receiver sees the transfer end unfinished


@dataclass(frozen=True)
class KvAck:
    """The receiver's acknowledgement of a whole transfer."""

    num_chunks: int
    num_bytes: int
    receive_ms: float  # from the first chunk to the last, on the receiving side


@dataclass
class ChunkTiming:
    """When the pages of one prompt chunk (tokens [token_start, token_start + num_tokens)) were handed
    over: first_s at its first layer, last_s at its last (time.monotonic())."""

    token_start: int
    num_tokens: int
    first_s: float
    last_s: float


@dataclass
class SendLog:
    """What a sender notes as the engine hands it pages: when the first went, and each chunk's span of
    hand-overs (the prefill tier's chunk spans come from these, without the engine knowing about tracing)."""

    first_sent_at: float | None = None
    chunks: dict[int, ChunkTiming] = field(default_factory=dict)  # by token_start, in computation order

    def note(self, start: int, num_tokens: int) -> None:
        now = time.monotonic()
        self.first_sent_at = self.first_sent_at or now
        timing = self.chunks.get(start)
        if timing is None:
            self.chunks[start] = ChunkTiming(start, num_tokens, now, now)
        else:
            timing.last_s = now


class KvSender(Protocol):
    state: SenderState
    log: SendLog

    def source(self, block_table: list[int]) -> None: ...
    def send(self, layer: int, start: int, rows: KvRows) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def release_source(self, free: Callable[[], None]) -> None: ...
    def wait(self) -> KvAck: ...


class KvReceiver(Protocol):
    def receive_kv(self, handle: str, layer: int, start: int, rows: KvRows) -> None: ...
    def transfer_complete(self, handle: str) -> bool: ...


def rows_nbytes(rows: KvRows) -> int:
    tensors = (rows.key, rows.value, rows.key_scale, rows.value_scale)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class InProcessKvSender:
    """Hands each layer's rows straight to a receiver in this process, on the engine's thread. A refusal
    (a typed error from the receiver) aborts the transfer and is raised again by wait()."""

    def __init__(self, receiver: KvReceiver, handle: str) -> None:
        self.state = SenderState.SENDING
        self.log = SendLog()
        self._receiver, self._handle = receiver, handle
        self._num_chunks = self._num_bytes = 0
        self._refusal: PdserveError | None = None

    def source(self, block_table: list[int]) -> None:
        """The rows come with send(); where they lie locally does not matter here."""

    def release_source(self, free: Callable[[], None]) -> None:
        free()  # the receiver stored the rows during send()

    def send(self, layer: int, start: int, rows: KvRows) -> None:
        if self.state is not SenderState.SENDING:
            return
        self.log.note(start, rows.num_tokens)
        try:
            self._receiver.receive_kv(self._handle, layer, start, rows)
        except PdserveError as error:
            self._refusal, self.state = error, SenderState.ABORTED
            return
        self._num_chunks += 1
        self._num_bytes += rows_nbytes(rows)

    def close(self) -> None:
        if self.state is SenderState.SENDING:
            self.state = SenderState.CLOSED

    def abort(self) -> None:
        self.state = SenderState.ABORTED

    def wait(self) -> KvAck:
        if self._refusal is not None:
            raise self._refusal
        if self.state is not SenderState.CLOSED or not self._receiver.transfer_complete(self._handle):
            raise FailedPrecondition(f"the KV transfer for {self._handle} ended before every layer had every "
                                     "prompt token")
        first = self.log.first_sent_at or time.monotonic()
        return KvAck(self._num_chunks, self._num_bytes, (time.monotonic() - first) * 1000)
