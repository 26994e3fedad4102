"""The serving runtime: the code that runs inside Triton's Python backend, and nothing else.

    item_table.py    the item table (a version of `item_lookup`) and the lookup: ids -> ranking inputs
    limits.py        request bounds (candidates, history, message size), checked before any graph runs
    ort_graph.py     one onnxruntime session over an exported graph
    text_inputs.py   item text fields -> the text encoder's inputs (tokenizers)
    image_inputs.py  encoded image bytes -> the image encoder's pixels (Pillow)
    responses.py     the per-request answer loop of every Python-backend model
    torch_ranker.py  the torch backend's ranking step (exported program, table on the GPU, CUDA graphs)
    models/          the Python-backend `model.py` files

It imports numpy, onnxruntime, tokenizers, Pillow and the leaf module `common.errors` (MMRankError,
RequestError) only: never the trainer or `export/`, torch only in torch_ranker.py, which only a
torch-backend repository's lookup loads. It runs on Python 3.10-3.12: `mmrank repo` copies it and
common/errors.py next to every rendered `model.py`, so a rendered repository deploys on a stock
tritonserver. The trainer and `export/` import it, never the reverse.
"""
