"""Replicated managers: the manager_leases table and toolserver_nodes.origin.

``origin`` is the manager id the runtime's mark on a node carries; records made before this
migration were never adopted, so it stays NULL (read as ``manager_id``).

Revision ID: 0006_cluster_leases
Revises: 0005_lifecycle_ttl
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_cluster_leases"
down_revision = "0005_lifecycle_ttl"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "manager_leases",
        sa.Column("manager_id", sa.String(255), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False, server_default=""),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("deadline", sa.DateTime(), nullable=False),
        sa.Column("adopted_by", sa.String(255), nullable=True),
        sa.Column("adopted_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_manager_leases_deadline", "manager_leases", ["deadline"])
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.add_column(sa.Column("origin", sa.String(255), nullable=True))
        batch.create_index("ix_toolserver_nodes_origin", ["origin"])


def downgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.drop_index("ix_toolserver_nodes_origin")
        batch.drop_column("origin")
    op.drop_index("ix_manager_leases_deadline", "manager_leases")
    op.drop_table("manager_leases")
