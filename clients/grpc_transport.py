"""`rank` over Triton's gRPC protocol, through the generated stubs tritonclient ships: the ids go straight
into the request message and the outputs come back as arrays over the response's bytes, one layer
thinner than tritonclient's `infer` and its per-tensor InferInput and InferResult objects.
"""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from clients.rank_protocol import (
    OUTPUTS,
    RankingError,
    Tensors,
    Transport,
    Unavailable,
    all_outputs,
    input_shape,
    output_array,
)

MAX_MESSAGE = 2**31 - 1  # gRPC's default receive limit (4 MiB) would refuse a large candidate set's answer
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
)


def infer_request(model: str, tensors: Tensors, batched: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, arr in tensors:
        request.inputs.add(name=name, datatype="INT64", shape=input_shape(arr, batched))
        request.raw_input_contents.append(arr.tobytes())
    for name in OUTPUTS:
        request.outputs.add(name=name)
    return request


def response_outputs(response: pb.ModelInferResponse, model: str) -> dict[str, np.ndarray]:
    """{output: flat array} of a response, each checked against the datatype `rank` answers it in."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise RankingError(
            f"response of {model!r} carries {len(response.raw_output_contents)} output buffers for "
            f"{len(response.outputs)} outputs"
        )
    out = {
        tensor.name: output_array(tensor.name, tensor.datatype, tensor.shape, raw, model)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        if tensor.name in OUTPUTS
    }
    return all_outputs(out, model)


class _Grpc(Transport):
    def __init__(self, url: str, model: str, timeout_s: float, channel):
        super().__init__(url, model, timeout_s)
        self._channel = channel
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def _error(self, err: grpc.RpcError) -> Exception:
        code, msg = err.code(), err.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(msg)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self.no_answer()
        return self.refused(msg)


def _inputs(meta: pb.ModelMetadataResponse) -> list[tuple[str, list[int]]]:
    return [(t.name, list(t.shape)) for t in meta.inputs]


class GrpcTransport(_Grpc):
    def __init__(self, url: str, target: str, model: str, timeout_s: float):
        super().__init__(url, model, timeout_s, grpc.insecure_channel(target, options=CHANNEL_OPTIONS))

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def ready(self) -> bool:
        return self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=self.model)).ready

    def inputs(self) -> list[tuple[str, list[int]]]:
        return _inputs(self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=self.model)))

    def infer(self, tensors: Tensors, batched: bool) -> dict[str, np.ndarray]:
        response = self._call(self._stub.ModelInfer, infer_request(self.model, tensors, batched))
        return response_outputs(response, self.model)

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport(_Grpc):
    def __init__(self, url: str, target: str, model: str, timeout_s: float):
        super().__init__(url, model, timeout_s, grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self._error(e) from e

    async def ready(self) -> bool:
        return (await self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=self.model))).ready

    async def inputs(self) -> list[tuple[str, list[int]]]:
        return _inputs(await self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=self.model)))

    async def infer(self, tensors: Tensors, batched: bool) -> dict[str, np.ndarray]:
        response = await self._call(self._stub.ModelInfer, infer_request(self.model, tensors, batched))
        return response_outputs(response, self.model)

    async def close(self) -> None:
        await self._channel.close()
