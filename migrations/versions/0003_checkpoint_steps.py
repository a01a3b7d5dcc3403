"""Checkpoints: models.step, one model per (family, seed, step); views gain step and hook_name;
the universality_by_step view.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 00:10:00
"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# The views as they are at this revision (frozen here: later revisions change views in their own files).
VIEWS = {
    'universal_neurons': """
CREATE VIEW universal_neurons AS
SELECT m.name AS model, m.family, m.seed, m.step, c.model_id, d.name AS dataset, c.dataset_id, c.layer, c.neuron,
       COUNT(c.max_corr) AS n_other_seeds,
       AVG(c.max_corr) AS mean_max_corr,
       AVG(c.baseline_max_corr) AS mean_baseline_corr,
       AVG(c.max_corr) - AVG(c.baseline_max_corr) AS excess_corr,
       (AVG(c.max_corr) - AVG(c.baseline_max_corr) > MAX(c.universal_threshold)) AS is_universal,
       MAX(c.universal_threshold) AS universal_threshold
FROM neuron_correlations c
JOIN models m ON m.id = c.model_id
JOIN datasets d ON d.id = c.dataset_id
GROUP BY m.name, m.family, m.seed, m.step, c.model_id, d.name, c.dataset_id, c.layer, c.neuron
""",
    'neuron_atlas': """
CREATE VIEW neuron_atlas AS
SELECT m.family, m.seed, m.step, m.name AS model, n.model_id, n.layer,
       CASE WHEN m.n_layers > 1 THEN CAST(n.layer AS DOUBLE PRECISION) / (m.n_layers - 1) ELSE 0.0 END AS rel_depth,
       n.neuron, 'blocks.' || CAST(n.layer AS VARCHAR(12)) || '.mlp.hook_post' AS hook_name, n.w_in_norm, n.w_gate_norm, n.b_in, n.w_out_norm, n.in_out_cos, n.l2_penalty,
       n.vocab_mean, n.vocab_var, n.vocab_skew, n.vocab_kurt, n.vocab_class,
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


def _views_of_0001() -> dict[str, str]:
    path = Path(__file__).with_name('0001_initial_schema.py')
    spec = importlib.util.spec_from_file_location('atlas_migration_0001', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VIEWS


def _drop(views: dict[str, str]) -> None:
    for name in reversed(list(views)):
        op.execute(f'DROP VIEW IF EXISTS {name}')


def upgrade() -> None:
    _drop(_views_of_0001())  # SQLite copies the table to change a constraint: no view may name it
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('step', sa.Integer(), nullable=True))
        batch_op.drop_constraint('uq_models_family_seed', type_='unique')
    op.create_index('uq_models_family_seed_step', 'models', ['family', 'seed', sa.text('coalesce(step, -1)')],
                    unique=True)
    for statement in VIEWS.values():
        op.execute(statement)


def downgrade() -> None:
    _drop(VIEWS)
    op.drop_index('uq_models_family_seed_step', table_name='models')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('step')
        batch_op.create_unique_constraint('uq_models_family_seed', ['family', 'seed'])
    for statement in _views_of_0001().values():
        op.execute(statement)
