"""README's "A 30-second tour" as a new user meets it.

The owner's tour (keygen, encrypt, inspect, decrypt, rewrap and its Python twin) needs no
server: its commands run here as written, in an empty directory, with this interpreter's
``sealtorch`` and ``python`` first on PATH. The production part needs a key server, a PCCS and
SGX, so it is only checked: every ``sealtorch`` command names existing subcommands and options,
every environment variable it sets is one sealtorch reads, the key cache command yields valid
settings, the policy is a valid policy, and the Python snippet imports what exists.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import sealtorch
from sealtorch.attestation import Policy
from sealtorch.cli import cli
from sealtorch.keycache.settings import KeyCacheSettings
from sealtorch.keyserver.settings import config_env_names

README = Path(__file__).resolve().parents[2] / "README.md"
TOUR = "## A 30-second tour"
PRODUCTION = "### In production"
HF = "### Hugging Face models"


def _section(text: str, heading: str) -> str:
    """From ``heading`` to the next heading of the same or a higher level (outside code)."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines(keepends=True)
    start = lines.index(heading + "\n")
    fenced = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            return "".join(lines[start:end])
    return "".join(lines[start:])


def _owner_tour() -> str:
    tour = _section(README.read_text(encoding="utf-8"), TOUR)
    return tour[: tour.index(f"\n{HF}\n")]


def _hf_tour() -> str:
    tour = _section(README.read_text(encoding="utf-8"), TOUR)
    return tour[tour.index(f"\n{HF}\n") : tour.index(f"\n{PRODUCTION}\n")]


def _production() -> str:
    return _section(README.read_text(encoding="utf-8"), PRODUCTION)


def _blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [
        line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


# -- the owner's tour, run ------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_the_owner_tour_runs_as_written(tmp_path: Path) -> None:
    tour = _owner_tour()
    (shell,) = _blocks(tour, "sh")
    (python,) = _blocks(tour, "python")
    commands = _commands(shell)
    assert [c.split()[:2] for c in commands if c.startswith("sealtorch")] == [
        ["sealtorch", "keygen"],
        ["sealtorch", "encrypt"],
        ["sealtorch", "inspect"],
        ["sealtorch", "decrypt"],
        ["sealtorch", "keygen"],
        ["sealtorch", "rewrap"],
    ]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert "key version 1 -> 2" in done.stdout  # the last command: the rewrap

    done = subprocess.run(
        [sys.executable, "-c", python],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{python}\n{done.stdout}\n{done.stderr}"
    for name in ("resnet50.sealed", "plain.safetensors", "resnet50-v2.key", "resnet50-py.sealed"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.e2e
@pytest.mark.slow
def test_the_hugging_face_tour_runs_as_written(tmp_path: Path) -> None:
    (shell,) = _blocks(_hf_tour(), "sh")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    for command in _commands(shell):
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert "GPT2LMHeadModel" in done.stdout  # the last command: the loaded model's class
    assert min(p.name for p in tmp_path.glob("gpt2.sealed*")) == "gpt2.sealed"


# -- production: checked, not run -----------------------------------------------------------


def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {
        opt: param
        for param in command.params
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    }


def _check_sealtorch(tokens: list[str]) -> list[str]:
    """Every subcommand exists, every option belongs to the command it follows, and the
    command reached is a command (not a group). Returns the values given to path options."""
    command: click.Command = cli
    ctx = click.Context(cli)
    path = ["sealtorch"]
    paths: list[str] = []
    words = iter(tokens[1:])
    for word in words:
        if word.startswith("-") and word != "-":
            flag, _, inline = word.partition("=")
            options = _options(command)
            assert flag in options, f"`{' '.join(path)}` has no option {flag}"
            option = options[flag]
            assert isinstance(option, click.Option)
            if not (option.is_flag or option.count):
                value = inline or next(words)  # its value
                if isinstance(option.type, click.Path):
                    paths.append(value)
            continue
        if isinstance(command, click.Group):
            sub = command.get_command(ctx, word)
            assert sub is not None, f"`{' '.join(path)}` has no command {word!r}"
            command, ctx = sub, click.Context(sub, info_name=word, parent=ctx)
            path.append(word)
    assert not isinstance(command, click.Group), f"`{' '.join(path)}` needs a command"
    return paths


def _production_commands() -> list[list[str]]:
    """Each command of the production blocks as shell words (comments dropped)."""
    return [
        shlex.split(command, comments=True)
        for block in _blocks(_production(), "sh")
        for command in _commands(block)
    ]


def _known_environment() -> set[str]:
    names = set(config_env_names())

    def walk(command: click.Command, ctx: click.Context) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, click.Context(sub, info_name=name, parent=ctx))

    walk(cli, click.Context(cli))
    return names


def test_production_commands_name_real_commands_options_and_variables() -> None:
    known = _known_environment()
    checked = 0
    for tokens in _production_commands():
        if tokens[0] == "export":
            assigned, tokens = tokens[1:], []
        else:
            assigned = []
            while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
                assigned.append(tokens.pop(0))
        for assignment in assigned:
            name = assignment.split("=", 1)[0]
            assert name in known, f"sealtorch reads no environment variable {name}"
        if tokens and tokens[0] == "sealtorch":
            _check_sealtorch(tokens)
            checked += 1
    for span in re.findall(r"`(sealtorch [^`]*)`", _production()):
        _check_sealtorch(shlex.split(span))
        checked += 1
    assert checked >= 10


def test_production_key_cache_command_makes_complete_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key cache command passes the settings checks (e.g. a verifier for local enclaves),
    its files standing in as empty placeholders; it stops short of attesting."""
    (tokens,) = [t for t in _production_commands() if t[:3] == ["sealtorch", "keycache", "serve"]]
    for value in _check_sealtorch(tokens):
        if not Path(value).is_absolute():
            (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value).touch(mode=0o600)
    monkeypatch.chdir(tmp_path)
    started: list[KeyCacheSettings] = []
    monkeypatch.setattr(
        "sealtorch.keycache.server.run", lambda settings, *, announce: started.append(settings)
    )
    result = CliRunner().invoke(cli, tokens[1:])
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert settings.tee == "gramine"
    assert settings.keyserver_ca is not None
    assert settings.keyserver_pubkeys  # pins the key server's release-signing key


def test_production_policy_and_python_are_valid() -> None:
    production = _production()
    (policy,) = _blocks(production, "yaml")
    Policy.from_yaml(policy, source="README")
    (python,) = _blocks(production, "python")
    tree = ast.parse(python)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "sealtorch"
        ):
            assert hasattr(sealtorch, node.attr), f"sealtorch has no {node.attr}"
