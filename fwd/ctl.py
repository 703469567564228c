"""fwd-ctl: look at and steer a running fwd-server through its control socket.

Human output is aligned tables with sizes in binary units; ``--json`` prints
the server's reply as it came, for scripts. Any failure is one line on stderr
and exit status 1 (2 for usage errors, as click does).
"""
from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from . import control
from .cli import MAX_SECONDS, Seconds

T = TypeVar("T")

EXIT_ERROR = 1


def human_size(n: int) -> str:
    """``1536`` → ``1.5 KiB``; bytes stay exact below 1 KiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(secs: float) -> str:
    """``3723.4`` → ``1h02m03s``; under a minute with one decimal."""
    if secs < 60:
        return f"{secs:.1f}s"
    s = int(secs)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    text = f"{h}h{m:02d}m{s:02d}s" if h or d else f"{m}m{s:02d}s"
    return f"{d}d{text}" if d else text


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; ``right`` marks right-aligned ones."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = right or [False] * len(header)
    lines = []
    for r in cells:
        parts = [c.rjust(w) if ra else c.ljust(w)
                 for c, w, ra in zip(r, widths, right, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _most_first(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))


def format_status(st: dict[str, Any]) -> str:
    t = st["totals"]
    failures = ", ".join(f"{k} {v}" for k, v in sorted(st["failures"].items()) if v)
    ends = ", ".join(f"{k} {v}" for k, v in _most_first(st.get("ends", {})))
    drops = ", ".join(f"{k} {human_size(v)}" for k, v in _most_first(st.get("drops", {})))
    summary = [
        ("pid", st["pid"]),
        ("uptime", human_seconds(st["uptime"])),
        ("mode", st["mode"]),
        ("listen", ", ".join(st["listen"])),
        ("sessions", f"{t.get('sessions', 0)} live, {t.get('open_connections', 0)} "
                     f"connections open, {t.get('sessions_total', 0)} since start"),
        ("bytes in", human_size(t.get("bytes_in", 0))),
        ("bytes out", human_size(t.get("bytes_out", 0))),
        ("cross-worker", human_size(t.get("cross_worker_bytes", 0))),
        ("held", f"{human_size(t.get('held_bytes', 0))} "
                 f"({human_size(t.get('held_memory', 0))} of memory with bookkeeping)"),
        ("queued", human_size(t.get("buffered_bytes", 0))),
        ("spliced sessions", t.get("spliced_sessions", 0)),
        ("pumped pairs", f"{t.get('pumped_pairs_now', 0)} now, "
                         f"{t.get('pumped_pairs', 0)} since start"),
        ("session ends", ends or "none"),
        ("dropped", human_size(t.get("dropped_bytes", 0)) + (f" ({drops})" if drops else "")),
        ("slow-consumer disconnects", t.get("slow_disconnects", 0)),
        ("rate-limit pauses", t.get("throttled", 0)),
        ("handshake failures", f"{t.get('handshake_failures', 0)}"
                               + (f" ({failures})" if failures else "")),
        ("refused connections", t.get("rejected", 0)),
    ]
    if st.get("busiest_addresses"):  # with --max-conns-per-ip
        summary.append(("busiest addresses",
                        ", ".join(f"{key} {n}" for key, n in st["busiest_addresses"])))
    width = max(len(k) for k, _ in summary)
    lines = [f"{k.ljust(width)}  {v}" for k, v in summary]
    rows = []
    for w in st["workers"]:
        if "error" in w:
            rows.append([w["worker"], w.get("pid") or "-", "-", "-", "-", "-", w["error"]])
        else:
            rows.append([w["worker"], w["pid"], w["sessions"], w["connections"],
                         human_size(w["bytes_in"]), human_size(w["bytes_out"]),
                         human_seconds(w["uptime"])])
    lines += ["", table(["WORKER", "PID", "SESSIONS", "CONNS", "BYTES IN", "BYTES OUT",
                         "UPTIME"], rows, [True, True, True, True, True, True, False])]
    return "\n".join(lines)


def _recvers(r: list[str] | None, limit: int = 40) -> str:
    text = "*" if not r else ",".join(r)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_sessions(reply: dict[str, Any]) -> str:
    rows = sorted(reply["sessions"], key=lambda s: (s["worker"], s["chid"] or "", s["peer"]))
    out = table(
        ["CHID", "PEER", "WORKER", "STATE", "RECVERS", "IN", "OUT", "QUEUED", "IDLE"],
        [[s["chid"] if s["chid"] is not None else "-", s["peer"], s["worker"], s["state"],
          _recvers(s["recvers"]), human_size(s["bytes_in"]), human_size(s["bytes_out"]),
          human_size(s["buffered"]), human_seconds(s["idle"])] for s in rows],
        [False, False, True, False, False, True, True, True, True])
    notes = [f"worker {e['worker']}: {e['error']}" for e in reply.get("errors", [])]
    return "\n".join([out, *notes])


def _die(message: str) -> NoReturn:
    click.echo(f"fwd-ctl: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _check_owner(path: str) -> None:
    """Talk only to a socket of our own user or root: anyone can make a file in
    /tmp, and a stranger's socket must not receive our commands. Root may also
    use a service user's socket, but not in a directory others can write to:
    there the stranger could have made it."""
    try:
        st = os.stat(path)
    except OSError:
        return  # connect reports it
    me = os.geteuid()
    if st.st_uid not in (0, me):
        where = os.path.dirname(os.path.abspath(path))
        if me != 0:
            _die(f"{path} belongs to uid {st.st_uid}, not to you: not using it")
        if os.stat(where).st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            _die(f"{path} belongs to uid {st.st_uid}, in {where}, which others can write "
                 f"to: not using it (run fwd-ctl as that user, or give the server a "
                 f"--control path in a directory of its own)")
    if not stat.S_ISSOCK(st.st_mode):
        _die(f"{path} is not a socket")


def _formatted(fmt: Callable[[dict[str, Any]], T], reply: dict[str, Any]) -> T:
    """A reply without the fields a fwd-server sends (another program on the
    socket, another version) is one line on stderr, not a traceback."""
    try:
        return fmt(reply)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        _die(f"unexpected reply (not from this fwd-server version?): {exc!r}")


class _Ctl:
    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    def connect(self) -> control.Client:
        _check_owner(self.path)
        try:
            return control.Client(self.path, self.timeout)
        except FileNotFoundError:
            _die(f"no control socket at {self.path}: is fwd-server running? "
                 "(--port or --control selects the server)")
        except OSError as exc:
            _die(f"cannot connect to {self.path}: {exc.strerror or exc}")

    def call(self, request: dict[str, Any], client: control.Client | None = None
             ) -> dict[str, Any]:
        own = client is None
        client = client or self.connect()
        try:
            reply = client.call(request)
        except TimeoutError:
            _die(f"no reply from {self.path} within {self.timeout:g}s")
        except (OSError, ValueError, control.ControlError) as exc:
            _die(f"{self.path}: {exc}")
        finally:
            if own:
                client.close()
        if not reply.get("ok"):
            _die(str(reply.get("error", "request failed")))
        return reply


@click.group(context_settings={"auto_envvar_prefix": "FWD",
                               "help_option_names": ["-h", "--help"]})
# FWD_CONTROL, as fwd-server's --control (the parameter's own name would make it FWD_PATH).
@click.option("--control", "path", default=None, metavar="PATH", envvar="FWD_CONTROL",
              allow_from_autoenv=False,
              help="The server's control socket [default: derived from --port].")
@click.option("--port", type=click.IntRange(1, 65535), default=8601, show_default=True,
              help="Listen port of the server, to find its default control socket.")
# Not FWD_TIMEOUT: that is fwd-client's session idle timeout.
@click.option("--timeout", type=Seconds(min=0, min_open=True), default=10.0,
              envvar="FWD_CTL_TIMEOUT", allow_from_autoenv=False, show_default=True,
              help="Seconds to wait for a reply.")
@click.pass_context
def main(ctx: click.Context, path: str | None, port: int, timeout: float) -> None:
    """Look at and steer a running fwd-server."""
    ctx.obj = _Ctl(path or control.default_path(port), timeout)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON reply.")
@click.pass_obj
def status(ctl: _Ctl, as_json: bool) -> None:
    """Uptime, mode, workers and totals."""
    reply = ctl.call({"cmd": "status"})
    click.echo(json.dumps(reply, indent=2) if as_json else _formatted(format_status, reply))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON reply.")
@click.pass_obj
def sessions(ctl: _Ctl, as_json: bool) -> None:
    """One row per connection: chid, peer, worker, receivers, bytes, queue, idle time."""
    reply = ctl.call({"cmd": "sessions"})
    click.echo(json.dumps(reply, indent=2) if as_json else _formatted(format_sessions, reply))


@main.command()
@click.argument("chid", required=False)
@click.option("--peer", metavar="HOST:PORT",
              help="Close the session connected from this address instead (as `sessions` "
                   "shows it): a plain broadcast client has no chid.")
@click.pass_obj
def kick(ctl: _Ctl, chid: str | None, peer: str | None) -> None:
    """Close the session holding CHID (its receivers keep their connections, but
    the other half of a chan pair is closed with it)."""
    if (chid is None) == (peer is None):
        raise click.UsageError("give a CHID or --peer" + ("" if chid is None else ", not both"))
    if peer is not None:
        ctl.call({"cmd": "kick-peer", "peer": peer})
        click.echo(f"kicked {peer}")
    else:
        ctl.call({"cmd": "kick", "chid": chid})
        click.echo(f"kicked {chid}")


@main.command()
@click.pass_obj
def reload(ctl: _Ctl) -> None:
    """Read --allow-file and --deny-file again (new connections only; a file
    with an error changes nothing)."""
    click.echo(_formatted(format_reload, ctl.call({"cmd": "reload"})))


def _drain_timeout(reply: dict[str, Any]) -> float:
    seconds = float(reply.get("drain_timeout", 5.0))
    if not 0 <= seconds <= MAX_SECONDS:  # nan too: a socket timeout must be a number
        raise ValueError(f"drain_timeout {seconds!r}")
    return seconds


def format_reload(reply: dict[str, Any]) -> str:
    if not reply.get("files"):
        return "nothing to reload: the server has no --allow-file or --deny-file"

    def networks(n: int) -> str:
        return f"{int(n)} network" + ("" if n == 1 else "s")

    allow = "any address" if reply["allow"] is None else networks(reply["allow"])
    return (f"reloaded {' and '.join(reply['files'])}: allow {allow}, "
            f"deny {networks(reply['deny'])}")


@main.command()
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the server has exited.")
@click.pass_obj
def drain(ctl: _Ctl, wait: bool) -> None:
    """Stop the server gracefully, as SIGTERM does: stop accepting, flush, exit."""
    client = ctl.connect()
    try:
        reply = ctl.call({"cmd": "drain"}, client)
        if wait:
            limit = _formatted(_drain_timeout, reply) + 10.0
            if not client.wait_closed(limit):
                _die(f"the server has not exited within {limit:g}s")
    finally:
        client.close()
    click.echo("drained" if wait else "draining")


if __name__ == "__main__":  # pragma: no cover
    main()
