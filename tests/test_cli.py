"""The command lines' own text: what an operator reads before running anything."""
from __future__ import annotations

import os
import subprocess
import sys


def test_server_help_names_the_environment_variables() -> None:
    """An operator's audit looked for FWD_* in --help and did not find it."""
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--help"], capture_output=True,
                          text=True, check=True, timeout=60)
    text = " ".join(done.stdout.split())
    assert "set in the environment as FWD_ and its name" in text and "FWD_MAX_CONNS" in text


def test_a_bad_network_is_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--allow", "10.0.0.0/8,10.1.2.300"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Invalid value for '--allow': not an address or network: '10.1.2.300'" \
        in " ".join(done.stderr.split())


def test_a_bad_network_file_is_a_usage_error_naming_its_line(tmp_path) -> None:
    path = tmp_path / "deny"
    path.write_text("10.0.0.0/8\n10.1.2.300\n")
    for nets in (str(path), str(tmp_path / "missing")):
        done = subprocess.run([sys.executable, "-m", "fwd.cli", "--deny-file", nets],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        said = " ".join(done.stderr.split())
        assert "Invalid value for '--deny-file'" in said
        assert ("line 2: not an address or network: '10.1.2.300'" in said
                if nets == str(path) else "No such file" in said), said


def test_the_default_worker_count_is_the_cpus_the_server_may_run_on() -> None:
    """Under taskset (or in a cpuset) one worker per CPU of the machine would
    only take turns on the CPUs allowed: the default counts those, as nproc."""
    one = min(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--help"], capture_output=True,
                          text=True, check=True, timeout=60,
                          preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    text = " ".join(done.stdout.split())
    assert "counts them). [default: 1; x>=1]" in text
