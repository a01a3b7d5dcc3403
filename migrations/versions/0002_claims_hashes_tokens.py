"""Ledger claims (claim_key, pid, host, heartbeat), model weights hashes, real token counts per tokenizer.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 23:20:00
"""
from typing import Sequence, Union

import importlib.util
from pathlib import Path

from alembic import op
import sqlalchemy as sa

revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('weights_hash', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_models_weights_hash'), ['weights_hash'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claim_key', sa.String(length=400), nullable=True))
        batch_op.add_column(sa.Column('pid', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('host', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('uq_jobs_running_claim', ['claim_key'], unique=True,
                              sqlite_where=sa.text("status = 'running'"),
                              postgresql_where=sa.text("status = 'running'"))

    op.create_table('dataset_tokens',
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('tokenizer_hash', sa.String(length=64), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=False),
    sa.Column('n_rows', sa.Integer(), nullable=False),
    sa.Column('n_truncated_tokens', sa.Integer(), nullable=False),
    sa.Column('source_exhausted', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_dataset_tokens_dataset_id_datasets'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset_id', 'tokenizer_hash', name=op.f('pk_dataset_tokens'))
    )


def _views_of_0001() -> dict[str, str]:
    """The views 0001 froze: SQLite's table copy (drop_column) fails while views name the table."""
    path = Path(__file__).with_name('0001_initial_schema.py')
    spec = importlib.util.spec_from_file_location('atlas_migration_0001', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VIEWS


def downgrade() -> None:
    views = _views_of_0001()
    for name in reversed(list(views)):
        op.execute(f'DROP VIEW IF EXISTS {name}')
    op.drop_table('dataset_tokens')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_running_claim', sqlite_where=sa.text("status = 'running'"),
                            postgresql_where=sa.text("status = 'running'"))
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('host')
        batch_op.drop_column('pid')
        batch_op.drop_column('claim_key')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_weights_hash'))
        batch_op.drop_column('weights_hash')
    for statement in views.values():
        op.execute(statement)
