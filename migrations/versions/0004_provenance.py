"""Provenance: resolved revisions of models and datasets, and on every job the model and dataset
it read (source, resolved revision, tokenizer) and the torch / transformers versions.

Weights hashes are now computed from the checkpoint files tensor by tensor (registration no longer
loads the model); hashes of the old definition are cleared and the next job on each model refills them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:45:00
"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

JOB_COLUMNS = {
    'model_source': sa.Text, 'model_revision': lambda: sa.String(length=100),
    'other_model_revision': lambda: sa.String(length=100), 'dataset_source': sa.Text,
    'dataset_revision': lambda: sa.String(length=100), 'tokenizer_hash': lambda: sa.String(length=64),
    'torch_version': lambda: sa.String(length=50), 'transformers_version': lambda: sa.String(length=50),
}


def _views_of_0003() -> dict[str, str]:
    path = Path(__file__).with_name('0003_checkpoint_steps.py')
    spec = importlib.util.spec_from_file_location('atlas_migration_0003', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VIEWS


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        for name, column_type in JOB_COLUMNS.items():
            batch_op.add_column(sa.Column(name, column_type(), nullable=True))
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resolved_revision', sa.String(length=100), nullable=True))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revision', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('resolved_revision', sa.String(length=100), nullable=True))
    op.execute('UPDATE models SET weights_hash = NULL')
    # What older jobs can still be credited with: the registry's source and tokenizer.
    op.execute('UPDATE jobs SET model_source = (SELECT m.source FROM models m WHERE m.id = jobs.model_id), '
               'tokenizer_hash = (SELECT m.tokenizer_hash FROM models m WHERE m.id = jobs.model_id), '
               'dataset_source = (SELECT d.source FROM datasets d WHERE d.id = jobs.dataset_id)')


def downgrade() -> None:
    views = _views_of_0003()
    for name in reversed(list(views)):  # SQLite rebuilds a table to drop a column: no view may name it
        op.execute(f'DROP VIEW IF EXISTS {name}')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('resolved_revision')
        batch_op.drop_column('revision')
    op.drop_index('uq_models_family_seed_step', table_name='models')  # a rebuild would lose the expression
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('resolved_revision')
    op.create_index('uq_models_family_seed_step', 'models', ['family', 'seed', sa.text('coalesce(step, -1)')],
                    unique=True)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        for name in reversed(list(JOB_COLUMNS)):
            batch_op.drop_column(name)
    for statement in views.values():
        op.execute(statement)
