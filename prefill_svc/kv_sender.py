"""KvSender: pushes one prompt's KV pages to a decode instance while the prefill is still computing.

The engine hands each layer's fresh K/V to `send` as it is computed; a gRPC client stream
(Decode.PushKv) serialises and sends them from its own thread, so transfer overlaps compute.
"""

import enum
import queue
from typing import Protocol

import grpc
import torch

from common import kv_wire
from pdserve.v1 import decode_pb2, decode_pb2_grpc


class SenderState(enum.Enum):
    SENDING = "sending"  # accepting chunks
    CLOSED = "closed"  # every chunk handed over; waiting for the receiver's acknowledgement
    ABORTED = "aborted"  # cancelled; the receiver sees the stream cancelled


class KvSender(Protocol):
    state: SenderState

    def send(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def wait(self) -> decode_pb2.PushKvResponse: ...


class GrpcKvSender:
    def __init__(self, stub: decode_pb2_grpc.DecodeStub, *, handle: str, fingerprint: str, kv_dtype: str,
                 metadata: list[tuple[str, str]], timeout_s: float | None) -> None:
        self.state = SenderState.SENDING
        self._handle = handle
        self._fingerprint = fingerprint
        self._dtype = kv_wire.DTYPES[kv_dtype]
        self._dtype_name = kv_dtype
        self._pending: queue.Queue = queue.Queue()
        self._call = stub.PushKv.future(self._chunks(), metadata=metadata, timeout=timeout_s)

    def send(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.state is SenderState.SENDING:
            self._pending.put((layer, start, key, value))

    def close(self) -> None:
        if self.state is SenderState.SENDING:
            self.state = SenderState.CLOSED
            self._pending.put(None)

    def abort(self) -> None:
        if self.state is not SenderState.ABORTED:
            self.state = SenderState.ABORTED
            self._call.cancel()
            self._pending.put(None)

    def wait(self) -> decode_pb2.PushKvResponse:
        """The receiver's acknowledgement; raises grpc.RpcError if it refused or the stream broke."""
        return self._call.result()

    def _chunks(self):
        while (item := self._pending.get()) is not None:
            layer, start, key, value = item
            key_bytes = kv_wire.to_bytes(key.to(self._dtype))
            value_bytes = kv_wire.to_bytes(value.to(self._dtype))
            yield decode_pb2.KvChunk(
                handle=self._handle,
                fingerprint=self._fingerprint,
                layer=layer,
                token_start=start,
                token_end=start + key.shape[0],
                dtype=self._dtype_name,
                shape=list(key.shape),
                key=key_bytes,
                value=value_bytes,
                crc32=kv_wire.checksum(key_bytes, value_bytes),
            )


def is_cancelled(error: grpc.RpcError) -> bool:
    return isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.CANCELLED
