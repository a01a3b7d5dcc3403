"""The atlas schema: SQLAlchemy 2.0 typed ORM, keyed by model (family, seed) / layer / neuron.

Alembic migrations in migrations/versions create exactly these tables; views live in views.py.
Result tables carry the job that wrote them (job_id), so the jobs ledger explains every row.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, DateTime, func, Float, ForeignKey, Index, MetaData, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from atlas.store.summaries import DEACTIVATING_WHERE

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _model_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)


def _dataset_fk() -> Mapped[int]:
    return mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)


def _job_fk() -> Mapped[Optional[int]]:
    return mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)


# --- registry ------------------------------------------------------------------------------------


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    family: Mapped[str] = mapped_column(String(200), index=True)
    seed: Mapped[int]
    # Training step of a checkpoint (hub revisions such as step1000, or train-seeds --checkpoints);
    # NULL for a model known only as itself. Seeds at the same step are compared with each other.
    step: Mapped[Optional[int]]
    source: Mapped[str] = mapped_column(Text)
    revision: Mapped[Optional[str]] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(50))
    n_layers: Mapped[int]
    d_model: Mapped[int]
    d_mlp: Mapped[int]
    vocab_size: Mapped[int]
    tokenizer_hash: Mapped[str] = mapped_column(String(64))
    # sha256 over the parameters' bytes: refuses a second copy of a seed, keys checkpoints on content.
    # NULL only for models registered before revision 0002.
    weights_hash: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    # What `revision` resolved to when the model was registered: the hub commit SHA, or for a local
    # directory "sha256:" + a hash of its files' contents. NULL for models registered before 0004.
    resolved_revision: Mapped[Optional[str]] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())

    # One model per (family, seed, step), a NULL step counting as one value (an expression index:
    # SQLite has no NULLS NOT DISTINCT).
    __table_args__ = (Index("uq_models_family_seed_step", "family", "seed", text("coalesce(step, -1)"), unique=True),)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(100), default="train")
    text_field: Mapped[str] = mapped_column(String(100), default="text")
    n_tokens: Mapped[int]
    ctx_len: Mapped[int]
    sample_seed: Mapped[int] = mapped_column(default=0)
    content_hash: Mapped[str] = mapped_column(String(64))
    revision: Mapped[Optional[str]] = mapped_column(String(200))  # hub dataset revision asked for
    # The hub dataset's commit SHA, or "sha256:" + the local files' content hash; NULL before 0004.
    resolved_revision: Mapped[Optional[str]] = mapped_column(String(100))
    n_documents: Mapped[Optional[int]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class DatasetTokens(Base):
    """What a dataset really gives under one tokenizer: written when its token cache is built or read."""

    __tablename__ = "dataset_tokens"

    dataset_id: Mapped[int] = _dataset_fk()
    tokenizer_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    n_tokens: Mapped[int]  # non-pad tokens held, BOS included (TokenizedDataset.n_tokens)
    n_rows: Mapped[int]
    n_truncated_tokens: Mapped[int]
    source_exhausted: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class Job(Base):
    """The jobs ledger: one row per run of a job on a (model, dataset) with a config."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[Optional[int]] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    other_model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    shard: Mapped[Optional[str]] = mapped_column(String(100))  # e.g. "a0:512/b0:2" for correlation blocks
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))  # running | done | failed | replaced | abandoned
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    error: Mapped[Optional[str]] = mapped_column(Text)
    atlas_version: Mapped[str] = mapped_column(String(50))
    n_rows: Mapped[Optional[int]]
    # Provenance, copied from the registry and the running process when the job is claimed, so a row
    # says what produced it even after the model's files change. NULL for jobs before revision 0004.
    model_source: Mapped[Optional[str]] = mapped_column(Text)
    model_revision: Mapped[Optional[str]] = mapped_column(String(100))
    other_model_revision: Mapped[Optional[str]] = mapped_column(String(100))
    dataset_source: Mapped[Optional[str]] = mapped_column(Text)
    dataset_revision: Mapped[Optional[str]] = mapped_column(String(100))
    tokenizer_hash: Mapped[Optional[str]] = mapped_column(String(64))
    torch_version: Mapped[Optional[str]] = mapped_column(String(50))
    transformers_version: Mapped[Optional[str]] = mapped_column(String(50))
    # The claim: at most one `running` row per claim_key (a partial unique index), held by pid on host,
    # alive while heartbeat_at moves. A claim whose heartbeat stopped is marked `abandoned`.
    claim_key: Mapped[Optional[str]] = mapped_column(String(400))
    pid: Mapped[Optional[int]]
    host: Mapped[Optional[str]] = mapped_column(String(255))
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_jobs_lookup", "kind", "model_id", "dataset_id", "other_model_id", "status"),
        Index("uq_jobs_running_claim", "claim_key", unique=True,
              sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'")),
    )


# --- weights (no data) ---------------------------------------------------------------------------


class Neuron(Base):
    __tablename__ = "neurons"

    model_id: Mapped[int] = _model_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    w_in_norm: Mapped[float] = mapped_column(Float)
    w_gate_norm: Mapped[Optional[float]] = mapped_column(Float)
    b_in: Mapped[Optional[float]] = mapped_column(Float)
    w_out_norm: Mapped[float] = mapped_column(Float)
    in_out_cos: Mapped[Optional[float]] = mapped_column(Float)  # NULL for a zero weight vector
    l2_penalty: Mapped[float] = mapped_column(Float)
    vocab_mean: Mapped[Optional[float]] = mapped_column(Float)  # NULL for a zero weight vector
    vocab_var: Mapped[Optional[float]] = mapped_column(Float)  # NULL for a zero weight vector
    vocab_skew: Mapped[Optional[float]] = mapped_column(Float)
    vocab_kurt: Mapped[Optional[float]] = mapped_column(Float)
    vocab_class: Mapped[str] = mapped_column(String(20))
    job_id: Mapped[Optional[int]] = _job_fk()
    # Entropy neurons: the share of ||w_out||^2 in the effective null space of the processed unembedding
    # (its bottom singular directions), and what a random direction gets (k / d_model; k / (d_model - 1) for
    # LayerNorm models). NULL before 0005. After job_id, where migration 0005 added them.
    null_frac: Mapped[Optional[float]] = mapped_column(Float)
    null_frac_random: Mapped[Optional[float]] = mapped_column(Float)

    # The few classed neurons (prediction, suppression, partition), for the Families page's counts and plots
    # without reading every neuron.
    __table_args__ = (Index("ix_neurons_classed", "model_id", "layer", "neuron",
                            sqlite_where=text("vocab_class <> 'none'"), postgresql_where=text("vocab_class <> 'none'")),)


class LayerClasses(Base):
    """Per model and layer, how many neurons fall in each vocabulary class and how many are entropy neurons:
    rewritten from neurons by the weights job in the transaction that writes them (atlas.store.summaries);
    layer_profile, Figure 6 and the Layers page's role counts read it."""

    __tablename__ = "layer_classes"

    model_id: Mapped[int] = _model_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    n_neurons: Mapped[int]
    n_prediction: Mapped[int]
    n_suppression: Mapped[int]
    n_partition: Mapped[int]
    # NULL where the layer has no null-space fractions (weights ingested before 0005).
    n_entropy: Mapped[Optional[int]]
    max_null_frac: Mapped[Optional[float]] = mapped_column(Float)
    null_frac_random: Mapped[Optional[float]] = mapped_column(Float)


class NeuronVocab(Base):
    __tablename__ = "neuron_vocab"

    model_id: Mapped[int] = _model_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    direction: Mapped[str] = mapped_column(String(10), primary_key=True)  # 'top' | 'bottom'
    rank: Mapped[int] = mapped_column(primary_key=True)
    token_id: Mapped[int]
    token: Mapped[str] = mapped_column(Text)
    value: Mapped[float] = mapped_column(Float)


# --- activations (one pass over a dataset) -------------------------------------------------------


class ActivationStat(Base):
    __tablename__ = "activation_stats"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]
    mean: Mapped[float] = mapped_column(Float)
    var: Mapped[float] = mapped_column(Float)
    skew: Mapped[Optional[float]] = mapped_column(Float)
    kurt: Mapped[Optional[float]] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    min: Mapped[float] = mapped_column(Float)
    frac_active: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()


class TopExample(Base):
    __tablename__ = "top_examples"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    rank: Mapped[int] = mapped_column(primary_key=True)
    doc_index: Mapped[int]
    position: Mapped[int]
    activation: Mapped[float] = mapped_column(Float)
    context_token_ids: Mapped[list[int]] = mapped_column(JSON)
    context_tokens: Mapped[list[str]] = mapped_column(JSON)  # decoded strings, one per context token
    highlight_index: Mapped[int]  # index of the firing token inside the context
    context_activations: Mapped[Optional[list[float]]] = mapped_column(JSON(none_as_null=True))  # the neuron on every context token


# --- cross-seed correlations ---------------------------------------------------------------------


class NeuronCorrelation(Base):
    __tablename__ = "neuron_correlations"

    model_id: Mapped[int] = _model_fk()
    other_model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    max_corr: Mapped[Optional[float]] = mapped_column(Float)  # NULL: zero-variance neuron
    partner_layer: Mapped[Optional[int]]
    partner_neuron: Mapped[Optional[int]]
    baseline_max_corr: Mapped[Optional[float]] = mapped_column(Float)
    universal_threshold: Mapped[float] = mapped_column(Float, default=0.5)
    job_id: Mapped[Optional[int]] = _job_fk()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())

    # A neuron's rows against every other seed (the card, the summary refresh): the primary key runs
    # (model_id, other_model_id, ...) and cannot serve them.
    __table_args__ = (Index("ix_neuron_correlations_neuron", "model_id", "dataset_id", "layer", "neuron"),)


class NeuronUniversality(Base):
    """Per neuron and dataset, its correlations with every other seed summed up (the universal_neurons view
    reads it). Rewritten from neuron_correlations by the correlations job in the transaction that writes
    those rows (atlas.store.summaries), so it always agrees with them."""

    __tablename__ = "neuron_universality"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    n_other_seeds: Mapped[int]  # other seeds with a max_corr (a zero-variance neuron has none)
    mean_max_corr: Mapped[Optional[float]] = mapped_column(Float)
    mean_baseline_corr: Mapped[Optional[float]] = mapped_column(Float)
    excess_corr: Mapped[Optional[float]] = mapped_column(Float)
    is_universal: Mapped[Optional[bool]]
    universal_threshold: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_neuron_universality_ranked", "dataset_id", "excess_corr"),
        # The universal neurons alone (a few %): universal fractions and counts without reading the rest.
        Index("ix_neuron_universality_universal", "model_id", "dataset_id", "layer",
              sqlite_where=text("is_universal"), postgresql_where=text("is_universal")),
    )


# --- layer interventions, logit lens, layer statistics -------------------------------------------


class LayerIntervention(Base):
    __tablename__ = "layer_interventions"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(10))  # 'none' | 'delete' | 'swap'
    layer: Mapped[Optional[int]]  # NULL for 'none'; for a swap the first of the two blocks
    n_positions: Mapped[int]
    kl: Mapped[Optional[float]] = mapped_column(Float)
    top1_agreement: Mapped[Optional[float]] = mapped_column(Float)
    accuracy: Mapped[float] = mapped_column(Float)
    accuracy_retention: Mapped[Optional[float]] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    loss_delta: Mapped[Optional[float]] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()

    __table_args__ = (UniqueConstraint("model_id", "dataset_id", "kind", "layer"),)


class LogitLens(Base):
    __tablename__ = "logit_lens"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)  # residual state: 0 = embeddings, l = after block l-1
    kl_to_final: Mapped[float] = mapped_column(Float)
    entropy_nats: Mapped[float] = mapped_column(Float)
    entropy_bits: Mapped[float] = mapped_column(Float)
    top1_agreement: Mapped[float] = mapped_column(Float)
    accuracy: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()


class LayerStat(Base):
    __tablename__ = "layer_stats"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    attn_prev5: Mapped[Optional[float]] = mapped_column(Float)
    attn_out_norm: Mapped[float] = mapped_column(Float)
    mlp_out_norm: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()


# --- functional roles ----------------------------------------------------------------------------


class TokenFeature(Base):
    """A named boolean over a tokenizer's vocabulary (computed from the decoded tokens), stored per tokenizer."""

    __tablename__ = "token_features"

    tokenizer_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    feature: Mapped[str] = mapped_column(String(50), primary_key=True)
    description: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int]
    token_ids: Mapped[list[int]] = mapped_column(JSON)


class NeuronLabel(Base):
    """The top features of a neuron by variance reduction, per source: 'vocab' (its vocabulary effect
    W_U . w_out, dataset_id NULL), 'current_token' and 'next_token' (its activation on a dataset)."""

    __tablename__ = "neuron_labels"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[Optional[int]] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    layer: Mapped[int]
    neuron: Mapped[int]
    source: Mapped[str] = mapped_column(String(20))  # 'vocab' | 'current_token' | 'next_token'
    rank: Mapped[int]  # 0 = the feature that explains the most variance
    feature: Mapped[str] = mapped_column(String(50))
    score: Mapped[float] = mapped_column(Float)  # variance reduction, in [0, 1]
    mean_with: Mapped[Optional[float]] = mapped_column(Float)  # mean of the quantity where the feature holds
    mean_without: Mapped[Optional[float]] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()

    __table_args__ = (
        Index("uq_neuron_labels_unit", "model_id", text("coalesce(dataset_id, -1)"), "source", "layer", "neuron",
              "rank", unique=True),
        Index("ix_neuron_labels_feature", "feature", "source", "score"),
        # A neuron's labels (the card, the Families join): the unique index above cannot serve it, its second
        # column is an expression.
        Index("ix_neuron_labels_neuron", "model_id", "layer", "neuron"),
        # Counts of neurons per rank-0 label and source (the Families page), read from the index alone.
        Index("ix_neuron_labels_source", "source", "rank", "model_id", "feature"),
    )


class NeuronTokenSet(Base):
    """Prediction / suppression neurons: mean activation when the next token is in the neuron's top-k
    (prediction) or bottom-k (suppression) vocabulary set, against when it is not."""

    __tablename__ = "neuron_token_sets"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    vocab_class: Mapped[str] = mapped_column(String(20))  # 'prediction' (top set) | 'suppression' (bottom set)
    set_size: Mapped[int]
    n_in_set: Mapped[int]  # positions whose next token is in the set
    n_out_set: Mapped[int]
    mean_in_set: Mapped[Optional[float]] = mapped_column(Float)
    mean_out_set: Mapped[Optional[float]] = mapped_column(Float)
    ratio: Mapped[Optional[float]] = mapped_column(Float)  # mean_in_set / mean_out_set
    job_id: Mapped[Optional[int]] = _job_fk()


class EntropyIntervention(Base):
    """A neuron's activation fixed to `value` at every scored position: mean next-token entropy (nats), loss,
    final-norm scale (1 / sigma of its input), and their change from the untouched model."""

    __tablename__ = "entropy_interventions"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)  # index in the value grid, by increasing value
    value: Mapped[float] = mapped_column(Float)
    value_kind: Mapped[str] = mapped_column(String(10))  # 'zero' | 'mean' | 'grid'
    n_positions: Mapped[int]
    entropy: Mapped[float] = mapped_column(Float)
    loss: Mapped[float] = mapped_column(Float)
    norm_scale: Mapped[float] = mapped_column(Float)
    d_entropy: Mapped[float] = mapped_column(Float)
    d_loss: Mapped[float] = mapped_column(Float)
    d_norm_scale: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()


class NeuronHeadScore(Base):
    """Attention deactivation: the direct effect of a neuron on a later head's attention logit to the first
    position, and its z-score against random directions of the same norm; the top heads by |z| per neuron."""

    __tablename__ = "neuron_head_scores"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()  # k_first, the head's key at position 0, is averaged over it
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    rank: Mapped[int] = mapped_column(primary_key=True)  # 0 = the largest |z|
    head_layer: Mapped[int]
    head: Mapped[int]
    score: Mapped[float] = mapped_column(Float)
    z: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()

    # The deactivating neurons (z <= -3 with a negative effect: a few % of the rows) per layer, for the
    # Layers page's counts without reading every neuron's scores.
    __table_args__ = (Index("ix_neuron_head_scores_head", "model_id", "head_layer", "head"),
                      Index("ix_neuron_head_scores_deactivating", "model_id", "layer", "neuron",
                            sqlite_where=text(DEACTIVATING_WHERE), postgresql_where=text(DEACTIVATING_WHERE)))


class LabelCounts(Base):
    """Per model, label source and feature, how many neurons have the feature as their rank-0 label (over every
    dataset): rewritten from neuron_labels by the labels job in the transaction that writes them
    (atlas.store.summaries); the Families page reads it."""

    __tablename__ = "label_counts"

    model_id: Mapped[int] = _model_fk()
    source: Mapped[str] = mapped_column(String(20), primary_key=True)
    feature: Mapped[str] = mapped_column(String(50), primary_key=True)
    n_neurons: Mapped[int]


class HeadDeactivation(Base):
    """Path ablation of a (neuron, head) pair: the head with and without the neuron's contribution to its query."""

    __tablename__ = "head_deactivation"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    neuron: Mapped[int] = mapped_column(primary_key=True)
    head_layer: Mapped[int] = mapped_column(primary_key=True)
    head: Mapped[int] = mapped_column(primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    z: Mapped[float] = mapped_column(Float)
    n_positions: Mapped[int]
    attn_first_orig: Mapped[float] = mapped_column(Float)
    attn_first_ablated: Mapped[float] = mapped_column(Float)
    z_norm_orig: Mapped[float] = mapped_column(Float)
    z_norm_ablated: Mapped[float] = mapped_column(Float)
    act_attn_corr: Mapped[Optional[float]] = mapped_column(Float)  # NULL when either side is constant
    job_id: Mapped[Optional[int]] = _job_fk()


# --- stages of inference: case studies ------------------------------------------------------------


class ProbeRun(Base):
    """A prediction-ensembling study: balanced positions whose next token has / has not a token feature,
    split into train and test (seeded), probes on the strongest prediction and suppression neurons."""

    __tablename__ = "probe_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    feature: Mapped[str] = mapped_column(String(50))
    n_train: Mapped[int]
    n_test: Mapped[int]
    split_seed: Mapped[int]
    min_context: Mapped[int]
    model_accuracy: Mapped[float] = mapped_column(Float)  # the model itself: P(next token has f) > 1/2
    job_id: Mapped[Optional[int]] = _job_fk()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())

    __table_args__ = (UniqueConstraint("model_id", "dataset_id", "feature"),)


class ProbeResult(Base):
    """One probe of a run: on one neuron (kind 'individual', rank = the neuron's rank by |score|) or on the
    top k neurons by individual test accuracy (kind 'topk', rank = k - 1, layer/neuron = the k-th added)."""

    __tablename__ = "probe_results"

    run_id: Mapped[int] = mapped_column(ForeignKey("probe_runs.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)  # 'individual' | 'topk'
    rank: Mapped[int] = mapped_column(primary_key=True)
    layer: Mapped[int]
    neuron: Mapped[int]
    vocab_class: Mapped[str] = mapped_column(String(20))  # the neuron's class: 'prediction' | 'suppression' (any with --neuron-pool all)
    score: Mapped[float] = mapped_column(Float)  # mean W_U . w_out over f-tokens minus over the others
    accuracy: Mapped[float] = mapped_column(Float)  # on the test split
    train_accuracy: Mapped[float] = mapped_column(Float)


class HeadStat(Base):
    """Per attention head: the subjoiner score (attention from a word's continuation to the earlier tokens of
    the same word, minus the same-length baseline at word starts), and attention to position 0 and to the
    previous token."""

    __tablename__ = "head_stats"

    model_id: Mapped[int] = _model_fk()
    dataset_id: Mapped[int] = _dataset_fk()
    layer: Mapped[int] = mapped_column(primary_key=True)
    head: Mapped[int] = mapped_column(primary_key=True)
    subjoiner: Mapped[Optional[float]] = mapped_column(Float)  # NULL: no continuation or no baseline position
    subjoiner_attn: Mapped[Optional[float]] = mapped_column(Float)
    subjoiner_baseline: Mapped[Optional[float]] = mapped_column(Float)
    n_continuations: Mapped[int]
    attn_first: Mapped[float] = mapped_column(Float)
    attn_prev: Mapped[float] = mapped_column(Float)
    job_id: Mapped[Optional[int]] = _job_fk()


# --- seed-family training ------------------------------------------------------------------------


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    family: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int]
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    out_dir: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    steps: Mapped[int]
    tokens_seen: Mapped[int]
    train_loss: Mapped[float] = mapped_column(Float)
    heldout_loss: Mapped[float] = mapped_column(Float)
    unigram_entropy: Mapped[Optional[float]] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())

    __table_args__ = (UniqueConstraint("family", "seed"),)


class TrainingCurve(Base):
    __tablename__ = "training_curves"

    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    train_loss: Mapped[float] = mapped_column(Float)
    heldout_loss: Mapped[Optional[float]] = mapped_column(Float)
