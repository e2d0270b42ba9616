"""The suite's own order (tests/conftest.py): files with a slow test are collected before files without one, each
file whole, so that `make test`'s two workers start on the long files."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_files_with_slow_tests_are_collected_first_and_stay_whole():
    # test_attention (no slow test) sorts before test_golden (one) by name; test_flow has none either
    files = ["tests/test_attention.py", "tests/test_flow.py", "tests/test_golden.py"]
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    order = [line.split("::")[0] for line in listed.splitlines() if "::" in line]
    runs = [path for i, path in enumerate(order) if i == 0 or order[i - 1] != path]
    assert runs == ["tests/test_golden.py", "tests/test_attention.py", "tests/test_flow.py"], runs
