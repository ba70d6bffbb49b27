"""onnxformer: train transformers in PyTorch, export them to portable ONNX packages, run them
anywhere without torch.

The code is in three layers, each its own package: ``onnxformer.runtime`` (the base install:
numpy, onnxruntime, tokenizers), ``onnxformer.modeling`` (torch) and ``onnxformer.export``.
This root package holds only the version and imports none of them, so ``import onnxformer``
is cheap and ``import onnxformer.runtime`` stays torch-free. It is installed from
``runtime/_root/`` (pyproject's package-dir) because the top of the repository holds only the
layers' folders.
"""

from importlib import metadata as _metadata

try:  # the installed distribution's version (editable or not)
    __version__ = _metadata.version("onnxformer")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
