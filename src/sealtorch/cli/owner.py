"""The model owner's commands: keygen, encrypt, inspect, decrypt, rewrap.

How the file's content key gets wrapped is decided in one place, :func:`_sealing_wrapper`, so a
remote wrapper (``--keyserver URL``: the key server wraps, the data key never leaves it) can be
added next to ``--key-file`` without touching the commands.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sealtorch.cli._progress import _Progress
from sealtorch.errors import ConfigError

if TYPE_CHECKING:
    from sealtorch.keys import DataKey
    from sealtorch.sealed.keywrap import ContentKeyWrapper

_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _quiet(ctx: click.Context) -> bool:
    return bool(ctx.find_root().obj and ctx.find_root().obj.get("quiet"))


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


def _parse_size(value: str) -> int:
    match = _SIZE.fullmatch(value)
    if match is None:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 1MiB, 4M, 65536)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _parse_metadata(items: tuple[str, ...]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--metadata")
        if key in metadata:
            raise click.BadParameter(f"{key!r} is given twice", param_hint="--metadata")
        metadata[key] = value
    return metadata


def _parse_json(value: str | None, option: str) -> Any:
    """JSON given inline or as @FILE."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {value[1:]}: {exc.strerror}", param_hint=option
            ) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=option) from exc


@contextmanager
def _writing(output: Path | None, *, what: str) -> Iterator[None]:
    """Turn a failed read or write (disk full, read-only directory, file size limit) into one
    line naming the path and what to do; the writers leave no partial file behind."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(_os_error_message(exc, output, what=what)) from exc


def _os_error_message(exc: OSError, output: Path | None, *, what: str) -> str:
    path = exc.filename if exc.filename is not None else output
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free space there or write elsewhere with -o"
    elif exc.errno == errno.EFBIG:
        todo = "raise the file size limit (ulimit -f) or write elsewhere with -o"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        todo = "choose a directory you can write with -o (or fix its permissions)"
    elif exc.errno == errno.ENOENT:
        todo = "check the path"
    else:
        todo = "check the path and the disk"
    return f"cannot {what}: {reason}: {path}; {todo} (no partial file was left)"


def _read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc.strerror}") from exc
    labels = [line.strip() for line in lines if line.strip()]
    if not labels:
        raise ConfigError(f"labels file {path} holds no labels (one class name per line)")
    return labels


def _sealing_wrapper(
    *,
    key_file: Path | None,
    key_version: int,
    keyserver: str | None = None,
    ca: Path | None = None,
    token_file: Path | None = None,
    token_env: str = "SEALTORCH_ADMIN_TOKEN",  # noqa: S107 - a variable name, not a token
) -> tuple[ContentKeyWrapper, str]:
    """Who wraps the content key of a new or rewrapped file, and how to name it in summaries:
    a local key file, or (``--keyserver URL``) the key server, which wraps under the model's
    current data key version so that the data key never leaves it."""
    if keyserver is not None:
        import os

        from sealtorch.client import AdminClient, KeyServerWrapper, read_token

        if key_file is not None:
            raise click.UsageError("give either --key-file or --keyserver, not both")
        token = read_token(token=os.environ.get(token_env), token_file=token_file)
        admin = AdminClient(keyserver, token=token, ca=ca)
        return KeyServerWrapper(admin), f"wrapped by the key server {keyserver}"
    if key_file is None:
        raise click.UsageError("give --key-file FILE, or --keyserver URL to let the server wrap")
    from sealtorch.keys import read_key_file
    from sealtorch.sealed.header import check_key_version
    from sealtorch.sealed.keywrap import LocalKeyWrapper

    dek: DataKey = read_key_file(key_file)
    wrapper = LocalKeyWrapper(dek, key_version=check_key_version(key_version))
    return wrapper, f"key fingerprint {dek.fingerprint}"


@contextmanager
def _closing(wrapper: object) -> Iterator[None]:
    """Close a remote wrapper's connections when done (a local wrapper has nothing to close)."""
    try:
        yield
    finally:
        close = getattr(wrapper, "close", None)
        if callable(close):
            close()


def _keyserver_options(function: Any) -> Any:
    """``--keyserver``, ``--ca``, ``--token-file``, ``--token-env`` (for encrypt and rewrap)."""
    options = [
        click.option(
            "--keyserver",
            metavar="URL",
            help="Let this key server wrap the file's content key under the model's current "
            "data key version (the data key never leaves the server); needs an admin token.",
        ),
        click.option(
            "--ca",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="CA certificate of the key server (its DATA_DIR/tls/ca.crt).",
        ),
        click.option(
            "--token-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="File holding the key server admin token.",
        ),
        click.option(
            "--token-env",
            default="SEALTORCH_ADMIN_TOKEN",
            show_default=True,
            metavar="VAR",
            help="Environment variable holding the admin token (used when set).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@contextmanager
def _progress(ctx: click.Context, description: str) -> Iterator[_Progress]:
    progress = _Progress(description, quiet=_quiet(ctx))
    try:
        yield progress
    finally:
        progress.stop()


_KEYGEN_EPILOG = """\b
Examples:
  sealtorch keygen -o resnet50.key
  sealtorch keygen -o keys/fraud-v2.key

\b
The file holds one line, "sealtorch-data-key-v1:" followed by the key in base64url. Keep it
like a password: mode 0600, never in version control. The fingerprint printed is a one-way
digest, safe to share and to compare.
"""


@click.command("keygen", epilog=_KEYGEN_EPILOG)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the new key file (created with mode 0600; never overwritten).",
)
@click.pass_context
def keygen(ctx: click.Context, output: Path) -> None:
    """Create a new random 256-bit model data key in a key file."""
    from sealtorch.keys import write_key_file

    key = write_key_file(output)
    if not _quiet(ctx):
        click.echo(f"wrote a new 256-bit model key to {output} (mode 0600)")
    click.echo(f"fingerprint: {key.fingerprint}")


_ENCRYPT_EPILOG = """\b
Examples:
  sealtorch encrypt resnet50.safetensors -o resnet50.sealed --model-id resnet50 \\
      --key-file resnet50.key --arch torchvision:resnet50
  sealtorch encrypt checkpoint.pth -o m.sealed --model-id fraud --key-file fraud.key \\
      --state-dict-key model --arch mypkg.models:build --arch-kwargs '{"layers": 12}'
  sealtorch encrypt m.safetensors -o m.sealed --model-id m --arch mypkg:build \\
      --keyserver https://keys:8443 --ca ca.crt --token-file admin.token
  sealtorch encrypt traced.pt -o m.sealed --model-id m --key-file m.key     # TorchScript
  sealtorch encrypt program.pt2 -o m.sealed --model-id m --key-file m.key   # torch.export
  sealtorch encrypt ./gpt2-finetuned/ -o gpt2.sealed --model-id gpt2 --key-file gpt2.key
      # a Hugging Face save_pretrained directory: config, tokenizer and weights (sharded
      # like the input: gpt2.sealed plus gpt2.sealed.00002-of-0000N...), architecture
      # transformers:CLASS from its config.json
  sealtorch encrypt effnet.safetensors -o effnet.sealed --model-id effnet \\
      --key-file effnet.key --arch timm:efficientnet_lite0 --labels imagenet.txt \\
      --preprocess @preprocess.json --metadata owner=vision-team

\b
Inputs are recognised by content: .safetensors, .pt/.pth state_dicts (read with
torch.load(weights_only=True); pickles needing more are refused), TorchScript archives,
torch.export .pt2 programs and Hugging Face save_pretrained directories (safetensors weights;
code and pickled weights are refused). Everything except the model id, key version and sizes is
encrypted, including tensor names, shapes, the architecture and the metadata.
"""


@click.command("encrypt", epilog=_ENCRYPT_EPILOG)
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The sealed file to write (atomically).",
)
@click.option(
    "--model-id",
    required=True,
    help="Public model name the key server knows it by: 1-128 of A-Z a-z 0-9 . _ -",
)
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The model's data key (from `sealtorch keygen`); or use --keyserver.",
)
@click.option(
    "--key-version",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Version of the data key in --key-file (the key server's version number).",
)
@_keyserver_options
@click.option(
    "--arch",
    help="Architecture to rebuild a state_dict with: torchvision:NAME, timm:NAME, "
    "transformers:CLASS (Hugging Face directories; default: from config.json) or "
    "package.module:factory (which loads only where allowed: serve --allow-arch).",
)
@click.option(
    "--arch-kwargs", help="JSON object of keyword arguments for the architecture (or @FILE)."
)
@click.option(
    "--metadata",
    multiple=True,
    metavar="KEY=VALUE",
    help="Private metadata stored (encrypted) with the model; repeatable.",
)
@click.option(
    "--state-dict-key",
    help="Take the state_dict from this entry of a checkpoint dict (e.g. state_dict, model).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text file with one class name per line (served with predictions).",
)
@click.option(
    "--preprocess",
    help='Image preprocessing for the inference server, JSON or @FILE: {"type": "image", '
    '"resize": 256, "crop": 224, "mean": [...], "std": [...], "interpolation": "bilinear"}.',
)
@click.option("--inputs", help="JSON list of input specs {name, datatype, shape} (or @FILE).")
@click.option("--outputs", help="JSON list of output specs {name, datatype, shape} (or @FILE).")
@click.option(
    "--chunk-size",
    default="1MiB",
    show_default=True,
    help="Encryption chunk size: a power of two from 64B to 64MiB.",
)
@click.option(
    "--max-file-size",
    metavar="SIZE",
    help="Cut the sealed model into a sealed set of files of at most SIZE each (e.g. 2GiB). "
    "A sharded input is cut like its shards anyway.",
)
@click.option(
    "--single-file",
    is_flag=True,
    help="Seal a sharded input into one file (unless --max-file-size cuts it).",
)
@click.option(
    "--skip-arch-check",
    is_flag=True,
    help="Do not check the state_dict against --arch now (e.g. the factory is only "
    "installed where the model runs).",
)
@click.option("-f", "--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.pass_context
def encrypt(
    ctx: click.Context,
    source: Path,
    output: Path,
    model_id: str,
    key_file: Path | None,
    key_version: int,
    arch: str | None,
    arch_kwargs: str | None,
    metadata: tuple[str, ...],
    state_dict_key: str | None,
    labels: Path | None,
    preprocess: str | None,
    inputs: str | None,
    outputs: str | None,
    chunk_size: str,
    max_file_size: str | None,
    single_file: bool,
    skip_arch_check: bool,
    force: bool,
    keyserver: str | None,
    ca: Path | None,
    token_file: Path | None,
    token_env: str,
) -> None:
    """Seal a model (a file, or a Hugging Face save_pretrained directory) into an encrypted,
    authenticated .sealed file or sealed set."""
    from sealtorch.api import encrypt_model
    from sealtorch.sealed.header import check_chunk_size, check_model_id

    check_model_id(model_id)
    size = check_chunk_size(_parse_size(chunk_size))
    file_limit = _parse_size(max_file_size) if max_file_size is not None else None
    if file_limit is not None and file_limit < 1:
        raise click.BadParameter("must be positive", param_hint="--max-file-size")
    kwargs = _parse_json(arch_kwargs, "--arch-kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--arch-kwargs")
    if kwargs is not None and arch is None:
        raise click.BadParameter("needs --arch", param_hint="--arch-kwargs")
    wrapper, key_description = _sealing_wrapper(
        key_file=key_file,
        key_version=key_version,
        keyserver=keyserver,
        ca=ca,
        token_file=token_file,
        token_env=token_env,
    )
    with (
        _closing(wrapper),
        _writing(output, what=f"seal {source}"),
        _progress(ctx, f"sealing {source.name}") as progress,
    ):
        info = encrypt_model(
            source,
            output,
            model_id=model_id,
            key=wrapper,
            arch=arch,
            arch_kwargs=kwargs,
            metadata=_parse_metadata(metadata),
            state_dict_key=state_dict_key,
            labels=_read_labels(labels),
            preprocess=_parse_json(preprocess, "--preprocess"),
            inputs=_parse_json(inputs, "--inputs"),
            outputs=_parse_json(outputs, "--outputs"),
            chunk_size=size,
            overwrite=force,
            check_arch=not skip_arch_check,
            progress=progress,
            max_file_size=file_limit,
            split_like_input=not single_file,
        )
    elapsed = progress.elapsed
    rate = info.plaintext_size / max(elapsed, 1e-9) / 1e9
    if not _quiet(ctx):
        click.echo(
            f"sealed {source} -> {output}\n"
            f"  model id     {info.model_id} (key version {info.key_version}, "
            f"{key_description})\n"
            f"  size         {_human(info.plaintext_size)} plaintext, "
            f"{_human(info.file_size)} sealed, {info.chunk_count} "
            f"chunk{'s' if info.chunk_count != 1 else ''} of "
            f"{_human(info.chunk_size)}\n"
            + (
                f"  files        {info.file_count} (a sealed set: {output.name} and "
                f"{output.name}.00002-of-{info.file_count:05d}...; keep them together)\n"
                if info.file_count > 1
                else ""
            )
            + f"  time         {elapsed:.2f} s ({rate:.2f} GB/s)"
        )


_INSPECT_EPILOG = """\b
Examples:
  sealtorch inspect resnet50.sealed
  sealtorch inspect resnet50.sealed --json | jq .model_id

\b
Shows only what anyone holding the file can read: the model id, key version, cipher suite and
sizes. No key is needed, and none of it is authenticated until the file is opened with its key.
"""


@click.command("inspect", epilog=_INSPECT_EPILOG)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Show the public header of a sealed model (no key needed)."""
    from sealtorch.api import inspect_sealed

    info = inspect_sealed(file)
    fields = info.as_dict()
    if as_json:
        click.echo(json.dumps(fields, indent=2))
        return
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        shown = (
            f"{value} ({_human(value)})"
            if name in ("chunk_size", "plaintext_size", "file_size")
            else value
        )
        click.echo(f"{name:<{width}}  {shown}")


_DECRYPT_EPILOG = """\b
Examples:
  sealtorch decrypt resnet50.sealed --key-file resnet50.key -o resnet50.safetensors
  sealtorch decrypt traced.sealed --key-file m.key -o traced.pt       # TorchScript
  sealtorch decrypt program.sealed --key-file m.key -o program.pt2    # torch.export
  sealtorch decrypt gpt2.sealed --key-file gpt2.key -o gpt2-plain/   # Hugging Face directory

\b
For the model owner: writes the plain payload - a .safetensors state_dict, a TorchScript .pt
or a torch.export .pt2; a sealed Hugging Face directory becomes a directory again (its files
and one model.safetensors) - with mode 0600. Output appears only after every chunk authenticated;
a damaged or tampered file leaves nothing behind.
"""

_SUFFIXES = {"safetensors": ".safetensors", "torchscript": ".pt", "torch_export": ".pt2"}


@click.command("decrypt", epilog=_DECRYPT_EPILOG)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The model's data key.",
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the plain model (a directory for a sealed Hugging Face model).",
)
@click.option("-f", "--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.pass_context
def decrypt(ctx: click.Context, file: Path, key_file: Path, output: Path, force: bool) -> None:
    """Decrypt a sealed model back into a plain model file (owner's tool)."""
    from sealtorch.api import decrypt_model
    from sealtorch.keys import KeyFile

    with (
        _writing(output, what=f"decrypt {file}"),
        _progress(ctx, f"decrypting {file.name}") as progress,
    ):
        manifest = decrypt_model(
            file, output, key=KeyFile(key_file), overwrite=force, progress=progress
        )
    if not _quiet(ctx):
        click.echo(f"decrypted {file} -> {output} ({manifest.kind}, mode 0600)")
        if manifest.arch:
            click.echo(f"  architecture {manifest.arch}")
        expected = _SUFFIXES[manifest.kind]
        if output.suffix != expected and not manifest.files:
            click.echo(f"  note: a {manifest.kind} payload is usually named *{expected}")


_REWRAP_EPILOG = """\b
Examples:
  sealtorch rewrap resnet50.sealed --key-file v1.key --new-key-file v2.key
  sealtorch rewrap resnet50.sealed --keyserver https://keys:8443 --ca ca.crt \\
      --token-file admin.token        # the server rewraps to the current version
  sealtorch rewrap resnet50.sealed --key-file v1.key --new-key-file v2.key \\
      --new-key-version 2 -o resnet50-v2.sealed

\b
Key rotation: the file's content key is unwrapped with the old data key and wrapped under the
new one; the encrypted body is copied byte for byte (no re-encryption). In place by default,
atomically. Afterwards the old key no longer opens the file.
"""


@click.command("rewrap", epilog=_REWRAP_EPILOG)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The current data key (not with --keyserver).",
)
@click.option(
    "--new-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The new data key (not with --keyserver).",
)
@click.option(
    "--new-key-version",
    type=click.IntRange(min=1),
    help="Version number of the new key (default: the current version + 1).",
)
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the rewrapped file here instead of replacing FILE.",
)
@click.option("-f", "--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@_keyserver_options
@click.pass_context
def rewrap(
    ctx: click.Context,
    file: Path,
    key_file: Path | None,
    new_key_file: Path | None,
    new_key_version: int | None,
    output: Path | None,
    force: bool,
    keyserver: str | None,
    ca: Path | None,
    token_file: Path | None,
    token_env: str,
) -> None:
    """Rotate a sealed model to a new data key without re-encrypting it."""
    from sealtorch.api import inspect_sealed
    from sealtorch.api import rewrap as rewrap_file
    from sealtorch.keys import KeyFile

    old = inspect_sealed(file)
    version = old.key_version + 1 if new_key_version is None else new_key_version
    if keyserver is not None and (key_file is not None or new_key_version is not None):
        raise click.UsageError(
            "with --keyserver the server rewraps to the model's current key version; "
            "drop --key-file and --new-key-version"
        )
    if keyserver is None and key_file is None:
        raise click.UsageError("give --key-file and --new-key-file, or --keyserver URL")
    wrapper, key_description = _sealing_wrapper(
        key_file=new_key_file,
        key_version=version,
        keyserver=keyserver,
        ca=ca,
        token_file=token_file,
        token_env=token_env,
    )
    with _closing(wrapper), _writing(output or file, what=f"rewrap {file}"):
        info = rewrap_file(
            file,
            key=KeyFile(key_file) if key_file is not None else None,
            new_key=wrapper,
            new_key_version=version,
            destination=output,
            overwrite=force,
        )
    if not _quiet(ctx):
        click.echo(
            f"rewrapped {file}{' -> ' + str(output) if output else ' in place'}: model "
            f"{info.model_id}, key version {old.key_version} -> {info.key_version} "
            f"({key_description})"
        )
