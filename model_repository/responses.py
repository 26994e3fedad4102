"""The per-request answer loop shared by the Triton Python-backend models in model_repository/models.

`pb_utils` (triton_python_backend_utils) exists only inside the backend stub, so the models pass it in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from model_repository.errors import RequestError


def error_response(pb_utils, error: Exception):
    """A RequestError answers INVALID_ARGUMENT with its message; anything else INTERNAL, with its type."""
    if isinstance(error, RequestError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
        )
    message = f"{type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))


def respond_each(pb_utils, requests, outputs: dict[str, np.dtype], compute: Callable[[object], dict]) -> list:
    """One response per request: `compute(request)` gives {output name: array}, cast to `outputs`'
    dtypes; an exception answers its own request and leaves the others' results."""
    responses = []
    for request in requests:
        try:
            values = compute(request)
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(values[n], dtype=t)) for n, t in outputs.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        except Exception as e:  # every failure is this request's answer, never the whole batch's
            responses.append(error_response(pb_utils, e))
    return responses


def output_dtypes(pb_utils, config: dict) -> dict[str, np.dtype]:
    """{output name: numpy dtype} from the model config, read once in initialize()."""
    return {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
