"""Triton Python-backend model: encoded image files (BYTES [1]) -> pixels [3, 224, 224], image_mask [1].

The preprocessing is the trainer's own (`trainer.features.image.load_image`: RGB, shorter side 224
bicubic, centre crop, ImageNet mean/std), so served vectors match the cached training features.
An empty value means "no image": zero pixels and image_mask False. An unreadable image fails its
request with the reason.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from export.backend_responses import respond_each
from trainer.features.image import IMAGE_SIZE, load_image


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def _preprocess(self, blobs):
        pixels = np.zeros((len(blobs), 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        present = np.zeros((len(blobs), 1), bool)
        for row, blob in enumerate(blobs):
            if blob:
                try:
                    pixels[row] = load_image(bytes(blob)).numpy()
                except Exception as e:  # PIL raises several types for bytes that are not an image
                    raise ValueError(f"image {row}: unreadable ({type(e).__name__}: {e})") from e
                present[row] = True
        return {"pixels": pixels, "image_mask": present}

    def _respond(self, request):
        return self._preprocess(pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1))

    def execute(self, requests):
        return respond_each(pb_utils, requests, self.outputs, self._respond)
