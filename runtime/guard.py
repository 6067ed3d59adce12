"""Undecodable requests are the caller's mistake: answer INVALID_ARGUMENT, not INTERNAL (issue 17, item 4).

grpcio runs a method's request deserializer before any servicer code; when it raises (malformed protobuf
bytes, invalid UTF-8 in a string field) grpcio answers INTERNAL "Exception deserializing request!", which
reads as a server fault. :class:`DecodeGuardInterceptor` wraps every method's deserializer so a failure
becomes a marker value, and wraps the method so the marker is answered with INVALID_ARGUMENT naming the
message type. The server keeps serving either way; this only makes the status honest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import grpc

log = logging.getLogger("fluxmusic.serve")

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self, method: str) -> str:
        # The parser's own text is short and names no user data; cap it anyway (status details travel in
        # headers, which the client limits to 8 KB).
        detail = (str(self.error).strip().splitlines() or [type(self.error).__name__])[0][:200]
        return f"request to {method} is not a valid protobuf message: {detail}"


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Turns request-decoding failures into INVALID_ARGUMENT for every method of the server."""

    def __init__(self, on_reject: Callable[[str], None] | None = None) -> None:
        self._on_reject = on_reject

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        decode = handler.request_deserializer

        def safe_decode(data: bytes):
            try:
                return decode(data)
            except Exception as e:  # DecodeError, UnicodeDecodeError, ...: all mean "bad bytes"
                return Undecodable(e)

        def reject(bad: Undecodable, context) -> None:
            message = bad.message(method)
            log.warning(json.dumps({"event": "undecodable", "method": method, "peer": context.peer(),
                                    "message": message}))
            if self._on_reject is not None:
                self._on_reject(method)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        attr, make = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, attr)

        if not handler.request_streaming:
            def guarded(request, context):
                if isinstance(request, Undecodable):
                    reject(request, context)
                return behavior(request, context)
        else:
            def guarded(request_iterator, context):
                def checked() -> Iterator:
                    for request in request_iterator:
                        if isinstance(request, Undecodable):
                            reject(request, context)
                        yield request

                return behavior(checked(), context)

        return make(guarded, request_deserializer=safe_decode, response_serializer=handler.response_serializer)
