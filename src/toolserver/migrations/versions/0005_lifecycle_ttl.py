"""Session lifetime and sleep: toolserver_nodes.expires_at, idle_seconds, asleep, node_options.

Records made before this migration have no expiry and the manager's idle limit.

Revision ID: 0005_lifecycle_ttl
Revises: 0004_ownership
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_lifecycle_ttl"
down_revision = "0004_ownership"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("idle_seconds", sa.Float(), nullable=True))
        batch.add_column(sa.Column("asleep", sa.String(16), nullable=True))
        batch.add_column(sa.Column("node_options", sa.JSON(), nullable=True))
        batch.create_index("ix_toolserver_nodes_expires_at", ["expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.drop_index("ix_toolserver_nodes_expires_at")
        batch.drop_column("node_options")
        batch.drop_column("asleep")
        batch.drop_column("idle_seconds")
        batch.drop_column("expires_at")
