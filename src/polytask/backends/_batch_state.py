"""The Batch API mode's state file: which batches were submitted, which requests each holds, and how far each got,
so a run killed mid-batch (kill -9 included) waits for its batches again instead of paying for them twice.

One SQLite file (WAL, each change committed at once), two tables:

- ``submissions``: one row per input file sent: its ``file_id``, the ``batch_id`` once the batch was created (None
  while only the upload is known: a run that died between the upload and the batch's creation, whose batch may
  or may not exist; the next run looks for it by its input file), the batch's last ``status`` and its
  ``output_file_id`` / ``error_file_id``;
- ``requests``: ``(custom_id, submission)``: the requests a submission holds (a custom_id names its request's
  content, see :func:`polytask.backends._batch.custom_id`, so a rerun finds its request again).

Nothing secret is written: no API key, no header, no request body.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ConfigurationError

__all__ = ["BatchState", "Submission"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id TEXT NOT NULL,
    batch_id TEXT,
    status TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    custom_id TEXT NOT NULL,
    submission INTEGER NOT NULL REFERENCES submissions(key),
    PRIMARY KEY (custom_id, submission)
);
CREATE INDEX IF NOT EXISTS requests_by_submission ON requests(submission);
"""


@dataclass(frozen=True, slots=True)
class Submission:
    """One recorded input file and its batch.

    Attributes:
        key: the row's number (the order submissions were made in).
        file_id: the uploaded input file's id.
        batch_id: the batch's id, or None when the run died before the batch was created (or recorded).
        status: the batch's last known status (``"uploaded"`` before the batch exists, then OpenAI's:
            ``validating``, ``in_progress``, ``finalizing``, ``completed``, ``failed``, ``expired``,
            ``cancelling``, ``cancelled``).
        output_file_id, error_file_id: the batch's result files, once it has them.
    """

    key: int
    file_id: str
    batch_id: str | None
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None


class BatchState:
    """The state file at ``path`` (made on first use, with its folder's permissions).

    Args:
        path: the SQLite file (the CLI's: ``.OUTPUT.batches`` beside the output's partial file).

    Raises:
        ConfigurationError: the file cannot be opened or is not a state file (the message names it).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            raise ConfigurationError(
                f"cannot use the batch state file {self.path}: {error}; move it away (its batches are then "
                "submitted again, and paid for again) or choose another path"
            ) from None

    def close(self) -> None:
        """Close the file (every change is committed already)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def uploaded(self, file_id: str, custom_ids: Iterable[str]) -> int:
        """Record an uploaded input file holding ``custom_ids`` (before its batch is created); returns its key."""
        with self._db:
            self._db.execute("BEGIN")
            cursor = self._db.execute(
                "INSERT INTO submissions (file_id, status, created) VALUES (?, 'uploaded', ?)", (file_id, time.time())
            )
            key = cursor.lastrowid
            assert key is not None
            self._db.executemany(
                "INSERT OR IGNORE INTO requests (custom_id, submission) VALUES (?, ?)", ((c, key) for c in custom_ids)
            )
        return key

    def update(
        self,
        key: int,
        *,
        batch_id: str | None = None,
        status: str,
        output_file_id: str | None = None,
        error_file_id: str | None = None,
    ) -> None:
        """Record what a submission's batch is now (fields left None keep their value)."""
        self._db.execute(
            "UPDATE submissions SET batch_id = COALESCE(?, batch_id), status = ?, "
            "output_file_id = COALESCE(?, output_file_id), error_file_id = COALESCE(?, error_file_id) WHERE key = ?",
            (batch_id, status, output_file_id, error_file_id, key),
        )

    def latest(self, custom_id: str) -> Submission | None:
        """The newest submission holding ``custom_id`` (a request sent again after a failed line is in several),
        or None."""
        row = self._db.execute(
            "SELECT s.key, s.file_id, s.batch_id, s.status, s.output_file_id, s.error_file_id FROM requests r "
            "JOIN submissions s ON s.key = r.submission WHERE r.custom_id = ? ORDER BY s.key DESC LIMIT 1",
            (custom_id,),
        ).fetchone()
        return Submission(*row) if row is not None else None

    def custom_ids(self, key: int) -> list[str]:
        """The requests submission ``key`` holds."""
        return [row[0] for row in self._db.execute("SELECT custom_id FROM requests WHERE submission = ?", (key,))]

    def submissions(self) -> list[Submission]:
        """Every recorded submission, oldest first."""
        rows = self._db.execute(
            "SELECT key, file_id, batch_id, status, output_file_id, error_file_id FROM submissions ORDER BY key"
        )
        return [Submission(*row) for row in rows]
