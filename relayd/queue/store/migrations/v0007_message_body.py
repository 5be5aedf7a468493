"""Schema version 7: ``messages.body``, where a big message's bytes are kept (``data`` is then empty).

The last column of the row, so that SQLite can store a big message without copying it: a ``zeroblob`` in
the last column is not expanded when the row is built, and the bytes are then written into it in pieces
(``Connection.blobopen``). Bound as a parameter of the ``INSERT``, a 20 MB message cost 40 MB more at its
commit (SQLite's own copy of the parameter and the row built from it), and as much again when it was read
back. Rows from before have ``body`` NULL and their bytes in ``data``, as small messages still do.
"""

from __future__ import annotations

from . import Migration

MIGRATION = Migration(
    version=7,
    name="message_body",
    sqlite=(),
    column=("messages", "body", "BLOB"),
)
