"""API keys, session owners and labels, session events.

Revision ID: 0003_keys
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_keys"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.add_column(sa.Column("owner", sa.String(32), nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch.create_index("ix_toolserver_nodes_owner", ["owner"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("max_sessions", sa.Integer(), nullable=True),
        sa.Column("starts_per_minute", sa.Integer(), nullable=True),
    )
    op.create_index("ix_api_keys_name", "api_keys", ["name"])
    op.create_table(
        "session_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("short_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_session_events_at", "session_events", ["at"])
    op.create_index("ix_session_events_short_id", "session_events", ["short_id"])
    op.create_index("ix_session_events_owner_at", "session_events", ["owner", "at"])


def downgrade() -> None:
    op.drop_table("session_events")
    op.drop_index("ix_api_keys_name", "api_keys")
    op.drop_table("api_keys")
    with op.batch_alter_table("toolserver_nodes") as batch:
        batch.drop_index("ix_toolserver_nodes_owner")
        batch.drop_column("labels")
        batch.drop_column("owner")
