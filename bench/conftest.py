"""Benchmarks reuse the test suite's real-server fixtures and helpers."""
import importlib.util
import os
import sys

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests")
sys.path.insert(0, _TESTS)
_spec = importlib.util.spec_from_file_location(
    "fwd_test_fixtures", os.path.join(_TESTS, "conftest.py"))
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

impl = _fixtures.impl
start_server = _fixtures.start_server
chan_server = _fixtures.chan_server
bcast_server = _fixtures.bcast_server
