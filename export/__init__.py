"""Export: a trained run -> ONNX graphs, the item table and a manifest; the manifest -> a Triton repository.

    onnx_graphs.py   `mmrank export`: encoder_text / encoder_image / fusion / ranking graphs (+ fp16)
    item_table.py    the item table of a trained model (the table format and lookup are the runtime's)
    torch_program.py torch.export programs of the ranking graph (fp32 + fp16), for the torch backend
    manifest.py      manifest.json: every graph's tensors, the table, the tokenizer, checksums
    repository.py    `mmrank repo`: a Triton model repository rendered from the manifest
    parity.py        onnxruntime vs PyTorch, graph by graph and through the lookup
    tensorrt.py      fp16 TensorRT engines from the same ONNX (where TensorRT and a GPU exist)
    triton_launcher  the tritonserver shipped in nvidia-pytriton, started on loopback

What runs inside Triton is the serving runtime, model_repository/ (no torch, no project): export imports
it, never the reverse, and `mmrank repo` copies it into every rendered repository.
"""
