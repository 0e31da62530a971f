from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens", "max_new_tokens", "lease_ms", "prompt_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    max_new_tokens: int
    lease_ms: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("handle", "num_blocks", "lease_expires_unix_ms", "compat", "num_cached_tokens")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMPAT_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    handle: str
    num_blocks: int
    lease_expires_unix_ms: int
    compat: _common_pb2.CompatInfo
    num_cached_tokens: int
    def __init__(self, handle: _Optional[str] = ..., num_blocks: _Optional[int] = ..., lease_expires_unix_ms: _Optional[int] = ..., compat: _Optional[_Union[_common_pb2.CompatInfo, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("handle", "fingerprint", "layer", "token_start", "token_end", "dtype", "shape", "key", "value", "crc32", "key_scale", "value_scale")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    KEY_SCALE_FIELD_NUMBER: _ClassVar[int]
    VALUE_SCALE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    fingerprint: str
    layer: int
    token_start: int
    token_end: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    key: bytes
    value: bytes
    crc32: int
    key_scale: bytes
    value_scale: bytes
    def __init__(self, handle: _Optional[str] = ..., fingerprint: _Optional[str] = ..., layer: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., crc32: _Optional[int] = ..., key_scale: _Optional[bytes] = ..., value_scale: _Optional[bytes] = ...) -> None: ...

class PushKvResponse(_message.Message):
    __slots__ = ("num_chunks", "num_bytes", "receive_ms")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_MS_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    num_bytes: int
    receive_ms: float
    def __init__(self, num_chunks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., receive_ms: _Optional[float] = ...) -> None: ...

class KvWriteRequest(_message.Message):
    __slots__ = ("open", "progress", "commit", "stop")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    open: KvWriteOpen
    progress: KvWriteProgress
    commit: KvWriteCommit
    stop: KvWriteStop
    def __init__(self, open: _Optional[_Union[KvWriteOpen, _Mapping]] = ..., progress: _Optional[_Union[KvWriteProgress, _Mapping]] = ..., commit: _Optional[_Union[KvWriteCommit, _Mapping]] = ..., stop: _Optional[_Union[KvWriteStop, _Mapping]] = ...) -> None: ...

class KvWriteOpen(_message.Message):
    __slots__ = ("handle", "fingerprint", "writer_agent", "token_start")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WRITER_AGENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    handle: str
    fingerprint: str
    writer_agent: str
    token_start: int
    def __init__(self, handle: _Optional[str] = ..., fingerprint: _Optional[str] = ..., writer_agent: _Optional[str] = ..., token_start: _Optional[int] = ...) -> None: ...

class KvWriteProgress(_message.Message):
    __slots__ = ("token_end", "layer")
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    token_end: int
    layer: int
    def __init__(self, token_end: _Optional[int] = ..., layer: _Optional[int] = ...) -> None: ...

class KvWriteCommit(_message.Message):
    __slots__ = ("num_bytes", "num_writes", "token_end")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_WRITES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    num_writes: int
    token_end: int
    def __init__(self, num_bytes: _Optional[int] = ..., num_writes: _Optional[int] = ..., token_end: _Optional[int] = ...) -> None: ...

class KvWriteStop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KvWriteReply(_message.Message):
    __slots__ = ("target", "ack", "revoke")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    target: KvWriteTarget
    ack: PushKvResponse
    revoke: KvWriteRevoke
    def __init__(self, target: _Optional[_Union[KvWriteTarget, _Mapping]] = ..., ack: _Optional[_Union[PushKvResponse, _Mapping]] = ..., revoke: _Optional[_Union[KvWriteRevoke, _Mapping]] = ...) -> None: ...

class KvWriteTarget(_message.Message):
    __slots__ = ("agent_name", "agent_metadata", "block_ids", "tensor_addresses", "layer_bytes", "num_blocks", "num_prompt_tokens")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    agent_metadata: bytes
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    tensor_addresses: _containers.RepeatedScalarFieldContainer[int]
    layer_bytes: _containers.RepeatedScalarFieldContainer[int]
    num_blocks: int
    num_prompt_tokens: int
    def __init__(self, agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., block_ids: _Optional[_Iterable[int]] = ..., tensor_addresses: _Optional[_Iterable[int]] = ..., layer_bytes: _Optional[_Iterable[int]] = ..., num_blocks: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ...) -> None: ...

class KvWriteRevoke(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("handle", "request_id", "first_token_id", "max_new_tokens", "sampling", "stop_token_ids", "stop", "prompt_token_ids", "speculative", "first_step", "prefill_locally")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    handle: str
    request_id: str
    first_token_id: int
    max_new_tokens: int
    sampling: _common_pb2.SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    speculative: bool
    first_step: int
    prefill_locally: bool
    def __init__(self, handle: _Optional[str] = ..., request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., stop: _Optional[_Iterable[str]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., speculative: _Optional[bool] = ..., first_step: _Optional[int] = ..., prefill_locally: _Optional[bool] = ...) -> None: ...

class SpeculationStats(_message.Message):
    __slots__ = ("num_proposed", "num_accepted", "num_verify_steps", "num_verify_tokens")
    NUM_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NUM_VERIFY_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_VERIFY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_proposed: int
    num_accepted: int
    num_verify_steps: int
    num_verify_tokens: int
    def __init__(self, num_proposed: _Optional[int] = ..., num_accepted: _Optional[int] = ..., num_verify_steps: _Optional[int] = ..., num_verify_tokens: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "queue_ms", "speculation", "local_prefill_ms", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    queue_ms: float
    speculation: SpeculationStats
    local_prefill_ms: float
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., queue_ms: _Optional[float] = ..., speculation: _Optional[_Union[SpeculationStats, _Mapping]] = ..., local_prefill_ms: _Optional[float] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeStats(_message.Message):
    __slots__ = ("num_blocks_total", "num_blocks_free", "num_reserved", "num_running", "num_steps", "num_tokens_generated", "max_batch_size", "mean_batch_size", "num_leases_expired", "num_cancelled", "block_size", "num_spec_proposed", "num_spec_accepted", "expert_load", "batch_capacity", "num_preemptions", "num_cached_blocks", "num_prefix_query_tokens", "num_prefix_hit_tokens", "num_local_prefills", "num_preempted_waiting", "num_fenced_blocks")
    NUM_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_RESERVED_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    NUM_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SPEC_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    NUM_SPEC_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    BATCH_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOCAL_PREFILLS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTED_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_FENCED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks_total: int
    num_blocks_free: int
    num_reserved: int
    num_running: int
    num_steps: int
    num_tokens_generated: int
    max_batch_size: int
    mean_batch_size: float
    num_leases_expired: int
    num_cancelled: int
    block_size: int
    num_spec_proposed: int
    num_spec_accepted: int
    expert_load: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    batch_capacity: int
    num_preemptions: int
    num_cached_blocks: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int
    num_local_prefills: int
    num_preempted_waiting: int
    num_fenced_blocks: int
    def __init__(self, num_blocks_total: _Optional[int] = ..., num_blocks_free: _Optional[int] = ..., num_reserved: _Optional[int] = ..., num_running: _Optional[int] = ..., num_steps: _Optional[int] = ..., num_tokens_generated: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., mean_batch_size: _Optional[float] = ..., num_leases_expired: _Optional[int] = ..., num_cancelled: _Optional[int] = ..., block_size: _Optional[int] = ..., num_spec_proposed: _Optional[int] = ..., num_spec_accepted: _Optional[int] = ..., expert_load: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., batch_capacity: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., num_cached_blocks: _Optional[int] = ..., num_prefix_query_tokens: _Optional[int] = ..., num_prefix_hit_tokens: _Optional[int] = ..., num_local_prefills: _Optional[int] = ..., num_preempted_waiting: _Optional[int] = ..., num_fenced_blocks: _Optional[int] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "tokens_per_expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens_per_expert: _Optional[_Iterable[int]] = ...) -> None: ...
