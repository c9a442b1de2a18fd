"""The test vector published in docs/format.md is exactly what this implementation produces.

Regenerate the block (after a deliberate format change) with:
    .venv/bin/python tests/unit/sealed/test_sealed_vector.py
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import torch

from sealtorch._crypto.stream import chunk_nonce, derive_body_key
from sealtorch.api import load_state_dict
from sealtorch.keys import DataKey, encode_key
from sealtorch.payloads.manifest import Manifest
from sealtorch.payloads.sources import prepare_payload
from sealtorch.sealed.header import Header, wrap_aad
from sealtorch.sealed.keywrap import LocalKeyWrapper, unwrap_content_key
from sealtorch.sealed.writer import SealedWriter

DOC = Path(__file__).resolve().parents[3] / "docs" / "format.md"

DEK = bytes(range(0x20))
CEK = bytes(range(0x20, 0x40))
BODY_SALT = bytes(range(0x40, 0x60))
KEY_SALT = bytes(range(0x60, 0x80))
KEY_NONCE = bytes(range(0x80, 0x8C))
STATE_DICT = {
    "w": torch.tensor([1.0, 2.0]),
    "n": torch.tensor(3, dtype=torch.int64),
    "flag": torch.tensor([True]),
}
#: Exercises every escape of canonical JSON: quote, backslash, tab, DEL, non-ASCII, beyond BMP.
METADATA = {"owner": 'Zo\u00eb "ML" team\\', "note": "tab\there\u007f \U0001f600"}
MANIFEST_FIELDS = {
    "arch": "torchvision:resnet18",
    "arch_kwargs": {"num_classes": 2},
    "metadata": METADATA,
    "labels": ["cat", "caf\u00e9"],
    "preprocess": {
        "type": "image",
        "resize": 256,
        "crop": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
}


def _fixed_random() -> object:
    values = [BODY_SALT, CEK, KEY_SALT, KEY_NONCE]  # the order the writer and wrapper ask

    def take(size: int) -> bytes:
        value = values.pop(0)
        assert len(value) == size
        return value

    return take


def build_vector() -> dict[str, str]:
    payload = prepare_payload(STATE_DICT)
    manifest = Manifest.build(
        kind=payload.kind,
        payload_size=payload.size,
        payload_align=payload.align,
        **MANIFEST_FIELDS,  # type: ignore[arg-type]
    )
    plaintext = manifest.encode_prefix() + b"".join(bytes(p) for p in payload.stream())
    random_bytes = _fixed_random()
    out = io.BytesIO()
    with SealedWriter(
        out,
        model_id="tiny",
        plaintext_size=len(plaintext),
        wrapper=LocalKeyWrapper(DataKey(DEK), key_version=1, _random_bytes=random_bytes),  # type: ignore[arg-type]
        chunk_size=64,
        _random_bytes=random_bytes,  # type: ignore[arg-type]
    ) as writer:
        writer.write(plaintext)
    header: Header = writer.header
    sealed = out.getvalue()
    body_key, prefix = derive_body_key(CEK, salt=BODY_SALT, body_digest=header.body.digest)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    wrapping_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=KEY_SALT, info=b"sealtorch/v1/wrap\x00"
    ).derive(DEK)
    last = header.body.chunk_count - 1
    return {
        "dek": DEK.hex(),
        "cek": CEK.hex(),
        "body_salt": BODY_SALT.hex(),
        "key_salt": KEY_SALT.hex(),
        "key_nonce": KEY_NONCE.hex(),
        "header_json": header.encode()[16:].decode("ascii"),
        "body_digest": header.body.digest.hex(),
        "body_key": body_key.hex(),
        "nonce_prefix": prefix.hex(),
        "nonce_chunk_0": chunk_nonce(prefix, 0, last=False).hex(),
        f"nonce_chunk_{last}": chunk_nonce(prefix, last, last=True).hex(),
        "wrapping_key": wrapping_key.hex(),
        "wrap_aad": wrap_aad(model_id="tiny", key_version=1, body_digest=header.body.digest).decode(
            "ascii"
        ),
        "wrapped_cek": header.key.wrapped_cek.hex(),
        "body_plaintext": plaintext.hex(),
        "sealed_file": sealed.hex(),
    }


def render(vector: dict[str, str]) -> str:
    lines = []
    for name, value in vector.items():
        if len(value) <= 80 and name not in ("header_json", "wrap_aad"):
            lines.append(f"{name} = {value}")
        else:
            lines.append(f"{name} =")
            lines.extend("    " + value[i : i + 96] for i in range(0, len(value), 96))
    return "\n".join(lines)


def parse(text: str) -> dict[str, str]:
    block = re.search(r"<!-- test-vector -->\n```text\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/format.md has no test vector block"
    vector: dict[str, str] = {}
    name = None
    for line in block.group(1).splitlines():
        if line.startswith("    ") and name is not None:
            vector[name] += line.strip()
        else:
            name, _, value = (part.strip() for part in line.partition("="))
            vector[name] = value
    return vector


def test_documented_vector_matches_the_implementation() -> None:
    assert parse(DOC.read_text(encoding="utf-8")) == build_vector()


def test_documented_vector_opens() -> None:
    vector = parse(DOC.read_text(encoding="utf-8"))
    sealed = bytes.fromhex(vector["sealed_file"])
    loaded = load_state_dict(io.BytesIO(sealed), key=bytes.fromhex(vector["dek"]))
    assert list(loaded) == list(STATE_DICT)
    for name, tensor in STATE_DICT.items():
        assert torch.equal(loaded[name], tensor)
        assert loaded[name].data_ptr() % 64 == 0
    header = Header.decode(vector["header_json"].encode("ascii"))
    assert unwrap_content_key(DataKey(DEK), header) == CEK


def test_documented_key_file_example_is_what_keygen_writes() -> None:
    assert encode_key(DataKey(bytes(range(32)))) in DOC.read_text(encoding="utf-8")


if __name__ == "__main__":
    sys.stdout.write(render(build_vector()) + "\n")
