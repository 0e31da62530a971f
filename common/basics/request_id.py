"""Request ids: chosen by callers, carried in gRPC metadata (x-request-id) and traces, so checked at every edge
that takes one from the network."""

from common.basics.errors import InvalidArgument

MAX_REQUEST_ID_CHARS = 128


def checked_request_id(given: str) -> str:
    """The id unchanged when it is empty or 1 to 128 printable ASCII characters without spaces (what gRPC metadata
    carries); InvalidArgument otherwise."""
    if len(given) > MAX_REQUEST_ID_CHARS or not all(" " < c <= "~" for c in given):
        raise InvalidArgument(f"request_id must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without "
                              "spaces (it travels in gRPC metadata and traces); send another or none")
    return given
