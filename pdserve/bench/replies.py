"""The last GenerateResponse of a peer that serves the Gateway API itself (hf-static, llama.cpp)."""

import time

from pdserve.v1 import gateway_pb2


def last_reply(*, request_id: str, finish_reason: int, prompt_tokens: int, completion_tokens: int,
               arrived: float, first_at: float | None) -> gateway_pb2.GenerateResponse:
    """finish_reason: a pdserve.v1.FinishReason value; arrived / first_at: time.monotonic() seconds."""
    now = time.monotonic()
    first_at = first_at or now
    return gateway_pb2.GenerateResponse(
        finish_reason=finish_reason, request_id=request_id,
        usage=gateway_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        timings=gateway_pb2.Timings(time_to_first_token_ms=(first_at - arrived) * 1000,
                                    decode_ms=(now - first_at) * 1000, total_ms=(now - arrived) * 1000))
