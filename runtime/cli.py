"""The `onnxformer` command line.

Each subcommand lives in its own module that defines `add_arguments(parser)` and
`run(args) -> int`. Those modules are torch-free at import time (train and export import
torch inside `run`), so `onnxformer --help` and the runtime subcommands start without torch.

An error onnxformer raises on purpose (`OnnxformerError`) prints `error[CODE]: message` on
stderr and exits with status 2 (`-v`, before or after the subcommand, re-raises it with its
traceback); usage errors are argparse's (status 2). Any other exception is a bug and ends with its
traceback. `onnxformer --version` prints the installed version (`onnxformer.__version__`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

# name -> one-line help, in the order --help shows them. Which module runs a subcommand is
# declared in pyproject.toml's entry-point group "onnxformer.commands" (the runtime names no
# module of training or export; tests/test_layering.py checks it). A module that cannot be
# imported in this install (train and export without the [train] extra) leaves its subcommand
# without options.
SUBCOMMANDS: dict[str, str] = {
    "quickstart": "train, export and run tiny models of all four architectures",
    "train": "train a model (pretraining, fine-tuning, LoRA/BitFit)",
    "export": "export a checkpoint to a validated ONNX package",
    "inspect": "describe a package: graphs, I/O, sizes, validation",
    "generate": "generate text with a decoder or encoder-decoder package",
    "classify": "classify texts with an encoder package",
    "embed": "sentence embeddings from an encoder package",
    "report": "draw a training run's curves (PNG) and a short HTML page",
    "eval": "score a package on a labelled data file (accuracy, macro-F1; exact match, chrF, BLEU)",
    "serve": "an OpenAI-compatible HTTP server over packages, with continuous batching",
    "web": "serve a page that runs packages in the browser (onnxruntime-web)",
}
ENTRY_POINTS = "onnxformer.commands"


def _module(name: str):
    found = entry_points(group=ENTRY_POINTS, name=name)
    if not found:  # an install whose metadata predates the subcommand: reinstall
        raise ImportError(f"no {ENTRY_POINTS!r} entry point {name!r}; reinstall onnxformer (pip install -e .)")
    return next(iter(found)).load()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxformer",
        description="Train transformers in PyTorch, export them to ONNX packages, run them anywhere.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"onnxformer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    # -v also after the subcommand; SUPPRESS keeps a subcommand's unset flag from overriding the top's.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress details; show an error's traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[verbose])
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
    except OnnxformerError as err:
        # Raised on purpose: the message names the problem and the fix, the code is stable
        # (runtime/errors.py), -v shows where it came from. Anything else is a bug and keeps
        # its traceback.
        if args.verbose:
            raise
        print(f"error[{err.code}]: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
