"""What a backend raises: one base, and each subclass also inherits the builtin it refines (docs/contributing.md, Errors).

Every error names the server URL and the request id it concerns, so a log line alone says which server
broke and which trajectory it touched. `retryable` says whether the request may go to another server:
transport faults and 5xx are; a 4xx or an in-stream rejection means the request itself is wrong.
"""

from tidal.protocol.errors import TidalError

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BadResponse",
    "HTTPStatusError",
    "RETRYABLE_STATUSES",
    "ServerUnavailable",
    "RequestRejected",
    "ResponseTooLarge",
    "Unsupported",
]


class BackendError(TidalError):
    """Base of every backend failure; `url` and `request_id` say where (either may be empty)."""

    retryable = False
    kind = "backend"

    def __init__(self, message: str, *, url: str = "", request_id: str = ""):
        self.url = url
        self.request_id = request_id
        where = ", ".join(part for part in (f"server {url}" if url else "",
                                            f"request {request_id}" if request_id else "") if part)
        super().__init__(f"{message} ({where})" if where else message)


class BackendTimeout(BackendError, TimeoutError):
    """No response, or no stream event, within the configured budget."""

    retryable = True
    kind = "timeout"


class BadResponse(BackendError, ValueError):
    """The server answered, but not per the contract: bad JSON, a missing field, inconsistent lengths."""

    retryable = True
    kind = "bad_response"


class ResponseTooLarge(BadResponse):
    """A stream event or response body beyond the backend's `max_response_bytes`: refused unread, so a
    hostile or broken server cannot make the engine buffer without bound."""

    kind = "too_large"


RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
"""The server's trouble, not the request's: worth sending to another server. Any other 4xx is not."""


class HTTPStatusError(BackendError):
    """A non-2xx status; those in `RETRYABLE_STATUSES` are retried elsewhere, the rest are not."""

    kind = "http_status"

    def __init__(self, status: int, message: str, *, url: str = "", request_id: str = ""):
        self.status = status
        self.retryable = status in RETRYABLE_STATUSES
        super().__init__(f"HTTP {status}: {message}", url=url, request_id=request_id)


class ServerUnavailable(BackendError, ConnectionError):
    """The connection failed or broke, or no healthy server is left to take the request."""

    retryable = True
    kind = "connection"


class RequestRejected(BackendError, ValueError):
    """The server refused the request inside an open stream (HTTP 200 + an error event, docs/sglang.md §1.6)."""

    kind = "rejected"


class Unsupported(BackendError, NotImplementedError):
    """The backend has no such operation (e.g. a weight update on a plain OpenAI-compatible server)."""

    kind = "unsupported"
