"""Shared test configuration.

Its presence makes pytest put `tests/` on sys.path, so tests in any subfolder can import
shared helpers such as `vectors` (tests/vectors.py).
"""

# PostgreSQL fixtures (pg_server, own_pg_server, pg_url, store_engine, store_location)
# for every test folder: tests/pgserver.py.
from pgserver import (  # noqa: E402, F401
    own_pg_server,
    pg_server,
    pg_url,
    store_engine,
    store_location,
)
