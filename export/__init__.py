"""onnxformer.export: a trained model -> a validated ONNX package.

    from onnxformer.export.exporter import ExportOptions, export_checkpoint
    report = export_checkpoint("runs/numbers", "packages/numbers", ExportOptions())
    report.decoder_graph   # "built" (export/builder.py) or "traced"; also manifest producer.decoder_graph

Torch-free at import (the CLI lists its commands without torch); the modules import torch.
"""
