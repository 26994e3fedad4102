"""mmrank: end-to-end multimodal ranking (EM3 + LEMUR), from raw item content to a Triton gRPC endpoint."""

__version__ = "0.1.0"
