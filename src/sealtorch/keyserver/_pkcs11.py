"""PKCS#11 tokens (HSMs; SoftHSM2 in tests) shared by the key server's keys in a token.

The master key (:mod:`sealtorch.keyserver.masterkey`) and the release-signing key
(:mod:`sealtorch.keyserver.signingkey`) may live in the same token. PKCS#11 login state belongs
to the whole process (per token), so both share one :class:`TokenLogin`, and
:class:`TokenKey` gives each key the same behaviour: found by label, operations serialised per
token, one new login when the token dropped the session (HSM restart), unusable after a
``fork``. PINs are never logged or shown.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

from sealtorch.errors import ConfigError, StorageError

__all__ = [
    "PIN_ENV",
    "SOFTHSM2_MODULE",
    "Pin",
    "TokenKey",
    "TokenKeyConfig",
    "TokenLogin",
    "acquire_login",
    "pin_from",
    "pkcs11_library",
    "release_login",
]

_log = logging.getLogger("sealtorch.keyserver.masterkey")

#: Environment variable holding the PKCS#11 user PIN (default name).
PIN_ENV = "SEALTORCH_PKCS11_PIN"
#: The PKCS#11 module most Debian/Ubuntu SoftHSM2 installs provide.
SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class Pin:
    """Holds a PIN without ever showing it."""

    __slots__ = ("_digest", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._digest = hashlib.sha256(b"sealtorch/v1/pin\x00" + value.encode()).digest()

    def reveal(self) -> str:
        return self._value

    def matches(self, other: Pin) -> bool:
        return hmac.compare_digest(self._digest, other._digest)

    def __repr__(self) -> str:
        return "<PIN redacted>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("PINs cannot be pickled")


def pkcs11_library() -> Any:
    try:
        import pkcs11  # optional server dependency, imported on first use
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError(
            "keys in a PKCS#11 token need python-pkcs11: pip install 'sealtorch[server]'"
        ) from exc
    return pkcs11


def find_token(lib: Any, module: str, token_label: str) -> Any:
    if not Path(module).exists():
        raise ConfigError(
            f"PKCS#11 module {module} does not exist; install the HSM's PKCS#11 library "
            f"(for SoftHSM2: apt-get install softhsm2, module {SOFTHSM2_MODULE})"
        )
    try:
        library = lib.lib(module)
    except lib.exceptions.PKCS11Error as exc:
        raise ConfigError(f"cannot load the PKCS#11 module {module}: {exc}") from exc
    try:
        return library.get_token(token_label=token_label)
    except lib.exceptions.NoSuchToken as exc:
        labels = sorted({t.label for t in library.get_tokens() if t.label})
        raise ConfigError(
            f"no PKCS#11 token labelled {token_label!r} in {module} "
            f"(tokens present: {', '.join(map(repr, labels)) or 'none'}); "
            "check the token label in the configuration, or initialise the token "
            "(SoftHSM2: softhsm2-util --init-token --free --label LABEL)"
        ) from exc
    except lib.exceptions.PKCS11Error as exc:
        raise StorageError(
            f"the PKCS#11 module {module} failed to list tokens ({type(exc).__name__})"
        ) from exc


class TokenLogin:
    """The logged-in session of this process on one token, shared by every master key on it.

    PKCS#11 login state belongs to the whole process (per token): a second ``C_Login`` fails
    with ``CKR_USER_ALREADY_LOGGED_IN`` and ``C_Logout`` logs out every session. So each
    process logs in once per token, reference-counts the users, and logs out when the last
    one closes. A later user must present the same PIN (compared in constant time).
    """

    def __init__(self, module: str, token_label: str, pin: Pin) -> None:
        self.module = module
        self.token_label = token_label
        self.pin = pin
        self.lock = threading.Lock()
        self.users = 0
        self.generation = 0
        self.pid = os.getpid()
        self.session: Any = None

    def connect(self) -> None:
        """(Re)open the read-write session and log in. Caller holds ``lock`` or owns self."""
        lib = pkcs11_library()
        token = find_token(lib, self.module, self.token_label)
        try:
            session = token.open(user_pin=self.pin.reveal(), rw=True)
        except (
            lib.exceptions.PinIncorrect,
            lib.exceptions.PinInvalid,
            lib.exceptions.PinLenRange,
        ) as exc:
            raise wrong_pin(self.token_label) from exc
        except (lib.exceptions.PinLocked, lib.exceptions.PinExpired) as exc:
            raise ConfigError(
                f"the user PIN of PKCS#11 token {self.token_label!r} is locked or expired; "
                "reset it with the token's security officer"
            ) from exc
        except lib.exceptions.UserPinNotInitialized as exc:
            raise ConfigError(
                f"PKCS#11 token {self.token_label!r} has no user PIN yet; initialise it first"
            ) from exc
        except lib.exceptions.PKCS11Error as exc:
            raise StorageError(
                f"cannot log in to PKCS#11 token {self.token_label!r} ({type(exc).__name__}); "
                "is another library in this process logged in to it?"
            ) from exc
        self.session = session
        self.generation += 1

    def close(self) -> None:
        session, self.session = self.session, None
        if session is not None and os.getpid() == self.pid:
            try:
                session.close()
            except pkcs11_library().exceptions.PKCS11Error:
                _log.debug("closing the PKCS#11 session failed", exc_info=True)


def wrong_pin(token_label: str) -> ConfigError:
    return ConfigError(
        f"PKCS#11 login to token {token_label!r} failed: the user PIN is wrong. "
        f"Set the correct PIN in ${PIN_ENV} (or the configuration)"
    )


_LOGINS: dict[tuple[str, str], TokenLogin] = {}
_LOGINS_LOCK = threading.Lock()


def acquire_login(module: str, token_label: str, pin: Pin) -> TokenLogin:
    key = (os.path.realpath(module), token_label)
    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is not None and login.pid != os.getpid():  # inherited through fork: unusable
            del _LOGINS[key]
            login = None
        if login is None:
            login = TokenLogin(module, token_label, pin)
            login.connect()
            _LOGINS[key] = login
        elif not login.pin.matches(pin):
            raise wrong_pin(token_label)
        login.users += 1
        return login


def release_login(login: TokenLogin) -> None:
    with _LOGINS_LOCK:
        login.users -= 1
        if login.users > 0:
            return
        key = (os.path.realpath(login.module), login.token_label)
        if _LOGINS.get(key) is login:
            del _LOGINS[key]
        with login.lock:
            login.close()


_T = TypeVar("_T")
_K = TypeVar("_K", bound="TokenKey")


def pin_from(environ: Mapping[str, str], *, pin_env: str, token_label: str) -> str:
    """The user PIN of ``token_label`` from the environment variable ``pin_env``."""
    pin = environ.get(pin_env)
    if not pin:
        raise ConfigError(
            f"the PKCS#11 user PIN for token {token_label!r} is not set; "
            f"export {pin_env}=... before starting the key server"
        )
    return pin


class TokenKey(ABC):
    """A key inside a PKCS#11 token, found by label in this process's login on that token.

    Subclasses implement :meth:`_locate` (look the key up in the session and check its
    attributes, with :meth:`_get_unique`; return its handle) and :meth:`_generate` (make the
    key in the token, for :meth:`create_key`), and run their operations through :meth:`_run`.
    """

    #: What the key is, for messages ("master key", "release-signing key").
    what = "key"
    #: Added to the message when the token cannot create the key (what it must support).
    create_hint: ClassVar[str] = ""

    @classmethod
    def create_key(
        cls: type[_K],
        *,
        module: str | os.PathLike[str],
        token_label: str,
        key_label: str,
        pin: str,
    ) -> _K:
        """Generate the key inside the token (sensitive, non-extractable) and open it.

        Refuses when an object with ``key_label`` already exists in the token.
        """
        lib = pkcs11_library()
        login = acquire_login(os.fspath(module), token_label, Pin(pin))
        try:
            with login.lock:
                session = login.session
                try:
                    query = {lib.Attribute.LABEL: key_label, **cls._existing_query(lib)}
                    existing = list(session.get_objects(query))
                    if not existing:
                        cls._generate(lib, session, key_label)
                except lib.exceptions.PKCS11Error as exc:
                    raise StorageError(
                        f"the PKCS#11 token {token_label!r} could not create the {cls.what} "
                        f"({type(exc).__name__}){cls.create_hint}"
                    ) from exc
            if existing:
                raise ConfigError(
                    f"token {token_label!r} already holds a key labelled {key_label!r}; "
                    f"use it (open the {cls.what}) or choose another label"
                )
            return cls(module=module, token_label=token_label, key_label=key_label, pin=pin)
        finally:
            release_login(login)

    @classmethod
    def _existing_query(cls, lib: Any) -> dict[Any, Any]:
        """Attributes (besides the label) of the objects that make a label taken."""
        return {}

    @classmethod
    @abstractmethod
    def _generate(cls, lib: Any, session: Any, key_label: str) -> None:
        """Create the key (or key pair) labelled ``key_label`` in ``session``'s token."""

    def __init__(
        self,
        *,
        module: str | os.PathLike[str],
        token_label: str,
        key_label: str,
        pin: str,
    ) -> None:
        self._module = os.fspath(module)
        self._token_label = token_label
        self._key_label = key_label
        self._key: Any = None
        self._generation = -1
        self._closed = False
        self._login = acquire_login(self._module, token_label, Pin(pin))
        found = False
        try:
            with self._login.lock:
                self._find_key()
            found = True
        finally:
            if not found:
                self._closed = True
                release_login(self._login)

    @property
    def key_label(self) -> str:
        """The key's label in its token (not secret)."""
        return self._key_label

    @abstractmethod
    def _locate(self, lib: Any, session: Any) -> Any:
        """The key's handle in ``session``, checked (ConfigError if unusable)."""

    def _get_unique(self, lib: Any, session: Any, *, key_type: Any, object_class: Any) -> Any:
        """The one object of ``object_class`` and ``key_type`` with this key's label;
        ConfigError when there is none (:meth:`_missing`) or several."""
        try:
            return session.get_key(
                label=self._key_label, key_type=key_type, object_class=object_class
            )
        except lib.exceptions.NoSuchKey as exc:
            raise ConfigError(
                f"PKCS#11 token {self._token_label!r} has no {self._missing()}"
            ) from exc
        except lib.exceptions.MultipleObjectsReturned as exc:
            raise ConfigError(
                f"PKCS#11 token {self._token_label!r} holds several keys labelled "
                f"{self._key_label!r}; the {self.what} label must be unique"
            ) from exc

    def _missing(self) -> str:
        """What is missing and how to create it, after "PKCS#11 token 'T' has no "."""
        return f"key labelled {self._key_label!r}"

    def _find_key(self) -> None:
        """Look the key up in the current session (caller holds the token lock)."""
        self._key = self._locate(pkcs11_library(), self._login.session)
        self._generation = self._login.generation

    def close(self) -> None:
        """Release this key's share of the token login (logs out after the last user)."""
        if self._closed:
            return
        self._closed = True
        self._key = None
        release_login(self._login)

    def _run(self, operation: Callable[[Any, Any], _T]) -> _T:
        """Run ``operation(lib, key)`` under the token lock; log in again once if needed."""
        lib = pkcs11_library()
        lost = (
            lib.exceptions.SessionClosed,
            lib.exceptions.SessionHandleInvalid,
            lib.exceptions.DeviceRemoved,
            lib.exceptions.TokenNotPresent,
            lib.exceptions.UserNotLoggedIn,
            lib.exceptions.KeyHandleInvalid,
            lib.exceptions.ObjectHandleInvalid,
        )
        login = self._login
        with login.lock:
            if self._closed:
                raise StorageError(f"the PKCS#11 {self.what} was closed")
            if login.pid != os.getpid():
                raise StorageError(
                    f"this PKCS#11 {self.what} was opened before a fork; open it again in "
                    "each worker process"
                )
            if self._generation != login.generation:
                self._find_key()
            try:
                return operation(lib, self._key)
            except lost:
                _log.warning("PKCS#11 session lost; logging in to %r again", self._token_label)
                login.close()
                login.connect()
                self._find_key()
                return operation(lib, self._key)

    def __reduce__(self) -> NoReturn:
        raise TypeError("keys in a PKCS#11 token cannot be pickled")


@dataclass(frozen=True)
class TokenKeyConfig:
    """A key inside a PKCS#11 token; the user PIN comes from the environment (``pin_env``)."""

    token_label: str
    key_label: str
    module: str = SOFTHSM2_MODULE
    pin_env: str = PIN_ENV

    def open(self, key_type: type[_K], *, environ: Mapping[str, str] | None, create: bool) -> _K:
        """Open the key as ``key_type`` (with ``create``, generate it first)."""
        pin = pin_from(
            os.environ if environ is None else environ,
            pin_env=self.pin_env,
            token_label=self.token_label,
        )
        opener = key_type.create_key if create else key_type
        return opener(
            module=self.module, token_label=self.token_label, key_label=self.key_label, pin=pin
        )
