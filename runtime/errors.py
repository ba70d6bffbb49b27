"""The one error tree of onnxformer: training, export and the runtime raise these, and only these
on purpose. No torch here (the runtime imports it; training and export import it from here).

Every message names the problem, the offending value and, where there is one, the fix, e.g.
``top_p must be in (0, 1]; got 1.5. Use 1.0 to turn nucleus filtering off.``

Every error carries a stable ``code`` (``err.code``, e.g. ``E_CHECKSUM``): the class's default,
or a finer one from :data:`CODES` passed as ``code=``. Codes, not English text, are the contract:
the CLIs print them, the Node.js runtime raises the same ones (``runtime/node/errors.js``), and
tests compare class and code. A code once published keeps its meaning.

Hierarchy::

    OnnxformerError               E_ONNXFORMER   (never raised itself)
    ├── PackageError              E_PACKAGE      bad, missing or damaged package
    ├── InputError(ValueError)    E_INPUT        bad input to a call (texts, token ids, lengths)
    ├── ConfigError(ValueError)   E_CONFIG       bad or contradictory parameters
    ├── ProviderError             E_PROVIDER     execution provider unavailable or failing to start
    ├── RunError                  E_RUN          onnxruntime failed while running a graph
    ├── DataError(ValueError)     E_DATA         training data that cannot be read or used
    ├── CheckpointError           E_CHECKPOINT   a checkpoint or run directory that cannot be used
    ├── TrainingError             E_TRAINING     a training run that cannot go on (e.g. loss is NaN)
    └── ExportError               E_EXPORT       a model that cannot be exported as asked
        └── ValidationError       E_VALIDATION   an exported graph disagrees with PyTorch

The CLIs catch :class:`OnnxformerError` (exit 2, ``error[CODE]: message``) and nothing else, so a
real bug keeps its traceback.
"""

from __future__ import annotations

from typing import ClassVar

# Every code an error may carry, with what it means. Node.js mirrors this table (a test checks).
CODES: dict[str, str] = {
    "E_ONNXFORMER": "an onnxformer error without a finer code",
    # packages
    "E_PACKAGE": "the package is missing, incomplete or damaged",
    "E_MANIFEST": "manifest.json is missing, unreadable or breaks the format (runtime/FORMAT.md)",
    "E_FORMAT_VERSION": "the package was written for another format version",
    "E_CHECKSUM": "a package file's size or sha256 differs from the manifest",
    "E_MISSING_FILE": ("a file the manifest lists is not in the package, or a package, checkpoint or run "
                       "directory does not exist"),
    "E_EXTERNAL_DATA": "a graph's external-data reference is unsafe or does not match the manifest",
    "E_GRAPH": "onnxruntime could not load a graph file",
    "E_GRAPH_IO": "a graph's inputs or outputs break the I/O contract",
    "E_TOKENIZER": "the tokenizer is unreadable or does not belong to the model",
    "E_WRONG_KIND": "the call needs another kind of package (e.g. classify on a decoder)",
    "E_RELEASED": "a model used after release() (Node; Python frees sessions when the model is dropped)",
    # inputs and parameters
    "E_INPUT": "bad input to a call",
    "E_TOO_LONG": "an input is longer than the model takes",
    "E_TOKEN_ID": "a token id that is not an integer, negative, or outside the vocabulary",
    "E_CONFIG": "a bad or contradictory parameter",
    "E_UNKNOWN_PARAMETER": "a parameter name that does not exist",
    # running
    "E_PROVIDER": "the execution provider is unavailable or failed to start",
    "E_RUN": "onnxruntime failed while running a graph",
    # training
    "E_DATA": "training data that cannot be read or used",
    "E_CHECKPOINT": "a checkpoint or run directory that cannot be used",
    "E_LOCKED": "another process holds the directory",
    "E_TRAINING": "a training run that cannot go on",
    "E_NOT_FINITE": "a loss or weights that are NaN or infinite",
    # export
    "E_EXPORT": "a model that cannot be exported as asked",
    "E_UNSUPPORTED": "a model feature the chosen graph producer does not implement",
    "E_VALIDATION": "an exported graph disagrees with PyTorch beyond its tolerance",
    "E_DISK": "a file could not be written (disk full, permissions, a file in the way)",
    # serving (onnxformer serve)
    "E_NOT_FOUND": "an unknown model name or route of the server",
    "E_UNAUTHORIZED": "a missing or wrong API key",
    "E_BUSY": "the server's queue is full or it is shutting down: retry later",
}


class OnnxformerError(Exception):
    """Base class of every error onnxformer raises on purpose. ``code`` is stable."""

    default_code: ClassVar[str] = "E_ONNXFORMER"

    def __init__(self, message: str = "", *, code: str | None = None):
        super().__init__(message)
        code = code or self.default_code
        if code not in CODES:  # a typo in our own code: fail loudly, with a traceback
            raise AssertionError(f"unknown error code {code!r}; add it to onnxformer.runtime.errors.CODES")
        self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # picklable with its code and attributes (worker processes, multiprocessing)
        return (_rebuild, (type(self), self.message, self.code), dict(self.__dict__))


def _rebuild(cls: type, message: str, code: str) -> OnnxformerError:
    return cls(message, code=code)


class PackageError(OnnxformerError):
    """The package is missing, incomplete or damaged, or a graph breaks the I/O contract."""

    default_code = "E_PACKAGE"


class InputError(OnnxformerError, ValueError):
    """The caller passed input the model cannot take (empty prompt, token id out of range...)."""

    default_code = "E_INPUT"


class ConfigError(OnnxformerError, ValueError):
    """A parameter is invalid or parameters contradict each other."""

    default_code = "E_CONFIG"


class ProviderError(OnnxformerError):
    """An onnxruntime execution provider is not available or could not be initialised."""

    default_code = "E_PROVIDER"


class RunError(OnnxformerError):
    """onnxruntime failed while running a graph that loaded (out of memory, a damaged graph)."""

    default_code = "E_RUN"


class DataError(OnnxformerError, ValueError):
    """Training data that cannot be read, parsed or used as asked."""

    default_code = "E_DATA"


class CheckpointError(OnnxformerError):
    """A checkpoint or run directory that cannot be read, resumed or written."""

    default_code = "E_CHECKPOINT"


class TrainingError(OnnxformerError):
    """A training run that cannot go on (a NaN loss, a diverged run)."""

    default_code = "E_TRAINING"


class ExportError(OnnxformerError):
    """A model that cannot be exported as asked (an unsupported option, an unwritable folder)."""

    default_code = "E_EXPORT"


class ValidationError(ExportError):
    """An exported graph disagrees with the PyTorch model beyond its stated tolerance."""

    default_code = "E_VALIDATION"


__all__ = [
    "CODES", "OnnxformerError", "PackageError", "InputError", "ConfigError", "ProviderError", "RunError",
    "DataError", "CheckpointError", "TrainingError", "ExportError", "ValidationError",
]
