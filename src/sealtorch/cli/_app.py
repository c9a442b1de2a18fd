"""Root command group, lazy subcommand loading, logging setup and error → exit code mapping."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from sealtorch import __version__
from sealtorch.cli._logging import configure_logging
from sealtorch.errors import Error, KeyReleaseError, PolicyDenied, ReleaseStatementError

# name -> "module:attribute"; modules are imported only when the command runs or shows help.
_COMMANDS: dict[str, str] = {
    "demo": "sealtorch.cli.demo:demo",
    "keygen": "sealtorch.cli.owner:keygen",
    "encrypt": "sealtorch.cli.owner:encrypt",
    "inspect": "sealtorch.cli.owner:inspect_cmd",
    "decrypt": "sealtorch.cli.owner:decrypt",
    "rewrap": "sealtorch.cli.owner:rewrap",
    "attest": "sealtorch.cli.attest:attest",
    "keyserver": "sealtorch.cli.keyserver:keyserver",
    "admin": "sealtorch.cli.admin:admin",
    "keycache": "sealtorch.cli.keycache:keycache",
    "serve": "sealtorch.cli.serve:serve",
    "deploy": "sealtorch.deploy.cli:deploy",
}

# Order in `sealtorch --help`: the model owner's daily commands first.
_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Model owner", ("keygen", "encrypt", "inspect", "decrypt", "rewrap")),
    ("Services", ("keyserver", "admin", "keycache", "serve")),
    ("Attestation", ("attest",)),
    ("Deployment", ("deploy",)),
    ("Try it", ("demo",)),
)


class _LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._available(ctx)})

    def _available(self, ctx: click.Context) -> list[str]:
        del ctx
        return [name for name in self._lazy if self._module_exists(name)]

    def _module_exists(self, name: str) -> bool:
        module = self._lazy[name].partition(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy and self._module_exists(cmd_name):
            module_name, _, attr = self._lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):  # pragma: no cover - programming error
                raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
            _add_output_options(command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        available = set(self.list_commands(ctx))
        shown: set[str] = set()
        for title, names in _SECTIONS:
            rows = []
            for name in names:
                if name not in available:
                    continue
                command = self.get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(limit=formatter.width - 20)))
                shown.add(name)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = sorted(available - shown)
        if rest:
            with formatter.section("Other commands"):
                formatter.write_dl(
                    [
                        (name, cmd.get_short_help_str())
                        for name in rest
                        if (cmd := self.get_command(ctx, name)) is not None
                    ]
                )

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Error as exc:
            _report(exc)
            ctx.exit(exc.exit_code)


# -- output options (-v/-q) -------------------------------------------------------------------
#
# `sealtorch -q encrypt ...` and `sealtorch encrypt ... -q` mean the same: the root command and
# every subcommand accept -v/-q, and each occurrence updates the settings the root keeps in its
# context object and reconfigures logging.

_VERBOSE_HELP = "More log output (-v: info, -vv: debug)."
_QUIET_HELP = "Only errors; no progress bars or informational output."


def _configure_output(ctx: click.Context, *, verbose: int = 0, quiet: bool = False) -> None:
    """Add ``verbose``/``quiet`` to the root's output settings and configure logging by them."""
    root = ctx.find_root()
    settings = root.ensure_object(dict)
    settings["verbose"] = settings.get("verbose", 0) + verbose
    settings["quiet"] = bool(settings.get("quiet")) or quiet
    levels = (logging.WARNING, logging.INFO, logging.DEBUG)
    level = logging.ERROR if settings["quiet"] else levels[min(settings["verbose"], 2)]
    configure_logging(level=level, json_format=settings.get("log_format") == "json")


def _more_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    del param
    if value:
        _configure_output(ctx, verbose=value)


def _be_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    del param
    if value:
        _configure_output(ctx, quiet=True)


def _add_output_options(command: click.Command) -> None:
    """Let ``command`` and, for a group, each of its subcommands take -v/-q (once)."""
    names = {name for param in command.params for name in param.opts}
    if "--quiet" not in names:
        command.params.extend(
            [
                click.Option(
                    ["-v", "--verbose"],
                    count=True,
                    expose_value=False,
                    callback=_more_verbose,
                    help=_VERBOSE_HELP,
                ),
                click.Option(
                    ["-q", "--quiet"],
                    is_flag=True,
                    expose_value=False,
                    callback=_be_quiet,
                    help=_QUIET_HELP,
                ),
            ]
        )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_output_options(sub)


def _report(exc: Error) -> None:
    message = str(exc)
    click.secho(f"error: {message}", fg="red", err=True)
    reasons: tuple[str, ...] = ()
    if isinstance(exc, PolicyDenied | KeyReleaseError | ReleaseStatementError):
        reasons = exc.reasons
    if reasons:
        click.secho("reasons: " + ", ".join(reasons), fg="red", err=True)
    cause = exc.__cause__
    if cause is not None and logging.getLogger("sealtorch").isEnabledFor(logging.DEBUG):
        click.echo(f"caused by: {type(cause).__name__}: {cause}", err=True)


_EPILOG = """\b
Start here:
  sealtorch demo                          the whole system on this machine, in one command
  sealtorch keygen -o model.key           a new 256-bit model key (mode 0600)
  sealtorch encrypt model.safetensors -o model.sealed --model-id resnet50 \\
      --key-file model.key --arch torchvision:resnet50
  sealtorch inspect model.sealed          what a sealed file reveals (only key-lookup fields)

\b
Run `sealtorch COMMAND --help` for the details of each command.
Docs: docs/format.md, docs/protocol.md, docs/policy.md, docs/deployment.md.
"""


@click.group(
    cls=_LazyGroup,
    lazy=_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EPILOG,
)
@click.version_option(__version__, "-V", "--version", prog_name="sealtorch")
@click.option("-v", "--verbose", count=True, help=_VERBOSE_HELP + " Also after the command.")
@click.option("-q", "--quiet", is_flag=True, help=_QUIET_HELP + " Also after the command.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="SEALTORCH_LOG_FORMAT",
    help="Log line format; json writes one structured record per line (for log shippers).",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, log_format: str) -> None:
    """sealtorch: deploy PyTorch models that can be used but not seen.

    The model owner seals a model (`encrypt`); a key server releases its key only to an enclave
    that proves, by remote attestation, what code it runs; the enclave decrypts the model in
    memory and serves predictions.
    """
    ctx.ensure_object(dict)["log_format"] = log_format
    _configure_output(ctx, verbose=verbose, quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``sealtorch``): exit 0 ok, 1 error, 2 usage, 130 interrupted."""
    try:
        result = cli.main(args=argv, prog_name="sealtorch", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
