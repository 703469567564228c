"""The command lines' own text: what an operator reads before running anything."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest


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
    assert "counts them). [default: 1; 1<=x<=256]" in text


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Start a server that must refuse to start (exit 2): what it said."""
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                           "--control", "none", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 2, done.stderr
    return " ".join(done.stderr.split())


@pytest.mark.parametrize("args, said", [
    # uvloop takes write buffer limits as C ints: every client failed with
    # OverflowError, and never got a byte.
    (["--max-buffer", "2GiB"], "Invalid value for '--max-buffer': '2GiB' is more than 1GiB"),
    (["--splice-min", str(1 << 63)], "Invalid value for '--splice-min'"),
    # A million workers: each ran out of ZeroMQ sockets and was restarted, and
    # the parent never got to hear SIGTERM.
    (["--workers", "257"], "'--workers': 257 is not in the range 1<=x<=256"),
    # Timers and socket timeouts overflow: fwd-ctl drain's wait ended in a traceback.
    (["--drain-timeout", "1e300"], "'--drain-timeout': '1e300' is more than 1e+09 seconds"),
    # Workers report every second: healthy ones were killed every second.
    (["--worker-timeout", "0.5"], "'--worker-timeout': 0.5 is less than 2"),
])
def test_values_that_would_overflow_or_cannot_work_are_refused(args, said) -> None:
    assert said in refused(*args)


@pytest.mark.parametrize("args, env, said", [
    (["--allow", ""], {}, "Invalid value for '--allow': names no network"),
    (["--deny", ","], {}, "Invalid value for '--deny': names no network"),
    # click reads a variable set to "" as unset: a template that left it
    # empty let every client in.
    ([], {"FWD_ALLOW": ""}, "FWD_ALLOW is set but empty"),
    ([], {"FWD_ALLOW_FILE": ""}, "FWD_ALLOW_FILE is set but empty"),
    ([], {"FWD_DENY": ""}, "FWD_DENY is set but empty"),
    # Beside the other form too: the deny file it was meant to name was unused.
    (["--deny", "192.0.2.1"], {"FWD_DENY_FILE": ""}, "FWD_DENY_FILE is set but empty"),
    (["--allow", "127.0.0.1"], {"FWD_ALLOW_FILE": ""}, "FWD_ALLOW_FILE is set but empty"),
    (["--password", "pw"], {"FWD_PASSWORD_FILE": ""}, "FWD_PASSWORD_FILE is set but empty"),
])
def test_an_empty_allow_or_deny_list_is_refused(args, env, said) -> None:
    assert said in refused(*args, env=env)


def test_an_empty_variable_the_command_line_overrides_is_no_error(start_server) -> None:
    """--allow given: FWD_ALLOW is not read, empty or not. Only an empty
    variable that would be read, or that names the other form, is refused."""
    server = start_server("--mode", "chan", "--allow", "127.0.0.1", env={"FWD_ALLOW": ""})
    server.handshake("a")


def test_a_bad_value_from_the_environment_names_its_variable() -> None:
    """The command line had no --max-buffer: the error must say where it came from."""
    said = refused(env={"FWD_MAX_BUFFER": "1XB"})
    assert "Invalid value for '--max-buffer' (from FWD_MAX_BUFFER): not a size: '1XB'" in said
    assert "(from" not in refused("--max-buffer", "1XB")


def test_a_metrics_address_that_cannot_be_bound_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                               "--control", "none", "--workers", "1",
                               "--metrics", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot start: --metrics 127.0.0.1:{port}: Address already in use" in done.stderr


def test_a_stop_signal_while_the_workers_start_stops_at_once() -> None:
    """It waited until every worker had started (with a million, never)."""
    proc = subprocess.Popen([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                             "--control", "none", "--workers", "64", "--log-level", "debug"],
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "worker 0 started" in line:
                proc.send_signal(signal.SIGTERM)
                break
        lines.extend(proc.stderr)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    started = [ln for ln in lines if re.search(r"worker \d+ started", ln)]
    assert len(started) < 64, "every worker started before the signal was heard"
    assert not any("listening on" in ln for ln in lines)


@pytest.mark.parametrize("argv, env", [
    (["-m", "fwd.cli", "--password", os.fsdecode(b"pw\xe9x")], {}),
    (["-c", "from fwd.cli import cat; cat()", "127.0.0.1:9", "--e2e-key",
      os.fsdecode(b"k\xe9y")], {}),
    (["-c", "from fwd.cli import cat; cat()", "127.0.0.1:9"],
     {"FWD_E2E_KEY": os.fsdecode(b"k\xe9y")}),
], ids=["server-password", "cat-e2e-key", "cat-env"])
def test_a_secret_that_is_not_utf8_is_a_usage_error_that_does_not_show_it(argv, env) -> None:
    """Bytes that are not UTF-8 (argv, environment) reached the key
    derivation: fwd-server's worker died with a traceback, and fwd-cat's
    error quoted a character of the secret and where it was."""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert "is not valid UTF-8" in done.stderr
    assert "\\udce9" not in done.stderr and "position" not in done.stderr
