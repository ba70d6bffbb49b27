"""onnxformer.export."""
