"""The promotion gate's measured scores, kept so that a gate killed mid-evaluation resumes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gate_scores",
        sa.Column("key", sa.String(64), primary_key=True),  # fst.gate.score_key
        sa.Column("pass_rate", sa.Float, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gate_scores")
