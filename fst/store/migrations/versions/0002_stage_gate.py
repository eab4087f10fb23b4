"""Stages record their data version and the promotion gate: decision, numbers, bundle.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Frozen copy of the type at this revision (see 0001).
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # batch: SQLite cannot ALTER a table in place; alembic copies it (a no-op on PostgreSQL).
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("data_version", sa.Text, nullable=True))
        batch.add_column(sa.Column("promoted", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("gate", JSON, nullable=True))
        batch.add_column(sa.Column("bundle_uri", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stages") as batch:
        for column in ("bundle_uri", "gate", "promoted", "data_version"):
            batch.drop_column(column)
