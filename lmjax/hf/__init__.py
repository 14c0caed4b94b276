"""Hugging Face checkpoints: `config.json` + safetensors <-> lmjax run directories and parameters.

configs.py          config.json <-> lmjax's model section (refusing what lmjax cannot compute)
weights.py          which Hugging Face tensors hold which lmjax parameters, exact transforms
safetensors_io.py   reading (checked, tensor by tensor) and writing (sharded) safetensors
convert.py          streaming import onto shardings, export link by link
interop.py          `lmjax import-hf` / `export-hf`, and loading for `train.init_from` and `load_model`
"""
