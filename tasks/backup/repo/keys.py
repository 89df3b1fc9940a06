"""The repository's master key: generated once, stored only wrapped by passphrase-derived keys.

The master key is 64 random bytes: an AES-256-GCM data key and a keyed-BLAKE3 id key. Each
wrapping key comes from scrypt over what a credential reference resolves to, so the credential
can be rotated by adding a wrapped copy, never by re-encrypting chunks.
"""

from __future__ import annotations

import base64
import functools
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tasks.backup.errors import RepositoryError, WeakKey, WrongKey

NONCE_SIZE = 12
_KDF = {"name": "scrypt", "n": 2**15, "r": 8, "p": 1}
_WRAP_AAD = b"patchdrill master key v1"
#: The rule for a new repository's passphrase: long enough that scrypt makes guessing it slow,
#: and not one character repeated. An empty value (an unset-but-present variable, an empty
#: file) would otherwise create an "encrypted" repository anyone can open.
MIN_PASSPHRASE_LENGTH = 12
MIN_DISTINCT_CHARACTERS = 5
PASSPHRASE_RULE = (f"at least {MIN_PASSPHRASE_LENGTH} characters, at least {MIN_DISTINCT_CHARACTERS} of them different "
                   "(e.g. four random words)")


@dataclass(frozen=True)
class MasterKey:
    data_key: bytes
    id_key: bytes

    @classmethod
    def generate(cls) -> "MasterKey":
        raw = os.urandom(64)
        return cls(raw[:32], raw[32:])

    def raw(self) -> bytes:
        return self.data_key + self.id_key

    def __repr__(self) -> str:  # never print key material
        return "MasterKey(***)"


def _derive(passphrase: str, salt: bytes, kdf: dict[str, Any]) -> bytes:
    if kdf.get("name") != "scrypt":
        raise RepositoryError(f"unsupported key derivation {kdf.get('name')!r} in config.json")
    return _scrypt(passphrase, salt, int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))


# A disk's backup opens the repository once per step (each may be a task of its own), and
# scrypt costs ~0.16 s by design: deriving once per process and salt keeps that off every step.
# The passphrase is held in this process anyway (for redaction); nothing is kept on disk.
@functools.lru_cache(maxsize=16)
def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def check_passphrase(passphrase: str, *, reference: str) -> None:
    """Refuse a passphrase that does not meet PASSPHRASE_RULE, naming the reference, never the value."""
    if len(passphrase) < MIN_PASSPHRASE_LENGTH or len(set(passphrase)) < MIN_DISTINCT_CHARACTERS:
        what = "is empty" if not passphrase else "is too weak"
        raise WeakKey(f"the passphrase from {reference} {what}: a new encrypted repository needs {PASSPHRASE_RULE}")


def wrap(master: MasterKey, passphrase: str) -> dict[str, Any]:
    """A `keys` entry of config.json: the master key sealed under the passphrase."""
    salt = os.urandom(16)
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(_derive(passphrase, salt, _KDF)).encrypt(nonce, master.raw(), _WRAP_AAD)
    return {
        "id": uuid.uuid4().hex,
        "created": datetime.now(timezone.utc).isoformat(),
        "salt": base64.b64encode(salt).decode(),
        "wrapped": base64.b64encode(nonce + sealed).decode(),
    }


def unwrap(encryption: dict[str, Any], passphrase: str, *, reference: str, repository: str) -> MasterKey:
    """Try every wrapped copy; a passphrase that opens none is a WrongKey naming the reference."""
    kdf = encryption.get("kdf", _KDF)
    for entry in encryption.get("keys", []):
        try:
            salt = base64.b64decode(entry["salt"])
            blob = base64.b64decode(entry["wrapped"])
        except (KeyError, ValueError, TypeError) as exc:
            raise RepositoryError(f"{repository}: malformed key entry in config.json ({exc})") from None
        try:
            raw = AESGCM(_derive(passphrase, salt, kdf)).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], _WRAP_AAD)
        except InvalidTag:
            continue
        return MasterKey(raw[:32], raw[32:])
    raise WrongKey(f"the key from {reference} does not open repository {repository}: "
                   "none of its wrapped keys authenticates with it")


def kdf_parameters() -> dict[str, Any]:
    return dict(_KDF)
