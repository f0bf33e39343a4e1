"""Add messages.external_id: the platform's id of a person's message, so an edit finds its stored turn.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("external_id", sa.String(64), nullable=True))
        batch.create_index("ix_messages_chat_id_external_id", ["chat_id", "external_id"])


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_chat_id_external_id")
        batch.drop_column("external_id")
