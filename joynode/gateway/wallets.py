"""Sign-In with Ethereum (EIP-4361) for the gateway: a wallet signs in once and gets a JWT.

A client asks for a nonce, signs the EIP-4361 message naming it with its wallet
(``personal_sign``, EIP-191), and trades message and signature for a bearer token:
an HS256 JWT (pyjwt) whose subject is the wallet's address. The ``siwe`` package
would pin web3 to 7 (../shared/TOOLCHAIN.md), so the message is parsed here, by the
ABNF of the EIP, and must render back to exactly the text signed. Checked: the domain
(this gateway's ``public_host``, else the request's Host), version 1, this chain's
id, a nonce this gateway issued and nobody used, and the times (issued, not before,
expiration). Smart-contract wallets (EIP-1271) are not supported: the signature must
recover to the address.

The JWT key is 32 random bytes in a 0600 file of the data directory (deleting it
signs every wallet out); pyjwt compares HS256 digests with ``hmac.compare_digest``.
Tokens are short-lived (``http.wallet_session_s``); signing out revokes one until
it would have expired (in memory: a restart forgets revocations, not the expiry).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jwt
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.address import is_checksum_address

from joynode.secret_files import SecretFileError, read_secret_file, write_secret_file

log = logging.getLogger(__name__)

AUDIENCE = "joynet-gateway"
NONCE_TTL_S = 300.0
MAX_NONCES = 10_000  # outstanding at once: more are refused until some expire
CLOCK_SKEW_S = 60.0
MAX_MESSAGE = 4096

_HEADER = " wants you to sign in with your Ethereum account:"
_FIELDS = (
    ("URI", "uri"),
    ("Version", "version"),
    ("Chain ID", "chain_id"),
    ("Nonce", "nonce"),
    ("Issued At", "issued_at"),
    ("Expiration Time", "expiration_time"),
    ("Not Before", "not_before"),
    ("Request ID", "request_id"),
)
_NONCE = re.compile(r"^[A-Za-z0-9]{8,}$")


class SignInError(Exception):
    """Why a sign-in or a token is refused (said to the client as a 401)."""


@dataclass(frozen=True)
class SiweMessage:
    """An EIP-4361 message, field by field."""

    domain: str
    address: str
    statement: str | None
    uri: str
    version: str
    chain_id: int
    nonce: str
    issued_at: str
    expiration_time: str | None = None
    not_before: str | None = None
    request_id: str | None = None
    resources: tuple[str, ...] = ()

    def text(self) -> str:
        """The message as a wallet shows and signs it."""
        lines = [self.domain + _HEADER, self.address, ""]
        if self.statement is not None:
            lines += [self.statement, ""]
        for label, name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                lines.append(f"{label}: {value}")
        if self.resources:
            lines.append("Resources:")
            lines += [f"- {r}" for r in self.resources]
        return "\n".join(lines)

    @classmethod
    def parse(cls, text: str) -> SiweMessage:
        """The message ``text`` spells; ``SignInError`` if it is not EIP-4361."""
        if len(text) > MAX_MESSAGE:
            raise SignInError(f"the message is over {MAX_MESSAGE} characters")
        lines = text.split("\n")
        if len(lines) < 4 or not lines[0].endswith(_HEADER) or lines[2] != "":
            raise SignInError("not an EIP-4361 message (its first lines are wrong)")
        domain, address = lines[0].removesuffix(_HEADER), lines[1]
        rest = lines[3:]
        statement = None
        if rest and not rest[0].startswith("URI: "):
            if len(rest) < 2 or rest[1] != "":
                raise SignInError("not an EIP-4361 message (its statement is not one line)")
            statement, rest = rest[0], rest[2:]
        values: dict[str, str] = {}
        for label, name in _FIELDS:
            if rest and rest[0].startswith(label + ": "):
                values[name] = rest[0].removeprefix(label + ": ")
                rest = rest[1:]
        resources: list[str] = []
        if rest and rest[0] == "Resources:":
            resources = [r.removeprefix("- ") for r in rest[1:] if r.startswith("- ")]
            rest = rest[1 + len(resources) :]
        if rest:
            raise SignInError(f"not an EIP-4361 message (unexpected line {rest[0][:80]!r})")
        for required in ("uri", "version", "chain_id", "nonce", "issued_at"):
            if required not in values:
                raise SignInError(f"the message has no {required.replace('_', ' ')}")
        try:
            chain_id = int(values.pop("chain_id"))
        except ValueError:
            raise SignInError("its chain id is not a number") from None
        message = cls(
            domain, address, statement, chain_id=chain_id, resources=tuple(resources), **values
        )
        if message.text() != text:
            raise SignInError("not an EIP-4361 message (it does not render back the same)")
        if not is_checksum_address(address):
            raise SignInError("its address is not EIP-55 checksummed")
        return message


def _timestamp(value: str, what: str) -> float:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SignInError(f"its {what} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise SignInError(f"its {what} has no time zone")
    return parsed.timestamp()


def rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WalletSession:
    """A signed-in wallet, as its token says."""

    address: str
    token_id: str
    expires_at: float


class WalletSignIn:
    """Issues nonces, checks signed messages, and issues and checks the tokens."""

    def __init__(
        self,
        key_file: Path,
        issuer: str,
        chain_id: Callable[[], int | None],
        session_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_file = key_file
        self._key: bytes | None = None  # read (or made) at first use
        self._issuer = issuer
        self._chain_id = chain_id
        self._session_s = session_s
        self._clock = clock
        self._nonces: dict[str, float] = {}  # nonce -> expires at
        self._revoked: dict[str, float] = {}  # token id -> expires at

    def chain_id(self) -> int | None:
        """The chain wallets sign in on (None: this node has none, and takes no wallets)."""
        return self._chain_id()

    def nonce(self) -> str:
        """A fresh nonce, good for one sign-in within ``NONCE_TTL_S``."""
        now = self._clock()
        self._forget_expired(now)
        if len(self._nonces) >= MAX_NONCES:
            raise SignInError("too many sign-ins under way: try again in a few minutes")
        nonce = secrets.token_hex(16)
        self._nonces[nonce] = now + NONCE_TTL_S
        return nonce

    def sign_in(self, text: str, signature: str, host: str) -> tuple[str, WalletSession]:
        """A token for the wallet that signed ``text``; ``SignInError`` says why not."""
        message = SiweMessage.parse(text)
        now = self._clock()
        if message.domain != host:
            raise SignInError(f"the message signs in to {message.domain!r}, not {host!r}")
        if message.version != "1":
            raise SignInError(f"version {message.version!r} (only 1 exists)")
        chain_id = self.chain_id()
        if chain_id is None:
            raise SignInError("this gateway has no chain: wallets cannot sign in")
        if message.chain_id != chain_id:
            raise SignInError(f"the message is for chain {message.chain_id}, not {chain_id}")
        if _NONCE.match(message.nonce) is None:
            raise SignInError("its nonce is not at least 8 letters and digits")
        if _timestamp(message.issued_at, "issued-at time") > now + CLOCK_SKEW_S:
            raise SignInError("it is issued in the future")
        expires = message.expiration_time
        if expires is not None and _timestamp(expires, "expiration time") <= now:
            raise SignInError("the message has expired")
        not_before = message.not_before
        if (
            not_before is not None
            and _timestamp(not_before, "not-before time") > now + CLOCK_SKEW_S
        ):
            raise SignInError("the message is not valid yet")
        try:
            signer = Account.recover_message(
                encode_defunct(text=text), signature=bytes.fromhex(signature.removeprefix("0x"))
            )
        except Exception:  # eth-account raises several types for malformed signatures
            raise SignInError("the signature does not recover") from None
        if signer != message.address:
            raise SignInError(f"the message is signed by {signer}, not {message.address}")
        self._forget_expired(now)
        # The nonce last: a refused message does not burn it, a used one cannot come back.
        if self._nonces.pop(message.nonce, None) is None:
            raise SignInError("its nonce was not issued by this gateway, or is used or expired")
        expires_at = now + self._session_s
        if message.expiration_time is not None:
            expires_at = min(expires_at, _timestamp(message.expiration_time, "expiration time"))
        session = WalletSession(message.address, uuid.uuid4().hex, expires_at)
        claims = {
            "iss": self._issuer,
            "aud": AUDIENCE,
            "sub": session.address,
            "iat": int(now),
            "exp": int(expires_at),
            "jti": session.token_id,
        }
        return jwt.encode(claims, self._session_key(), algorithm="HS256"), session

    def session(self, token: str) -> WalletSession:
        """The session ``token`` opens; ``SignInError`` if it is not one of ours or is over."""
        try:
            claims = jwt.decode(
                token,
                self._session_key(),
                algorithms=["HS256"],
                audience=AUDIENCE,
                issuer=self._issuer,
                # (the times are checked below, by this gateway's clock)
                options={
                    "require": ["exp", "iat", "sub", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError:
            raise SignInError("the token is not one this gateway issued") from None
        if float(claims["exp"]) <= self._clock():
            raise SignInError("the session has expired: sign in again")
        if claims["jti"] in self._revoked:
            raise SignInError("the session was signed out")
        return WalletSession(str(claims["sub"]), str(claims["jti"]), float(claims["exp"]))

    def sign_out(self, session: WalletSession) -> None:
        self._forget_expired(self._clock())
        self._revoked[session.token_id] = session.expires_at

    def _session_key(self) -> bytes:
        if self._key is None:
            try:
                self._key = _session_key(self._key_file)
            except (SecretFileError, OSError) as exc:
                log.error("wallet sign-in is off: %s", exc)
                raise SignInError("this gateway cannot keep wallet sessions now") from None
        return self._key

    def _forget_expired(self, now: float) -> None:
        for held in (self._nonces, self._revoked):
            for gone in [k for k, at in held.items() if at <= now]:
                del held[gone]


def _session_key(path: Path) -> bytes:
    """The JWT key: read from ``path``, made there (0600) the first time."""
    if not path.exists():
        with contextlib.suppress(SecretFileError):  # (made meanwhile by another start)
            write_secret_file(path, base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    try:
        key = base64.b64decode(read_secret_file(path, "gateway session key"), validate=True)
    except ValueError:
        raise SecretFileError(f"gateway session key {path} is not base64") from None
    if len(key) < 32:
        raise SecretFileError(f"gateway session key {path} is shorter than 32 bytes")
    return key
