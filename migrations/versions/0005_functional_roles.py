"""Functional roles: token features per tokenizer, neuron labels, next-token set activations, entropy
interventions, neuron-head attention scores and head deactivation; the null-space fraction of every neuron.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 03:40:00
"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ('neuron_token_sets', 'neuron_labels', 'neuron_head_scores', 'head_deactivation', 'entropy_interventions',
          'token_features')


def _views_of_0003() -> dict[str, str]:
    path = Path(__file__).with_name('0003_checkpoint_steps.py')
    spec = importlib.util.spec_from_file_location('atlas_migration_0003', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VIEWS


def upgrade() -> None:
    op.create_table('token_features',
    sa.Column('tokenizer_hash', sa.String(length=64), nullable=False),
    sa.Column('feature', sa.String(length=50), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=False),
    sa.Column('token_ids', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('tokenizer_hash', 'feature', name=op.f('pk_token_features'))
    )
    op.create_table('entropy_interventions',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('value_kind', sa.String(length=10), nullable=False),
    sa.Column('n_positions', sa.Integer(), nullable=False),
    sa.Column('entropy', sa.Float(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=False),
    sa.Column('norm_scale', sa.Float(), nullable=False),
    sa.Column('d_entropy', sa.Float(), nullable=False),
    sa.Column('d_loss', sa.Float(), nullable=False),
    sa.Column('d_norm_scale', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_entropy_interventions_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_entropy_interventions_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_entropy_interventions_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', 'step', name=op.f('pk_entropy_interventions'))
    )
    op.create_table('head_deactivation',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('head_layer', sa.Integer(), nullable=False),
    sa.Column('head', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('z', sa.Float(), nullable=False),
    sa.Column('n_positions', sa.Integer(), nullable=False),
    sa.Column('attn_first_orig', sa.Float(), nullable=False),
    sa.Column('attn_first_ablated', sa.Float(), nullable=False),
    sa.Column('z_norm_orig', sa.Float(), nullable=False),
    sa.Column('z_norm_ablated', sa.Float(), nullable=False),
    sa.Column('act_attn_corr', sa.Float(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_head_deactivation_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_head_deactivation_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_head_deactivation_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', 'head_layer', 'head', name=op.f('pk_head_deactivation'))
    )
    op.create_table('neuron_head_scores',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('head_layer', sa.Integer(), nullable=False),
    sa.Column('head', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('z', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_neuron_head_scores_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_neuron_head_scores_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neuron_head_scores_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', 'rank', name=op.f('pk_neuron_head_scores'))
    )
    op.create_index('ix_neuron_head_scores_head', 'neuron_head_scores', ['model_id', 'head_layer', 'head'], unique=False)
    op.create_table('neuron_labels',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('feature', sa.String(length=50), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('mean_with', sa.Float(), nullable=True),
    sa.Column('mean_without', sa.Float(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_neuron_labels_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_neuron_labels_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neuron_labels_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_neuron_labels'))
    )
    op.create_index('uq_neuron_labels_unit', 'neuron_labels',
                    ['model_id', sa.text('coalesce(dataset_id, -1)'), 'source', 'layer', 'neuron', 'rank'], unique=True)
    op.create_index('ix_neuron_labels_feature', 'neuron_labels', ['feature', 'source', 'score'], unique=False)
    op.create_table('neuron_token_sets',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('vocab_class', sa.String(length=20), nullable=False),
    sa.Column('set_size', sa.Integer(), nullable=False),
    sa.Column('n_in_set', sa.Integer(), nullable=False),
    sa.Column('n_out_set', sa.Integer(), nullable=False),
    sa.Column('mean_in_set', sa.Float(), nullable=True),
    sa.Column('mean_out_set', sa.Float(), nullable=True),
    sa.Column('ratio', sa.Float(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_neuron_token_sets_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_neuron_token_sets_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neuron_token_sets_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', name=op.f('pk_neuron_token_sets'))
    )
    with op.batch_alter_table('neurons', schema=None) as batch_op:
        batch_op.add_column(sa.Column('null_frac', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('null_frac_random', sa.Float(), nullable=True))


def downgrade() -> None:
    views = _views_of_0003()
    for name in reversed(list(views)):  # SQLite rebuilds neurons to drop a column: no view may name it
        op.execute(f'DROP VIEW IF EXISTS {name}')
    with op.batch_alter_table('neurons', schema=None) as batch_op:
        batch_op.drop_column('null_frac_random')
        batch_op.drop_column('null_frac')
    for statement in views.values():
        op.execute(statement)
    for table in TABLES:  # their indexes go with them
        op.drop_table(table)
