"""Exceptions raised by the onnxformer runtime. No torch here.

Every message names the problem, the offending value and, where there is one, the fix, e.g.
``top_p must be in (0, 1]; got 1.5. Use 1.0 to turn nucleus filtering off.``

Hierarchy::

    OnnxformerError
    ├── PackageError            bad, missing or damaged package (manifest, graph files, graph I/O)
    ├── InputError(ValueError)  bad user input (prompts, token ids, shapes)
    ├── ConfigError(ValueError) bad generation parameters
    ├── ProviderError           execution provider unavailable or failing to start
    └── RunError                onnxruntime failed while running a graph (out of memory, a graph
                                damaged in a way the checks before running could not see)
"""

from __future__ import annotations


class OnnxformerError(Exception):
    """Base class of every error the runtime raises on purpose."""


class PackageError(OnnxformerError):
    """The package is missing, incomplete or damaged, or a graph breaks the I/O contract."""


class InputError(OnnxformerError, ValueError):
    """The caller passed input the model cannot take (empty prompt, token id out of range...)."""


class ConfigError(OnnxformerError, ValueError):
    """A generation parameter is invalid or parameters contradict each other."""


class ProviderError(OnnxformerError):
    """An onnxruntime execution provider is not available or could not be initialised."""


class RunError(OnnxformerError):
    """onnxruntime failed while running a graph that loaded (out of memory, a damaged graph)."""


__all__ = ["OnnxformerError", "PackageError", "InputError", "ConfigError", "ProviderError", "RunError"]
