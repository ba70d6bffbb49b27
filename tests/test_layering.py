"""Dependencies point one way: the layers of onnxformer and the imports each may make.

    onnxformer.runtime    the base: runs packages with numpy, onnxruntime and tokenizers only
    onnxformer.modeling   training (PyTorch); may import the runtime (GenerationConfig, errors, ...)
    onnxformer.export     may import both

The table is written once, in ALLOWED and RUNTIME_THIRD_PARTY below, and checked two ways:

* statically, over every module of the three packages (their folders' .py files): every
  ``import``, top-level or inside a function, relative imports resolved to their package,
  ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name, and string
  constants that spell a module of another layer (``"onnxformer.export.cli"``: the table a
  by-name import is looked up in);
* dynamically, in a fresh interpreter: import ``onnxformer.runtime`` and every submodule,
  then no forbidden module may be in ``sys.modules``, nor may one have been *attempted* (an
  import hook records attempts, so an ``import torch`` inside ``try/except ImportError`` is
  caught in the torch-free venv too).

This subsumes tests/test_contract.py::test_contract_and_generation_do_not_import_torch (three
runtime modules, torch only). tests/test_runtime.py::test_runtime_works_when_torch_cannot_be_imported
is the functional side: it loads and runs exported packages with torch blocked.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "onnxformer"

# layer -> the layers it may import (pyproject's package-dir: onnxformer.<layer> is folder <layer>/).
ALLOWED: dict[str, set[str]] = {
    "runtime": set(),
    "modeling": {"runtime"},
    "export": {"modeling", "runtime"},
}
# Third-party modules the runtime may import: the base install (pyproject `dependencies`).
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers"}
# Optional extras the runtime imports on first use, inside the function that needs them (never at
# import time): jinja2 for chat templates (the [chat] extra, runtime/chat.py); pyarrow for Parquet
# data files (the [data] extra, runtime/datafiles.py); sacrebleu for BLEU/chrF (the [eval] extra,
# runtime/evaluate.py); starlette, uvicorn and prometheus_client for `onnxformer serve` (the [serve]
# extra, runtime/server.py).
RUNTIME_OPTIONAL = {"jinja2", "pyarrow", "sacrebleu", "starlette", "uvicorn", "prometheus_client"}
# Never in the runtime's process, not even pulled in by a dependency (the train/bench extras).
RUNTIME_FORBIDDEN = {"torch", "onnx", "onnx_ir", "onnxscript", "safetensors", "tqdm", "transformers", "optimum"}

# The root package `onnxformer` (only __version__, stdlib imports) is installed from this folder,
# inside the runtime's: it is not a module of onnxformer.runtime.
ROOT_PACKAGE_DIR = Path("runtime", "_root")

_MODULE_NAME = re.compile(rf"^{PACKAGE}\.({'|'.join(ALLOWED)})(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # absolute dotted name
    how: str  # "import", "importlib" or "by name" (a string constant)

    def __str__(self) -> str:
        return f"{_shown(self.file)}:{self.line}: {self.how} {self.module}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE and parts[1] in ALLOWED else None


def package_modules(layer: str) -> dict[Path, str]:
    """file -> module name for every module of onnxformer.<layer> (folders with __init__.py)."""
    base = ROOT / layer
    modules = {}
    for path in sorted(base.rglob("*.py")):
        if path.is_relative_to(ROOT / ROOT_PACKAGE_DIR):
            continue  # installed as `onnxformer`, not as onnxformer.runtime._root
        folders = path.parent.relative_to(base).parts
        if not all((base.joinpath(*folders[:k]) / "__init__.py").is_file() for k in range(len(folders) + 1)):
            continue  # a script beside the package (runtime/node/test/make_expected.py), not a module
        parts = [PACKAGE, layer, *folders] + ([] if path.name == "__init__.py" else [path.stem])
        modules[path] = ".".join(parts)
    return modules


def _resolve(level: int, module: str | None, package: str, path: Path, line: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    if level > len(parts):
        raise AssertionError(f"{_shown(path)}:{line}: relative import beyond {PACKAGE}")
    base = parts[:len(parts) - level + 1]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, module: str) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found, named = [], set()  # named: the literal arguments of import calls (not counted twice)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name, "import") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node.level, node.module, package, path, node.lineno)
            found.append(Import(path, node.lineno, target, "import"))
            # `from onnxformer import export` imports onnxformer.export
            found += [Import(path, node.lineno, f"{target}.{alias.name}", "import")
                      for alias in node.names if layer_of(f"{target}.{alias.name}") and not layer_of(target)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_import_call(node.func):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = _resolve(level, name.lstrip(".") or None, package, path, node.lineno)
            found.append(Import(path, node.lineno, name, "importlib"))
            named.add(id(node.args[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.match(node.value) \
                and id(node) not in named:
            found.append(Import(path, node.lineno, node.value, "by name"))
    return found


def _is_import_call(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in ("import_module", "__import__")


def _stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names or top == "__future__"


@pytest.mark.runtime_only
def test_the_scanner_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "cli.py"
    source.write_text(
        "import numpy as np, os.path\n"
        "from . import generation\n"
        "from ..export.exporter import export_model\n"
        "from onnxformer import modeling\n"
        "def run():\n"
        "    import torch\n"
        "    return importlib.import_module('onnxformer.export.cli'), import_module('.manifest', __package__)\n"
        "COMMANDS = {'train': ('onnxformer.modeling.cli', 'help text naming onnxformer.export is not a name')}\n",
        encoding="utf-8",
    )
    found = {(imp.module, imp.how) for imp in imports_of(source, "onnxformer.runtime.cli")}
    assert found == {
        ("numpy", "import"), ("os.path", "import"), ("onnxformer.runtime", "import"),
        ("onnxformer.export.exporter", "import"), ("onnxformer", "import"), ("onnxformer.modeling", "import"),
        ("torch", "import"), ("onnxformer.export.cli", "importlib"),
        ("onnxformer.runtime.manifest", "importlib"), ("onnxformer.modeling.cli", "by name"),
    }


@pytest.mark.runtime_only
def test_the_table_covers_every_package_and_the_base_install():
    """ALLOWED names every package pyproject installs (each from its folder), and
    RUNTIME_THIRD_PARTY is the base install."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = project["tool"]["setuptools"]["packages"]
    assert sorted(packages) == sorted([PACKAGE] + [f"{PACKAGE}.{layer}" for layer in ALLOWED]), f"pyproject packages {packages}"
    folders = project["tool"]["setuptools"]["package-dir"]
    assert folders == {PACKAGE: ROOT_PACKAGE_DIR.as_posix()} | {f"{PACKAGE}.{layer}": layer for layer in ALLOWED}, \
        f"pyproject package-dir {folders}"
    declared = project["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in declared}
    assert names == RUNTIME_THIRD_PARTY, f"pyproject dependencies {sorted(names)} vs RUNTIME_THIRD_PARTY"


@pytest.mark.runtime_only
def test_the_root_package_imports_only_the_stdlib():
    """`import onnxformer` (for __version__) loads no layer and no third-party module."""
    path = ROOT / ROOT_PACKAGE_DIR / "__init__.py"
    found = [imp for imp in imports_of(path, PACKAGE) if not _stdlib(imp.module.split(".")[0])]
    assert not found, f"the root package imports {[str(imp) for imp in found]}"
    code = "import sys, onnxformer; print(onnxformer.__version__); print(sorted(m for m in sys.modules if m.startswith('onnxformer') or m in ('numpy', 'onnxruntime', 'tokenizers', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    version, loaded = out.stdout.strip().splitlines()
    assert loaded == "['onnxformer']", loaded
    from importlib import metadata
    assert version == metadata.version(PACKAGE)


@pytest.mark.runtime_only
@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_static_imports_follow_the_table(layer):
    modules = package_modules(layer)
    assert modules, f"no modules found under {layer}/"
    violations = []
    for path, module in modules.items():
        for imp in imports_of(path, module):
            target = layer_of(imp.module)
            if target is not None:
                if target != layer and target not in ALLOWED[layer]:
                    violations.append(f"{imp}  (onnxformer.{layer} may import {sorted(ALLOWED[layer]) or 'no other layer'})")
                continue
            top = imp.module.split(".")[0]
            if layer == "runtime" and imp.how != "by name" and not _stdlib(top) and top != PACKAGE \
                    and top not in RUNTIME_THIRD_PARTY | RUNTIME_OPTIONAL:
                violations.append(f"{imp}  (the runtime may import the stdlib, {sorted(RUNTIME_THIRD_PARTY)} and, "
                                  f"on first use, {sorted(RUNTIME_OPTIONAL)})")
    assert not violations, f"{len(violations)} import(s) break the layering:\n  " + "\n  ".join(violations)


# Runs in a fresh interpreter: records every import attempted (even one that fails and is
# caught), with the first frame outside importlib that asked for it, then imports the runtime.
_PROBE = r"""
import importlib, json, pkgutil, sys
forbidden, layers = set(FORBIDDEN), tuple(f"onnxformer.{l}" for l in OTHER_LAYERS)
attempts = []

class Recorder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in forbidden or fullname.startswith(layers):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
            attempts.append(f"{fullname} (from {where})")
        return None  # let the real finders decide

sys.meta_path.insert(0, Recorder())
import onnxformer.runtime as rt
for info in pkgutil.walk_packages(rt.__path__, "onnxformer.runtime."):
    if info.name != "onnxformer.runtime._root":  # the root package's folder (installed as onnxformer)
        importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden or m.startswith(layers))
print(json.dumps({"attempts": attempts, "loaded": loaded,
                  "runtime": sorted(m for m in sys.modules if m.startswith("onnxformer.runtime"))}))
"""


def _probe(forbidden: set[str], other_layers: list[str]) -> dict[str, list[str]]:
    code = _PROBE.replace("FORBIDDEN", repr(sorted(forbidden))).replace("OTHER_LAYERS", repr(other_layers))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.runtime_only
def test_importing_the_runtime_pulls_in_nothing_forbidden():
    result = _probe(RUNTIME_FORBIDDEN, sorted(set(ALLOWED) - {"runtime"} - ALLOWED["runtime"]))
    expected = set(package_modules("runtime").values())
    assert expected <= set(result["runtime"]), f"not imported: {sorted(expected - set(result['runtime']))}"
    assert not result["loaded"], f"importing onnxformer.runtime loaded {result['loaded']}"
    assert not result["attempts"], "importing onnxformer.runtime tried to import:\n  " + "\n  ".join(result["attempts"])


@pytest.mark.runtime_only
def test_the_probe_sees_an_import_made_by_a_dependency():
    result = _probe({"numpy"}, [])  # the control: the runtime imports numpy, and so does onnxruntime
    assert "numpy" in result["loaded"]
    first = result["attempts"][0]  # names the importing module's file and line
    assert re.fullmatch(r"numpy \(from .*runtime[/\\]\w+\.py:\d+\)", first), result["attempts"][:3]
