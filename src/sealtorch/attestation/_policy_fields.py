"""Field types shared by the release policy schemas (``policy`` and ``snp_policy``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["U8", "U16", "U32", "Hex16", "Hex32", "Hex48", "StrictBool", "_Schema", "hex_bytes"]


def hex_bytes(size: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(
                f"must be a quoted string of {2 * size} hex digits (YAML reads unquoted digits "
                "as a number)"
            )
        text = value.strip().lower()
        if not re.fullmatch(f"[0-9a-f]{{{2 * size}}}", text):
            raise ValueError(
                f"must be {2 * size} hex digits ({size} bytes), not {value!r}"
                if len(value) < 120
                else f"must be {2 * size} hex digits ({size} bytes)"
            )
        return text

    return check


Hex16 = Annotated[str, BeforeValidator(hex_bytes(16))]
Hex32 = Annotated[str, BeforeValidator(hex_bytes(32))]
Hex48 = Annotated[str, BeforeValidator(hex_bytes(48))]
U8 = Annotated[int, Field(strict=True, ge=0, le=0xFF)]
U16 = Annotated[int, Field(strict=True, ge=0, le=0xFFFF)]
U32 = Annotated[int, Field(strict=True, ge=0, le=0xFFFFFFFF)]
StrictBool = Annotated[bool, Field(strict=True)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)
