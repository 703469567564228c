"""Command-line entry points: parse options, build a Config, call the pieces."""
from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .config import MODES, Config, parse_hostport, parse_size


class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


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


_SECONDS = click.FloatRange(min=0)
_D = Config()


@click.command(context_settings={"auto_envvar_prefix": "FWD", "show_default": True,
                                 "help_option_names": ["-h", "--help"]})
@click.option("--listen", type=_HostPort(), multiple=True, default=["0.0.0.0:8601"],
              help="Address to listen on; repeat for several ([::]:8601 for IPv6).")
@click.option("--mode", type=click.Choice(MODES), default=_D.mode,
              help="chan: clients handshake and name receivers; broadcast: all to all.")
@click.option("--workers", type=click.IntRange(min=1), default=_D.workers,
              help="Worker processes (only 1 is implemented so far).")
@click.option("--handshake-timeout", type=_SECONDS, default=_D.handshake_timeout,
              help="Seconds a client has to finish the handshake (0 = no limit).")
@click.option("--idle-timeout", type=_SECONDS, default=_D.idle_timeout,
              help="Close sessions idle this many seconds, unless hs3 sets its own (0 = off).")
@click.option("--max-buffer", type=_Size(), default=str(_D.max_buffer),
              help="High-water mark of each session's outgoing buffer; senders wait above it.")
@click.option("--slow-timeout", type=_SECONDS, default=_D.slow_timeout,
              help="Disconnect a receiver that stays above --max-buffer this long (0 = never).")
@click.option("--hold-bytes", type=_Size(), default=str(_D.hold_bytes),
              help="Bytes held per absent chan receiver until it connects.")
@click.option("--hold-seconds", type=_SECONDS, default=_D.hold_seconds,
              help="How long held bytes wait for their receiver.")
@click.option("--hold-total", type=_Size(), default=str(_D.hold_total),
              help="Cap on held bytes over all absent receivers.")
@click.option("--max-conns", type=click.IntRange(min=1), default=_D.max_conns,
              help="Connections beyond this are closed at once.")
@click.option("--takeover/--no-takeover", default=_D.takeover,
              help="A new session claiming a held chid replaces the old one.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default=_D.log_level)
def server(**options: Any) -> None:
    """Relay raw TCP bytes between clients that connect to it."""
    options["listen"] = list(options["listen"])
    if options["workers"] != 1:
        raise click.UsageError("--workers > 1 is not implemented yet; run with --workers 1")
    config = Config(**options)
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .worker import run

    try:
        run(config)
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc}") from None


def _split_recvers(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[str, ...]:
    # "--recvers a,b --recvers c" and FWD_RECVERS="a,b c" both mean a, b, c.
    return tuple(r for v in value or () for r in v.split(",") if r)


@click.command(context_settings={"auto_envvar_prefix": "FWD", "show_default": True,
                                 "help_option_names": ["-h", "--help"]})
@click.option("--server0", type=_HostPort(), default="127.0.0.1:8601",
              help="The fwd-server to join (the public side).")
@click.option("--server1", type=_HostPort(), default="127.0.0.1:8080",
              help="The service to expose (usually on the LAN).")
@click.option("--chid", default=None, help="Chan handshake on server0: the chid to claim.")
@click.option("--recvers", multiple=True, callback=_split_recvers,
              help="Chan handshake: receivers of our bytes (repeat or comma-separate).")
@click.option("--timeout", type=click.IntRange(min=0), default=None,
              help="Chan handshake: idle timeout (seconds) the server applies to our session.")
@click.option("--handshake/--no-handshake", default=None,
              help="Force the chan handshake on or off [default: on if --chid, --recvers or "
                   "--timeout is given].", show_default=False)
@click.option("--on-close", type=click.Choice(["both", "one"]), default="both",
              help="When one side closes: both = end the pair and start a fresh one; "
                   "one = reconnect only that side.")
@click.option("--connect", type=click.Choice(["lazy", "eager"]), default="lazy",
              help="lazy: connect server1 when server0 first sends bytes; eager: right after "
                   "server0 (for services that speak first).")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="Give up after this many consecutive failures of one side [default: never].")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="Seconds allowed for a connect plus handshake.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info")
def client(**options: Any) -> None:
    """Connect out to a fwd-server (server0) and a service (server1), and copy bytes
    between them; listens on nothing."""
    from .bridge import BridgeOptions, run

    handshake = options.pop("handshake")
    if handshake is None:
        handshake = bool(options["chid"] or options["recvers"] or options["timeout"] is not None)
    logging.basicConfig(
        level=options.pop("log_level").upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        opts = BridgeOptions(handshake=handshake, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run(opts))


if __name__ == "__main__":  # pragma: no cover
    server()
