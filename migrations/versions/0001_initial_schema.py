"""Initial schema: registry, jobs ledger, per-neuron results, layer results, training runs, views.

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 15:57:38.453154
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa



revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


# The views as they were at this revision (frozen here: later revisions change views in their own files).
VIEWS = {
    'universal_neurons': """
CREATE VIEW universal_neurons AS
SELECT m.name AS model, m.family, m.seed, c.model_id, d.name AS dataset, c.dataset_id, c.layer, c.neuron,
       COUNT(c.max_corr) AS n_other_seeds,
       AVG(c.max_corr) AS mean_max_corr,
       AVG(c.baseline_max_corr) AS mean_baseline_corr,
       AVG(c.max_corr) - AVG(c.baseline_max_corr) AS excess_corr,
       (AVG(c.max_corr) - AVG(c.baseline_max_corr) > MAX(c.universal_threshold)) AS is_universal,
       MAX(c.universal_threshold) AS universal_threshold
FROM neuron_correlations c
JOIN models m ON m.id = c.model_id
JOIN datasets d ON d.id = c.dataset_id
GROUP BY m.name, m.family, m.seed, c.model_id, d.name, c.dataset_id, c.layer, c.neuron
""",
    'neuron_atlas': """
CREATE VIEW neuron_atlas AS
SELECT m.family, m.seed, m.name AS model, n.model_id, n.layer,
       CASE WHEN m.n_layers > 1 THEN CAST(n.layer AS DOUBLE PRECISION) / (m.n_layers - 1) ELSE 0.0 END AS rel_depth,
       n.neuron, n.w_in_norm, n.w_gate_norm, n.b_in, n.w_out_norm, n.in_out_cos, n.l2_penalty,
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
SELECT m.family, m.seed, m.name AS model, k.model_id, d.name AS dataset, k.dataset_id, k.layer,
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
}


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('split', sa.String(length=100), nullable=False),
    sa.Column('text_field', sa.String(length=100), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=False),
    sa.Column('ctx_len', sa.Integer(), nullable=False),
    sa.Column('sample_seed', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('n_documents', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('family', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('revision', sa.String(length=200), nullable=True),
    sa.Column('architecture', sa.String(length=50), nullable=False),
    sa.Column('n_layers', sa.Integer(), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('d_mlp', sa.Integer(), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('tokenizer_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('family', 'seed', name=op.f('uq_models_family_seed')),
    sa.UniqueConstraint('name', name=op.f('uq_models_name'))
    )
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_models_family'), ['family'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=50), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('dataset_id', sa.Integer(), nullable=True),
    sa.Column('other_model_id', sa.Integer(), nullable=True),
    sa.Column('shard', sa.String(length=100), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('config_hash', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('atlas_version', sa.String(length=50), nullable=False),
    sa.Column('n_rows', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_jobs_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['other_model_id'], ['models.id'], name=op.f('fk_jobs_other_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_lookup', ['kind', 'model_id', 'dataset_id', 'other_model_id', 'status'], unique=False)

    op.create_table('neuron_vocab',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('direction', sa.String(length=10), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('token', sa.Text(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neuron_vocab_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'layer', 'neuron', 'direction', 'rank', name=op.f('pk_neuron_vocab'))
    )
    op.create_table('top_examples',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('doc_index', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('activation', sa.Float(), nullable=False),
    sa.Column('context_token_ids', sa.JSON(), nullable=False),
    sa.Column('context_tokens', sa.JSON(), nullable=False),
    sa.Column('highlight_index', sa.Integer(), nullable=False),
    sa.Column('context_activations', sa.JSON(none_as_null=True), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_top_examples_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_top_examples_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', 'rank', name=op.f('pk_top_examples'))
    )
    op.create_table('training_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('family', sa.String(length=200), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=True),
    sa.Column('out_dir', sa.Text(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('steps', sa.Integer(), nullable=False),
    sa.Column('tokens_seen', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=False),
    sa.Column('heldout_loss', sa.Float(), nullable=False),
    sa.Column('unigram_entropy', sa.Float(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_training_runs_model_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs')),
    sa.UniqueConstraint('family', 'seed', name=op.f('uq_training_runs_family_seed'))
    )
    op.create_table('activation_stats',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('mean', sa.Float(), nullable=False),
    sa.Column('var', sa.Float(), nullable=False),
    sa.Column('skew', sa.Float(), nullable=True),
    sa.Column('kurt', sa.Float(), nullable=True),
    sa.Column('max', sa.Float(), nullable=False),
    sa.Column('min', sa.Float(), nullable=False),
    sa.Column('frac_active', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_activation_stats_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_activation_stats_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_activation_stats_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', 'neuron', name=op.f('pk_activation_stats'))
    )
    op.create_table('layer_interventions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=True),
    sa.Column('n_positions', sa.Integer(), nullable=False),
    sa.Column('kl', sa.Float(), nullable=True),
    sa.Column('top1_agreement', sa.Float(), nullable=True),
    sa.Column('accuracy', sa.Float(), nullable=False),
    sa.Column('accuracy_retention', sa.Float(), nullable=True),
    sa.Column('loss', sa.Float(), nullable=False),
    sa.Column('loss_delta', sa.Float(), nullable=True),
    sa.Column('entropy', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_layer_interventions_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_layer_interventions_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_layer_interventions_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_layer_interventions')),
    sa.UniqueConstraint('model_id', 'dataset_id', 'kind', 'layer', name=op.f('uq_layer_interventions_model_id_dataset_id_kind_layer'))
    )
    op.create_table('layer_stats',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('attn_prev5', sa.Float(), nullable=True),
    sa.Column('attn_out_norm', sa.Float(), nullable=False),
    sa.Column('mlp_out_norm', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_layer_stats_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_layer_stats_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_layer_stats_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', name=op.f('pk_layer_stats'))
    )
    op.create_table('logit_lens',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('kl_to_final', sa.Float(), nullable=False),
    sa.Column('entropy_nats', sa.Float(), nullable=False),
    sa.Column('entropy_bits', sa.Float(), nullable=False),
    sa.Column('top1_agreement', sa.Float(), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_logit_lens_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_logit_lens_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_logit_lens_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'dataset_id', 'layer', name=op.f('pk_logit_lens'))
    )
    op.create_table('neuron_correlations',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('other_model_id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('max_corr', sa.Float(), nullable=True),
    sa.Column('partner_layer', sa.Integer(), nullable=True),
    sa.Column('partner_neuron', sa.Integer(), nullable=True),
    sa.Column('baseline_max_corr', sa.Float(), nullable=True),
    sa.Column('universal_threshold', sa.Float(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_neuron_correlations_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_neuron_correlations_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neuron_correlations_model_id_models'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['other_model_id'], ['models.id'], name=op.f('fk_neuron_correlations_other_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'other_model_id', 'dataset_id', 'layer', 'neuron', name=op.f('pk_neuron_correlations'))
    )
    op.create_table('neurons',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('w_in_norm', sa.Float(), nullable=False),
    sa.Column('w_gate_norm', sa.Float(), nullable=True),
    sa.Column('b_in', sa.Float(), nullable=True),
    sa.Column('w_out_norm', sa.Float(), nullable=False),
    sa.Column('in_out_cos', sa.Float(), nullable=True),
    sa.Column('l2_penalty', sa.Float(), nullable=False),
    sa.Column('vocab_mean', sa.Float(), nullable=True),
    sa.Column('vocab_var', sa.Float(), nullable=True),
    sa.Column('vocab_skew', sa.Float(), nullable=True),
    sa.Column('vocab_kurt', sa.Float(), nullable=True),
    sa.Column('vocab_class', sa.String(length=20), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_neurons_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_neurons_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'layer', 'neuron', name=op.f('pk_neurons'))
    )
    op.create_table('training_curves',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('train_loss', sa.Float(), nullable=False),
    sa.Column('heldout_loss', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], name=op.f('fk_training_curves_run_id_training_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'step', name=op.f('pk_training_curves'))
    )

    for sql in VIEWS.values():
        op.execute(sql)


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table('training_curves')
    op.drop_table('neurons')
    op.drop_table('neuron_correlations')
    op.drop_table('logit_lens')
    op.drop_table('layer_stats')
    op.drop_table('layer_interventions')
    op.drop_table('activation_stats')
    op.drop_table('training_runs')
    op.drop_table('top_examples')
    op.drop_table('neuron_vocab')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_lookup')

    op.drop_table('jobs')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_family'))

    op.drop_table('models')
    op.drop_table('datasets')
