"""PKCS#11 master key against a real SoftHSM2 token."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from _fixtures.softhsm import SoftHsmToken
from sealtorch.errors import ConfigError, IntegrityError, StorageError
from sealtorch.keys import generate_key
from sealtorch.keyserver._pkcs11 import Pin, acquire_login, release_login
from sealtorch.keyserver.masterkey import (
    UNWRAP_FAILED_MESSAGE,
    FileMasterKey,
    MasterKey,
    Pkcs11MasterKey,
    Pkcs11MasterKeyConfig,
    open_master_key,
    wrap_aad,
)

pytestmark = pytest.mark.softhsm


def _open(token: SoftHsmToken, label: str, **overrides: str) -> Pkcs11MasterKey:
    params = {
        "module": token.module,
        "token_label": token.token_label,
        "key_label": label,
        "pin": token.user_pin,
        **overrides,
    }
    return Pkcs11MasterKey(**params)


def _raw_session(token: SoftHsmToken) -> pkcs11.Session:
    """A read-write session as a PIN holder would open it with the PKCS#11 API directly.

    PKCS#11 login state is per process: while a master key in this process is open, the
    process is already logged in and a plain (PIN-less) session sees the private objects.
    """
    lib = pkcs11.lib(token.module)
    slot_token = lib.get_token(token_label=token.token_label)
    try:
        return slot_token.open(user_pin=token.user_pin, rw=True)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return slot_token.open(rw=True)


@pytest.fixture
def hsm_key(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11MasterKey]:
    key = Pkcs11MasterKey.create_key(
        module=softhsm_token.module,
        token_label=softhsm_token.token_label,
        key_label=softhsm_token.new_key_label(),
        pin=softhsm_token.user_pin,
    )
    yield key
    key.close()


def test_round_trip_inside_the_token(hsm_key: Pkcs11MasterKey) -> None:
    dek = generate_key()
    aad = wrap_aad("resnet50", 4)
    blob = hsm_key.wrap(dek, aad)
    assert len(blob) == 61
    assert blob[0] == 0x02
    assert dek.material not in blob
    assert hsm_key.unwrap(blob, aad) == dek
    assert hsm_key.wrap(dek, aad) != blob  # fresh nonce each time
    assert isinstance(hsm_key, MasterKey)
    assert hsm_key.key_id.startswith("pkcs11:sealtorch-test-")


def test_reopening_by_label_unwraps(hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken) -> None:
    dek = generate_key()
    blob = hsm_key.wrap(dek, wrap_aad("m", 1))
    label = hsm_key.key_id.rsplit("/", 1)[1]
    again = _open(softhsm_token, label)
    try:
        assert again.key_id == hsm_key.key_id
        assert again.unwrap(blob, wrap_aad("m", 1)) == dek
    finally:
        again.close()


def test_key_is_sensitive_and_not_extractable(
    hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken
) -> None:
    """From the attacker's side: log in with the PIN and try to read or export the key."""
    label = hsm_key.key_id.rsplit("/", 1)[1]
    with _raw_session(softhsm_token) as session:
        key = session.get_key(label=label, object_class=ObjectClass.SECRET_KEY)
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.WRAP] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            _ = key[Attribute.VALUE]
        exporter = session.generate_key(
            KeyType.AES,
            256,
            store=False,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP | MechanismFlag.ENCRYPT,
        )
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            exporter.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            key[Attribute.EXTRACTABLE] = True


def test_extractable_key_with_the_label_is_refused(softhsm_token: SoftHsmToken) -> None:
    label = softhsm_token.new_key_label("weak")
    with _raw_session(softhsm_token) as session:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(ConfigError, match="can be read out of the token"):
        _open(softhsm_token, label)


def test_short_key_with_the_label_is_refused(softhsm_token: SoftHsmToken) -> None:
    label = softhsm_token.new_key_label("short")
    with _raw_session(softhsm_token) as session:
        session.generate_key(
            KeyType.AES,
            128,
            label=label,
            store=True,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
    with pytest.raises(ConfigError, match="not an AES-256 key"):
        _open(softhsm_token, label)


@pytest.mark.parametrize("logged_in", [False, True])
def test_wrong_pin_is_a_clear_error(
    softhsm_token: SoftHsmToken, caplog: pytest.LogCaptureFixture, logged_in: bool
) -> None:
    """Wrong PIN: refused by the token itself, or (while this process is already logged in
    with the right PIN) by the constant-time comparison with that PIN."""
    caplog.set_level(logging.DEBUG)
    key = Pkcs11MasterKey.create_key(
        module=softhsm_token.module,
        token_label=softhsm_token.token_label,
        key_label=softhsm_token.new_key_label(),
        pin=softhsm_token.user_pin,
    )
    label = key.key_id.rsplit("/", 1)[1]
    if not logged_in:
        key.close()
    try:
        with pytest.raises(ConfigError, match="user PIN is wrong") as info:
            _open(softhsm_token, label, pin="not-the-pin-0000")
        assert "not-the-pin-0000" not in str(info.value)
        assert "not-the-pin-0000" not in caplog.text
        if logged_in:  # the right key keeps working
            dek = generate_key()
            assert key.unwrap(key.wrap(dek, wrap_aad("m", 1)), wrap_aad("m", 1)) == dek
    finally:
        key.close()


def test_lost_session_logs_in_again(
    hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken, caplog: pytest.LogCaptureFixture
) -> None:
    dek = generate_key()
    blob = hsm_key.wrap(dek, wrap_aad("m", 1))
    # the HSM dropped the session (restart, network HSM): the token's one login in this
    # process is shared, so closing its session under the key is what a lost session looks like
    login = acquire_login(
        softhsm_token.module, softhsm_token.token_label, Pin(softhsm_token.user_pin)
    )
    try:
        login.session.close()
    finally:
        release_login(login)
    assert hsm_key.unwrap(blob, wrap_aad("m", 1)) == dek
    assert "logging in to" in caplog.text
    assert hsm_key.unwrap(hsm_key.wrap(dek, wrap_aad("m", 2)), wrap_aad("m", 2)) == dek


def test_keys_on_one_token_share_the_login(
    hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken
) -> None:
    label = hsm_key.key_id.rsplit("/", 1)[1]
    second = _open(softhsm_token, label)
    second.close()  # closing one user must not log the other out
    dek = generate_key()
    assert hsm_key.unwrap(hsm_key.wrap(dek, wrap_aad("m", 1)), wrap_aad("m", 1)) == dek
    second.close()  # idempotent


def test_missing_token_label_is_a_clear_error(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(ConfigError, match="no PKCS#11 token labelled 'no-such-token'") as info:
        _open(softhsm_token, "k", token_label="no-such-token")
    assert softhsm_token.token_label in str(info.value)  # lists what is there


def test_missing_key_label_is_a_clear_error(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(ConfigError, match="has no AES key labelled 'absent'"):
        _open(softhsm_token, "absent")


def test_missing_module_is_a_clear_error(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        _open(softhsm_token, "k", module=str(tmp_path / "libnothing.so"))


def test_duplicate_label_refused_on_create(
    hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken
) -> None:
    label = hsm_key.key_id.rsplit("/", 1)[1]
    with pytest.raises(ConfigError, match="already holds a key"):
        Pkcs11MasterKey.create_key(
            module=softhsm_token.module,
            token_label=softhsm_token.token_label,
            key_label=label,
            pin=softhsm_token.user_pin,
        )


def test_tampered_blob_and_wrong_aad_fail(hsm_key: Pkcs11MasterKey) -> None:
    aad = wrap_aad("model-a", 1)
    blob = hsm_key.wrap(generate_key(), aad)
    for other in (wrap_aad("model-b", 1), wrap_aad("model-a", 2)):
        with pytest.raises(IntegrityError, match="wrapped data key failed authentication"):
            hsm_key.unwrap(blob, other)
    messages = set()
    for index in (0, 1, 12, 13, 30, 44, 45, 60):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(IntegrityError) as info:
            hsm_key.unwrap(bytes(tampered), aad)
        messages.add(str(info.value))
    for bad in (b"", blob[:-1], blob + b"\x00"):
        with pytest.raises(IntegrityError) as info:
            hsm_key.unwrap(bad, aad)
        messages.add(str(info.value))
    assert messages == {UNWRAP_FAILED_MESSAGE}


def test_blobs_do_not_cross_providers_or_keys(
    hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    aad = wrap_aad("m", 1)
    file_key = FileMasterKey.create(tmp_path / "mk")
    other = Pkcs11MasterKey.create_key(
        module=softhsm_token.module,
        token_label=softhsm_token.token_label,
        key_label=softhsm_token.new_key_label(),
        pin=softhsm_token.user_pin,
    )
    try:
        hsm_blob = hsm_key.wrap(generate_key(), aad)
        with pytest.raises(IntegrityError):
            other.unwrap(hsm_blob, aad)
        with pytest.raises(IntegrityError):
            file_key.unwrap(hsm_blob, aad)
        with pytest.raises(IntegrityError):
            hsm_key.unwrap(file_key.wrap(generate_key(), aad), aad)
        # Relabelling the format byte does not help either.
        relabelled = b"\x02" + file_key.wrap(generate_key(), aad)[1:]
        with pytest.raises(IntegrityError):
            hsm_key.unwrap(relabelled, aad)
    finally:
        other.close()


def test_closed_key_refuses(softhsm_token: SoftHsmToken) -> None:
    key = Pkcs11MasterKey.create_key(
        module=softhsm_token.module,
        token_label=softhsm_token.token_label,
        key_label=softhsm_token.new_key_label(),
        pin=softhsm_token.user_pin,
    )
    key.close()
    with pytest.raises(StorageError, match="closed"):
        key.wrap(generate_key(), wrap_aad("m", 1))


def test_pin_never_in_repr(hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken) -> None:
    text = repr(hsm_key) + str(hsm_key) + repr(vars(hsm_key))
    assert softhsm_token.user_pin not in text


def test_config_reads_pin_from_environment(softhsm_token: SoftHsmToken) -> None:
    label = softhsm_token.new_key_label()
    config = Pkcs11MasterKeyConfig(
        token_label=softhsm_token.token_label, key_label=label, module=softhsm_token.module
    )
    with pytest.raises(ConfigError, match="SEALTORCH_PKCS11_PIN"):
        open_master_key(config, environ={})
    env = {"SEALTORCH_PKCS11_PIN": softhsm_token.user_pin}
    created = open_master_key(config, environ=env, create=True)
    opened = open_master_key(config, environ=env)
    try:
        dek = generate_key()
        assert opened.unwrap(created.wrap(dek, wrap_aad("m", 1)), wrap_aad("m", 1)) == dek
    finally:
        created.close()
        opened.close()


def test_another_process_unwraps_with_the_same_token(
    hsm_key: Pkcs11MasterKey, softhsm_token: SoftHsmToken
) -> None:
    """Key server replicas share one HSM key: a blob wrapped here unwraps in another process."""
    dek = generate_key()
    blob = hsm_key.wrap(dek, wrap_aad("shared", 3))
    label = hsm_key.key_id.rsplit("/", 1)[1]
    code = (
        "import sys\n"
        "from sealtorch.keyserver.masterkey import Pkcs11MasterKey, wrap_aad\n"
        f"k = Pkcs11MasterKey(module={softhsm_token.module!r}, "
        f"token_label={softhsm_token.token_label!r}, key_label={label!r}, "
        "pin=sys.stdin.readline().strip())\n"
        f"print(k.unwrap(bytes.fromhex({blob.hex()!r}), wrap_aad('shared', 3)).fingerprint)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=softhsm_token.user_pin + "\n",
        capture_output=True,
        text=True,
        env=softhsm_token.environ(),
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == dek.fingerprint
