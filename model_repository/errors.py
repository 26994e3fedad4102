"""The project's user-facing errors. They live here, in the serving runtime, because the runtime
cannot import the rest of the project; `mmrank.errors` re-exports them."""


class MMRankError(Exception):
    """An error caused by the user's input or environment (bad file, unknown id, server down)."""


class RequestError(MMRankError):
    """A request the server refuses before any graph runs; answered as INVALID_ARGUMENT. The message
    names the input and the limit it broke."""
