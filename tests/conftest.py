"""Shared fixtures: tiny packages exported on the spot (helpers live in support.py)."""

from __future__ import annotations

import pytest

from support import HAS_TORCH, make_model  # noqa: F401  (re-exported for fixtures)


@pytest.fixture(scope="session")
def package_factory(tmp_path_factory):
    """Export (and cache) a tiny package: package_factory(arch, pos="rope", **options)."""
    if not HAS_TORCH:
        pytest.skip("exporting needs the [train] extra (torch)")
    from onnxformer.export.exporter import ExportOptions, export_model
    from onnxformer.modeling.tokenizer import save_tokenizer

    cache: dict = {}

    def build(arch: str, pos: str = "rope", **options):
        key = (arch, pos, tuple(sorted(options.items())))
        if key not in cache:
            model, tok = make_model(arch, pos)
            root = tmp_path_factory.mktemp(f"pkg-{arch}-{pos}")
            save_tokenizer(tok, root / "tokenizer.json")
            report = export_model(model, root / "tokenizer.json", root / "package", ExportOptions(**options))
            cache[key] = (model, tok, report)
        return cache[key]

    return build
