"""The service's exception tree, drawn in one place.

The API edges map these to status codes: REST in ``service/api/rest.py``, gRPC in
``service/api/grpc_server.py``. Messages are written for the caller: they say what is wrong.
"""

from __future__ import annotations

__all__ = [
    "InvalidQuery",
    "NotSupported",
    "QueryError",
    "QueryTooLarge",
    "Unavailable",
]


class QueryError(Exception):
    """A query the service will not answer; ``str(error)`` is the caller-facing reason."""


class InvalidQuery(QueryError):
    """Malformed request (HTTP 400/422, gRPC INVALID_ARGUMENT)."""


class QueryTooLarge(QueryError):
    """Over a configured limit (HTTP 413, gRPC RESOURCE_EXHAUSTED)."""


class NotSupported(QueryError):
    """Well-formed, but the service lacks what it needs, e.g. a tokenizer (HTTP 422, gRPC
    FAILED_PRECONDITION)."""


class Unavailable(QueryError):
    """The service cannot answer now, e.g. the index backend is down (HTTP 503, UNAVAILABLE)."""
