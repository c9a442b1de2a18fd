"""The ``sealtorch`` command line.

This package is the only place that configures logging and decides exit codes. Subcommands live
in their own modules and are imported only when used, so ``sealtorch --help`` stays fast and
never imports PyTorch.
"""

from sealtorch.cli._app import cli, main

__all__ = ["cli", "main"]
