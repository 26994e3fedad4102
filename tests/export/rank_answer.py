"""A well-formed answer of `rank` for the client's transport tests: output -> (datatype, [1, ...] array)."""

import numpy as np


def rank_answer(n: int = 3) -> dict[str, tuple[str, np.ndarray]]:
    return {
        "scores": ("FP32", np.arange(n, dtype=np.float32)[None]),
        "candidate_known": ("BOOL", np.ones((1, n), bool)),
        "user_known": ("BOOL", np.zeros((1, 1), bool)),
        "item_table_version": ("INT64", np.full((1, 1), 7, np.int64)),
    }
