"""Request bounds of the `rank` ensemble, checked by `item_lookup` before any graph runs.

Set when the repository is rendered (`mmrank repo --max-candidates/--max-history/--max-request-bytes`,
stored in item_lookup's config) and enforced per request: too many or zero candidates, a history over
the bound, or more input bytes than allowed answer INVALID_ARGUMENT naming the input and the limit, so
no oversize request reaches onnxruntime. A history within the bound but longer than the model's L keeps
its most recent L known items (the lookup's `recent_known`). Dtypes, ranks and the user-feature width
are checked by Triton itself against the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from model_repository.errors import RequestError


@dataclass(frozen=True)
class RequestLimits:
    max_candidates: int = 2000  # candidate ids per user (row of the request)
    max_history: int = 1000  # history ids per user; the model reads the most recent L of them
    max_request_bytes: int = 4 << 20  # every input tensor of one request together (4 MiB)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"request limit {name} must be >= 1, got {value}")

    def check(self, inputs: dict[str, np.ndarray | None]) -> None:
        """Raise RequestError for the first bound `inputs` (name -> array [B, ...]) break."""
        candidates = inputs["candidate_ids"]
        if candidates.shape[-1] == 0:
            raise RequestError(f"candidate_ids is empty: send 1 to {self.max_candidates} candidates per user")
        if candidates.shape[-1] > self.max_candidates:
            raise RequestError(
                f"candidate_ids has {candidates.shape[-1]} candidates per user, over the limit of "
                f"{self.max_candidates}"
            )
        history = inputs["history_ids"]
        if history.shape[-1] > self.max_history:
            raise RequestError(
                f"history_ids has {history.shape[-1]} ids per user, over the limit of {self.max_history} "
                "(the model reads the most recent ones; send at most the limit)"
            )
        size = sum(x.nbytes for x in inputs.values() if x is not None)
        if size > self.max_request_bytes:
            raise RequestError(
                f"request inputs hold {size} bytes, over the limit of {self.max_request_bytes}"
            )
