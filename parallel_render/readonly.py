"""A queryset's SQL sent to a worker runs only if it is one SELECT, and only read-only.

A job carries an unevaluated queryset as its SQL and parameters (codec.RemoteQuerySet): the
worker runs it itself, so its query runs in parallel. Whoever could forge a job (a leaked
SECRET_KEY) could put any SQL there, so a worker checks it twice:

1. check_select(): the text is one statement that starts with SELECT, with no statement
   separator, comment, dollar quote or write keyword (INSERT, UPDATE, DELETE, INTO, WITH...)
   outside quoted strings and identifiers. Django compiles a model queryset to exactly that;
   anything else is refused.
2. read_only(): the database itself refuses writes while the query runs: SQLite
   `PRAGMA query_only = ON` (restored after), PostgreSQL and Oracle `SET TRANSACTION READ ONLY`
   in a transaction of its own, MySQL/MariaDB `START TRANSACTION READ ONLY`. On other
   databases querysets are evaluated in the master and travel as rows (VENDORS).

A refused query fails the block "for the master", which renders it from its own queryset.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

# Databases on which read_only() can make the database itself refuse writes.
VENDORS = frozenset(("sqlite", "postgresql", "mysql", "oracle"))

# Words that never appear outside quotes in the SELECT Django compiles for a model queryset,
# and that would let a statement write, lock, change the session or reach the file system.
FORBIDDEN_WORDS = frozenset("""
    ALTER ANALYZE ATTACH BEGIN CALL CHECKPOINT CLUSTER COMMENT COMMIT COPY CREATE DEALLOCATE DECLARE
    DELETE DETACH DISCARD DO DROP DUMPFILE EXEC EXECUTE EXPLAIN GRANT HANDLER IMPORT INSERT INTO
    KILL LISTEN LOAD LOCK MERGE NOTIFY OUTFILE PRAGMA PREPARE REFRESH REINDEX RELEASE RENAME
    RESET REVOKE ROLLBACK SAVEPOINT SECURITY SET SHUTDOWN START TRUNCATE UNLISTEN
    UNLOCK UPDATE UPSERT USE VACUUM WITH
""".split())

# Outside quotes: statement separators, comments (--, /* */, MySQL #), PostgreSQL dollar
# quotes and parameters, backslashes, NUL.
_FORBIDDEN_TEXT = (";", "--", "/*", "*/", "#", "$", "\\", "\x00")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SELECT = re.compile(r"SELECT\b", re.IGNORECASE)


class QueryRefused(ValueError):
    """SQL a worker will not run: the message says why."""


def check_select(sql: str, vendor: str) -> None:
    """Raise QueryRefused unless sql is a single SELECT statement that cannot write."""
    if not isinstance(sql, str):
        raise QueryRefused("the SQL is not a string")
    text = sql.strip()
    if not _SELECT.match(text):
        raise QueryRefused(f"it does not start with SELECT: {_excerpt(text)!r}")
    outside = _outside_quotes(text, vendor)
    for token in _FORBIDDEN_TEXT:
        if token in outside:
            raise QueryRefused(f"{token!r} outside a quoted string: {_excerpt(text)!r}")
    words = {w.upper() for w in _WORD.findall(outside)}
    bad = sorted(words & FORBIDDEN_WORDS)
    if bad:
        raise QueryRefused(f"it contains {bad[0]}: {_excerpt(text)!r}")


def _outside_quotes(text: str, vendor: str) -> str:
    """text with every quoted string and identifier replaced by a space.

    'strings' and "identifiers" end at the next quote, a doubled quote standing for one; on
    MySQL a backslash escapes the next character inside them, and `identifiers` are quoted
    with backticks; SQLite also quotes [identifiers]. PostgreSQL's E'...' strings (backslash
    escapes) are refused, as Django never writes them.
    """
    out: list[str] = []
    i = 0
    n = len(text)
    closers = {"'": "'", '"': '"', "`": "`"}
    if vendor == "sqlite":
        closers["["] = "]"
    backslash = vendor == "mysql"
    while i < n:
        ch = text[i]
        close = closers.get(ch)
        if close is None:
            out.append(ch)
            i += 1
            continue
        if ch == "'" and vendor == "postgresql" and i and text[i - 1] in "eE" and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_")):
            raise QueryRefused("an escape string (E'...') in the SQL")
        j = i + 1
        while True:
            if j >= n:
                raise QueryRefused("an unterminated quoted string or identifier in the SQL")
            c = text[j]
            if backslash and c == "\\" and ch != "`":
                j += 2
                continue
            if c == close:
                if close != "]" and j + 1 < n and text[j + 1] == close:
                    j += 2  # a doubled quote stands for one
                    continue
                break
            j += 1
        out.append(" ")
        i = j + 1
    return "".join(out)


def _excerpt(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def read_only(connection: Any) -> Iterator[None]:
    """The database refuses writes on this connection while the block runs.

    Raises QueryRefused on a database it cannot do that for, or where it would change an
    enclosing transaction (PostgreSQL, Oracle and MySQL inside an atomic block).
    """
    vendor = connection.vendor
    if vendor == "sqlite":
        # On the sqlite3 connection itself: two cheap pragmas, not queries of the page.
        connection.ensure_connection()
        raw = connection.connection
        before = raw.execute("PRAGMA query_only").fetchone()[0]
        if not before:
            raw.execute("PRAGMA query_only = ON")
        try:
            yield
        finally:
            if not before:
                raw.execute("PRAGMA query_only = OFF")
        return
    if vendor not in VENDORS:
        raise QueryRefused(f"a {vendor} database has no read-only mode this worker knows")
    if connection.in_atomic_block:
        # SET TRANSACTION READ ONLY would stay for the rest of the enclosing transaction, and
        # START TRANSACTION would commit it.
        raise QueryRefused("the connection is inside a transaction, which cannot be made read-only for one query")
    if vendor == "mysql":
        with connection.cursor() as cursor:
            cursor.execute("START TRANSACTION READ ONLY")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("ROLLBACK")
        return
    from django.db import transaction

    with transaction.atomic(using=connection.alias):
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION READ ONLY")
        yield


def is_refusal(exc: BaseException) -> bool:
    """Whether a database error is the database refusing a write in read-only mode."""
    text = str(exc).lower()
    return "read-only" in text or "readonly" in text or "read only" in text
