"""A per-neuron universality summary (neuron_universality) that the universal_neurons view reads, instead of
regrouping every correlation row on each query; an index for a neuron's correlation rows; neuron_atlas gains
null_frac. The summary is filled from the existing correlation rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 04:00:00
"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The views as of this revision (atlas/store/views.py; a test keeps them equal).
VIEWS = {
    'universal_neurons': """
CREATE VIEW universal_neurons AS
SELECT m.name AS model, m.family, m.seed, m.step, u.model_id, d.name AS dataset, u.dataset_id, u.layer, u.neuron,
       u.n_other_seeds, u.mean_max_corr, u.mean_baseline_corr, u.excess_corr, u.is_universal,
       u.universal_threshold
FROM neuron_universality u
JOIN models m ON m.id = u.model_id
JOIN datasets d ON d.id = u.dataset_id
""",
    'neuron_atlas': """
CREATE VIEW neuron_atlas AS
SELECT m.family, m.seed, m.step, m.name AS model, n.model_id, n.layer,
       CASE WHEN m.n_layers > 1 THEN CAST(n.layer AS DOUBLE PRECISION) / (m.n_layers - 1) ELSE 0.0 END AS rel_depth,
       n.neuron, 'blocks.' || CAST(n.layer AS VARCHAR(12)) || '.mlp.hook_post' AS hook_name, n.w_in_norm, n.w_gate_norm, n.b_in, n.w_out_norm, n.in_out_cos, n.l2_penalty,
       n.vocab_mean, n.vocab_var, n.vocab_skew, n.vocab_kurt, n.vocab_class, n.null_frac,
       d.name AS dataset, a.dataset_id,
       a.n AS act_n, a.mean AS act_mean, a.var AS act_var, a.skew AS act_skew, a.kurt AS act_kurt,
       a.max AS act_max, a.min AS act_min, a.frac_active,
       u.n_other_seeds, u.mean_max_corr, u.mean_baseline_corr, u.excess_corr, u.is_universal
FROM neurons n
JOIN models m ON m.id = n.model_id
LEFT JOIN activation_stats a ON a.model_id = n.model_id AND a.layer = n.layer AND a.neuron = n.neuron
LEFT JOIN datasets d ON d.id = a.dataset_id
LEFT JOIN universal_neurons u ON u.model_id = n.model_id AND u.layer = n.layer AND u.neuron = n.neuron
     AND u.dataset_id = COALESCE(a.dataset_id, u.dataset_id)
""",
    'layer_profile': """
CREATE VIEW layer_profile AS
WITH layer_keys AS (
    SELECT model_id, dataset_id, layer FROM layer_stats
    UNION
    SELECT model_id, dataset_id, layer FROM layer_interventions WHERE kind = 'delete'
), class_counts AS (
    SELECT model_id, layer,
           COUNT(*) AS n_neurons,
           SUM(CASE WHEN vocab_class = 'prediction' THEN 1 ELSE 0 END) AS n_prediction,
           SUM(CASE WHEN vocab_class = 'suppression' THEN 1 ELSE 0 END) AS n_suppression,
           SUM(CASE WHEN vocab_class = 'partition' THEN 1 ELSE 0 END) AS n_partition
    FROM neurons GROUP BY model_id, layer
)
SELECT m.family, m.seed, m.step, m.name AS model, k.model_id, d.name AS dataset, k.dataset_id, k.layer,
       CASE WHEN m.n_layers > 1 THEN CAST(k.layer AS DOUBLE PRECISION) / (m.n_layers - 1) ELSE 0.0 END AS rel_depth,
       c.n_neurons, c.n_prediction, c.n_suppression, c.n_partition,
       ll.kl_to_final AS lens_kl, ll.entropy_nats AS lens_entropy_nats, ll.entropy_bits AS lens_entropy_bits,
       ll.top1_agreement AS lens_top1_agreement, ll.accuracy AS lens_accuracy,
       del.kl AS delete_kl, del.accuracy_retention AS delete_retention, del.loss_delta AS delete_loss_delta,
       sw.kl AS swap_kl, sw.accuracy_retention AS swap_retention,
       s.attn_prev5, s.attn_out_norm, s.mlp_out_norm
FROM layer_keys k
JOIN models m ON m.id = k.model_id
JOIN datasets d ON d.id = k.dataset_id
LEFT JOIN class_counts c ON c.model_id = k.model_id AND c.layer = k.layer
LEFT JOIN logit_lens ll ON ll.model_id = k.model_id AND ll.dataset_id = k.dataset_id AND ll.layer = k.layer + 1
LEFT JOIN layer_interventions del
     ON del.model_id = k.model_id AND del.dataset_id = k.dataset_id AND del.kind = 'delete' AND del.layer = k.layer
LEFT JOIN layer_interventions sw
     ON sw.model_id = k.model_id AND sw.dataset_id = k.dataset_id AND sw.kind = 'swap' AND sw.layer = k.layer
LEFT JOIN layer_stats s ON s.model_id = k.model_id AND s.dataset_id = k.dataset_id AND s.layer = k.layer
""",
    'universality_by_step': """
CREATE VIEW universality_by_step AS
SELECT u.family, u.step, u.dataset, u.dataset_id,
       COUNT(DISTINCT u.model_id) AS n_seeds,
       COUNT(*) AS n_neurons,
       AVG(CASE WHEN u.excess_corr > 0.5 THEN 1.0 ELSE 0.0 END) AS universal_fraction_05,
       AVG(CASE WHEN u.excess_corr > 0.3 THEN 1.0 ELSE 0.0 END) AS universal_fraction_03,
       AVG(u.excess_corr) AS mean_excess_corr,
       AVG(u.mean_max_corr) AS mean_max_corr,
       AVG(u.mean_baseline_corr) AS mean_baseline_corr,
       SUM(CASE WHEN n.vocab_class = 'prediction' THEN 1 ELSE 0 END) AS n_prediction,
       SUM(CASE WHEN n.vocab_class = 'suppression' THEN 1 ELSE 0 END) AS n_suppression
FROM universal_neurons u
LEFT JOIN neurons n ON n.model_id = u.model_id AND n.layer = u.layer AND n.neuron = u.neuron
WHERE u.step IS NOT NULL
GROUP BY u.family, u.step, u.dataset, u.dataset_id
""",
}

# The summary as atlas/store/summaries.py computes it, frozen here.
FILL_SUMMARY = """INSERT INTO neuron_universality (model_id, dataset_id, layer, neuron, n_other_seeds, mean_max_corr, mean_baseline_corr, excess_corr, is_universal, universal_threshold)

SELECT c.model_id, c.dataset_id, c.layer, c.neuron,
       COUNT(c.max_corr) AS n_other_seeds,
       AVG(c.max_corr) AS mean_max_corr,
       AVG(c.baseline_max_corr) AS mean_baseline_corr,
       AVG(c.max_corr) - AVG(c.baseline_max_corr) AS excess_corr,
       (AVG(c.max_corr) - AVG(c.baseline_max_corr) > MAX(c.universal_threshold)) AS is_universal,
       MAX(c.universal_threshold) AS universal_threshold
FROM neuron_correlations c
GROUP BY c.model_id, c.dataset_id, c.layer, c.neuron"""


def _views_of_0003() -> dict[str, str]:
    path = Path(__file__).with_name('0003_checkpoint_steps.py')
    spec = importlib.util.spec_from_file_location('atlas_migration_0003', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VIEWS


def _drop(views: dict[str, str]) -> None:
    for name in reversed(list(views)):
        op.execute(f'DROP VIEW IF EXISTS {name}')


def upgrade() -> None:
    _drop(_views_of_0003())
    op.create_table('neuron_universality',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('n_other_seeds', sa.Integer(), nullable=False),
    sa.Column('mean_max_corr', sa.Float(), nullable=True),
    sa.Column('mean_baseline_corr', sa.Float(), nullable=True),
    sa.Column('excess_corr', sa.Float(), nullable=True),
    sa.Column('is_universal', sa.Boolean(), nullable=True),
    sa.Column('universal_threshold', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_neuron_universality_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neuron_universality_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', name=op.f('pk_neuron_universality'))
    )
    op.create_index('ix_neuron_universality_ranked', 'neuron_universality',
                    ['dataset_id', 'excess_corr'], unique=False)
    op.create_index('ix_neuron_correlations_neuron', 'neuron_correlations', ['model_id', 'dataset_id', 'layer', 'neuron'],
                    unique=False)
    op.execute(FILL_SUMMARY)
    for statement in VIEWS.values():
        op.execute(statement)


def downgrade() -> None:
    _drop(VIEWS)
    op.drop_index('ix_neuron_correlations_neuron', table_name='neuron_correlations')
    op.drop_table('neuron_universality')
    for statement in _views_of_0003().values():
        op.execute(statement)
