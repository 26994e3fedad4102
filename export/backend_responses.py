"""The per-request answer loop shared by the Triton Python-backend models in model_repository/python.

`pb_utils` (triton_python_backend_utils) exists only inside the backend stub, so the models pass it in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def respond_each(pb_utils, requests, outputs: dict[str, np.dtype], compute: Callable[[object], dict]) -> list:
    """One response per request: `compute(request)` gives {output name: array}, cast to `outputs`'
    dtypes; an exception answers its own request with the message and leaves the others' results."""
    responses = []
    for request in requests:
        try:
            values = compute(request)
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(values[n], dtype=t)) for n, t in outputs.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        except Exception as e:
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
    return responses
