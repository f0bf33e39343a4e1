"""Index messages by (chat, id): prompt building reads a chat's newest turns on every reply.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_messages_chat_id_id", "messages", ["chat_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_messages_chat_id_id", table_name="messages")
