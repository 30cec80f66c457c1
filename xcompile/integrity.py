"""Signed cache records: whoever can write a shared cache cannot forge a measurement or an entry.

Every JSON record xcompile puts in its cache (a measurement, a pass entry's artifact and checks)
is stored with an HMAC-SHA256 over its canonical JSON, keyed by a secret kept outside the cache:
`$XDG_CONFIG_HOME/xcompile/cache.key` (default `~/.config/xcompile/cache.key`, mode 0600, made on
first use; `XCOMPILE_CACHE_KEY` names another file). A record whose signature does not verify
(edited, copied from another user's cache, malformed) is treated as absent: the work is done
again and the build notes it. Where no key can be kept (no writable config folder), a key lives
for this process only, so the cache is written but never trusted across runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

SIG_KEY = "hmac_sha256"


def key_path() -> Path:
    env = os.environ.get("XCOMPILE_CACHE_KEY")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "xcompile" / "cache.key"


@functools.cache
def _key() -> bytes:
    path = key_path()
    with contextlib.suppress(OSError, ValueError):
        data = bytes.fromhex(path.read_text().strip())
        if len(data) >= 32:
            return data
    key = secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
    except FileExistsError:           # another process made it first: use theirs
        with contextlib.suppress(OSError, ValueError):
            data = bytes.fromhex(path.read_text().strip())
            if len(data) >= 32:
                return data
    except OSError:
        pass                          # no place for a key: trust nothing across runs
    return key


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with its signature added under `hmac_sha256`."""
    body = {k: v for k, v in doc.items() if k != SIG_KEY}
    return {**body, SIG_KEY: hmac.new(_key(), _canonical(body), hashlib.sha256).hexdigest()}


def verify(doc: Any) -> dict[str, Any] | None:
    """The record without its signature, or None when it is not a record this user signed."""
    if not isinstance(doc, dict) or not isinstance(doc.get(SIG_KEY), str):
        return None
    body = {k: v for k, v in doc.items() if k != SIG_KEY}
    want = hmac.new(_key(), _canonical(body), hashlib.sha256).hexdigest()
    return body if hmac.compare_digest(want, doc[SIG_KEY]) else None
