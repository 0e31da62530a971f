"""The NIXL KV transport between processes (--kv-transport nixl): one-sided NIXL WRITEs carry the KV
(common/kv/nixl_transport.py), and Decode.WriteKv, a bidirectional gRPC stream on the tiers' mutually authenticated
connection, carries everything else:

  prefill -> decode   open (handle, fingerprint, writer agent, first token)   decode checks the fingerprint and
                                                                               marks the reservation as written
  decode -> prefill   target (decode's agent metadata, pool layout, the reservation's block ids)
  prefill             WRITEs each layer's whole blocks as the layer is computed (a block cut by a chunk's end
                      waits for the next chunk: every block is written once); progress as a layer's WRITEs
                      are DONE up to a token: decode checks that KV (finite values) while the rest computes,
                      and renews the lease
  prefill -> decode   commit once every WRITE is DONE (in decode's memory); decode checks what progress did not
                      cover and admits the sequence; ack
  decode -> prefill   revoke, if the reservation ends first (lease, Release); the writer then stops: it waits
                      until none of its WRITEs is in flight and says stop

Block addresses come from the decode tier itself over this stream, never relayed by the gateway, and a reservation
with an open stream is never reused: its blocks are fenced (held) past its end until the writer commits or stops,
or --nixl-fence-ms after the stream broke without either (decode_svc/engine.py). NIXL's data plane (UCX) is not
authenticated: see the README's security section.

NixlKvSender is the prefill side (common/kv/transport.py's KvSender); serve_writes the decode side.
"""

import queue
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from common.basics.compat import Compat
from common.basics.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PdserveError,
)
from common.edge.errors import upstream
from common.edge.tracing import outgoing_metadata, tracer
from common.kv.grpc_transport import end_transfer_span
from common.kv.nixl_transport import NixlKvAgent, PoolLayout, RemotePool
from common.kv.quant import KvRows
from common.kv.transport import KvAck, SenderState, SendLog
from pdserve.v1 import decode_pb2, decode_pb2_grpc

_END = None  # ends the request stream
_POLL_S = 0.05  # how often the decode side looks for a revocation while the writer is quiet
_DEFAULT_TIMEOUT_S = 60.0  # a transfer with no deadline of its own still ends
STOP_WAIT_S = 10.0  # how long an aborted writer waits for its WRITEs in flight before ending without a stop
MAX_AGENT_NAME = 256


class NixlKvSender:
    """Writes one prompt's KV into a decode reservation over NIXL. The control stream opens at once, so the round
    trip for the target overlaps the prompt's queueing and first layers; send() never waits for it (what is handed
    over before the target arrives is posted when it does), so a slow decode instance cannot stall the prefill
    engine. The local blocks are read by the WRITEs until they are DONE: release_source() frees them only then."""

    def __init__(self, stub: decode_pb2_grpc.DecodeStub, agent: NixlKvAgent, *, handle: str, fingerprint: str,
                 kv_skip: int, request_id: str, trace_parent: Span | None, timeout_s: float | None) -> None:
        self.state = SenderState.SENDING
        self.log = SendLog()
        self._agent, self._handle = agent, handle
        self._deadline = time.monotonic() + (_DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        self._lock = threading.Lock()
        self._target_ready, self._replied, self._stopped = threading.Event(), threading.Event(), threading.Event()
        self._remote: RemotePool | None = None
        self._remote_blocks: list[int] = []
        self._local_blocks: list[int] | None = None
        num_layers = agent.pool_layout.num_layers
        self._handed = [kv_skip] * num_layers  # per layer: tokens the engine has handed over
        self._posted = [kv_skip] * num_layers  # per layer: tokens whose blocks are posted (whole blocks, or all)
        self._num_prompt_tokens = 0
        self._pending: list = []  # (NIXL handle, layer, first token it writes) not yet DONE
        self._reported = [kv_skip] * num_layers  # per layer, the progress decode has heard: WRITEs DONE up to here
        self._num_bytes = self._num_writes = 0
        self._free_source = None  # the engine's callback freeing the local blocks, once no WRITE reads them
        self._error: PdserveError | None = None
        self._ack: KvAck | None = None
        parent = trace.set_span_in_context(trace_parent) if trace_parent is not None else None
        self._span: Span | None = tracer("pdserve.prefill").start_span(
            "kv.transfer", context=parent, kind=SpanKind.CLIENT,
            attributes={"pdserve.kv.handle": handle, "pdserve.kv.transport": "nixl"})
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(decode_pb2.KvWriteRequest(open=decode_pb2.KvWriteOpen(
            handle=handle, fingerprint=fingerprint, writer_agent=agent.name, token_start=kv_skip)))
        self._call = stub.WriteKv(iter(self._requests.get, _END), timeout=max(self._deadline - time.monotonic(), 0),
                                  metadata=outgoing_metadata(request_id, self._span))
        threading.Thread(target=self._read, name=f"nixl-kv-{handle}", daemon=True).start()

    # The engine's side (its loop thread; never blocks on the network).

    def source(self, block_table: list[int]) -> None:
        self._local_blocks = list(block_table)

    def send(self, layer: int, start: int, rows: KvRows) -> None:
        """Layer `layer` holds the prompt's KV up to start + rows.num_tokens in the local blocks: posts the whole
        blocks that completes (the last one too once the prompt ends). The rows themselves are not read."""
        if self.state is not SenderState.SENDING:
            return
        self.log.note(start, rows.num_tokens)
        end = start + rows.num_tokens
        with self._lock:
            self._handed[layer] = end
        self._post(layer)
        self._reap()

    def close(self) -> None:
        if self.state is SenderState.SENDING:
            self.state = SenderState.CLOSED

    def abort(self) -> None:
        """Stops: no new WRITE; a thread waits until none is in flight, then tells decode (which frees the blocks)."""
        with self._lock:
            if self.state is SenderState.ABORTED:
                return
            self.state = SenderState.ABORTED
        threading.Thread(target=self._stop, name=f"nixl-kv-stop-{self._handle}", daemon=True).start()

    def release_source(self, free) -> None:
        """The engine is done with the prompt: free() frees its local blocks, called once no WRITE reads them."""
        with self._lock:
            self._free_source = free
        if self._stopped.is_set():  # the transfer ended (and tried to free before this was known)
            self._source_done()

    # The RPC thread's side.

    def wait(self) -> KvAck:
        """Once every WRITE is DONE, commits; returns decode's acknowledgement. Raises what ended the transfer."""
        if self.state is SenderState.ABORTED:
            self._stopped.wait(max(self._deadline - time.monotonic(), 0))
            raise self._error or Aborted(f"the KV write into {self._handle} was aborted")
        if not self._target_ready.wait(max(self._deadline - time.monotonic(), 0)):
            self._fail(DeadlineExceeded(f"the decode tier did not answer the KV write into {self._handle}"))
        for layer in range(len(self._handed)):
            self._post(layer)
        if self._error is None and min(self._handed) != self._num_prompt_tokens:
            self._fail(InvalidArgument(f"the reservation {self._handle} is for {self._num_prompt_tokens} prompt "
                                       f"tokens; this prompt has {min(self._handed)}"))
        if self._error is not None or not self._drain():
            self.abort()
            raise self._error or DeadlineExceeded(f"NIXL writes into {self._handle} did not complete in time")
        self._source_done()
        self._requests.put(decode_pb2.KvWriteRequest(commit=decode_pb2.KvWriteCommit(
            num_bytes=self._num_bytes, num_writes=self._num_writes, token_end=min(self._handed))))
        self._requests.put(_END)
        self._replied.wait(max(self._deadline - time.monotonic(), 0))
        if self._ack is None:
            error = self._error or DeadlineExceeded(f"the decode tier did not acknowledge the KV of {self._handle}")
            self._end_span(Status(StatusCode.ERROR, str(error)))
            raise error
        self._stopped.set()
        self._end_span(Status(StatusCode.OK), self._ack)
        return self._ack

    # Internals.

    def _post(self, layer: int) -> None:
        """Posts the whole blocks of `layer` handed over and not yet posted, once the target is known."""
        size = self._agent.block_size
        with self._lock:
            if self._remote is None or self._error is not None or self.state is SenderState.ABORTED:
                return
            end = self._handed[layer]
            first = self._posted[layer] // size
            last = -(-end // size) if end >= self._num_prompt_tokens else end // size
            if last <= first:
                return
            try:
                handle = self._agent.write(self._remote, layer, self._local_blocks[first:last],
                                           self._remote_blocks[first:last])
            except PdserveError as error:
                failed = error
            else:
                failed = None
                self._pending.append((handle, layer, first * size))
                self._num_writes += 1
                self._num_bytes += (last - first) * sum(self._remote.layout.block_bytes())
                self._posted[layer] = last * size
        if failed is not None:
            self._fail(failed)

    def _read(self) -> None:
        """The reply stream: the target, then an acknowledgement or a revocation; a broken stream fails the send."""
        try:
            for reply in self._call:
                kind = reply.WhichOneof("kind")
                if kind == "target":
                    self._on_target(reply.target)
                elif kind == "revoke":
                    self._fail(Aborted(f"the decode tier revoked the KV write into {self._handle}: "
                                       f"{reply.revoke.reason}"))
                elif kind == "ack":
                    self._ack = KvAck(reply.ack.num_chunks, reply.ack.num_bytes, reply.ack.receive_ms)
        except grpc.RpcError as error:
            if self._ack is None:
                self._fail(upstream(error, "the decode tier refused the KV write"))
        except PdserveError as error:
            self._fail(error)
        finally:
            self._target_ready.set()
            self._replied.set()

    def _on_target(self, target: decode_pb2.KvWriteTarget) -> None:
        mine = self._agent.pool_layout
        layout = PoolLayout(tuple(target.tensor_addresses), tuple(target.layer_bytes), mine.num_layers,
                            target.num_blocks)
        needed = -(-target.num_prompt_tokens // self._agent.block_size)
        if len(target.block_ids) < needed or any(b >= target.num_blocks for b in target.block_ids):
            raise InvalidArgument(f"the decode tier's target for {self._handle} names {len(target.block_ids)} blocks "
                                  f"(of a pool of {target.num_blocks}) for {target.num_prompt_tokens} tokens")
        if not target.agent_name or len(target.agent_name) > MAX_AGENT_NAME:
            raise InvalidArgument("the decode tier's target names no NIXL agent")
        if self._local_blocks is not None and len(self._local_blocks) < needed:
            raise InvalidArgument(f"the decode tier's reservation {self._handle} is for {target.num_prompt_tokens} "
                                  f"tokens, more than this prompt's {len(self._local_blocks)} blocks hold")
        remote = self._agent.remote(target.agent_name, target.agent_metadata, layout)
        with self._lock:
            self._remote, self._remote_blocks = remote, list(target.block_ids)
            self._num_prompt_tokens = target.num_prompt_tokens
        self._target_ready.set()
        if self._local_blocks is not None:
            for layer in range(len(self._handed)):  # what the engine handed over before the target came
                self._post(layer)

    def _reap(self) -> bool:
        """Polls the WRITEs in flight, releasing those DONE, and tells decode how far every layer's WRITEs are DONE
        (it checks that KV while the rest computes, and renews the lease); False on a failed WRITE."""
        with self._lock:
            pending, self._pending = self._pending, []
        still = []
        for item in pending:
            state = self._agent.state(item[0])
            if state == "PROC":
                still.append(item)
                continue
            self._agent.release(item[0])
            if state != "DONE":
                self._fail(Internal(f"a NIXL WRITE into {self._handle} failed ({state})"))
        with self._lock:
            self._pending = still + self._pending
            in_flight = {}
            for _, layer, first in self._pending:
                in_flight[layer] = min(first, in_flight.get(layer, first))
            reports = []
            for layer, posted in enumerate(self._posted):
                done = min(in_flight.get(layer, posted), posted, self._num_prompt_tokens or posted)
                if done > self._reported[layer]:
                    self._reported[layer] = done
                    reports.append((layer, done))
        for layer, done in reports if self.state is not SenderState.ABORTED else ():
            self._requests.put(decode_pb2.KvWriteRequest(progress=decode_pb2.KvWriteProgress(token_end=done,
                                                                                             layer=layer)))
        return self._error is None

    def _drain(self) -> bool:
        """Waits until no WRITE is in flight (until the deadline); whether they all succeeded."""
        while self._reap():
            with self._lock:
                if not self._pending:
                    return True
            if time.monotonic() > self._deadline:
                return False
            time.sleep(50e-6)
        return False

    def _fail(self, error: PdserveError) -> None:
        if self._error is None:
            self._error = error
        self.abort()

    def _stop(self) -> None:
        """After an abort: waits out the WRITEs in flight, then says stop and ends the stream. Without the stop
        (writes still in flight after STOP_WAIT_S), decode fences the blocks for --nixl-fence-ms."""
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending or time.monotonic() > deadline:
                break
            self._reap()
            time.sleep(50e-6)
        if not pending:
            self._requests.put(decode_pb2.KvWriteRequest(stop=decode_pb2.KvWriteStop()))
        self._requests.put(_END)
        self._end_span(Status(StatusCode.ERROR, str(self._error or "the transfer was aborted")))
        self._stopped.set()
        # Freed even with WRITEs still in flight: they only read the local blocks, into a reservation that ended.
        self._source_done()

    def _source_done(self) -> None:
        with self._lock:
            free, self._free_source = self._free_source, None
        if free is not None:
            free()

    def _end_span(self, status: Status, ack: KvAck | None = None) -> None:
        with self._lock:
            span, self._span = self._span, None
        end_transfer_span(span, status, self.log, ack)


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
            kind = message.WhichOneof("kind") if message is not _END else None
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
                if message is not _END:
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
    inbox.put(_END)
