"""Run `onnxformer ARGS...` and pause it at a chosen moment of a checkpoint or package write,
so that a test can kill it right there with a real signal.

    python tests/reliability/interrupt.py POINT MARKER ARGS...

POINT
  checkpoint:N     saving checkpoint step N: config.json, model.safetensors and tokenizer.json
                   are in the temporary folder, training_state.safetensors is not yet
  export:graphs    the graphs and a manifest are staged in the temporary folder; validation next
  export:replace   the package is complete in the temporary folder; it replaces OUT_DIR next
  export:swapped   OUT_DIR was just exchanged: it holds the new package, the temporary folder
                   the previous one, which is deleted next

At the pause the process writes the temporary folder's path to MARKER and sleeps; nothing else
about the run changes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def pause(marker: str, folder: Path) -> None:
    partial = marker + ".part"
    Path(partial).write_text(str(folder))
    os.replace(partial, marker)  # the test never reads half a path
    time.sleep(3600)


def install(point: str, marker: str) -> None:
    kind, _, where = point.partition(":")
    if kind == "checkpoint":
        from onnxformer.modeling import checkpoint

        real_save = checkpoint.save_file
        prefix = f".{checkpoint.checkpoint_name(int(where))}."

        def save_file(tensors, filename, *args, **kwargs):
            path = Path(filename)
            if path.parent.name.startswith(prefix) and path.name == checkpoint.TRAINING_STATE_FILE:
                pause(marker, path.parent)
            return real_save(tensors, filename, *args, **kwargs)

        checkpoint.save_file = save_file
    elif point == "export:graphs":
        from onnxformer.export import exporter

        real_validate = exporter.validate_package_graphs

        def validate(model, tmp, *args, **kwargs):
            pause(marker, Path(tmp))
            return real_validate(model, tmp, *args, **kwargs)

        exporter.validate_package_graphs = validate
    elif point == "export:replace":
        from onnxformer.export import exporter

        real_replace = exporter.publish

        def replace(tmp, out_dir):
            pause(marker, Path(tmp))
            return real_replace(tmp, out_dir)

        exporter.publish = replace
    elif point == "export:swapped":
        from onnxformer.runtime import atomic

        real_exchange = atomic.exchange

        def exchange(a, b):
            done = real_exchange(a, b)
            if done:
                pause(marker, Path(a))
            return done

        atomic.exchange = exchange
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], sys.argv[2])
    from onnxformer.runtime.cli import main

    sys.exit(main(sys.argv[3:]))
