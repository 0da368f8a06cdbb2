"""User-facing errors: raised at the boundary, printed as one line by the CLI, mapped to HTTP
statuses by the server (InvalidRequestError 400, QueueFullError 429, EngineDeadError 503)."""


class MetrolineError(Exception):
    """Base of every error that reports bad user input rather than a bug."""


class ModelLoadError(MetrolineError):
    """The model path, file or checkpoint cannot be loaded (missing, not a model, unsupported)."""


class InvalidRequestError(MetrolineError, ValueError):
    """A request or a sampling parameter is invalid. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(MetrolineError):
    """The waiting queue is at max_queued_requests: retry later (the server answers 429)."""


class EngineDeadError(RuntimeError):
    """The engine loop has died or was shut down; no request can be served."""


class RequestFailure(str):
    """Why one request failed inside the engine (the message, as a str), and whether its own
    input caused it (`invalid_input`: e.g. a grammar that leads nowhere with this vocabulary),
    which the server answers with a 400 rather than a 500."""

    invalid_input: bool

    def __new__(cls, message: str, invalid_input: bool = False):
        self = super().__new__(cls, message)
        self.invalid_input = invalid_input
        return self


def processor_failure(e: BaseException) -> RequestFailure:
    """The failure of a request whose logits processor raised `e`."""
    return RequestFailure(f"logits processor failed: {type(e).__name__}: {e}",
                          invalid_input=isinstance(e, InvalidRequestError))
