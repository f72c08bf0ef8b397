"""Puts the repository root on sys.path, so the tests import model.py however pytest is started,
and marks the two slower kinds of test, so that a fast tier can leave them out:

    python -m pytest -q tests                                       # everything (CI)
    python -m pytest -q tests -m "not oracle and not processes"     # requirements.txt and pytest

oracle: checks against another implementation (transformers, peft, gguf, tokenizers), which
requirements-dev.txt installs; processes: spawns torchrun or training processes (tests/test_dist.py).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ORACLE_FILES = {"test_model.py", "test_lora.py", "test_convert.py"}
PROCESS_FILES = {"test_dist.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "oracle: compares with transformers, peft, gguf or tokenizers (requirements-dev.txt)")
    config.addinivalue_line("markers", "processes: spawns torchrun or training processes")


def pytest_collection_modifyitems(items):
    for item in items:
        name = os.path.basename(str(item.fspath))
        if name in ORACLE_FILES:
            item.add_marker(pytest.mark.oracle)
        if name in PROCESS_FILES:
            item.add_marker(pytest.mark.processes)
