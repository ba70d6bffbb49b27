"""The `onnxformer` command line.

Each subcommand lives in its own module that defines `add_arguments(parser)` and
`run(args) -> int`. Those modules are torch-free at import time (train and export import
torch inside `run`), so `onnxformer --help` and the runtime subcommands start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Order is the order shown in --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("onnxformer.export.quickstart", "train, export and run tiny models of all four architectures"),
    "train": ("onnxformer.modeling.cli", "train a model (pretraining, fine-tuning, LoRA/BitFit)"),
    "export": ("onnxformer.export.cli", "export a checkpoint to a validated ONNX package"),
    "inspect": ("onnxformer.runtime.commands", "describe a package: graphs, I/O, sizes, validation"),
    "generate": ("onnxformer.runtime.commands", "generate text with a decoder or encoder-decoder package"),
    "classify": ("onnxformer.runtime.commands", "classify texts with an encoder package"),
    "embed": ("onnxformer.runtime.commands", "sentence embeddings from an encoder package"),
}


def _module(name: str):
    return importlib.import_module(SUBCOMMANDS[name][0])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxformer",
        description="Train transformers in PyTorch, export them to ONNX packages, run them anywhere.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            try:
                add = _module(name).add_arguments
            except (ImportError, AttributeError):  # subcommand not available in this install
                continue
            if name in ("inspect", "generate", "classify", "embed"):
                add(p, name)
            else:
                add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the chosen subcommand's options, so one broken/missing module never
    # takes the others down and start-up stays cheap.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    args = build_parser(only=chosen).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from .errors import OnnxformerError

    try:
        return int(_module(args.command).run(args) or 0)
    except (OnnxformerError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
        # The project's errors, and invalid configs / data / paths (ValueError, DataError):
        # the message names the problem and the fix; -v shows where it came from.
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
