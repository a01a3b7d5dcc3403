"""Attention deactivation (job `attention-roles`) against float64 numpy on the tiny real models.

The references read weights by their Hugging Face parameter names (written out here, not through the
adapters), apply the norms and the rotary formula (cos/sin of theta_j * p, theta_j = base^(-2j/r))
in numpy, and take residual states from the model's own output_hidden_states and attention
probabilities from its output_attentions.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM, AutoTokenizer

from atlas.metrics.attention_roles import CorrelationAccumulator, random_unit_directions
from atlas.modeling import load_model
from atlas.registry import register_dataset, register_model
from atlas.store import Store
from atlas.store.schema import HeadDeactivation, Job, NeuronHeadScore
from ingest.attention_roles import AttentionRolesConfig, first_keys, path_ablation, run, score_all, Pair
from ingest.next_token import ScoredBatch
from tests.tiny import ARCHITECTURES, docstring_texts

CTX = 128


def f64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in docstring_texts() if t.strip()))
    return path


@pytest.fixture(scope="module")
def llama_with_bos(tiny_models, tmp_path_factory):
    """The tiny Llama (grouped-query: 2 key/value heads for 4 heads) with a nonzero embedding of token 0:
    its pad_token_id is 0, so the embedding row of BOS is zero and, with no biases, so is every key at
    position 0 (no head has a z then)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    directory = tmp_path_factory.mktemp("llama-bos")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(directory)
    return directory


# -- numpy references -------------------------------------------------------------------------------

def params(model) -> dict[str, np.ndarray]:
    return {name: f64(p) for name, p in model.state_dict().items()}


def norm_np(p: dict, name: str, x: np.ndarray, eps: float) -> np.ndarray:
    if f"{name}.bias" in p:  # LayerNorm
        c = x - x.mean(-1, keepdims=True)
        return c / np.sqrt((c**2).mean(-1, keepdims=True) + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p[f"{name}.weight"]


def reference_layout(arch: str, model, layer: int) -> dict:
    """Per layer: W_Q [H, dh, D], b_Q, W_K [Hkv, dh, D], b_K, the attention norm's name and eps, from raw parameters."""
    p, cfg = params(model), model.config
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    dh = d_model // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if arch == "gpt2":
        w, b = p[f"transformer.h.{layer}.attn.c_attn.weight"], p[f"transformer.h.{layer}.attn.c_attn.bias"]
        wq = np.stack([w[:, h * dh:(h + 1) * dh].T for h in range(n_heads)])
        wk = np.stack([w[:, d_model + h * dh:d_model + (h + 1) * dh].T for h in range(n_heads)])
        bq = np.stack([b[h * dh:(h + 1) * dh] for h in range(n_heads)])
        bk = np.stack([b[d_model + h * dh:d_model + (h + 1) * dh] for h in range(n_heads)])
        return dict(wq=wq, bq=bq, wk=wk, bk=bk, norm=f"transformer.h.{layer}.ln_1", eps=cfg.layer_norm_epsilon)
    if arch == "neox":
        w, b = p[f"gpt_neox.layers.{layer}.attention.query_key_value.weight"], p.get(
            f"gpt_neox.layers.{layer}.attention.query_key_value.bias")
        rows = lambda h, s: slice(h * 3 * dh + s * dh, h * 3 * dh + (s + 1) * dh)  # noqa: E731
        wq = np.stack([w[rows(h, 0)] for h in range(n_heads)])
        wk = np.stack([w[rows(h, 1)] for h in range(n_heads)])
        bq = None if b is None else np.stack([b[rows(h, 0)] for h in range(n_heads)])
        bk = None if b is None else np.stack([b[rows(h, 1)] for h in range(n_heads)])
        return dict(wq=wq, bq=bq, wk=wk, bk=bk, norm=f"gpt_neox.layers.{layer}.input_layernorm", eps=cfg.layer_norm_eps)
    prefix = f"model.layers.{layer}.self_attn"
    bq, bk = p.get(f"{prefix}.q_proj.bias"), p.get(f"{prefix}.k_proj.bias")
    eps = cfg.rms_norm_eps if arch == "llama" else cfg.layer_norm_eps
    return dict(wq=p[f"{prefix}.q_proj.weight"].reshape(n_heads, dh, d_model),
                bq=None if bq is None else bq.reshape(n_heads, dh),
                wk=p[f"{prefix}.k_proj.weight"].reshape(n_kv, dh, d_model),
                bk=None if bk is None else bk.reshape(n_kv, dh), norm=f"model.layers.{layer}.input_layernorm", eps=eps)


def rope_np(config, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """x [..., P, dh] rotated at positions [P] by the rotary formula (identity for learned positions)."""
    rope = getattr(config, "rope_parameters", None)
    if not rope:
        return x
    dh = x.shape[-1]
    r = int(dh * rope.get("partial_rotary_factor", 1.0))
    theta = rope["rope_theta"] ** (-np.arange(0, r, 2, dtype=np.float64) / r)
    half = len(theta)
    angle = positions[:, None].astype(np.float64) * theta[None, :]          # [P, half]
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)


def projections_np(layout: dict, normed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """normed [seq, D] -> q [H, seq, dh], k [Hkv, seq, dh] before rotation."""
    q = np.einsum("hed,sd->hse", layout["wq"], normed)
    k = np.einsum("hed,sd->hse", layout["wk"], normed)
    if layout["bq"] is not None:
        q, k = q + layout["bq"][:, None], k + layout["bk"][:, None]
    return q, k


# -- (a) adapter weights and captures against the modules -----------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_query_key_weights_reproduce_the_modules(tiny_models, arch):
    loaded = load_model(str(tiny_models[arch]), attn_implementation="eager")
    model, adapter = loaded.model, loaded.adapter
    if arch == "llama":
        assert adapter.n_kv_heads(model) < adapter.n_heads(model)  # grouped-query
    ids = torch.randint(1, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    seen: dict = {}
    handles = []
    for layer, block in enumerate(adapter.blocks(model)):
        handles.append(adapter.attention_input_norm(block).register_forward_hook(
            lambda m, a, out, l=layer: seen.__setitem__(("normed", l), out)))
        attention = adapter.attention(block)
        for name in ("c_attn", "query_key_value", "q_proj", "k_proj"):
            if hasattr(attention, name):
                handles.append(getattr(attention, name).register_forward_hook(
                    lambda m, a, out, l=layer, n=name: seen.__setitem__((n, l), out)))

    def record(layer, query, key, value, attend):
        seen[("query", layer)], seen[("key", layer)] = query, key
        return attend(query, key, value)

    with torch.no_grad(), adapter.intercept_attention(model, record):
        logits = model(ids).logits
    for handle in handles:
        handle.remove()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        np.testing.assert_allclose(f64(logits), f64(model(ids).logits), atol=1e-6)  # the wrapper changes nothing

    H, Hkv, dh = adapter.n_heads(model), adapter.n_kv_heads(model), adapter.d_head(model)
    positions = np.arange(ids.shape[1])
    for layer, block in enumerate(adapter.blocks(model)):
        weights = adapter.query_key(block)
        assert weights.w_q.shape == (H, dh, model.config.hidden_size) and weights.w_k.shape[:2] == (Hkv, dh)
        normed = f64(seen[("normed", layer)])
        q = np.einsum("hed,bsd->bhse", f64(weights.w_q), normed)
        k = np.einsum("hed,bsd->bhse", f64(weights.w_k), normed)
        if weights.b_q is not None:
            q, k = q + f64(weights.b_q)[None, :, None], k + f64(weights.b_k)[None, :, None]
        # the module's own projection, split per head as its forward does
        if arch == "gpt2":
            fused = f64(seen[("c_attn", layer)])
            module_q = fused[..., :H * dh].reshape(2, -1, H, dh).transpose(0, 2, 1, 3)
            module_k = fused[..., H * dh:2 * H * dh].reshape(2, -1, H, dh).transpose(0, 2, 1, 3)
        elif arch == "neox":
            fused = f64(seen[("query_key_value", layer)]).reshape(2, -1, H, 3 * dh).transpose(0, 2, 1, 3)
            module_q, module_k = fused[..., :dh], fused[..., dh:2 * dh]
        else:
            module_q = f64(seen[("q_proj", layer)]).reshape(2, -1, H, dh).transpose(0, 2, 1, 3)
            module_k = f64(seen[("k_proj", layer)]).reshape(2, -1, Hkv, dh).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(q, module_q, atol=2e-5)
        np.testing.assert_allclose(k, module_k, atol=2e-5)
        # what the attention function receives = the rotary formula applied to the projections
        np.testing.assert_allclose(f64(seen[("query", layer)]), rope_np(model.config, module_q, positions), atol=2e-5)
        np.testing.assert_allclose(f64(seen[("key", layer)]), rope_np(model.config, module_k, positions), atol=2e-5)
        # adapter.rotate and its transpose against the formula
        pos = torch.arange(64, 100)
        x = torch.randn(3, len(pos), dh, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        turned = rope_np(model.config, f64(x), pos.numpy())
        np.testing.assert_allclose(f64(adapter.rotate(model, x, pos)), turned, atol=1e-5)
        np.testing.assert_allclose(f64(adapter.rotate(model, torch.from_numpy(turned), pos, transpose=True)),
                                   f64(x), atol=1e-5)
    gamma = f64(adapter.attention_norm_scale(adapter.blocks(model)[0]))
    norm_name = reference_layout(arch, model, 0)["norm"]
    np.testing.assert_array_equal(gamma, f64(model.get_submodule(norm_name).weight))


# -- (b) scores and z against numpy ---------------------------------------------------------------

def numpy_first_keys(arch: str, model, first_tokens: torch.Tensor) -> list[np.ndarray]:
    """Per layer [Hkv, dh]: key at position 0 (rotation there is the identity) averaged over the rows."""
    with torch.no_grad():
        hidden = model(first_tokens, output_hidden_states=True).hidden_states
    keys = []
    for layer in range(model.config.num_hidden_layers):
        layout = reference_layout(arch, model, layer)
        normed = norm_np(params(model), layout["norm"], f64(hidden[layer][:, 0]), layout["eps"])
        k = np.einsum("hed,bd->bhe", layout["wk"], normed)
        keys.append((k + (0 if layout["bk"] is None else layout["bk"])).mean(0))
    return keys


def numpy_scores(arch: str, model, keys: list[np.ndarray], layer: int, q_from: int, ctx: int,
                 directions: np.ndarray | None = None) -> np.ndarray:
    """[N, later heads]: mean over p of (R(p) W_Q^h diag(gamma) w) . k_first / sqrt(dh), for w_out rows
    of `layer` (centred for LayerNorm models) or for the given directions."""
    p = params(model)
    if directions is None:
        directions = processed_w_out(arch, p, layer)
    positions = np.arange(q_from, ctx)
    columns = []
    for m in range(layer + 1, model.config.num_hidden_layers):
        layout = reference_layout(arch, model, m)
        gamma = p[f"{layout['norm']}.weight"]
        H, Hkv, dh = layout["wq"].shape[0], layout["wk"].shape[0], layout["wq"].shape[1]
        for h in range(H):
            q = directions @ (layout["wq"][h] * gamma).T                               # [N, dh]
            rotated = rope_np(model.config, np.broadcast_to(q[:, None, :], (len(q), len(positions), dh)), positions)
            k = keys[m][h // (H // Hkv)]
            columns.append((rotated @ k).mean(axis=1) / math.sqrt(dh))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "phi", "llama_with_bos"])
def test_scores_and_z_match_numpy(tiny_models, llama_with_bos, arch):
    directory = llama_with_bos if arch == "llama_with_bos" else tiny_models[arch]
    arch = "llama" if arch == "llama_with_bos" else arch
    loaded = load_model(str(directory), attn_implementation="eager")
    model = loaded.model
    tokenizer = loaded.tokenizer
    texts = [t for t in docstring_texts()[:12] if t.strip()]
    rows = [[tokenizer.bos_token_id] + tokenizer(t)["input_ids"][:20] for t in texts]

    class Rows:  # the dataset interface first_keys reads: batches of padded rows
        def batches(self, batch_size, n_rows):
            from atlas.data.tokens import Batch
            for start in range(0, n_rows, batch_size):
                chunk = rows[start:start + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
                yield Batch(ids, mask, mask.bool(), mask.sum(1), torch.arange(len(chunk)), torch.arange(len(chunk)))

    keys = first_keys(loaded, Rows(), len(rows), 5, "cpu")
    reference_keys = numpy_first_keys(arch, model, torch.tensor([r[:1] for r in rows]))
    for got, expected in zip(keys, reference_keys):
        np.testing.assert_allclose(f64(got), expected, rtol=1e-5, atol=1e-6)

    q_from, ctx = (64, CTX)
    config = AttentionRolesConfig(n_random=300, seed=4, top_heads=3, ablate_pairs=4)
    stored, pairs = score_all(loaded, [torch.from_numpy(k) for k in reference_keys], config, q_from, ctx, "cpu")
    centre = arch != "llama"
    unit = f64(random_unit_directions(300, model.config.hidden_size, 4, centre))
    if centre:
        np.testing.assert_allclose(unit.mean(-1), 0, atol=1e-12)
    n_layers, d_mlp = model.config.num_hidden_layers, loaded.adapter.d_mlp(model)
    by_key = {(l, n, r): (hl, h, s, z) for l, n, r, hl, h, s, z in zip(*stored.values())}
    all_z = []
    for layer in range(n_layers - 1):
        scores = numpy_scores(arch, model, reference_keys, layer, q_from, ctx)
        p = params(model)
        norms = np.linalg.norm(processed_w_out(arch, p, layer), axis=-1)
        random_unit = numpy_scores(arch, model, reference_keys, layer, q_from, ctx, directions=unit)   # [R, heads]
        z = scores / (norms[:, None] * np.std(random_unit, axis=0)[None, :])
        # direct check: the random scores of a neuron scale with its norm
        np.testing.assert_allclose(np.std(random_unit * norms[0], axis=0), norms[0] * np.std(random_unit, axis=0))
        H = model.config.num_attention_heads
        for neuron in range(d_mlp):
            order = np.argsort(-np.abs(z[neuron]), kind="stable")[:3]
            for rank, column in enumerate(order):
                head_layer, head, score, zz = by_key[(layer, neuron, rank)]
                assert (head_layer, head) == (layer + 1 + column // H, column % H)
                np.testing.assert_allclose(score, scores[neuron, column], rtol=1e-5, atol=1e-9)
                np.testing.assert_allclose(zz, z[neuron, column], rtol=1e-5)
        all_z.append([(z[n, c], layer, n, c) for n in range(d_mlp) for c in range(z.shape[1])])
    assert len(stored["layer"]) == sum(d_mlp * min(3, (n_layers - 1 - l) * model.config.num_attention_heads)
                                       for l in range(n_layers - 1))
    expected_pairs = sorted(v for layer_z in all_z for v in layer_z)[:4]
    assert [(p.layer, p.neuron) for p in pairs] == [(l, n) for _, l, n, _ in expected_pairs]
    assert all(p.z < 0 for p in pairs)


def processed_w_out(arch: str, p: dict, layer: int) -> np.ndarray:
    """w_out rows [d_mlp, D] by parameter name, centred over d_model for LayerNorm models."""
    w = {"gpt2": lambda: p[f"transformer.h.{layer}.mlp.c_proj.weight"],
         "neox": lambda: p[f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.weight"].T,
         "llama": lambda: p[f"model.layers.{layer}.mlp.down_proj.weight"].T,
         "phi": lambda: p[f"model.layers.{layer}.mlp.fc2.weight"].T}[arch]()
    return w - w.mean(-1, keepdims=True) if arch != "llama" else w


def test_correlation_accumulator_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.normal(size=300)
    y = y + 0.5 * x
    acc = CorrelationAccumulator()
    for chunk in np.array_split(np.arange(300), 7):
        acc.add(torch.from_numpy(x[chunk]), torch.from_numpy(y[chunk]))
    assert acc.correlation() == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    constant = CorrelationAccumulator()
    constant.add(torch.ones(5), torch.arange(5.0))
    assert constant.correlation() is None


# -- (c) a planted deactivation neuron ------------------------------------------------------------

PLANTED_NEURON, PLANTED_HEAD = 7, 2


@pytest.fixture(scope="module")
def planted_gpt2(tiny_models, tmp_path_factory):
    """Tiny GPT-2 whose layer-0 neuron 7 writes -30 x (the centred diag(gamma) W_Q^h^T k_first of head 2 of
    layer 1, unit norm): its input weight separates what the MLP reads at the BOS (pre-activation -7:
    silent at position 0, so its write cannot move k_first) from what it reads elsewhere (+3 on average)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    bos = torch.tensor([[tokenizer.bos_token_id]])
    block0, block1 = model.transformer.h[0], model.transformer.h[1]
    seen = {}
    handle = block0.ln_2.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out[0].detach().clone()))
    with torch.no_grad():
        model(planted_batch(tokenizer, n_rows=1).input_ids)
        handle.remove()
        x0, typical = seen["x"][0], seen["x"][1:].mean(0)  # what the MLP reads at the BOS and elsewhere
        separating = (typical - x0) * 10 / (typical - x0).dot(typical - x0)  # typical - BOS: +10 on average
        block0.mlp.c_fc.weight[:, PLANTED_NEURON] = separating  # Conv1D [d_model, d_mlp]
        block0.mlp.c_fc.bias[PLANTED_NEURON] = -7.0 - separating.dot(x0)  # -7 at the BOS: silent there
        hidden = model(bos, output_hidden_states=True).hidden_states[1][0, 0]
        d_model, dh = model.config.n_embd, model.config.n_embd // model.config.n_head
        k = block1.attn.c_attn(block1.ln_1(hidden))[d_model + PLANTED_HEAD * dh:d_model + (PLANTED_HEAD + 1) * dh]
        w_q = block1.attn.c_attn.weight[:, PLANTED_HEAD * dh:(PLANTED_HEAD + 1) * dh]   # [d_model, dh]
        direction = (block1.ln_1.weight[:, None] * w_q) @ k
        direction = direction - direction.mean()
        block0.mlp.c_proj.weight[PLANTED_NEURON] = -30 * direction / direction.norm()
    directory = tmp_path_factory.mktemp("planted-gpt2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def planted_batch(tokenizer, n_rows: int = 3, width: int = 100) -> ScoredBatch:
    ids = [tokenizer.bos_token_id] + [i for t in docstring_texts()[:200] for i in tokenizer(t)["input_ids"]]
    rows = torch.tensor([ids[1 + r * width:1 + (r + 1) * width] for r in range(n_rows)])
    rows[:, 0] = tokenizer.bos_token_id
    mask = torch.ones_like(rows)
    counted = rows != tokenizer.bos_token_id
    return ScoredBatch(rows, mask, counted, torch.zeros(0, dtype=torch.long), counted)


def numpy_path_ablation(model, ids: torch.Tensor, counted: torch.Tensor, q_from: int) -> dict[str, float]:
    """GPT-2 layer-1 head PLANTED_HEAD with layer-0 neuron PLANTED_NEURON's write removed from its query only."""
    p = params(model)
    seen = {}
    handle = model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("act", a[0]))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    handle.remove()
    act = f64(seen["act"])[..., PLANTED_NEURON]                         # [b, T]
    resid = f64(out.hidden_states[1])
    layout = reference_layout("gpt2", model, 1)
    d_model, h = model.config.n_embd, PLANTED_HEAD
    dh = d_model // model.config.n_head
    w, b = p["transformer.h.1.attn.c_attn.weight"], p["transformer.h.1.attn.c_attn.bias"]
    w_v, b_v = w[:, 2 * d_model + h * dh:2 * d_model + (h + 1) * dh], b[2 * d_model + h * dh:2 * d_model + (h + 1) * dh]
    normed = norm_np(p, layout["norm"], resid, layout["eps"])
    ablated = norm_np(p, layout["norm"], resid - act[..., None] * p["transformer.h.0.mlp.c_proj.weight"][PLANTED_NEURON],
                      layout["eps"])
    k = normed @ layout["wk"][h].T + layout["bk"][h]
    v = normed @ w_v + b_v
    q = ablated @ layout["wq"][h].T + layout["bq"][h]
    T = ids.shape[1]
    logits = np.einsum("bqe,bke->bqk", q, k) / math.sqrt(dh) + np.triu(np.full((T, T), -np.inf), 1)
    probs_ablated = np.exp(logits - logits.max(-1, keepdims=True))
    probs_ablated /= probs_ablated.sum(-1, keepdims=True)
    probs = f64(out.attentions[1][:, h])                                  # the model's own eager attention
    select = (f64(counted) > 0) & (np.arange(T)[None, :] >= q_from)
    z, z_ablated = np.einsum("bqk,bke->bqe", probs, v), np.einsum("bqk,bke->bqe", probs_ablated, v)
    return {"n": int(select.sum()), "attn_orig": probs[..., 0][select].mean(),
            "attn_ablated": probs_ablated[..., 0][select].mean(),
            "z_orig": np.linalg.norm(z, axis=-1)[select].mean(), "z_ablated": np.linalg.norm(z_ablated, axis=-1)[select].mean(),
            "corr": np.corrcoef(act[select], probs[..., 0][select])[0, 1], "active": (act[select] > 0.5).mean()}


def test_planted_neuron_deactivates_its_head_and_ablation_restores_it(planted_gpt2, docs_file, tmp_path):
    loaded = load_model(str(planted_gpt2), attn_implementation="eager")
    batch = planted_batch(loaded.tokenizer)
    pair = Pair(0, PLANTED_NEURON, 1, PLANTED_HEAD, -1.0, -1.0)
    sums = path_ablation(loaded, [batch], [pair], q_from=64)[pair]
    expected = numpy_path_ablation(loaded.model, batch.input_ids, batch.counted, 64)
    assert expected["active"] > 0.5  # the neuron fires at most positions
    assert sums.n == expected["n"] > 0
    np.testing.assert_allclose(sums.attn_orig / sums.n, expected["attn_orig"], rtol=1e-5)
    np.testing.assert_allclose(sums.attn_ablated / sums.n, expected["attn_ablated"], rtol=1e-4)
    np.testing.assert_allclose(sums.z_norm_orig / sums.n, expected["z_orig"], rtol=1e-5)
    np.testing.assert_allclose(sums.z_norm_ablated / sums.n, expected["z_ablated"], rtol=1e-4)
    np.testing.assert_allclose(sums.correlation.correlation(), expected["corr"], rtol=1e-4)
    assert expected["attn_ablated"] > expected["attn_orig"]

    # the job finds the pair: top |z| head with a negative score, and its path ablation raises attention to 0
    store = Store(f"sqlite:///{tmp_path / 'atlas.db'}")
    register_model(store, str(planted_gpt2), family="planted", seed=0, name="planted")
    register_dataset(store, "docs", str(docs_file), n_tokens=1500, ctx_len=CTX, sample_seed=1)
    run(AttentionRolesConfig(model="planted", dataset="docs", n_random=200, ablate_pairs=3, device="cpu"), store)
    with store.session() as session:
        top = session.scalars(select(NeuronHeadScore).where(NeuronHeadScore.layer == 0,
                                                            NeuronHeadScore.neuron == PLANTED_NEURON,
                                                            NeuronHeadScore.rank == 0)).one()
        ablation = session.scalars(select(HeadDeactivation).order_by(HeadDeactivation.z)).all()
    store.dispose()
    assert (top.head_layer, top.head) == (1, PLANTED_HEAD) and top.score < 0 and top.z < -3
    first = ablation[0]
    assert (first.layer, first.neuron, first.head_layer, first.head) == (0, PLANTED_NEURON, 1, PLANTED_HEAD)
    assert first.attn_first_ablated > first.attn_first_orig


# -- (d) the job through the store, (e) every architecture ------------------------------------------

def test_job_fills_the_tables_and_skips_on_rerun(store, tiny_models, docs_file):
    model, _ = register_model(store, str(tiny_models["gpt2"]), family="tiny", seed=0, name="tiny")
    register_dataset(store, "docs", str(docs_file), n_tokens=1500, ctx_len=CTX, sample_seed=1)
    config = AttentionRolesConfig(model="tiny", dataset="docs", n_random=200, ablate_pairs=4, device="cpu")
    run(config, store)
    with store.session() as session:
        n_scores = session.scalar(select(func.count()).select_from(NeuronHeadScore))
        layers = set(session.scalars(select(NeuronHeadScore.layer)).all())
        pairs = session.scalars(select(HeadDeactivation).order_by(HeadDeactivation.z)).all()
        job = session.scalars(select(Job).where(Job.kind == "attention-roles")).one()
    assert n_scores == model.d_mlp * (5 + 4) and layers == {0, 1}  # 8 then 4 later heads; the last layer: none
    assert len(pairs) == 4 and all(p.z < 0 and p.head_layer > p.layer and p.n_positions > 0 for p in pairs)
    assert all(0 <= p.attn_first_orig <= 1 and 0 <= p.attn_first_ablated <= 1 and p.z_norm_orig > 0 for p in pairs)
    assert job.status == "done" and job.config["query_positions_from"] == 64
    run(config, store)  # skipped: the ledger has the unit done with this config
    with store.session() as session:
        assert session.scalars(select(Job.status)).all() == ["done"]
        assert set(session.scalars(select(NeuronHeadScore.job_id)).all()) == {job.id}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_runs_the_job(tiny_models, docs_file, tmp_path, arch):
    store = Store(f"sqlite:///{tmp_path / 'atlas.db'}")
    model, _ = register_model(store, str(tiny_models[arch]), family="tiny", seed=0, name="tiny")
    register_dataset(store, "short", str(docs_file), n_tokens=400, ctx_len=48, sample_seed=1)
    run(AttentionRolesConfig(model="tiny", dataset="short", n_random=100, ablate_pairs=2, device="cpu"), store)
    with store.session() as session:
        n_scores = session.scalar(select(func.count()).select_from(NeuronHeadScore))
        n_pairs = session.scalar(select(func.count()).select_from(HeadDeactivation))
        job = session.scalars(select(Job)).one()
    store.dispose()
    assert job.status == "done" and job.config["query_positions_from"] == 1  # ctx 48 <= 64: from position 1
    if arch == "llama":  # BOS = pad has a zero embedding and nothing has a bias: every key at position 0 is 0
        assert n_scores == n_pairs == 0
    else:
        assert n_scores == model.d_mlp * sum(min(5, (model.n_layers - 1 - l) * 4) for l in range(model.n_layers - 1))
        assert n_pairs == 2
