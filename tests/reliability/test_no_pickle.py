"""No pickle anywhere: weights are safetensors, packages are ONNX + JSON, and loading a
checkpoint or a package never unpickles, so it never runs code that came with the files.

1. A scan of the source (AST, not grep): no pickle-family imports (importing only pickle's
   exception classes is allowed: the Hugging Face import catches the UnpicklingError that
   `torch.load(weights_only=True)` raises for a `pytorch_model.bin` holding objects), no
   `torch.load` without `weights_only=True`, no `np.load(allow_pickle=True)`, no `torch.save`, `eval` or `exec`
   in the shipped code (runtime/, modeling/, export/).
2. Planted payloads: pickles that would create a marker directory when unpickled, under the
   names other tools load (`pytorch_model.bin`, `*.pt`, `*.pkl`), and in place of the real
   files; loading, resuming and exporting leave no marker.
3. With every unpickling entry point of `pickle` made to fail, checkpoints and packages still
   load (model and training state), run and export: no code path unpickles at all.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest

from reliability_support import REPO

SHIPPED = ("runtime", "modeling", "export")
ALSO_SCANNED = ("benchmarks",)  # not shipped: torch.save for scratch files is tolerated there
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
EXCEPTIONS_ONLY = {"UnpicklingError", "PickleError"}  # names that cannot unpickle anything


def _call_name(node: ast.Call) -> str:
    parts, target = [], node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.append(target.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def scan(path: Path, shipped: bool) -> list[str]:
    problems = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES \
                and not {a.name for a in node.names} <= EXCEPTIONS_ONLY:
            problems.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name.endswith("torch.load"):
                if _keyword(node, "weights_only") is not True:
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
                problems.append(f"{where}: {name}(allow_pickle=...)")
            elif name in ("pd.read_pickle", "pandas.read_pickle"):
                problems.append(f"{where}: {name}")
            elif shipped and (name.endswith("torch.save") or isinstance(node.func, ast.Name) and name in ("eval", "exec")):
                problems.append(f"{where}: {name}(...) in shipped code")
    return problems


def test_source_tree_has_no_pickle_paths(figures, tmp_path):
    files = {d: sorted((REPO / d).rglob("*.py")) for d in (*SHIPPED, *ALSO_SCANNED) if (REPO / d).is_dir()}
    problems = [p for d, paths in files.items() for path in paths for p in scan(path, d in SHIPPED)]
    assert not problems, "\n".join(problems)
    # The scanner itself catches what it should.
    probe = REPO / "tests" / "reliability" / "test_no_pickle.py"
    assert any("import pickle" in p for p in scan(probe, shipped=True))
    fake = tmp_path / "probe.py"  # only the exception class may be imported
    fake.write_text("from pickle import UnpicklingError\nfrom pickle import UnpicklingError, loads\n")
    assert scan(fake, shipped=True) == ["probe.py:2: from pickle import ..."]
    n = sum(len(p) for p in files.values())
    figures.record("no pickle", f"AST scan of {', '.join(files)}: pickle-family imports, torch.load without "
                   "weights_only=True, np.load(allow_pickle), pandas.read_pickle; torch.save/eval/exec in shipped code",
                   f"{n} files", "0 findings")


# --- payloads --------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates `marker` (a directory): proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def payload(tmp_path):
    marker = tmp_path / "PWNED"
    data = pickle.dumps(Payload(marker))
    pickle.loads(data)  # the payload is live: unpickling it does create the marker
    assert marker.is_dir()
    marker.rmdir()
    return marker, data


PLANTED = ["pytorch_model.bin", "model.pt", "optimizer.pt", "training_args.bin", "rng_state.pth", "weights.pkl"]


def test_planted_pickles_are_never_loaded(trained_run, tmp_path, payload, package_paths, figures):
    torch = pytest.importorskip("torch")
    import onnxformer.runtime as rt
    from onnxformer.export.exporter import ExportOptions, export_checkpoint
    from onnxformer.modeling import checkpoint as ckpt
    from onnxformer.runtime.cli import main
    from onnxformer.runtime.errors import CheckpointError

    marker, data = payload
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    latest = ckpt.latest_checkpoint(run)
    for name in PLANTED:
        (latest / name).write_bytes(data)
        (run / name).write_bytes(data)
    package = tmp_path / "package"
    shutil.copytree(package_paths["decoder"], package)
    for name in PLANTED:
        (package / name).write_bytes(data)

    ckpt.load_model(run)
    ckpt.load_training_state(run)
    rt.load(package).generate("the cat", max_new_tokens=2)
    export_checkpoint(run, tmp_path / "exported", ExportOptions(validate_generation=False))
    args = ["train", "--arch", "decoder", "--task", "causal-lm", "--data", str(trained_run.parent / "corpus.txt"),
            "--out", str(run), "--steps", "2", "--batch-size", "4", "--vocab-size", "300", "--max-len", "32",
            "--save-every", "1", "--keep-checkpoints", "0", "--eval-examples", "4", "--no-progress", "--resume"]
    assert main(args) == 0
    assert not marker.exists()

    # A pickle (or a torch.save zip) in place of the real files: refused as damaged, never run.
    cases = 5
    for name, load in ((ckpt.MODEL_FILE, ckpt.load_model), (ckpt.TRAINING_STATE_FILE, ckpt.load_training_state)):
        saved = (latest / name).read_bytes()
        for blob in (data, _torch_zip(torch, marker, tmp_path)):
            (latest / name).write_bytes(blob)
            with pytest.raises(CheckpointError, match=f"{name} is not a valid safetensors file"):
                load(latest)
            cases += 1
        (latest / name).write_bytes(saved)
    for name in ("decoder.onnx", "tokenizer.json", "manifest.json"):
        saved = (package / name).read_bytes()
        (package / name).write_bytes(data)
        for verify in (True, False):
            with pytest.raises(rt.PackageError):
                rt.load(package, verify=verify)
            cases += 1
        (package / name).write_bytes(saved)
    assert not marker.exists()
    figures.record("no pickle", f"malicious pickles (create a directory when unpickled) planted as "
                   f"{', '.join(PLANTED)} in a run dir, a checkpoint and a package, then load_model, "
                   "load_training_state, runtime load + generate, export, `train --resume`; pickles and torch.save "
                   "zips in place of model/training safetensors, graph, tokenizer and manifest", cases,
                   f"payload never ran; {cases - 5} replaced files refused as damaged (ValueError / PackageError)")


def _torch_zip(torch, marker: Path, tmp_path: Path) -> bytes:
    path = tmp_path / "payload.pt"
    torch.save({"weight": Payload(marker)}, path)
    return path.read_bytes()


def test_no_code_path_unpickles(trained_run, tmp_path, package_paths, monkeypatch):
    """Every unpickling entry point of the pickle module raises; everything still works."""
    pytest.importorskip("torch")
    import _pickle

    import onnxformer.runtime as rt
    from onnxformer.export.exporter import ExportOptions, export_checkpoint
    from onnxformer.modeling import checkpoint as ckpt

    class Forbidden(AssertionError):
        pass

    def forbidden(*args, **kwargs):
        raise Forbidden("something unpickled")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "load", forbidden)
        monkeypatch.setattr(module, "loads", forbidden)
        monkeypatch.setattr(module, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "_Unpickler", NoUnpickler)

    ckpt.load_model(trained_run)
    ckpt.load_training_state(trained_run)
    rt.load(package_paths["encoder-decoder"]).generate("the cat", max_new_tokens=2)
    export_checkpoint(trained_run, tmp_path / "exported", ExportOptions(validate_generation=False))
    with pytest.raises(Forbidden):  # the trap works
        pickle.loads(pickle.dumps(1))
