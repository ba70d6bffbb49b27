"""onnxformer.modeling: the transformer family in PyTorch, its training and reference generation.

`ModelConfig` is torch-free; the PyTorch pieces load on first use, so importing this package
(e.g. for the CLI's --help) never imports torch.
"""

from .config import ARCHITECTURES, PRESETS, ModelConfig

_LAZY = {
    "Transformer": "model",
    "KV": "model",
    "DecoderOutput": "model",
    "generate": "generate",
}

__all__ = ["ARCHITECTURES", "PRESETS", "ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
