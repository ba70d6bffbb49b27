"""onnxformer.runtime: run exported packages with onnxruntime, numpy and tokenizers. Never torch.

    import onnxformer.runtime as rt
    model = rt.load("artifacts/decoder")
    print(model.generate("twelve", max_new_tokens=8)[0].text)
"""

from importlib import metadata as _metadata

from .errors import ConfigError, InputError, OnnxformerError, PackageError, ProviderError, RunError
from .generation import Generation, GenerationConfig
from .manifest import Manifest
from .model import Classification, Model, load
from .steps import StepModel, StepResult

try:  # the installed distribution's version (editable or not); onnxformer itself is a namespace
    __version__ = _metadata.version("onnxformer")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "load", "Model", "Manifest", "GenerationConfig", "Generation", "StepModel", "StepResult", "Classification",
    "OnnxformerError", "PackageError", "InputError", "ConfigError", "ProviderError", "RunError",
]
