"""Command-line entry points: parse options, build a Config, call the pieces."""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
from typing import Any

import click
from click.core import ParameterSource

from .config import (
    LOG_FORMATS,
    MAX_WORKERS,
    MIN_WORKER_TIMEOUT,
    MODES,
    Config,
    parse_hostport,
    parse_network,
    parse_size,
    read_networks,
)
from .runtime import set_title, setup_logging

GiB = 1 << 30
TiB = 1 << 40


def _envvars(ctx: click.Context, param: click.Parameter) -> list[str]:
    """The environment variables ``param`` is read from."""
    env = param.envvar
    if env is None and ctx.auto_envvar_prefix and param.name:
        env = f"{ctx.auto_envvar_prefix}_{param.name.upper()}"
    return [env] if isinstance(env, str) else list(env or ())


def _refuse_empty_env(what: str, give: str | None = None) -> None:
    """click reads a variable set to "" as unset: for a secret (a template that
    left FWD_PASSWORD empty) that would turn encryption off without a word, and
    for an allow list, let everyone in."""
    ctx = click.get_current_context()
    names = {what.replace("-", "_"), what.replace("-", "_") + "_file"}
    for param in ctx.command.params:
        if param.name not in names \
                or ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
            continue  # the command line overrides its own variable
        for name in _envvars(ctx, param):
            if os.environ.get(name) == "":
                raise click.UsageError(f"{name} is set but empty: unset it or give "
                                       f"{give or 'the ' + what}")


class _Option(click.Option):
    """An error about a value from the environment names the variable: the
    command line had no --max-buffer when FWD_MAX_BUFFER was wrong."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = super().get_error_hint(ctx)
        if ctx is not None and self.name is not None \
                and ctx.get_parameter_source(self.name) is ParameterSource.ENVIRONMENT:
            found = [n for n in _envvars(ctx, self) if os.environ.get(n)]
            hint += f" (from {found[0]})" if found else ""
        return hint


option = functools.partial(click.option, cls=_Option)


class _Size(click.ParamType):
    """Bytes, at most ``most``: past it a value would overflow the C types it
    reaches (uvloop's write buffer limits are C ints) or mean nothing."""

    name = "SIZE"

    def __init__(self, most: int = TiB) -> None:
        self.most = most

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size > self.most:
            self.fail(f"{value!r} is more than {self.most // GiB}GiB", param, ctx)
        return size


class _HostPort(click.ParamType):
    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_hostport(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _nonempty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value == "":
        raise click.BadParameter("must not be empty")
    return value


MAX_SECONDS = 1e9
"""About 31 years: longer durations overflow socket and timer APIs (1e300
made fwd-ctl's --timeout, or a drain's wait, end in a traceback)."""


class Seconds(click.FloatRange):
    """A duration: finite (click's FloatRange takes "nan", which compares
    false with everything and so would mean "never", and "inf"), and at most
    MAX_SECONDS."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if seconds > MAX_SECONDS:
            self.fail(f"{value!r} is more than {MAX_SECONDS:g} seconds", param, ctx)
        return seconds


_SECONDS = Seconds(min=0)
_POSITIVE_SECONDS = Seconds(min=0, min_open=True)
_D = Config()


def _password_options(f: Any) -> Any:
    """--password / --password-file (also FWD_PASSWORD / FWD_PASSWORD_FILE)."""
    f = option("--password-file", type=click.Path(exists=True, dir_okay=False),
               default=None, help="Read the handshake password from this file "
               "(its first line; the rest is ignored).")(f)
    return option("--password", default=None, show_default=False,
                  help="Encrypt the handshake with this password (visible in the "
                  "process list: prefer --password-file or FWD_PASSWORD).")(f)


def _take_password(options: dict[str, Any]) -> str | None:
    """Pop both options and return the password; the error never shows it."""
    return _read_secret(options.pop("password"), options.pop("password_file"), "password")


def _read_secret(value: str | None, path: str | None, what: str) -> str | None:
    """A secret from its option/env value or the first line of a file; never echoed."""
    _refuse_empty_env(what)  # beside the other form too: it was meant to say something
    if value is not None and path is not None:
        raise click.UsageError(f"give --{what} or --{what}-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"cannot read --{what}-file {path}: "
                                   f"{getattr(exc, 'strerror', None) or 'not UTF-8'}") from None
    if value == "":
        raise click.UsageError(f"the {what} must not be empty")
    if value is not None:
        try:
            value.encode("utf-8")  # argv and environment may carry undecodable bytes
        except UnicodeEncodeError:
            raise click.UsageError(f"the {what} is not valid UTF-8") from None
    return value


def _worker_timeout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if 0 < value < MIN_WORKER_TIMEOUT:
        raise click.BadParameter(f"{value:g} is less than {MIN_WORKER_TIMEOUT:g} (workers "
                                 "report once a second; 0 = never kill)")
    return value


def _networks(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[str, ...]:
    # "--allow a,b --allow c" and FWD_ALLOW="a,b c" both mean a, b, c. An
    # empty one is refused: an empty allow list would let everyone in.
    if any(not v.replace(",", "").strip() for v in value or ()):
        raise click.BadParameter("names no network")
    nets = tuple(n for v in value or () for n in v.split(",") if n)
    for n in nets:
        try:
            parse_network(n)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return nets


def _network_file(ctx: click.Context, param: click.Parameter, value: str | None
                  ) -> str | None:
    if value is not None:
        try:
            read_networks(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _env_epilog(examples: str) -> str:
    return ("Every option can also be set in the environment as FWD_ and its name in "
            f"capitals, dashes as underscores: {examples}.")


@click.command(context_settings={"auto_envvar_prefix": "FWD", "show_default": True,
                                 "help_option_names": ["-h", "--help"]},
               epilog=_env_epilog("FWD_MODE=chan, FWD_MAX_CONNS=1000"))
@option("--listen", type=_HostPort(), multiple=True, default=["0.0.0.0:8601"],
        help="Address to listen on; repeat for several ([::]:8601 for IPv6).")
@option("--mode", type=click.Choice(MODES), default=_D.mode,
        help="chan: clients handshake and name receivers; broadcast: all to all.")
@option("--workers", type=click.IntRange(min=1, max=MAX_WORKERS), default=_D.workers,
        help="Worker processes that forward bytes (default: the CPUs it may run "
        "on, as nproc counts them).")
@option("--handshake-timeout", type=_SECONDS, default=_D.handshake_timeout,
        help="Seconds a client has to finish the handshake (0 = no limit).")
@option("--idle-timeout", type=_SECONDS, default=_D.idle_timeout,
        help="Close sessions idle this many seconds, unless hs3 sets its own (0 = off).")
@option("--max-buffer", type=_Size(GiB), default=str(_D.max_buffer),
        help="High-water mark of each session's outgoing buffer; senders wait above it.")
@option("--slow-timeout", type=_SECONDS, default=_D.slow_timeout,
        help="Disconnect a receiver that stays above its high-water mark (--max-buffer; "
             "64 KiB for the one receiver of a 1:1 route) this long (0 = never).")
@option("--hold-bytes", type=_Size(), default=str(_D.hold_bytes),
        help="Bytes held per absent chan receiver, from each sender, until it "
             "connects.")
@option("--hold-seconds", type=_SECONDS, default=_D.hold_seconds,
        help="How long held bytes wait for their receiver.")
@option("--hold-total", type=_Size(), default=str(_D.hold_total),
        help="Cap on the memory held bytes take, over all absent receivers "
        "and workers.")
@option("--max-conns", type=click.IntRange(min=1), default=_D.max_conns,
        help="Connections beyond this are closed at once.")
@option("--max-conns-per-ip", type=click.IntRange(min=0), default=_D.max_conns_per_ip,
        help="Connections from one address beyond this are closed at once; IPv6 "
             "counts by /64. Clients behind one NAT share an address (0 = no limit).")
@option("--allow", multiple=True, metavar="NET", callback=_networks,
        help="Take clients only from these addresses or networks (192.0.2.7, "
             "10.0.0.0/8, 2001:db8::/32; repeat or comma-separate) [default: any].",
        show_default=False)
@option("--deny", multiple=True, metavar="NET", callback=_networks,
        help="Refuse clients from these addresses or networks, even if --allow "
             "names them.")
@option("--allow-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
        callback=_network_file,
        help="More --allow networks, one or more a line, # for comments; read again "
             "by `fwd-ctl reload`. Given, it makes an allow list even when empty.")
@option("--deny-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
        callback=_network_file,
        help="More --deny networks, as --allow-file; read again by `fwd-ctl reload`.")
@option("--max-rate", type=_Size(), default=str(_D.max_rate), metavar="SIZE",
        help="Bytes per second each client may send into the relay (1MiB, 64KiB...), "
             "after a first second's worth at once; a client above it is paused, as "
             "by a slow receiver (0 = no limit; turns off pumps).")
@option("--splice-min", type=_Size(), default=str(_D.splice_min),
        help="A read this big sends that stream to its local receivers through "
             "a pipe with splice(2), without copying it; to several by tee(2), "
             "unless the congestion control is BBR (0 = never).")
@option("--pump-pairs", type=click.IntRange(min=0), default=_D.pump_pairs,
        help="1:1 pairs per worker that get two threads, one per direction, "
             "blocking in recv/send or splice(2) instead of the event loop: bulk "
             "pairs, and pairs past 64 reads until quiet for 2 s (0 = none; "
             "needs --splice-min).")
@option("--tcp-congestion", default=None, metavar="NAME",
        help="TCP congestion control of client connections (cubic, reno, bbr...) "
        "[default: the system's].")
@option("--takeover/--no-takeover", default=_D.takeover,
        help="A new session claiming a held chid replaces the old one.")
@option("--drain-timeout", type=_SECONDS, default=_D.drain_timeout,
        help="On SIGTERM/SIGINT/SIGHUP, how long queued bytes may take to reach "
        "receivers.")
@option("--worker-timeout", type=_SECONDS, default=_D.worker_timeout,
        callback=_worker_timeout,
        help="Kill and restart a worker that has not answered for this long (hung, "
             "or stopped), 2 s at least; one silent for 3 s already gets no new "
             "connections (0 = never kill).")
@_password_options
@option("--control", default=None, metavar="PATH", callback=_nonempty,
        help="Unix socket for fwd-ctl (mode 0600); 'none' for no control socket  "
             "[default: $XDG_RUNTIME_DIR or /tmp, fwd-PORT.ctl, PORT the first listen "
             "port].")
@option("--metrics", type=_HostPort(), default=None,
        help="Serve Prometheus metrics at http://HOST:PORT/metrics, and /healthz "
             "[default: off].")
@option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
        default=_D.log_level)
@option("--log-format", type=click.Choice(LOG_FORMATS), default=_D.log_format,
        help="text: one readable line per record; json: one JSON object per line.")
def server(**options: Any) -> None:
    """Relay raw TCP bytes between clients that connect to it."""
    options["listen"] = list(options["listen"])
    for what in ("allow", "deny"):  # also beside the other form (FWD_DENY_FILE= --deny X)
        _refuse_empty_env(what, "a network")
    options["password"] = _take_password(options)
    config = Config(**options)
    setup_logging(config.log_level, "acceptor", config.log_format)
    set_title("fwd-server: acceptor")
    from .arbiter import run

    try:
        code = run(config)
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    sys.exit(code)


def _split_recvers(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[str, ...]:
    # "--recvers a,b --recvers c" and FWD_RECVERS="a,b c" both mean a, b, c.
    return tuple(r for v in value or () for r in v.split(",") if r)


@click.command(context_settings={"auto_envvar_prefix": "FWD", "show_default": True,
                                 "help_option_names": ["-h", "--help"]},
               epilog=_env_epilog("FWD_SERVER0=relay:8601, FWD_RECVERS=user"))
@option("--server0", type=_HostPort(), default="127.0.0.1:8601",
        help="The fwd-server to join (the public side).")
@option("--server1", type=_HostPort(), default="127.0.0.1:8080",
        help="The service to expose (usually on the LAN).")
@option("--chid", default=None, help="Chan handshake on server0: the chid to claim.")
@option("--recvers", multiple=True, callback=_split_recvers,
        help="Chan handshake: receivers of our bytes (repeat or comma-separate).")
@option("--senders", multiple=True, callback=_split_recvers,
        help="Chan handshake: the only chids whose bytes reach the service (repeat or "
             "comma-separate) [default: the --recvers, if any].", show_default=False)
@option("--any-sender", is_flag=True,
        help="Chan handshake: let every chid's bytes reach the service, also those "
             "sent to everyone, even with --recvers.")
@option("--timeout", type=click.IntRange(min=0), default=None,
        help="Chan handshake: idle timeout (seconds) the server applies to our session.")
@option("--handshake/--no-handshake", default=None,
        help="Force the chan handshake on or off [default: on if --chid, --recvers, "
             "--senders, --timeout or a password is given].", show_default=False)
@option("--on-close", type=click.Choice(["both", "one"]), default="both",
        help="When one side closes: both = end the pair and start a fresh one; "
             "one = reconnect only that side.")
@option("--connect", type=click.Choice(["lazy", "eager"]), default="lazy",
        help="lazy: connect server1 when server0 first sends bytes; eager: right after "
             "server0 (for services that speak first).")
@option("--max-retries", type=click.IntRange(min=0), default=None,
        help="Give up when a side fails again after this many retries in a row "
             "(0: at its first failure) [default: never].")
@option("--connect-timeout", type=_POSITIVE_SECONDS, default=10.0,
        help="Seconds allowed for a connect plus handshake.")
@option("--service-wait", type=_SECONDS, default=5.0,
        help="With --on-close both: seconds bytes from the relay wait for the service "
             "to accept a connection before the relay session is reset (0: at once).")
@_password_options
@option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
        default="info")
@option("--log-format", type=click.Choice(LOG_FORMATS), default="text",
        help="text: one readable line per record; json: one JSON object per line.")
def client(**options: Any) -> None:
    """Connect out to a fwd-server (server0) and a service (server1), and copy bytes
    between them; listens on nothing."""
    from .bridge import BridgeOptions, run

    options["password"] = _take_password(options)
    handshake = options.pop("handshake")
    senders, any_sender = options.pop("senders"), options.pop("any_sender")
    if senders and any_sender:
        raise click.UsageError("--senders and --any-sender exclude each other")
    wants = bool(options["chid"] or options["recvers"] or senders
                 or options["timeout"] is not None or options["password"] is not None)
    if handshake is None:
        handshake = wants
    elif not handshake and wants:
        raise click.UsageError("--chid, --recvers, --senders, --timeout and --password need "
                               "the handshake")
    # The service answers whoever it hears, and its answers go to the --recvers
    # only: by default it hears only them, not every sender to "everyone else".
    if handshake and not any_sender:
        options["senders"] = senders or options["recvers"] or None
    setup_logging(options.pop("log_level"), "client", options.pop("log_format"))
    try:
        opts = BridgeOptions(handshake=handshake, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run(opts))


CAT_EXIT_ERROR = 1
"""fwd-cat: cannot connect, connection lost, local I/O error."""
CAT_EXIT_REJECTED = 3
"""fwd-cat: the server refused the handshake (same code as fwd-client)."""
CAT_EXIT_E2E = 4
"""fwd-cat: the end-to-end encrypted stream was not authentic or was cut short."""


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("address", type=_HostPort(), metavar="HOST:PORT")
@option("--chid", default=None, help="Handshake: the chid to claim [default: server picks].")
@option("--to", "recvers", multiple=True, callback=_split_recvers,
        help="Handshake: a receiver of our bytes (repeat or comma-separate) "
             "[default: everyone else].")
@option("--from", "senders", multiple=True, callback=_split_recvers,
        help="Handshake: receive only from this chid (repeat or comma-separate) "
             "[default: the --to chids, if any; else anyone].")
@option("--from-anyone", is_flag=True,
        help="Handshake: receive from every chid, also those sending to everyone, "
             "even with --to.")
@option("--timeout", type=click.IntRange(min=0), default=None,
        help="Handshake: idle timeout (seconds) the server applies to our session.")
@option("--handshake/--no-handshake", default=None,
        help="Force the handshake on or off [default: on if --chid, --to, --from, "
             "--timeout or a password is given; off is a plain broadcast client].")
@option("--password", envvar="FWD_PASSWORD", default=None,
        help="Handshake password (server --password); visible in the process list, "
             "prefer FWD_PASSWORD or --password-file.")
@option("--password-file", type=click.Path(dir_okay=False), default=None,
        envvar="FWD_PASSWORD_FILE",
        help="Read the handshake password from this file's first line.")
@option("--e2e-key", envvar="FWD_E2E_KEY", default=None,
        help="Shared secret: encrypt the stream end to end (every peer needs it); "
             "prefer FWD_E2E_KEY or --e2e-key-file.")
@option("--e2e-key-file", type=click.Path(dir_okay=False), default=None,
        envvar="FWD_E2E_KEY_FILE",
        help="Read the end-to-end secret from this file's first line.")
@option("--connect-timeout", type=_POSITIVE_SECONDS, default=10.0,
        show_default=True, help="Seconds allowed for connect plus handshake.")
@option("--linger", type=_SECONDS, default=0.5, show_default=True,
        help="Once the relay ended the stream toward us, end ours when stdin has "
             "been quiet this long (a file is always sent to its end).")
@option("--recv-only", "-d", is_flag=True,
        help="Do not read stdin (nc -d): only receive; our direction ends when the "
             "relay's does. For a receiver whose stdin is not a terminal.")
def cat(address: tuple[str, int], chid: str | None, recvers: tuple[str, ...],
        senders: tuple[str, ...], from_anyone: bool, timeout: int | None,
        handshake: bool | None, password: str | None,
        password_file: str | None, e2e_key: str | None, e2e_key_file: str | None,
        connect_timeout: float, linger: float, recv_only: bool) -> None:
    """Copy stdin to a fwd-server session and the session to stdout (netcat for fwd).

    Each direction ends on its own. At EOF on stdin the session is half-closed
    (in a chan pair the partner gets the FIN) and fwd-cat keeps reading. When
    the relay ends the stream toward us, the partner may still be reading:
    fwd-cat sends what stdin still has (a file to its end, a pipe or terminal
    until it is quiet for --linger), half-closes and exits.
    Exit status: 0 done, 1 connection or I/O error, 2 usage, 3 handshake
    refused, 4 end-to-end stream not authentic or cut short.
    """
    from .client import HandshakeError, HandshakeTimeout, StdioError, connect, splice_stdio
    from .e2e import E2EError

    password = _read_secret(password, password_file, "password")
    secret = _read_secret(e2e_key, e2e_key_file, "e2e-key")
    if senders and from_anyone:
        raise click.UsageError("--from and --from-anyone exclude each other")
    wants = bool(chid or recvers or senders or timeout is not None or password is not None)
    if handshake is None:
        handshake = wants
    elif not handshake and wants:
        raise click.UsageError("--chid, --to, --from, --timeout and --password need the "
                               "handshake")
    # As nc talks with the one peer it connected to: a stranger sending to
    # everyone else must not land in our output (as fwd-client's --senders).
    if not senders and not from_anyone:
        senders = recvers
    if sys.stdout is None:  # started with >&-
        raise click.UsageError("stdout is closed: nowhere to write what the relay sends")
    recv_only = recv_only or sys.stdin is None  # <&-: nothing to send, as -d
    host, port = address
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    def die(message: str, code: int) -> None:
        click.echo(f"fwd-cat: {message}", err=True)
        sys.exit(code)

    # SIGTERM and SIGHUP cut the stream as Ctrl-C does: with a reset, never
    # the FIN (or FINAL record) that would tell the peer it got everything.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    try:
        try:
            conn = connect(host, port, chid, recvers, timeout, password, secret,
                           handshake=handshake, connect_timeout=connect_timeout,
                           senders=senders or None)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        except HandshakeError as exc:
            return die(f"{where}: {exc}", CAT_EXIT_REJECTED)
        except HandshakeTimeout as exc:
            return die(f"{where}: {exc}", CAT_EXIT_ERROR)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or exc)
            return die(f"cannot connect to {where}: {reason}", CAT_EXIT_ERROR)
        try:
            splice_stdio(conn, None if recv_only or sys.stdin is None else sys.stdin.fileno(),
                         sys.stdout.fileno(), linger)
        except StdioError as exc:
            return die(str(exc.strerror), CAT_EXIT_ERROR)
        except HandshakeError as exc:
            return die(f"{where}: {exc}", CAT_EXIT_REJECTED)
        except E2EError as exc:
            return die(f"end-to-end decryption: {exc}", CAT_EXIT_E2E)
        except (ConnectionResetError, BrokenPipeError):  # EPIPE: a send after the reset
            return die(f"{where}: the server reset the connection; what was sent may not "
                       "all have been delivered (the server's log says why)", CAT_EXIT_ERROR)
        except OSError as exc:
            return die(f"{where}: {exc.strerror or exc}", CAT_EXIT_ERROR)
        finally:
            # Ended on purpose, or cut (an error, Ctrl-C, stdout gone): then a
            # reset, so the peer cannot take what it got for the whole stream.
            if conn.write_closed:
                conn.close()
            else:
                conn.abort()
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except _Stopped as exc:
        sys.exit(128 + exc.signum)


class _Stopped(BaseException):
    """A signal that ends fwd-cat (as KeyboardInterrupt does for SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


if __name__ == "__main__":  # pragma: no cover
    server()
