import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import MMRankError
from model_repository.text_inputs import ItemTokenizer, copy_tokenizer_files

FIELDS = np.array(
    [
        ["Toy Story", "A cowboy doll is profoundly threatened when a new spaceman figure supplants him."],
        ["Heat", "   "],
        ["", ""],
        [b"Caf\xc3\xa9 Society", "Hollywood in the 1930s, " * 20],
    ],
    dtype=object,
)


@pytest.fixture(scope="module")
def encoder(tiny_text_dir):
    from trainer.features.text import TextEncoder

    return TextEncoder(tiny_text_dir)


def test_per_field_layout_matches_the_feature_cache_tokenization(encoder, tiny_text_dir):
    ids, mask, present = ItemTokenizer(tiny_text_dir, 32, join_fields=False)(FIELDS)
    assert ids.shape[:2] == (4, 2) and present.tolist() == [
        [True, True],
        [True, False],
        [False, False],
        [True, True],
    ]
    texts = [str(v.decode() if isinstance(v, bytes) else v) for row in FIELDS for v in row]
    for k, text in enumerate(texts):
        if not text.strip():
            assert mask.reshape(8, -1)[k].sum() == 0
            continue
        want_ids, want_mask = encoder.tokenize([text], 32)
        n = int(want_mask.sum())
        assert ids.reshape(8, -1)[k, :n].tolist() == want_ids[0, :n].tolist()
        assert mask.reshape(8, -1)[k].sum() == n


def test_joined_layout_matches_the_trainable_token_table(encoder, tiny_text_dir):
    ids, mask, present = ItemTokenizer(tiny_text_dir, 40, join_fields=True)(FIELDS)
    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4],
            "title": [v.decode() if isinstance(v, bytes) else v for v in FIELDS[:, 0]],
            "overview": list(FIELDS[:, 1]),
        }
    )
    want_ids, want_mask = encoder.tokenize_items(items, ["title", "overview"], 40)
    assert present[:, 0].tolist() == [True, True, False, True]
    # Both pad to their longest text, so a tokenizer that truncates too early is narrower.
    assert ids.shape[-1] == want_ids.shape[-1]
    assert torch.equal(torch.from_numpy(mask[:, 0]), want_mask[1:])
    assert torch.equal(torch.from_numpy(ids[:, 0] * mask[:, 0]), want_ids[1:] * want_mask[1:])


def test_all_empty_batch_still_has_one_token_column(tiny_text_dir):
    ids, mask, present = ItemTokenizer(tiny_text_dir, 16, join_fields=False)(
        np.array([["", None]], dtype=object)
    )
    assert ids.shape == (1, 2, 1) and mask.sum() == 0 and not present.any()


def test_bad_inputs(tiny_text_dir, tmp_path):
    with pytest.raises(MMRankError, match="items, fields"):
        ItemTokenizer(tiny_text_dir, 16, False)(np.array(["a", "b"], dtype=object))
    with pytest.raises(MMRankError, match="no tokenizer.json"):
        copy_tokenizer_files(tmp_path, tmp_path / "out")
    (tmp_path / "tokenizer.json").write_text("{broken")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(MMRankError, match="unreadable tokenizer"):
        ItemTokenizer(tmp_path, 16, False)
