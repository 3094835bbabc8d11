"""Who may use the service: bearer tokens, each with a role.

Roles are ordered, each allowing what the ones before it allow: `inspect` (score images, read the
history and the images), `review` (mark inspections as defect / false alarm / normal), `admin`
(update the model from the reviews, activate or roll back a version). Tokens come from `--token`
or the `ANOMALENS_TOKEN` environment variable (role admin) or a tokens file, one per line:
`NAME ROLE TOKEN` (`#` starts a comment). Only the tokens' SHA-256 digests are kept in memory and
handed to worker processes; a token is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from anomalens.errors import ParameterError

ROLES = ("inspect", "review", "admin")
TOKEN_ENV = "ANOMALENS_TOKEN"
COOKIE = "anomalens_token"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Grant:
    """A token's holder: `name` (recorded with their reviews) and `role`."""

    name: str
    role: str

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


OPEN = Grant("operator", "admin")
"""Everyone, when no token is configured (a loopback-only service)."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ParameterError(f"{where}: a token needs at least {MIN_TOKEN_LENGTH} characters")
    return digest(token)


def read_tokens(token: str | None, tokens_file: Path | None) -> list[tuple[str, str, str]]:
    """(name, role, SHA-256 of the token) for every configured token."""
    grants = []
    if token:
        grants.append(("admin", "admin", _checked(token, "--token")))
    if tokens_file is not None:
        try:
            lines = tokens_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ParameterError(f"cannot read the tokens file {tokens_file}: {error}") from error
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{tokens_file}, line {number}"
            if len(fields) != 3:
                raise ParameterError(f"{where}: expected NAME ROLE TOKEN, got {len(fields)} fields")
            name, role, secret = fields
            if role not in ROLES:
                raise ParameterError(
                    f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}"
                )
            grants.append((name, role, _checked(secret, where)))
        if not grants:
            raise ParameterError(f"the tokens file {tokens_file} has no tokens")
    return grants


class Access:
    """Checks a request's token against the configured ones (none configured: everyone is
    `OPEN`)."""

    def __init__(self, tokens: list[tuple[str, str, str]] | list[list[str]]) -> None:
        self.grants = {entry[2]: Grant(entry[0], entry[1]) for entry in tokens}

    @property
    def required(self) -> bool:
        return bool(self.grants)

    def grant(self, token: str | None) -> Grant | None:
        """The holder of `token`, or None when tokens are required and it is not one of them."""
        if not self.required:
            return OPEN
        if not token:
            return None
        wanted = digest(token)
        for known, grant in self.grants.items():
            if hmac.compare_digest(known, wanted):
                return grant
        return None


def request_token(headers: dict[str, str]) -> str | None:
    """The bearer token of a request's headers (`Authorization: Bearer ...`) or its cookie."""
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == COOKIE and value:
            return value
    return None
