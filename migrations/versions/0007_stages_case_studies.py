"""Stages of inference case studies: probe_runs and probe_results (prediction ensembling), head_stats
(subjoiner scores, attention to the first and previous token), and the stage_profile view; layer_classes
(per-layer class counts, which layer_profile now reads); indexes for a neuron's labels, for label counts, and
partial indexes of the classed and of the universal neurons.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 04:15:00
"""
import importlib.util
from pathlib import Path
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '0007'
down_revision: Union[str, None] = '0006'
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
LEFT JOIN layer_classes c ON c.model_id = k.model_id AND c.layer = k.layer
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
    'stage_profile': """
CREATE VIEW stage_profile AS
WITH heads AS (
    SELECT model_id, dataset_id, layer, MAX(subjoiner) AS max_subjoiner, AVG(attn_first) AS mean_attn_first,
           AVG(attn_prev) AS mean_attn_prev
    FROM head_stats GROUP BY model_id, dataset_id, layer
)
SELECT p.family, p.seed, p.step, p.model, p.model_id, p.dataset, p.dataset_id, p.layer, p.rel_depth,
       p.delete_kl, p.attn_prev5, p.n_prediction, p.n_suppression, p.lens_kl, p.lens_entropy_nats,
       p.mlp_out_norm, p.attn_out_norm, h.max_subjoiner, h.mean_attn_first, h.mean_attn_prev
FROM layer_profile p
LEFT JOIN heads h ON h.model_id = p.model_id AND h.dataset_id = p.dataset_id AND h.layer = p.layer
""",
}

# The per-layer class counts as atlas/store/summaries.py computes them, frozen here.
FILL_LAYER_CLASSES = """INSERT INTO layer_classes (model_id, layer, n_neurons, n_prediction, n_suppression, n_partition)

SELECT n.model_id, n.layer, COUNT(*) AS n_neurons,
       SUM(CASE WHEN n.vocab_class = 'prediction' THEN 1 ELSE 0 END) AS n_prediction,
       SUM(CASE WHEN n.vocab_class = 'suppression' THEN 1 ELSE 0 END) AS n_suppression,
       SUM(CASE WHEN n.vocab_class = 'partition' THEN 1 ELSE 0 END) AS n_partition
FROM neurons n
GROUP BY n.model_id, n.layer"""


def _views_of_0006() -> dict[str, str]:
    path = Path(__file__).with_name('0006_universality_summary.py')
    spec = importlib.util.spec_from_file_location('atlas_migration_0006', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VIEWS


def upgrade() -> None:
    op.create_table('head_stats',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('head', sa.Integer(), nullable=False),
    sa.Column('subjoiner', sa.Float(), nullable=True),
    sa.Column('subjoiner_attn', sa.Float(), nullable=True),
    sa.Column('subjoiner_baseline', sa.Float(), nullable=True),
    sa.Column('n_continuations', sa.Integer(), nullable=False),
    sa.Column('attn_first', sa.Float(), nullable=False),
    sa.Column('attn_prev', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_head_stats_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_head_stats_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_head_stats_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'head', name=op.f('pk_head_stats'))
    )
    op.create_table('probe_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('feature', sa.String(length=50), nullable=False),
    sa.Column('n_train', sa.Integer(), nullable=False),
    sa.Column('n_test', sa.Integer(), nullable=False),
    sa.Column('split_seed', sa.Integer(), nullable=False),
    sa.Column('min_context', sa.Integer(), nullable=False),
    sa.Column('model_accuracy', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_probe_runs_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_probe_runs_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_probe_runs_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_probe_runs')),
    sa.UniqueConstraint('model_id', 'dataset_id', 'feature', name=op.f('uq_probe_runs_model_id_dataset_id_feature'))
    )
    op.create_table('probe_results',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('vocab_class', sa.String(length=20), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=False),
    sa.Column('train_accuracy', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['probe_runs.id'], name=op.f('fk_probe_results_run_id_probe_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'kind', 'rank', name=op.f('pk_probe_results'))
    )
    op.create_table('layer_classes',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('n_neurons', sa.Integer(), nullable=False),
    sa.Column('n_prediction', sa.Integer(), nullable=False),
    sa.Column('n_suppression', sa.Integer(), nullable=False),
    sa.Column('n_partition', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_layer_classes_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'layer', name=op.f('pk_layer_classes'))
    )
    op.execute(FILL_LAYER_CLASSES)
    op.execute('DROP VIEW IF EXISTS layer_profile')  # it now reads layer_classes
    op.execute(VIEWS['layer_profile'])
    op.execute(VIEWS['stage_profile'])
    op.create_index('ix_neuron_universality_universal', 'neuron_universality', ['model_id', 'dataset_id', 'layer'],
                    unique=False, sqlite_where=sa.text('is_universal'), postgresql_where=sa.text('is_universal'))
    op.create_index('ix_neuron_labels_neuron', 'neuron_labels', ['model_id', 'layer', 'neuron'], unique=False)
    op.create_index('ix_neuron_labels_source', 'neuron_labels', ['source', 'rank', 'model_id', 'feature'], unique=False)
    op.create_index('ix_neurons_classed', 'neurons', ['model_id', 'layer', 'neuron'], unique=False,
                    sqlite_where=sa.text("vocab_class <> 'none'"), postgresql_where=sa.text("vocab_class <> 'none'"))


def downgrade() -> None:
    op.drop_index('ix_neurons_classed', table_name='neurons')
    op.drop_index('ix_neuron_labels_source', table_name='neuron_labels')
    op.drop_index('ix_neuron_labels_neuron', table_name='neuron_labels')
    op.drop_index('ix_neuron_universality_universal', table_name='neuron_universality')
    op.execute('DROP VIEW IF EXISTS stage_profile')
    op.execute('DROP VIEW IF EXISTS layer_profile')
    op.execute(_views_of_0006()['layer_profile'])
    op.drop_table('layer_classes')
    op.drop_table('head_stats')
    op.drop_table('probe_results')
    op.drop_table('probe_runs')
