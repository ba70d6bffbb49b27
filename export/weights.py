"""The package's weights file, `weights.onnx_data`, written while the graphs are produced.

Every initializer of INLINE_BYTES or more is stored in the one file, each distinct tensor
(data type and bytes) once across the package's graphs, at an aligned offset; its TensorProto
keeps only the name, shape, type and the location (ONNX external data). A weight that several
graphs use (an encoder-decoder's token embedding: the encoder's input, the decoder's input and
its tied output head) is stored once, and onnxruntime maps raw weights from the file instead of
parsing them out of a protobuf, which makes a package load faster.

The built decoder (export/builder.py) writes each weight here as it converts it, so a model's
weights are never held twice in memory (the model and a graph proto of the same bytes): the
export's peak is the model plus one tensor. Traced graphs come out of torch.onnx with their
weights in memory; `move` writes them when they are staged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS_FILE = "weights.onnx_data"  # every graph's weights, each distinct tensor once
INLINE_BYTES = 1024  # initializers below this stay inside their graph (shapes, scalars, small biases)


def _align(size: int) -> int:
    """Offset alignment in the weights file: 64 KiB (the mmap granularity) for large tensors."""
    return 1 << 16 if size >= 1 << 20 else 64


class WeightStore:
    """`directory/weights.onnx_data`, open for writing until `close` (a context manager).
    A store that received no tensor removes its file on close."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / WEIGHTS_FILE
        self._out = open(self.path, "wb")
        self._stored: dict[tuple[int, bytes], tuple[int, int]] = {}  # (dtype, sha256) -> (offset, length)

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def used(self) -> bool:
        return bool(self._stored)

    def close(self) -> None:
        if self._out.closed:
            return
        self._out.close()
        if not self._stored:
            self.path.unlink()

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """An initializer for `array`: stored in the file (INLINE_BYTES or more) or inline."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        self._point(tensor, memoryview(array.reshape(-1)).cast("B"))
        return tensor

    def move(self, tensor: TensorProto) -> None:
        """An in-memory initializer (INLINE_BYTES or more) into the file; smaller ones and
        tensors already stored externally are left as they are."""
        if tensor.data_location == TensorProto.EXTERNAL:
            return
        if not tensor.HasField("raw_data"):  # typed fields (rare): normalise to raw bytes
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) < INLINE_BYTES:
            return
        self._point(tensor, tensor.raw_data)
        tensor.ClearField("raw_data")

    def _point(self, tensor: TensorProto, raw: bytes | memoryview) -> None:
        key = (tensor.data_type, hashlib.sha256(raw).digest())
        if key not in self._stored:
            out = self._out
            out.write(b"\0" * (-out.tell() % _align(len(raw))))
            self._stored[key] = (out.tell(), len(raw))
            out.write(raw)
        offset, length = self._stored[key]
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v


def uses_store(proto: onnx.ModelProto) -> bool:
    """Whether any initializer of `proto` lives in the weights file."""
    return any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
