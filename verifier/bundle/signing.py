"""Keyed signatures over an artifact's manifest digest: HMAC-SHA256 or Ed25519.

A key file is either raw secret bytes (HMAC-SHA256: the same file signs and verifies)
or a PEM Ed25519 key (the private key signs; its public key verifies; needs `cryptography`).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SigningKey", "SignatureError", "load_key", "as_key", "sign", "verify",
           "HMAC_ALG", "ED25519_ALG", "MIN_SECRET_BYTES"]

HMAC_ALG = "hmac-sha256"
ED25519_ALG = "ed25519"
#: an HMAC key file shorter than this is refused (make one: head -c 32 /dev/urandom > key)
MIN_SECRET_BYTES = 16
_MAX_KEY_FILE = 64 * 1024


class SignatureError(ValueError):
    """A key cannot be used, or a signature does not verify; the message says which."""


@dataclass(frozen=True)
class SigningKey:
    """A loaded key. `alg` is "hmac-sha256" or "ed25519"; `key_id` names it in records
    without revealing it; `can_sign` is False for an Ed25519 public key."""

    alg: str
    key_id: str
    secret: bytes | None = None
    private: Any = None
    public: Any = None
    path: Path | None = None

    @property
    def can_sign(self) -> bool:
        return self.secret is not None or self.private is not None


def load_key(path: str | Path) -> SigningKey:
    """Read a key file: PEM Ed25519 (private or public) or, otherwise, a raw HMAC secret."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise SignatureError(f"cannot read key file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_KEY_FILE:
        raise SignatureError(f"key file {path} is over {_MAX_KEY_FILE} bytes: not a key")
    if data.lstrip().startswith(b"-----BEGIN"):
        return _load_pem(data, path)
    if len(data) < MIN_SECRET_BYTES:
        raise SignatureError(f"HMAC key file {path} holds {len(data)} bytes; use at least "
                             f"{MIN_SECRET_BYTES} random bytes (head -c 32 /dev/urandom > {path.name})")
    key_id = "hmac:" + hmac.new(data, b"verifier key id", hashlib.sha256).hexdigest()[:16]
    return SigningKey(HMAC_ALG, key_id, secret=data, path=path)


def as_key(key: str | Path | SigningKey | None) -> SigningKey | None:
    """A `SigningKey` from a key file path (or the key itself; None stays None)."""
    return key if key is None or isinstance(key, SigningKey) else load_key(key)


def sign(key: SigningKey, message: bytes) -> dict[str, str]:
    """The signature record {"alg", "key_id", "value" (hex)} of `message`."""
    if not key.can_sign:
        raise SignatureError(f"{key.path or 'this key'} is an Ed25519 public key: it verifies "
                             f"signatures but cannot sign; give the private key")
    if key.alg == HMAC_ALG:
        value = hmac.new(key.secret, message, hashlib.sha256).hexdigest()
    else:
        value = key.private.sign(message).hex()
    return {"alg": key.alg, "key_id": key.key_id, "value": value}


def verify(key: SigningKey, record: Any, message: bytes) -> None:
    """Raise `SignatureError` unless `record` is a valid signature of `message` by `key`."""
    if not isinstance(record, dict) or not isinstance(record.get("value"), str):
        raise SignatureError("the signature record is malformed")
    if record.get("alg") != key.alg or record.get("key_id") != key.key_id:
        raise SignatureError(f"it was signed with {record.get('alg')} key {record.get('key_id')}, "
                             f"not with the {key.alg} key {key.key_id} given")
    if key.alg == HMAC_ALG:
        expected = hmac.new(key.secret, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, record["value"]):
            raise SignatureError("the HMAC does not match: the manifest was changed after signing")
        return
    from cryptography.exceptions import InvalidSignature

    try:
        key.public.verify(bytes.fromhex(record["value"]), message)
    except (InvalidSignature, ValueError):
        raise SignatureError("the Ed25519 signature does not verify: the manifest was "
                             "changed after signing") from None


def _load_pem(data: bytes, path: Path) -> SigningKey:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                                       Ed25519PublicKey)
    except ImportError:
        raise SignatureError(f"{path} is a PEM key: Ed25519 needs the 'cryptography' package "
                             f"(pip install 'verifier[sign]')") from None
    private = None
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            public = private.public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"cannot read PEM key {path}: {e}") from None
    if not isinstance(public, Ed25519PublicKey) or (private is not None and
                                                    not isinstance(private, Ed25519PrivateKey)):
        raise SignatureError(f"{path} is a PEM key but not Ed25519 (make one: openssl genpkey "
                             f"-algorithm ed25519 -out {path.name})")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    return SigningKey(ED25519_ALG, key_id, private=private, public=public, path=path)
