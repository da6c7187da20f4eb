"""Validated answers kept on disk, so a rerun never pays twice for one: a request cache in SQLite.

A question's key is a SHA-256 over everything that shapes its answer — the backend's identity (its base URL and
model, or the local model and its decoding settings; never an API key), the task (name, answer schema, its
``max_tokens``), the messages and the temperature — written as canonical JSON. The value is the answer text that
validated and the usage it cost. A hit costs no call, no rate-limit budget and no tokens; it is parsed by the task
again before use, so an entry that no longer validates is a miss, never a wrong answer.

The file is SQLite in WAL mode with a busy timeout: several processes (two ``polytask run`` jobs, Ray workers on one
machine) can read and write one cache at once without corrupting it. A file that is not a readable SQLite database
raises :class:`~polytask.ConfigurationError` naming it.

The per-call ``max_tokens`` the caller learns from real answers (``_estimates.CompletionBudget``) is left out of the
key on purpose: only answers that ended by themselves (not cut off) are stored, and such an answer does not depend
on a cap it never reached, while the learned cap differs between a first run and its rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import Message
from .exceptions import ConfigurationError

__all__ = ["CachedAnswer", "RequestCache", "default_cache_path"]

_SCHEMA_VERSION = 1


def default_cache_path() -> Path:
    """``$POLYTASK_CACHE_DIR/requests.sqlite``, else ``~/.cache/polytask/requests.sqlite`` (the CLI's default)."""
    root = os.environ.get("POLYTASK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "polytask")
    return Path(root) / "requests.sqlite"


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A stored answer: the ``content`` that validated, and the prompt / completion tokens it cost when paid for."""

    content: str
    prompt_tokens: int
    completion_tokens: int


class RequestCache:
    """Validated answers keyed by request, in one SQLite file (created with its folder when missing).

    Args:
        path: the database file.
        timeout: seconds a write waits for another process's write to finish (SQLite's busy timeout).

    Attributes:
        hits, misses, stored: counters since this object was made.

    Raises:
        ConfigurationError: the file cannot be created, or is not a readable polytask cache (the message names it
            and says what to do).

    Thread-safety: one connection, guarded by a lock; calls are short (a lookup or one insert).
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed answer it can see
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, content TEXT NOT NULL, "
                "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(_SCHEMA_VERSION),))
            version = self._db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0]
        except (sqlite3.Error, OSError) as error:
            raise self._broken(error) from None
        if version != str(_SCHEMA_VERSION):
            raise ConfigurationError(
                f"the request cache {self.path} was written by another polytask version (format {version}, this "
                f"one reads {_SCHEMA_VERSION}); choose another file or delete it"
            )

    @staticmethod
    def key(
        identity: str,
        task: str,
        schema: dict[str, Any],
        max_tokens: int,
        messages: list[Message],
        temperature: float,
    ) -> str:
        """The key of one question (a hex SHA-256): ``identity`` is the backend's (never a secret), ``task`` its name,
        ``schema`` its answer schema, ``max_tokens`` the task's own cap."""
        material = {
            "v": _SCHEMA_VERSION,
            "backend": identity,
            "task": task,
            "schema": schema,
            "max_tokens": max_tokens,
            "messages": messages,
            "temperature": temperature,
        }
        text = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for ``key``, or None (counted as a hit or a miss).

        Raises:
            ConfigurationError: the file became unreadable (corrupt, deleted under a reader, …).
        """
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT content, prompt_tokens, completion_tokens FROM answers WHERE key = ?", (key,)
                ).fetchone()
            except sqlite3.Error as error:
                raise self._broken(error) from None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return CachedAnswer(content=row[0], prompt_tokens=int(row[1]), completion_tokens=int(row[2]))

    def put(self, key: str, content: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Store the validated answer for ``key`` (a later ``put`` of the same key replaces it).

        Raises:
            ConfigurationError: the file cannot be written (disk full, read-only, corrupt).
        """
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                    (key, content, int(prompt_tokens), int(completion_tokens), time.time()),
                )
            except sqlite3.Error as error:
                raise self._broken(error) from None
        self.stored += 1

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"RequestCache({str(self.path)!r}, hits={self.hits}, misses={self.misses}, stored={self.stored})"

    def _broken(self, error: Exception) -> ConfigurationError:
        return ConfigurationError(
            f"the request cache {self.path} cannot be used ({type(error).__name__}: {error}); delete the file or "
            "choose another (--cache PATH, or --no-cache)"
        )
