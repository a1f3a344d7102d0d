"""The client's exception tree, drawn in one place, and the status code each kind stands for.

Every failed call raises a ``KVCacheError`` carrying the server's message and the gRPC status
code. A scheduler should treat ``ServiceUnavailable`` as "no cache information now" and fall
back to its default scoring; the others mean the request or the deployment is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import grpc

__all__ = [
    "InvalidRequest",
    "KVCacheError",
    "RequestTooLarge",
    "ServiceUnavailable",
    "Unsupported",
    "from_rpc_error",
]


class KVCacheError(Exception):
    """A call that got no answer. ``message`` is the server's (or grpc's) reason, ``code``
    the status; raised as is for codes without a kind of their own (INTERNAL, UNIMPLEMENTED,
    ...)."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.code})"

    def __reduce__(self) -> tuple[type[KVCacheError], tuple[str, grpc.StatusCode]]:
        return type(self), (self.message, self.code)  # picklable despite two arguments


class InvalidRequest(KVCacheError):
    """INVALID_ARGUMENT: a malformed request (no or two prompt forms, no model, an empty pod
    id), or a value protobuf cannot encode (a token id outside [0, 2**32)), refused before
    sending."""


class RequestTooLarge(KVCacheError):
    """RESOURCE_EXHAUSTED: more token ids or block hashes than the server's limits allow."""


class Unsupported(KVCacheError):
    """FAILED_PRECONDITION: well-formed, but the server lacks what it needs, e.g. a tokenizer
    for ``prompt`` or ``messages``."""


class ServiceUnavailable(KVCacheError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: the service cannot answer in time (down, starting,
    index backend unreachable, or slower than the timeout). Fall back to default scoring."""


_KIND_BY_CODE: Final[Mapping[grpc.StatusCode, type[KVCacheError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RequestTooLarge,
    grpc.StatusCode.FAILED_PRECONDITION: Unsupported,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailable,
}


def from_rpc_error(error: grpc.RpcError) -> KVCacheError:
    """The exception a failed call raises, of the kind its status code calls for."""
    code = error.code()
    return _KIND_BY_CODE.get(code, KVCacheError)(error.details() or "", code)
