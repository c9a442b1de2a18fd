"""A module that must never be imported by loading a sealed model: importing it creates the
file named by ``$SEALTORCH_TEST_MARKER`` (so does calling :func:`build` or ``Evil.apply``).

Sealed files in the tests name it (``marker_module:build``, or a torch.export node that
imports ``marker_module.Evil``); the tests check that the file never appears.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch


def _touch(what: str) -> None:
    target = os.environ.get("SEALTORCH_TEST_MARKER")
    if target:
        pathlib.Path(target).write_text(what)


_touch("imported")


def build(**kwargs: Any) -> torch.nn.Module:
    _touch("called")
    return torch.nn.Linear(8, 3)


class Evil:
    @staticmethod
    def apply(*args: Any) -> Any:
        _touch("applied")
        return args[0]
