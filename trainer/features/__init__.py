"""Item content features: the encoders (text.py, image.py), how they run (runtime.py), the frozen
feature cache built by `mmrank features` (cache.py) and the uniform view the model reads (store.py)."""
