"""A bare ``pytest`` at the repository root skips this package's tests where it is not installed."""

import importlib.util

collect_ignore_glob = ["test_*.py"] if importlib.util.find_spec("lowbit_cuda") is None else []
