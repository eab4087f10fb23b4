"""Alembic migrations of the run database (see fst/store/db.py). A package so that they ship
inside the wheel; `RunDB.upgrade()` runs them, no alembic.ini needed."""
