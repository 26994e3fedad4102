"""Bounds of the `encode_items` inputs, checked before anything is decoded: image sizes
(model_repository/image_inputs.py), the per-request limits of the tokenizer and image_preprocess
(model_repository/limits.py EncodeLimits), and the tokenizer reading only a prefix of a long text
with the same result (model_repository/text_inputs.py)."""

import io
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc
from PIL import Image

from common.errors import MMRankError, RequestError
from model_repository.image_inputs import (
    IMAGE_SIZE,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    ImageSizeError,
    check_image_size,
    image_pixels,
)
from model_repository.limits import EncodeLimits
from model_repository.text_inputs import CHARS_PER_TOKEN, ItemTokenizer

POSTERS = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml100k_tmdb_posters" / "posters"


def _png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "1":  # one bit a pixel: a large image without a large array here
        image = Image.new("1", (width, height))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_images_up_to_the_aspect_bound_give_224_pixels():
    for width, height in ((1, MAX_ASPECT_RATIO), (MAX_ASPECT_RATIO * 3, 3), (92, 142), (224, 224)):
        x = image_pixels(_png(width, height))
        assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == np.float32


def test_extreme_aspect_ratios_and_huge_images_are_refused_before_decoding():
    # 118 bytes that would have resized to 224 x 4480000 pixels (3 GB)
    strip = _png(1, 20000, mode="1")
    with pytest.raises(
        ImageSizeError, match=r"image is 1 x 20000 pixels, an aspect ratio over the limit of 20:1"
    ):
        image_pixels(strip)
    with pytest.raises(ImageSizeError, match="aspect ratio"):
        image_pixels(_png(MAX_ASPECT_RATIO + 1, 1))
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    with pytest.raises(ImageSizeError, match=f"image is {side} x {side} pixels, over the limit of"):
        image_pixels(_png(side, side, mode="1"))
    # a ValueError too: the trainer's feature cache reports it as the item's bad image
    assert issubclass(ImageSizeError, ValueError) and issubclass(ImageSizeError, MMRankError)


@pytest.mark.skipif(not POSTERS.is_dir(), reason=f"real posters not at {POSTERS}")
def test_every_real_poster_is_within_the_bounds():
    posters = sorted(POSTERS.glob("*.jpg"))
    assert len(posters) > 1000
    for path in posters:
        with Image.open(path) as im:  # the header only
            check_image_size(*im.size)


def test_encode_limits_refuse_with_the_input_and_the_limit():
    limits = EncodeLimits(max_items=2, max_text_bytes=8, max_image_bytes=5)
    limits.check_texts(np.array([["Heat", b"12345678"], ["", "caf\u00e9"]], dtype=object))
    limits.check_images(np.array([[b"12345"], [b""]], dtype=object))
    cases = [
        (limits.check_texts, [["a"], ["b"], ["c"]], "text holds 3 items, over the limit of 2 per request"),
        (
            limits.check_texts,
            [["ok", b"123456789"]],
            r"text\[0, 1\] holds 9 bytes, over the limit of 8 per text field",
        ),
        (limits.check_texts, [["caf\u00e9 caf\u00e9"]], r"text\[0, 0\] holds 11 bytes"),  # UTF-8 bytes
        (
            limits.check_images,
            [[b""], [b"123456"]],
            r"image\[1, 0\] holds 6 bytes, over the limit of 5 per image",
        ),
    ]
    for check, values, message in cases:
        with pytest.raises(RequestError, match=message):
            check(np.array(values, dtype=object))
    with pytest.raises(MMRankError, match="encode limit max_text_bytes must be >= 1"):
        EncodeLimits(max_text_bytes=0)


def _long_texts(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = np.array(["cowboy", "doll", "threatened", "spaceman", "1930s", "caf\u00e9", "Hollywood", "!"])
    spaced = " ".join(rng.choice(words, 20000))
    return [
        spaced,  # natural text: the prefix fills max_length
        " " * 50000 + "toy story",  # mostly whitespace: the prefix has no token, the whole text is read
        "a" + " " * 30000 + spaced[:400],  # a prefix with fewer tokens than max_length
        "x" * 40000,  # no space to cut at
        "short text",
    ]


@pytest.mark.parametrize("join_fields", [False, True])
def test_a_long_text_is_read_by_its_prefix_with_the_same_tokens(tiny_text_dir, join_fields):
    from tokenizers import Tokenizer

    max_length = 24
    tokenizer = ItemTokenizer(tiny_text_dir, max_length, join_fields)
    assert tokenizer.cut_at == CHARS_PER_TOKEN * max_length  # the MiniLM tokenizer splits at spaces
    texts = _long_texts(0)
    assert len(tokenizer._prefix(texts[0])) <= tokenizer.cut_at < len(texts[0])
    whole = Tokenizer.from_file(str(tiny_text_dir / "tokenizer.json"))
    whole.no_padding()
    whole.enable_truncation(max_length)
    for got, want in zip(tokenizer.encode(texts), whole.encode_batch(texts), strict=True):
        assert got.ids == want.ids and got.attention_mask == want.attention_mask
    fields = np.array([[texts[0], texts[1]], [texts[2], texts[3]]], dtype=object)
    ids, mask, present = tokenizer(fields)
    assert ids.shape[-1] == max_length and present.any(axis=1).all()


def test_the_served_encode_items_refuses_oversize_fields_and_extreme_images(triton_server):
    """The real tritonserver of conftest.py (default EncodeLimits): refused before any graph runs."""
    client = grpc.InferenceServerClient(triton_server.grpc_url)

    def encode(text: str, image: bytes):
        inputs = []
        for name, array in (("text", [["Heat", text]]), ("image", [[image]])):
            tensor = grpc.InferInput(name, [1, len(array[0])], "BYTES")
            tensor.set_data_from_numpy(np.array(array, dtype=object))
            inputs.append(tensor)
        return client.infer("encode_items", inputs, client_timeout=60).as_numpy("content")

    def refused(text: str, image: bytes) -> str:
        with pytest.raises(grpc.InferenceServerException) as caught:
            encode(text, image)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
        return caught.value.message()

    limit = EncodeLimits().max_text_bytes
    words = "a cowboy doll " * (limit // 14)  # under the limit, far over max_length tokens
    assert np.isfinite(encode(words, _png(92, 142))).all()
    assert f"text[0, 1] holds {limit + 1} bytes, over the limit of {limit} per text field" in refused(
        "x" * (limit + 1), b""
    )
    assert "image 0: image is 1 x 20000 pixels, an aspect ratio over the limit of 20:1" in refused(
        "", _png(1, 20000, mode="1")
    )
