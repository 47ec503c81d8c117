"""API keys for the Serve endpoint: where they come from and how a request is checked.

Keys come from the replica's own environment (`TOKENCARVE_API_KEY`, one key or several separated by
commas) and/or a key file named in the settings (one key per line; blank lines and `# comments`
ignored). They are never a setting themselves: a value on the command line (`serve run ... key=...`)
or in a Serve config file ends up in `ps`, shell history, Serve's stored config and the dashboard.

The replica reads them itself, in its constructor, rather than the driver reading them in
`build_app` and passing them along: the deployment's arguments are stored by the Serve controller,
and with `serve deploy` `build_app` does not even run where the operator typed the command.
So the environment variable has to be set where the replica runs (docs/SERVING.md, "API keys").
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "TOKENCARVE_API_KEY"
LOG = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's log file


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys (as bytes, for constant-time comparison) and where they came from (for the log)."""

    keys: tuple[bytes, ...]
    sources: tuple[str, ...]

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def accepts(self, authorization: str | None) -> bool:
        """True for an `Authorization: Bearer <key>` header carrying one of the keys (always True when
        no key is configured). Every key is compared, with hmac.compare_digest, whatever matched
        first: the time taken says nothing about which key, or how much of one, was right."""
        if not self.keys:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        candidate = token.strip().encode()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


def parse_keys(text: str, *, separator: str | None) -> list[str]:
    """Keys in `text`: split on `separator` (None: one per line, blank lines and # comments ignored)."""
    items = (
        text.split(separator) if separator else [line for line in text.splitlines() if not line.strip().startswith("#")]
    )
    keys = [item.strip() for item in items if item.strip()]
    for key in keys:
        if any(c.isspace() for c in key):  # a Bearer token cannot carry it; almost surely a paste error
            raise ValueError("an API key contains whitespace")
    return keys


def load_api_keys(key_file: str | None, environ=os.environ) -> ApiKeys:
    """Keys from the environment variable and the key file together (either may be absent).

    A key file that is named but missing or empty is an error, not an open endpoint: the operator
    asked for a closed one."""
    keys, sources = [], []
    if environ.get(ENV_VAR, "").strip():
        keys += parse_keys(environ[ENV_VAR], separator=",")
        sources.append(f"${ENV_VAR}")
    if key_file:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file {str(path)!r} does not exist on this node")
        from_file = parse_keys(path.read_text(encoding="utf-8"), separator=None)
        if not from_file:
            raise ValueError(f"api_key_file {str(path)!r} holds no key")
        keys += from_file
        sources.append(str(path))
    return ApiKeys(tuple(dict.fromkeys(k.encode() for k in keys)), tuple(sources))


def log_api_keys(api_keys: ApiKeys) -> None:
    """Say at startup whether the endpoint is closed (how many keys, from where; never a key itself)."""
    if api_keys.required:
        LOG.info("API keys required on /v1/*: %d key(s) from %s", len(api_keys.keys), ", ".join(api_keys.sources))
    else:
        LOG.warning(
            "no API key configured (%s unset, no api_key_file): /v1/* is open to every client that "
            "can reach this endpoint",
            ENV_VAR,
        )
