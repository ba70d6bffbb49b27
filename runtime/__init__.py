"""onnxformer.runtime: run exported packages with onnxruntime, numpy and tokenizers. Never torch.

    import onnxformer.runtime as rt
    model = rt.load("artifacts/decoder")
    print(model.generate("twelve", max_new_tokens=8)[0].text)
"""

from .. import __version__  # the root package's (runtime/_root/__init__.py): one place reads it
from .errors import ConfigError, InputError, OnnxformerError, PackageError, ProviderError, RunError
from .generation import Generation, GenerationConfig
from .manifest import Manifest
from .model import Classification, Model, load
from .steps import StepModel, StepResult

__all__ = [
    "__version__",
    "load", "Model", "Manifest", "GenerationConfig", "Generation", "StepModel", "StepResult", "Classification",
    "OnnxformerError", "PackageError", "InputError", "ConfigError", "ProviderError", "RunError",
]
