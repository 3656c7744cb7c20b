"""The console's own tables (migration 0014): its sessions and the key that signs its
form cookies."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, LargeBinary, String, Table

from infrastructure.store.tables import metadata

# A person's console session: the cookie's SHA-256, the sign-in session it stands on (the
# SHA-256 of a `trialog_user_sessions` token that never leaves the server), and when it
# was last used (the idle timeout). Disabling the person removes the sign-in session and
# with it every console session on it.
console_sessions = Table(
    "trialog_console_sessions",
    metadata,
    Column("cookie_hash", String(64), primary_key=True),
    Column("session_hash", String(64), nullable=False, index=True),
    Column("login", String(100), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("seal", LargeBinary, nullable=True),  # see store.access_seals
)

# The secret that signs the console's form cookie and its CSRF tokens, made once by the
# first process that needs it, so that every API process of a deployment shares it.
console_keys = Table(
    "trialog_console_keys",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("secret", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
