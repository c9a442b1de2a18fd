"""The model owner's commands, through click's runner and once through a real process."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from sealtorch.cli import cli
from sealtorch.cli.owner import _parse_size, _Progress
from sealtorch.errors import INTEGRITY_MESSAGE, PayloadError

# makes `arch_factories:tiny_mlp` importable, as a user's own package would be
sys.path.insert(0, str(Path(__file__).parents[1] / "payloads"))


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _key_text(path: Path) -> str:
    return path.read_text().strip().split(":", 1)[1]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "0.weight": torch.randn(8, 8),
            "0.bias": torch.randn(8),
            "2.weight": torch.randn(3, 8),
            "2.bias": torch.randn(3),
        },
        path,
    )
    return path


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    assert run("keygen", "-o", old).exit_code == 0
    assert run("keygen", "-o", new).exit_code == 0
    return old, new


@pytest.fixture
def sealed(tmp_path: Path, model_file: Path, keys: tuple[Path, Path]) -> Path:
    out = tmp_path / "model.sealed"
    result = run(
        "encrypt",
        model_file,
        "-o",
        out,
        "--model-id",
        "mlp",
        "--key-file",
        keys[0],
        "--arch",
        "arch_factories:tiny_mlp",
        "--chunk-size",
        "256B",
    )
    assert result.exit_code == 0, result.output
    return out


def test_keygen_prints_the_fingerprint_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "m.key"
    result = run("keygen", "-o", path)
    assert result.exit_code == 0
    assert "fingerprint:" in result.output
    assert _key_text(path) not in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = run("keygen", "-o", path)
    assert again.exit_code == 2
    assert "never overwrites" in again.output


def test_encrypt_summary_and_no_secrets(
    sealed: Path, keys: tuple[Path, Path], tmp_path: Path, model_file: Path
) -> None:
    result = run(
        "encrypt",
        model_file,
        "-o",
        tmp_path / "again.sealed",
        "--model-id",
        "mlp",
        "--key-file",
        keys[0],
        "--metadata",
        "team=vision",
        "--metadata",
        "note=a=b",
    )
    assert result.exit_code == 0, result.output
    assert "model id     mlp (key version 1" in result.output
    assert _key_text(keys[0]) not in result.output
    blob = (tmp_path / "again.sealed").read_bytes()
    assert b"0.weight" not in blob
    assert b"vision" not in blob


@pytest.mark.parametrize("where", ["before", "after"])
def test_encrypt_quiet(
    tmp_path: Path, model_file: Path, keys: tuple[Path, Path], where: str
) -> None:
    args = ["encrypt", model_file, "-o", tmp_path / "q.sealed", "--model-id", "q"]
    args += ["--key-file", keys[0]]
    result = run(*(["-q", *args] if where == "before" else [*args, "-q"]))
    assert result.exit_code == 0, result.output
    assert result.output == ""


@pytest.mark.parametrize(
    ("extra", "message", "code"),
    [
        (["--model-id", "bad id"], "invalid model id", 2),
        (["--model-id", "m", "--chunk-size", "1000"], "power of two", 2),
        (["--model-id", "m", "--chunk-size", "lots"], "not a size", 2),
        (["--model-id", "m", "--arch-kwargs", "{}"], "needs --arch", 2),
        (["--model-id", "m", "--arch", "timm:x", "--arch-kwargs", "[1]"], "JSON object", 2),
        (["--model-id", "m", "--arch", "x:y", "--arch-kwargs", "{bad"], "not valid JSON", 2),
        (["--model-id", "m", "--metadata", "novalue"], "KEY=VALUE", 2),
        (["--model-id", "m", "--arch", "torchvision:resnet18"], "does not match", 1),
        (["--model-id", "m", "--state-dict-key", "model"], "checkpoints only", 2),
        (["--model-id", "m", "--preprocess", '{"type": "image"}'], "preprocess is missing", 2),
    ],
)
def test_encrypt_errors_write_nothing(
    tmp_path: Path,
    model_file: Path,
    keys: tuple[Path, Path],
    extra: list[str],
    message: str,
    code: int,
) -> None:
    out = tmp_path / "out" / "x.sealed"
    out.parent.mkdir()
    result = run("encrypt", model_file, "-o", out, "--key-file", keys[0], *extra)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert list(out.parent.iterdir()) == []


def test_encrypt_refuses_to_overwrite_without_force(
    sealed: Path, model_file: Path, keys: tuple[Path, Path]
) -> None:
    args = ["encrypt", model_file, "-o", sealed, "--model-id", "other", "--key-file", keys[0]]
    refused = run(*args)
    assert refused.exit_code == 2
    assert "already exists" in refused.output
    assert run(*args, "--force").exit_code == 0
    assert json.loads(run("inspect", sealed, "--json").output)["model_id"] == "other"


def test_encrypt_checkpoint_and_serving_description(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    checkpoint = tmp_path / "ckpt.pth"
    torch.save({"epoch": 2, "model": {"weight": torch.ones(2, 3)}}, checkpoint)
    hint = run(
        "encrypt", checkpoint, "-o", tmp_path / "c.sealed", "--model-id", "c", "--key-file", keys[0]
    )
    assert hint.exit_code == 1
    assert "--state-dict-key model" in hint.output
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\n")
    preprocess = tmp_path / "pre.json"
    preprocess.write_text(
        json.dumps(
            {
                "type": "image",
                "resize": 256,
                "crop": 224,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.2, 0.2, 0.2],
            }
        )
    )
    result = run(
        "encrypt",
        checkpoint,
        "-o",
        tmp_path / "c.sealed",
        "--model-id",
        "c",
        "--key-file",
        keys[0],
        "--state-dict-key",
        "model",
        "--labels",
        labels,
        "--preprocess",
        f"@{preprocess}",
        "--inputs",
        '[{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]',
    )
    assert result.exit_code == 0, result.output
    from sealtorch.api import load_sealed_model

    loaded = load_sealed_model(
        tmp_path / "c.sealed",
        key=keys[0],
        arch="torch.nn:Linear",
        arch_kwargs={"in_features": 3, "out_features": 2, "bias": False},
    )
    assert loaded.manifest.labels == ("cat", "dog")
    assert loaded.manifest.preprocess is not None
    assert loaded.manifest.preprocess.crop == 224


def test_encrypt_refuses_code_running_pickles(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, evil)
    result = run(
        "encrypt", evil, "-o", tmp_path / "e.sealed", "--model-id", "e", "--key-file", keys[0]
    )
    assert result.exit_code == 1
    assert "could run arbitrary code" in result.output
    assert not marker.exists()
    assert not (tmp_path / "e.sealed").exists()


@pytest.mark.parametrize("case", ["pickled constant", "pickled sample inputs", "guard code"])
def test_encrypt_refuses_programs_that_would_run_code(
    case: str, tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: a .pt2 whose constants are pickled ran the pickle inside `sealtorch encrypt`
    (torch.export.load), on the owner's machine. It is inspected and refused first."""
    import hostile_programs

    marker = tmp_path / "marker"
    monkeypatch.setenv(hostile_programs.MARKER_ENV, str(marker))
    program = tmp_path / "model.pt2"
    program.write_bytes(hostile_programs.HOSTILE[case](marker, "marker_module"))
    out = tmp_path / "p.sealed"
    result = run("encrypt", program, "-o", out, "--model-id", "p", "--key-file", keys[0])
    assert result.exit_code == 1
    assert "error: refusing this torch.export program" in result.output
    assert not marker.exists()
    assert not out.exists()


def test_a_sealed_code_reference_never_runs_where_the_model_loads(
    tmp_path: Path, model_file: Path, keys: tuple[Path, Path]
) -> None:
    """The owner may seal any reference (here what issue 12 showed); loading refuses it."""
    from sealtorch.api import load_model

    marker = tmp_path / "marker"
    out = tmp_path / "x.sealed"
    command = json.dumps({"command": f"touch {marker}"})
    result = run(
        "encrypt", model_file, "-o", out, "--model-id", "x", "--key-file", keys[0],
        "--arch", "os:system", "--arch-kwargs", command, "--skip-arch-check",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with pytest.raises(PayloadError, match="os:system is not allowed on this machine"):
        load_model(out, key=keys[0])
    assert not marker.exists()


def test_inspect_shows_only_public_fields(sealed: Path) -> None:
    text = run("inspect", sealed)
    assert text.exit_code == 0
    assert "model_id        mlp" in text.output
    assert "arch" not in text.output
    data = json.loads(run("inspect", sealed, "--json").output)
    assert set(data) == {
        "model_id",
        "key_version",
        "format_version",
        "suite",
        "chunk_size",
        "chunk_count",
        "plaintext_size",
        "file_size",
    }
    assert data["file_size"] == sealed.stat().st_size


def test_inspect_non_sealed_files(tmp_path: Path, model_file: Path) -> None:
    result = run("inspect", model_file)
    assert result.exit_code == 1
    assert "not a sealtorch sealed model" in result.output
    newer = tmp_path / "newer.sealed"
    newer.write_bytes(b"SEALTRCH\x00\x07\x00\x00\x00\x00\x00\x02{}")
    result = run("inspect", newer)
    assert "newer sealtorch (format v7)" in result.output


def test_decrypt_round_trip_and_wrong_key(
    tmp_path: Path, sealed: Path, keys: tuple[Path, Path], model_file: Path
) -> None:
    out = tmp_path / "plain.bin"
    wrong = run("decrypt", sealed, "--key-file", keys[1], "-o", out)
    assert wrong.exit_code == 1
    assert INTEGRITY_MESSAGE in wrong.output
    assert not out.exists()
    ok = run("decrypt", sealed, "--key-file", keys[0], "-o", out)
    assert ok.exit_code == 0, ok.output
    assert "usually named *.safetensors" in ok.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    original = load_file(model_file)
    assert all(torch.equal(load_file(out)[k], v) for k, v in original.items())
    again = run("decrypt", sealed, "--key-file", keys[0], "-o", out)
    assert again.exit_code == 2


def test_decrypt_tampered_file_leaves_nothing(
    tmp_path: Path, sealed: Path, keys: tuple[Path, Path]
) -> None:
    data = bytearray(sealed.read_bytes())
    data[-3] ^= 1
    sealed.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("decrypt", sealed, "--key-file", keys[0], "-o", out_dir / "plain.safetensors")
    assert result.exit_code == 1
    assert list(out_dir.iterdir()) == []


def test_rewrap_in_place_and_to_a_new_file(
    tmp_path: Path, sealed: Path, keys: tuple[Path, Path]
) -> None:
    old, new = keys
    body = sealed.read_bytes()[-500:]
    result = run("rewrap", sealed, "--key-file", old, "--new-key-file", new)
    assert result.exit_code == 0, result.output
    assert "key version 1 -> 2" in result.output
    assert sealed.read_bytes()[-500:] == body
    assert run("decrypt", sealed, "--key-file", old, "-o", tmp_path / "x").exit_code == 1
    assert run("decrypt", sealed, "--key-file", new, "-o", tmp_path / "y").exit_code == 0
    copy = tmp_path / "v7.sealed"
    result = run(
        "rewrap",
        sealed,
        "--key-file",
        new,
        "--new-key-file",
        old,
        "--new-key-version",
        "7",
        "-o",
        copy,
    )
    assert result.exit_code == 0
    assert json.loads(run("inspect", copy, "--json").output)["key_version"] == 7
    assert json.loads(run("inspect", sealed, "--json").output)["key_version"] == 2


def test_wide_key_file_permissions_warn(
    tmp_path: Path, sealed: Path, keys: tuple[Path, Path]
) -> None:
    keys[0].chmod(0o644)
    result = CliRunner().invoke(
        cli,
        ["decrypt", str(sealed), "--key-file", str(keys[0]), "-o", str(tmp_path / "p.safetensors")],
    )
    assert result.exit_code == 0
    assert "chmod 600" in result.output
    assert _key_text(keys[0]) not in result.output
    sealing = CliRunner().invoke(
        cli,
        [
            "encrypt",
            str(tmp_path / "p.safetensors"),
            "-o",
            str(tmp_path / "again.sealed"),
            "--model-id",
            "again",
            "--key-file",
            str(keys[0]),
        ],
    )
    assert sealing.exit_code == 0, sealing.output
    assert sealing.output.count("chmod 600") == 1  # the key file is read once


def test_help_texts_teach_with_examples() -> None:
    for command in ("keygen", "encrypt", "inspect", "decrypt", "rewrap"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output
        assert f"sealtorch {command}" in result.output


def test_parse_size() -> None:
    assert _parse_size("64") == 64
    assert _parse_size("64B") == 64
    assert _parse_size("4k") == 4096
    assert _parse_size("1MiB") == 1 << 20
    assert _parse_size("2 MB") == 2 << 20


def test_progress_bar_only_for_large_inputs(caplog: pytest.LogCaptureFixture) -> None:
    small = _Progress("x", quiet=False, terminal=True)
    small(10, 100)
    assert not small.bar_shown
    large = _Progress("x", quiet=False, terminal=True)
    large(10, 1 << 30)
    assert large.bar_shown
    large.stop()
    quiet = _Progress("x", quiet=True, terminal=True)
    quiet(10, 1 << 30)
    assert not quiet.bar_shown
    assert quiet.elapsed == 0.0
    # Not a terminal: one structured log line per tenth, no bar.
    logged = _Progress("sealing m", quiet=False, terminal=False)
    with caplog.at_level("INFO", logger="sealtorch.progress"):
        for done in range(0, (1 << 30) + 1, 1 << 24):
            logged(done, 1 << 30)
    logged.stop()
    assert not logged.bar_shown
    records = [r for r in caplog.records if r.name == "sealtorch.progress"]
    assert [r.percent for r in records] == list(range(0, 101, 10))  # type: ignore[attr-defined]
    assert records[-1].done == 1 << 30  # type: ignore[attr-defined]


def test_real_process(tmp_path: Path, model_file: Path) -> None:
    """The installed console entry point, as a user types it."""
    exe = [sys.executable, "-m", "sealtorch"]
    key = tmp_path / "real.key"
    out = tmp_path / "real.sealed"
    done = subprocess.run(
        [*exe, "keygen", "-o", str(key)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [
            *exe,
            "encrypt",
            str(model_file),
            "-o",
            str(out),
            "--model-id",
            "real",
            "--key-file",
            str(key),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "sealed" in done.stdout
    done = subprocess.run(
        [*exe, "inspect", str(out), "--json"], capture_output=True, text=True, check=False
    )
    assert json.loads(done.stdout)["model_id"] == "real"
    done = subprocess.run(
        [*exe, "decrypt", str(out), "--key-file", str(model_file), "-o", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1  # not a key file
    assert "not a sealtorch key file" in done.stderr
