"""Where finished runs are saved: one interface, SQLite and Postgres.

Owns the :class:`~.base.Store` interface and its group commit
(:mod:`.base`), and the Postgres store (:mod:`.postgres`, imported only for a
``postgresql://`` ``--db``).

May import: :mod:`trio_stream.core`, :mod:`trio_stream.errors`.
"""
