"""The SQL views users query. One SQL text serves SQLite and PostgreSQL.

Conventions: rel_depth = layer / (n_layers - 1); logit_lens.layer counts residual states
(0 = embeddings, l = after block l - 1), so block l's lens row is logit_lens.layer = l + 1.
"""

REL_DEPTH = (
    "CASE WHEN m.n_layers > 1 THEN CAST({layer} AS DOUBLE PRECISION) / (m.n_layers - 1) ELSE 0.0 END"
)

# The TransformerLens hook of a neuron's activation, so rows join with TransformerLens / SAELens work.
HOOK_NAME = "'blocks.' || CAST({layer} AS VARCHAR(12)) || '.mlp.hook_post'"

# The summary table neuron_universality (atlas.store.summaries) holds the per-neuron aggregates over
# the other seeds; the correlations job rewrites it with the rows it sums.
UNIVERSAL_NEURONS = """
CREATE VIEW universal_neurons AS
SELECT m.name AS model, m.family, m.seed, m.step, u.model_id, d.name AS dataset, u.dataset_id, u.layer, u.neuron,
       u.n_other_seeds, u.mean_max_corr, u.mean_baseline_corr, u.excess_corr, u.is_universal,
       u.universal_threshold
FROM neuron_universality u
JOIN models m ON m.id = u.model_id
JOIN datasets d ON d.id = u.dataset_id
"""

NEURON_ATLAS = f"""
CREATE VIEW neuron_atlas AS
SELECT m.family, m.seed, m.step, m.name AS model, n.model_id, n.layer,
       {REL_DEPTH.format(layer="n.layer")} AS rel_depth,
       n.neuron, {HOOK_NAME.format(layer="n.layer")} AS hook_name, n.w_in_norm, n.w_gate_norm, n.b_in, n.w_out_norm, n.in_out_cos, n.l2_penalty,
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
"""

LAYER_PROFILE = f"""
CREATE VIEW layer_profile AS
WITH layer_keys AS (
    SELECT model_id, dataset_id, layer FROM layer_stats
    UNION
    SELECT model_id, dataset_id, layer FROM layer_interventions WHERE kind = 'delete'
)
SELECT m.family, m.seed, m.step, m.name AS model, k.model_id, d.name AS dataset, k.dataset_id, k.layer,
       {REL_DEPTH.format(layer="k.layer")} AS rel_depth,
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
"""

# Checkpoints of a family's seeds at one training step (models.step) are compared with each other:
# the universal fraction at each step shows when universal neurons appear during training.
UNIVERSALITY_BY_STEP = """
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
"""

# The Stages-of-Inference profile (Lad, Gurnee, Tegmark 2024, Figure 1): per model, dataset and layer the
# curves of the four stages, with the heads' subjoiner scores and attention to the first position.
STAGE_PROFILE = """
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
"""

# Creation order respects dependencies (neuron_atlas and universality_by_step read universal_neurons);
# drop in reverse.
VIEWS: dict[str, str] = {
    "universal_neurons": UNIVERSAL_NEURONS,
    "neuron_atlas": NEURON_ATLAS,
    "layer_profile": LAYER_PROFILE,
    "universality_by_step": UNIVERSALITY_BY_STEP,
    "stage_profile": STAGE_PROFILE,
}


def create_views(execute) -> None:
    for sql in VIEWS.values():
        execute(sql)


def drop_views(execute) -> None:
    for name in reversed(VIEWS):
        execute(f"DROP VIEW IF EXISTS {name}")
