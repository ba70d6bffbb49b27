"""`onnxformer export CHECKPOINT OUT_DIR` (our checkpoint or a Hugging Face folder). Torch-free
at import; torch loads inside run()."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training run directory (its latest checkpoint), one checkpoint directory, "
                                           "or a local Hugging Face model folder (config.json, *.safetensors, "
                                           "tokenizer.json; README 'Hugging Face models')")
    parser.add_argument("out_dir", help="package directory to write (replaced atomically if it is a package)")
    parser.add_argument("--quantize", choices=["int8", "int4", "int8-dynamic"], default=None,
                        help="int8/int4: weight-only quantization of every matmul (onnxruntime MatMulNBits; "
                             "smaller and faster on CPU, every architecture). int8-dynamic: int8 weights and "
                             "activations (MatMulInteger), about 2x fp32 classification throughput on CPU; "
                             "encoder models only")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                        help="float type of weights and float inputs/outputs; fp16 is meant for GPU (default fp32)")
    parser.add_argument("--opset", type=int, default=18,
                        help="ONNX opset (default 18; at most 26 so onnxruntime-node/web 1.30 can load it)")
    parser.add_argument("--external-data", action="store_true",
                        help="store weights in <graph>.onnx_data files (automatic above the 2 GB protobuf limit)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest max-abs difference ONNX vs PyTorch (fp32) that passes validation (default 1e-4)")
    parser.add_argument("--kv-cache", choices=["auto", "shared", "concat"], default="auto",
                        help="decoder KV-cache layout: 'shared' = one preallocated buffer per layer updated in "
                             "place, graph written for onnxruntime's GroupQueryAttention (fastest; decoder and "
                             "encoder-decoder, head size a multiple of 16); 'concat' = the traced graph, any model; "
                             "'auto' (default) = shared where the model allows it")
    parser.add_argument("--skip-generation-check", action="store_true",
                        help="skip the greedy-generation parity check (numeric checks still run)")


def run(args: argparse.Namespace) -> int:
    from .exporter import ExportOptions, export_checkpoint

    options = ExportOptions(
        opset=args.opset,
        dtype="float16" if args.dtype == "fp16" else "float32",
        quantize=args.quantize,
        external_data=True if args.external_data else None,
        atol=args.atol,
        validate_generation=not args.skip_generation_check,
        kv_cache=None if args.kv_cache == "auto" else args.kv_cache,
    )
    report = export_checkpoint(args.checkpoint, args.out_dir, options)  # errors: CheckpointError, ExportError
    m = report.manifest
    print(f"wrote {report.path} ({m.arch}, weights {m.weights}, kv cache {m.kv_cache}, opset {m.opset})")
    for variant, figures in report.validation.items():
        line = f"  {variant:12s} max |onnx - torch| = {figures['worst_abs_diff']:.2e}"
        if "greedy_match" in figures:
            line += f"; greedy {'matches' if figures['greedy_match'] else 'DIFFERS'} over {figures['greedy_tokens_compared']} tokens"
        print(line)
    return 0
