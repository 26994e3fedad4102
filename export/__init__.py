"""Export: a trained run -> ONNX graphs, the item table and a manifest; the manifest -> a Triton repository.

    onnx_graphs.py   `mmrank export`: encoder_text / encoder_image / fusion / ranking graphs (+ fp16)
    item_table.py    the serving item table (content vectors + item ID rows), versioned; its lookup
    manifest.py      manifest.json: every graph's tensors, the table, the tokenizer, checksums
    repository.py    `mmrank repo`: a Triton model repository rendered from the manifest
    parity.py        onnxruntime vs PyTorch, graph by graph and through the lookup
    tensorrt.py      fp16 TensorRT engines from the same ONNX (where TensorRT and a GPU exist)
    triton_launcher  the tritonserver shipped in nvidia-pytriton, started on loopback

Modules the Triton Python-backend models import (item_table, text_inputs, ort_session, manifest) do
not import torch, so a serving process never loads it.
"""
