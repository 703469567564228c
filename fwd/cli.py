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


if __name__ == "__main__":  # pragma: no cover
    server()
