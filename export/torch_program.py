"""The ranking graph as a PyTorch program, for the torch serving backend (`mmrank repo --backend torch`).

`torch.export` of the same RankingGraph module the ONNX file holds, with the same inputs in the same
order and the same dynamic axes (batch, candidates, history, long_history), saved with
`torch.export.save`:

    ranking.pt2        fp32: parameters, float inputs and scores in float32
    ranking.fp16.pt2   a half copy: parameters, float inputs and scores in float16, so the serving table
                       and every activation on the GPU are half precision

Attention is traced through `standard_attention` (scaled_dot_product_attention), so a program holds
aten ops only and loads with torch alone (model_repository/torch_ranker.py), on any device. A program
loads in the torch release it was exported with (and later ones reading the same schema); the manifest
records that release.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim

from export.manifest import ProgramSpec, sha256_file

PROGRAM_FILES = {"fp32": "ranking.pt2", "fp16": "ranking.fp16.pt2"}
MAX_DIM = 1 << 20  # upper bound of every dynamic axis; the request limits are far below it


def _half(x: Tensor) -> Tensor:
    return x.half() if x.is_floating_point() else x


def export_program(
    module: nn.Module, inputs: dict[str, Tensor], axes: dict[str, dict[int, str]], path: Path
) -> Path:
    """torch.export `module` on `inputs` (name -> example tensor, in argument order) with `axes`
    (name -> {axis: dynamic axis name}, axes of one name tied together), written to a temporary
    sibling and renamed into place."""
    dims = {name: Dim(name, min=0, max=MAX_DIM) for name in {n for a in axes.values() for n in a.values()}}
    shapes = tuple({axis: dims[n] for axis, n in axes.get(name, {}).items()} for name in inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # export's notes on specialised constants
        program = torch.export.export(module.eval(), tuple(inputs.values()), dynamic_shapes=(shapes,))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(program, tmp)
        os.chmod(tmp, 0o644)  # readable by a server running as another user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_ranking_programs(module: nn.Module, inputs: dict[str, Tensor], axes, out: Path) -> ProgramSpec:
    """ranking.pt2 and ranking.fp16.pt2 of the ranking graph `module` (RankingGraph) into `out`."""
    fp32 = export_program(module, inputs, axes, out / PROGRAM_FILES["fp32"])
    half_inputs = {name: _half(x) for name, x in inputs.items()}
    # float16 parameters and float16 inputs: no casts inside the program
    fp16 = export_program(copy.deepcopy(module).half(), half_inputs, axes, out / PROGRAM_FILES["fp16"])
    return ProgramSpec(
        file=fp32.name,
        fp16_file=fp16.name,
        sha256=sha256_file(fp32),
        fp16_sha256=sha256_file(fp16),
        inputs=list(inputs),
        torch=torch.__version__.split("+")[0],
    )
