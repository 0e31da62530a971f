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

NixlKvSender here is the prefill side (common/kv/transport.py's KvSender); common/kv/nixl_serve.py's
serve_writes the decode side.
"""

import queue
import threading
import time

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from common.basics.errors import (
    Aborted,
    DeadlineExceeded,
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

END = None  # ends the request stream
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
        self._call = stub.WriteKv(iter(self._requests.get, END), timeout=max(self._deadline - time.monotonic(), 0),
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
        self._requests.put(END)
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
        self._requests.put(END)
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
