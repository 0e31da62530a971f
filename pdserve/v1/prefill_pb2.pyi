from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "decode_address", "kv_handle", "first_step", "kv_skip_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    KV_SKIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    decode_address: str
    kv_handle: str
    first_step: int
    kv_skip_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., decode_address: _Optional[str] = ..., kv_handle: _Optional[str] = ..., first_step: _Optional[int] = ..., kv_skip_tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "queue_ms", "compute_ms", "kv_transfer_ms", "kv_bytes", "kv_chunks", "num_chunks", "num_cached_tokens", "first_token_logprob")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    queue_ms: float
    compute_ms: float
    kv_transfer_ms: float
    kv_bytes: int
    kv_chunks: int
    num_chunks: int
    num_cached_tokens: int
    first_token_logprob: _common_pb2.TokenLogprob
    def __init__(self, first_token_id: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., kv_transfer_ms: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., kv_chunks: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., first_token_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...

class GetInfoPrefillRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillStats(_message.Message):
    __slots__ = ("num_queued", "num_queued_tokens", "num_steps", "num_prompts", "max_batch_prompts", "num_blocks_free", "num_blocks_total", "num_cached_blocks", "num_prefix_query_tokens", "num_prefix_hit_tokens")
    NUM_QUEUED_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_queued: int
    num_queued_tokens: int
    num_steps: int
    num_prompts: int
    max_batch_prompts: int
    num_blocks_free: int
    num_blocks_total: int
    num_cached_blocks: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int
    def __init__(self, num_queued: _Optional[int] = ..., num_queued_tokens: _Optional[int] = ..., num_steps: _Optional[int] = ..., num_prompts: _Optional[int] = ..., max_batch_prompts: _Optional[int] = ..., num_blocks_free: _Optional[int] = ..., num_blocks_total: _Optional[int] = ..., num_cached_blocks: _Optional[int] = ..., num_prefix_query_tokens: _Optional[int] = ..., num_prefix_hit_tokens: _Optional[int] = ...) -> None: ...
