"""The PKCS#11 release-signing key against a real SoftHSM2 token: an Ed25519 key pair
(``CKK_EC_EDWARDS``, ``CKM_EDDSA``) that never leaves the token, sharing the token (and the
process's login) with the master key, and a key server that signs its release statements with
it — verified by a client that pins only the public key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from _fixtures.keyserver import running_keyserver
from _fixtures.softhsm import SoftHsmToken
from sealtorch._crypto.sign import ed25519_verify
from sealtorch.attestation import SimAttester
from sealtorch.errors import ConfigError
from sealtorch.keys import generate_key
from sealtorch.keyserver.masterkey import Pkcs11MasterKey
from sealtorch.keyserver.signingkey import (
    Pkcs11ReleaseSigningKey,
    Pkcs11SigningKeyConfig,
    ReleaseSigningKey,
    open_signing_key,
)
from sealtorch.keyserver.store import open_store, sqlite_url
from sealtorch.protocol import TrustedReleaseKeys

pytestmark = pytest.mark.softhsm


def _options(token: SoftHsmToken, label: str) -> dict[str, str]:
    return {
        "module": token.module,
        "token_label": token.token_label,
        "key_label": label,
        "pin": token.user_pin,
    }


def _raw_session(token: SoftHsmToken) -> pkcs11.Session:
    lib = pkcs11.lib(token.module)
    slot_token = lib.get_token(token_label=token.token_label)
    try:
        return slot_token.open(user_pin=token.user_pin, rw=True)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return slot_token.open(rw=True)


@pytest.fixture
def hsm_signer(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11ReleaseSigningKey]:
    key = Pkcs11ReleaseSigningKey.create_key(
        **_options(softhsm_token, softhsm_token.new_key_label("rsk"))
    )
    yield key
    key.close()


def test_signs_inside_the_token_and_reopens_by_label(
    hsm_signer: Pkcs11ReleaseSigningKey, softhsm_token: SoftHsmToken
) -> None:
    assert isinstance(hsm_signer, ReleaseSigningKey)
    assert not hsm_signer.in_process  # the key server signs in a worker thread
    signature = hsm_signer.sign(b"statement")
    assert len(signature) == 64
    ed25519_verify(hsm_signer.public_key.raw, signature, b"statement")
    label = hsm_signer.key_label
    again = Pkcs11ReleaseSigningKey(**_options(softhsm_token, label))
    try:
        assert again.public_key == hsm_signer.public_key
        assert again.key_id == hsm_signer.key_id
        ed25519_verify(again.public_key.raw, again.sign(b"x"), b"x")
    finally:
        again.close()
    config = Pkcs11SigningKeyConfig(
        token_label=softhsm_token.token_label, key_label=label, module=softhsm_token.module
    )
    with pytest.raises(ConfigError, match="SEALTORCH_PKCS11_PIN"):
        open_signing_key(config, environ={})
    opened = open_signing_key(config, environ={"SEALTORCH_PKCS11_PIN": softhsm_token.user_pin})
    assert opened.key_id == hsm_signer.key_id
    opened.close()


def test_the_private_key_is_sensitive_and_not_extractable(
    hsm_signer: Pkcs11ReleaseSigningKey, softhsm_token: SoftHsmToken
) -> None:
    label = hsm_signer.key_label
    with _raw_session(softhsm_token) as session:
        private = session.get_key(label=label, object_class=ObjectClass.PRIVATE_KEY)
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            _ = private[Attribute.VALUE]


def test_an_extractable_key_with_the_label_is_refused(softhsm_token: SoftHsmToken) -> None:
    label = softhsm_token.new_key_label("weak-rsk")
    with _raw_session(softhsm_token) as session:
        parameters = session.create_domain_parameters(
            KeyType.EC_EDWARDS,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},
            local=True,
        )
        parameters.generate_keypair(
            store=True,
            label=label,
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
    with pytest.raises(ConfigError, match="can be read out of the token"):
        Pkcs11ReleaseSigningKey(**_options(softhsm_token, label))


def test_labels_are_checked(
    hsm_signer: Pkcs11ReleaseSigningKey, softhsm_token: SoftHsmToken
) -> None:
    label = hsm_signer.key_label
    with pytest.raises(ConfigError, match="already holds a key labelled"):
        Pkcs11ReleaseSigningKey.create_key(**_options(softhsm_token, label))
    with pytest.raises(ConfigError, match="no Ed25519 key pair labelled 'absent'"):
        Pkcs11ReleaseSigningKey(**_options(softhsm_token, "absent"))
    master = Pkcs11MasterKey.create_key(**_options(softhsm_token, softhsm_token.new_key_label()))
    try:  # the master key's label names an AES key, not a signing key pair
        with pytest.raises(ConfigError, match="no Ed25519 key pair"):
            Pkcs11ReleaseSigningKey(**_options(softhsm_token, master.key_label))
    finally:
        master.close()


def test_a_key_server_with_both_keys_in_one_token_signs_what_it_releases(
    softhsm_token: SoftHsmToken, hsm_signer: Pkcs11ReleaseSigningKey, tmp_path: Path
) -> None:
    """Master key and release-signing key in the same token, one login; the client pins only
    the signing key's public key and accepts the keys, each with its verified statement."""
    master = Pkcs11MasterKey.create_key(**_options(softhsm_token, softhsm_token.new_key_label()))
    store = open_store(sqlite_url(tmp_path / "keys.db"))
    store.migrate()
    attester = SimAttester(role="app", key_path=tmp_path / "sim.key")
    dek = generate_key()
    try:
        with running_keyserver(
            tmp_path,
            store=store,
            master=master,
            attester=attester,
            uds=tmp_path / "ks.sock",
            signing_key=hsm_signer,
        ) as server:
            server.add_model("m", key=dek)
            with server.client(session=True) as client:
                released = client.release(["m"]).keys[0]
                renewed = client.renew().keys[0]
        pins = TrustedReleaseKeys([hsm_signer.public_key.text])
        for key in (released, renewed):
            assert key.key == dek
            statement = pins.verify(key.statement, what="key", source="test")
            assert statement.signing_key_id == hsm_signer.key_id
    finally:
        store.close()
        master.close()
