"""Triton Python-backend model: encoded image files (BYTES [1]) -> pixels [3, 224, 224], image_mask [1].

The preprocessing is `model_repository.image_inputs.image_pixels`, the one the trainer's feature cache
uses, so served vectors match the cached training features. An empty value means "no image": zero
pixels and image_mask False. A request over the `limits` parameter's bounds (model_repository/limits.py
EncodeLimits: items, bytes per image), an image over the size bounds of `image_inputs` (checked on its
header) or an unreadable one fails its request (INVALID_ARGUMENT) with the reason.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runtime package copied next to this file

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from common.errors import RequestError  # noqa: E402
from model_repository.image_inputs import IMAGE_SIZE, ImageSizeError, image_pixels  # noqa: E402
from model_repository.limits import EncodeLimits  # noqa: E402
from model_repository.responses import output_dtypes, respond_each  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.limits = EncodeLimits(**json.loads(params.get("limits", "{}")))
        self.outputs = output_dtypes(pb_utils, config)

    def _preprocess(self, blobs):
        pixels = np.zeros((len(blobs), 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        present = np.zeros((len(blobs), 1), bool)
        for row, blob in enumerate(blobs):
            if blob:
                try:
                    pixels[row] = image_pixels(bytes(blob))
                except ImageSizeError as e:
                    raise RequestError(f"image {row}: {e}") from e
                except Exception as e:  # PIL raises several types for bytes that are not an image
                    raise RequestError(f"image {row}: unreadable ({type(e).__name__}: {e})") from e
                present[row] = True
        return {"pixels": pixels, "image_mask": present}

    def _respond(self, request):
        blobs = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
        self.limits.check_images(blobs)
        return self._preprocess(blobs.reshape(-1))

    def execute(self, requests):
        return respond_each(pb_utils, requests, self.outputs, self._respond)
