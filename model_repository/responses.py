"""The per-request answer loop shared by the Triton Python-backend models in model_repository/models.

`pb_utils` (triton_python_backend_utils) exists only inside the backend stub, so the models pass it in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.errors import RequestError


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


def _shape_key(feed: dict[str, np.ndarray | None]) -> tuple:
    return tuple((n, None if x is None else x.shape[1:]) for n, x in sorted(feed.items()))


def _concat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    return None if arrays[0] is None else np.concatenate(arrays)


def respond_grouped(
    pb_utils,
    requests,
    outputs: dict[str, np.dtype],
    read: Callable[[object], dict],
    compute: Callable[[dict], dict],
    tensor: Callable[[str, np.ndarray], object] | None = None,
) -> list:
    """One response per request, computing requests of equal input shapes (past the batch axis) as one
    batch: `read(request)` gives its inputs {name: array [b, ...] or None} (an exception answers that
    request alone); `compute(inputs)` gives {output: array [sum of b, ...]} for the concatenated inputs,
    split back per request in order (an exception answers the requests of that group). `tensor(name,
    array)` makes each output tensor (default pb_utils.Tensor)."""
    tensor = tensor or pb_utils.Tensor
    responses = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, request in enumerate(requests):
        try:
            feed = read(request)
        except Exception as e:  # this request's own problem (a broken limit, a bad value)
            responses[i] = error_response(pb_utils, e)
            continue
        groups.setdefault(_shape_key(feed), []).append((i, feed))
    for members in groups.values():
        feeds = [feed for _, feed in members]
        batch = feeds[0] if len(feeds) == 1 else {n: _concat([f[n] for f in feeds]) for n in feeds[0]}
        try:
            values = compute(batch)
            sizes = np.cumsum([len(next(x for x in f.values() if x is not None)) for f in feeds])[:-1]
            parts = {n: np.split(np.ascontiguousarray(values[n], dtype=t), sizes) for n, t in outputs.items()}
        except Exception as e:  # one failing group answers its own requests with the error
            for i, _ in members:
                responses[i] = error_response(pb_utils, e)
            continue
        for j, (i, _) in enumerate(members):
            tensors = [tensor(n, parts[n][j]) for n in outputs]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
    return responses


def output_dtypes(pb_utils, config: dict) -> dict[str, np.dtype]:
    """{output name: numpy dtype} from the model config, read once in initialize()."""
    return {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
