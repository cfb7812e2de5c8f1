"""Domain errors for every stage; the CLI and HTTP edges translate them to exit codes and statuses.

Each error carries the message a user sees (what happened and what to do), the CLI exit code, the
HTTP status and the Workers AI error code, so the edges never guess.
"""


class LlmpackError(Exception):
    """Base of every error llmpack raises on purpose."""

    exit_code = 1
    http_status = 500
    api_code = 5000

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# --- export side -------------------------------------------------------------------------------


class CheckpointError(LlmpackError):
    """The source checkpoint is missing, incomplete, corrupt or not a Llama."""

    exit_code = 2


class BuildError(LlmpackError):
    """The build could not finish (output path, disk, locking)."""

    exit_code = 3


class ParityError(LlmpackError):
    """`llm-export verify` found the artifact disagrees with the source model."""

    exit_code = 4


# --- runtime side ------------------------------------------------------------------------------


class ArtifactError(LlmpackError):
    """The artifact folder cannot be loaded: missing files, unknown manifest version, bad checksum."""

    exit_code = 3


class ServeError(LlmpackError):
    """The server cannot start: its address is taken or not allowed."""

    exit_code = 2


class InvalidRequest(LlmpackError):
    """The request breaks the published schema or a rule of the chat template.

    `param` names the offending field where there is one (OpenAI's error body carries it).
    """

    exit_code = 2
    http_status = 400
    api_code = 5006

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InputTooLong(InvalidRequest):
    """The encoded prompt is over the input token limit."""

    api_code = 3030


class RequestTooLarge(InvalidRequest):
    """The raw request body is over the configured size."""

    http_status = 413
    api_code = 3006


class CapacityExceeded(LlmpackError):
    """The queue is full; the client should retry later."""

    http_status = 429
    api_code = 3040


class BackendError(LlmpackError):
    """The inference backend failed while running a request."""

    http_status = 500
    api_code = 5000
