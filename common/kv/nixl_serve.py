"""The decode side of the NIXL KV transport: Decode.WriteKv's stream (the protocol is common/kv/nixl_stream.py's).
The writer's WRITEs land in the reservation's blocks by themselves; this stream hands out where those blocks lie,
checks each layer's KV as the writer reports it in place, and completes the transfer on the commit, while the
decode engine (KvWriteReceiver) keeps the blocks out of reuse until the writer has committed or stopped."""

import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from common.basics.compat import Compat
from common.basics.errors import FailedPrecondition, InvalidArgument
from common.kv.nixl_stream import END, MAX_AGENT_NAME
from common.kv.nixl_transport import NixlKvAgent
from common.kv.transport import KvAck
from pdserve.v1 import decode_pb2

_POLL_S = 0.05  # how often the stream looks for a revocation while the writer is quiet


class KvWriteReceiver(Protocol):
    """The decode engine's side of a NIXL write (decode_svc/engine.py)."""

    def open_write(self, handle: str, writer: str, token_start: int) -> tuple[list[int], int]: ...
    def check_written(self, handle: str, layers: range, start: int, end: int) -> None: ...
    def write_revoked(self, handle: str) -> str | None: ...
    def commit_write(self, handle: str, checked: list[int]) -> None: ...
    def close_write(self, handle: str, confirmed: bool) -> None: ...


def serve_writes(requests: Iterator[decode_pb2.KvWriteRequest], context: grpc.ServicerContext,
                 receiver: KvWriteReceiver, agent: NixlKvAgent, metadata: bytes, compat: Compat,
                 on_commit=None) -> Iterator[decode_pb2.KvWriteReply]:
    """The decode side of one WriteKv stream. on_commit(handle, ack) is told of each committed transfer."""
    first = next(requests, None)
    if first is None or first.WhichOneof("kind") != "open":
        raise InvalidArgument("a KV write stream starts with open (handle, fingerprint, writer agent)")
    opened = first.open
    if opened.fingerprint != compat.fingerprint:
        raise FailedPrecondition(
            "KV layout mismatch: the writer's compatibility fingerprint differs from this decode instance's "
            f"(model {compat.model_id}, kv_dtype {compat.kv_dtype}, block_size {compat.block_size}); "
            "run prefill and decode with the same model, --kv-dtype and --block-size")
    if not opened.writer_agent or len(opened.writer_agent) > MAX_AGENT_NAME:
        raise InvalidArgument(f"writer_agent must name the writer's NIXL agent (1 to {MAX_AGENT_NAME} characters)")
    handle, started = opened.handle, time.monotonic()
    block_ids, num_prompt_tokens = receiver.open_write(handle, opened.writer_agent, opened.token_start)
    confirmed, checked = False, [opened.token_start] * agent.pool_layout.num_layers  # per layer
    try:
        layout = agent.pool_layout
        yield decode_pb2.KvWriteReply(target=decode_pb2.KvWriteTarget(
            agent_name=agent.name, agent_metadata=metadata, block_ids=block_ids,
            tensor_addresses=layout.addresses, layer_bytes=layout.layer_bytes, num_blocks=layout.num_blocks,
            num_prompt_tokens=num_prompt_tokens))
        inbox: queue.Queue = queue.Queue()
        threading.Thread(target=_forward, args=(requests, inbox), name=f"kv-write-{handle}", daemon=True).start()
        revoked = False
        while True:
            try:
                message = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                reason = None if revoked else receiver.write_revoked(handle)
                if reason is not None:
                    revoked = True
                    yield decode_pb2.KvWriteReply(revoke=decode_pb2.KvWriteRevoke(reason=reason))
                if not context.is_active():
                    return
                continue
            kind = message.WhichOneof("kind") if message is not END else None
            if kind == "progress":  # a layer's KV up to token_end is in place: checked now, while the rest computes
                layer, end = message.progress.layer, min(message.progress.token_end, num_prompt_tokens)
                if layer >= len(checked):
                    raise InvalidArgument(f"progress names layer {layer}; the model has {len(checked)}")
                if end > checked[layer]:
                    receiver.check_written(handle, range(layer, layer + 1), checked[layer], end)
                    checked[layer] = end
            elif kind in ("commit", "stop"):
                confirmed = True  # either way none of the writer's WRITEs is in flight any more
                if kind == "stop":
                    return
                if message.commit.token_end != num_prompt_tokens:
                    raise InvalidArgument(f"the commit covers tokens up to {message.commit.token_end}; the reservation "
                                          f"holds {num_prompt_tokens} prompt tokens")
                receiver.commit_write(handle, checked)
                ack = KvAck(message.commit.num_writes, message.commit.num_bytes, (time.monotonic() - started) * 1000)
                if on_commit is not None:
                    on_commit(handle, ack)
                yield decode_pb2.KvWriteReply(ack=decode_pb2.PushKvResponse(
                    num_chunks=ack.num_chunks, num_bytes=ack.num_bytes, receive_ms=ack.receive_ms))
                return
            else:  # the stream ended (or broke) with neither: the writer may still have WRITEs in flight
                if message is not END:
                    raise InvalidArgument(f"a KV write stream carries progress, commit or stop after open; got {kind}")
                return
    finally:
        receiver.close_write(handle, confirmed)


def _forward(requests: Iterator, inbox: queue.Queue) -> None:
    try:
        for message in requests:
            inbox.put(message)
    except Exception:  # noqa: BLE001 - a broken stream ends like a closed one; the caller fences the blocks
        pass
    inbox.put(END)
