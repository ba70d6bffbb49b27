"""Shared fixtures: tiny packages exported on the spot (helpers live in support.py); the slow lane."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import HAS_TORCH, make_model  # noqa: F401  (re-exported for fixtures)

TESTS = Path(__file__).resolve().parent

# The slow lane (pyproject.toml's `markers` say how to run each lane). Besides the tests that
# carry @pytest.mark.slow in their own file (test_learning.py, test_train.py, test_benchmarks.py),
# these end-to-end tests are slow: each trains, exports or drives real processes for seconds.
# Listed here, in one place, with what they cost: CPU seconds on 2 cores, all parameters
# together, from `pytest --durations=40` (12/2026; a shared package fixture is paid by whichever
# test first needs it). A module path marks the whole module. A renamed test drops out of the
# list silently, so keep the names in step.
SLOW_TESTS: dict[str, float] = {
    "reliability/test_atomic_writes.py": 13.2,  # real processes killed mid-write, then resumed
    "reliability/test_load.py": 12.9,  # soak, threads, loading and dropping packages
    "reliability/test_properties.py::test_cli_with_any_arguments": 4.0,
    "test_errors.py::test_train_cli_user_errors": 5.6,
    "test_errors.py::test_train_and_export_cli_bugs_keep_their_traceback": 3.5,
    "test_export.py::test_export_validates_against_pytorch": 11.0,
    "test_export.py::test_int8_and_fp16_variants": 7.7,
    "test_export.py::test_weights_are_stored_once_in_one_file": 6.8,
    "test_export.py::test_llama_style_blocks_export": 3.6,
    "test_export.py::test_a_config_field_the_builder_does_not_know_gets_the_traced_graph": 3.2,
    "test_export.py::test_a_value_the_builder_does_not_implement_gets_the_traced_graph": 2.9,
    "test_shared_cache.py::test_export_matches_pytorch": 19.6,
    "test_shared_cache.py::test_variants_of_the_shared_graph": 6.0,
    "test_shared_cache.py::test_the_graph_is_fused_and_small": 8.0,
    "test_shared_cache.py::test_shared_and_concat_generate_the_same": 6.6,
    "test_steps.py::test_every_operation_keeps_every_row_equal_to_the_row_alone": 15.9,
    # run-directory locks held by real processes (the stale-lock takeover waits out its grace
    # period), and training into a full disk / write limit
    "reliability/test_training_safety.py::test_of_several_processes_taking_over_a_stale_lock_exactly_one_wins": 10.7,
    "reliability/test_training_safety.py::test_a_second_run_into_a_locked_out_is_refused_with_the_holders_pid": 10.0,
    "reliability/test_training_safety.py::test_a_full_disk_keeps_the_last_checkpoint_and_resume_works_after_freeing_space": 6.2,
    "reliability/test_training_safety.py::test_a_write_limit_at_the_checkpoint_is_one_clear_error_and_another_out_trains": 5.7,
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(item.path)
        if not path.is_relative_to(TESTS):
            continue
        module = path.relative_to(TESTS).as_posix()
        if module in SLOW_TESTS or f"{module}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


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
