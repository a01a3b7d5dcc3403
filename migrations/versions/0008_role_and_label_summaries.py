"""Role and label summaries for the pages at paper scale: layer_classes gains each layer's entropy-neuron count
(n_entropy, max_null_frac, null_frac_random), label_counts holds each model's rank-0 label counts per source
and feature, and a partial index on neuron_head_scores holds the deactivating rows (z <= -3, score < 0).
Upgrading fills both summaries from the rows already there.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 10:00:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# atlas/store/summaries.py as of this revision, frozen here.
DEACTIVATING_WHERE = "z <= -3.0 AND score < 0"
FILL_LAYER_CLASSES = """INSERT INTO layer_classes (model_id, layer, n_neurons, n_prediction, n_suppression, n_partition,
                           n_entropy, max_null_frac, null_frac_random)
SELECT n.model_id, n.layer, COUNT(*) AS n_neurons,
       SUM(CASE WHEN n.vocab_class = 'prediction' THEN 1 ELSE 0 END) AS n_prediction,
       SUM(CASE WHEN n.vocab_class = 'suppression' THEN 1 ELSE 0 END) AS n_suppression,
       SUM(CASE WHEN n.vocab_class = 'partition' THEN 1 ELSE 0 END) AS n_partition,
       CASE WHEN COUNT(n.null_frac) > 0
            THEN SUM(CASE WHEN n.null_frac >= 10.0 * n.null_frac_random THEN 1 ELSE 0 END)
       END AS n_entropy,
       MAX(n.null_frac) AS max_null_frac, MAX(n.null_frac_random) AS null_frac_random
FROM neurons n
GROUP BY n.model_id, n.layer"""
FILL_LABEL_COUNTS = """INSERT INTO label_counts (model_id, source, feature, n_neurons)
SELECT l.model_id, l.source, l.feature, COUNT(*) AS n_neurons
FROM neuron_labels l
WHERE l.rank = 0
GROUP BY l.model_id, l.source, l.feature"""


def upgrade() -> None:
    op.add_column('layer_classes', sa.Column('n_entropy', sa.Integer(), nullable=True))
    op.add_column('layer_classes', sa.Column('max_null_frac', sa.Float(), nullable=True))
    op.add_column('layer_classes', sa.Column('null_frac_random', sa.Float(), nullable=True))
    op.execute('DELETE FROM layer_classes')
    op.execute(FILL_LAYER_CLASSES)
    op.create_table('label_counts',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('feature', sa.String(length=50), nullable=False),
    sa.Column('n_neurons', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_label_counts_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'source', 'feature', name=op.f('pk_label_counts'))
    )
    op.execute(FILL_LABEL_COUNTS)
    op.create_index('ix_neuron_head_scores_deactivating', 'neuron_head_scores', ['model_id', 'layer', 'neuron'],
                    unique=False, sqlite_where=sa.text(DEACTIVATING_WHERE),
                    postgresql_where=sa.text(DEACTIVATING_WHERE))


def downgrade() -> None:
    op.drop_index('ix_neuron_head_scores_deactivating', table_name='neuron_head_scores')
    op.drop_table('label_counts')
    # ALTER TABLE ... DROP COLUMN in place (SQLite >= 3.35 too): a batch copy of the table would trip over the
    # layer_profile view, which reads it.
    for column in ('null_frac_random', 'max_null_frac', 'n_entropy'):
        op.execute(f'ALTER TABLE layer_classes DROP COLUMN {column}')
