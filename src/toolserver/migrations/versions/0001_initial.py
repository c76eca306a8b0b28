"""Initial schema: toolserver_nodes and node_checkers.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "toolserver_nodes",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("short_id", sa.String(32), nullable=False),
        sa.Column("manager_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("health", sa.String(32), nullable=False),
        sa.Column("last_req_time", sa.DateTime(), nullable=False),
        sa.Column("ip", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("runtime_state", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_toolserver_nodes_short_id", "toolserver_nodes", ["short_id"], unique=True)
    op.create_index("ix_toolserver_nodes_manager_id", "toolserver_nodes", ["manager_id"])
    op.create_table(
        "node_checkers",
        sa.Column("manager_id", sa.String(255), primary_key=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("interval", sa.Float(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_checkers")
    op.drop_index("ix_toolserver_nodes_manager_id", "toolserver_nodes")
    op.drop_index("ix_toolserver_nodes_short_id", "toolserver_nodes")
    op.drop_table("toolserver_nodes")
