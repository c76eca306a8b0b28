"""Ownership of node records: toolserver_nodes.ownership, creator, deadline.

Records made before this migration were handed to their sessions (or sit in the warm pool).

Revision ID: 0004_ownership
Revises: 0003_keys
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_ownership"
down_revision = "0003_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.add_column(sa.Column("ownership", sa.String(16), nullable=False, server_default="session"))
        batch.add_column(sa.Column("creator", sa.String(255), nullable=True))
        batch.add_column(sa.Column("deadline", sa.DateTime(), nullable=True))
        batch.create_index("ix_toolserver_nodes_ownership", ["ownership"])
    nodes = sa.table("toolserver_nodes", sa.column("ownership", sa.String), sa.column("pooled", sa.Boolean))
    op.execute(nodes.update().where(nodes.c.pooled.is_(True)).values(ownership="pool"))


def downgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.drop_index("ix_toolserver_nodes_ownership")
        batch.drop_column("deadline")
        batch.drop_column("creator")
        batch.drop_column("ownership")
