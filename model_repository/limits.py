"""Request bounds, checked before any graph runs: of the `rank` ensemble by `item_lookup`
(RequestLimits), of `encode_items` by `tokenizer` and `image_preprocess` (EncodeLimits).

Set when the repository is rendered (`mmrank repo --max-candidates/--max-history/--max-request-bytes`,
stored in item_lookup's config) and enforced per request: too many or zero candidates, a history over
the bound, or more input bytes than allowed answer INVALID_ARGUMENT naming the input and the limit, so
no oversize request reaches onnxruntime. A history within the bound but longer than the model's L keeps
its most recent L known items (the lookup's `recent_known`). Dtypes, ranks and the user-feature width
are checked by Triton itself against the config.

EncodeLimits (export/repository.py RenderConfig.encode_limits, stored as the `limits` parameter of the
tokenizer's and image_preprocess's configs) bound the items of one request and the bytes of each text
field and image, so no request decodes or tokenizes more than max_items * (fields * max_text_bytes +
max_image_bytes). Triton's max_batch_size bounds the items too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.errors import MMRankError, RequestError


def check_positive(limits, kind: str) -> None:
    """Every field of the `limits` dataclass >= 1, else MMRankError naming it (set when rendering)."""
    for name, value in asdict(limits).items():
        if value < 1:
            raise MMRankError(f"{kind} limit {name} must be >= 1, got {value}")


@dataclass(frozen=True)
class RequestLimits:
    max_candidates: int = 2000  # candidate ids per user (row of the request)
    max_history: int = 1000  # history ids per user; the model reads the most recent L of them
    max_request_bytes: int = 4 << 20  # every input tensor of one request together (4 MiB)

    def __post_init__(self):
        check_positive(self, "request")

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


def _value_bytes(value) -> int:
    return len(value) if isinstance(value, bytes | bytearray) else len(str(value).encode())


@dataclass(frozen=True)
class EncodeLimits:
    max_items: int = 256  # items (rows) of one request; a max_batch_size below it refuses more first
    max_text_bytes: int = 64 << 10  # one text field, UTF-8 (the tokenizer keeps max_length tokens of it)
    max_image_bytes: int = 8 << 20  # one encoded image file

    def __post_init__(self):
        check_positive(self, "encode")

    def _check(self, name: str, values: np.ndarray, limit: int, what: str) -> None:
        if values.shape[0] > self.max_items:
            raise RequestError(
                f"{name} holds {values.shape[0]} items, over the limit of {self.max_items} per request"
            )
        for index, value in np.ndenumerate(values):
            size = _value_bytes(value)
            if size > limit:
                raise RequestError(
                    f"{name}{list(index)} holds {size} bytes, over the limit of {limit} {what}"
                )

    def check_texts(self, fields: np.ndarray) -> None:
        """Raise RequestError for the first bound the text fields [items, K] break."""
        self._check("text", np.asarray(fields, dtype=object), self.max_text_bytes, "per text field")

    def check_images(self, blobs: np.ndarray) -> None:
        """Raise RequestError for the first bound the encoded images [items, ...] break."""
        self._check("image", np.asarray(blobs, dtype=object), self.max_image_bytes, "per image")
