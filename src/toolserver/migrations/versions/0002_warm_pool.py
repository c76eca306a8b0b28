"""Warm pool: toolserver_nodes.pooled.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.add_column(sa.Column("pooled", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_index("ix_toolserver_nodes_pooled", ["pooled"])


def downgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.drop_index("ix_toolserver_nodes_pooled")
        batch.drop_column("pooled")
