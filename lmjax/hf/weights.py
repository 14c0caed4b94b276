"""Which Hugging Face tensors hold which lmjax parameters, and the exact transforms between them.

A `Link` ties, for one layer (or none), some lmjax parameters to some Hugging Face tensors with two
inverse functions made of reshapes, transposes, slices and concatenations only: values are never
rounded, so import -> export gives back every tensor bit for bit. Import reads the links of each
lmjax parameter; export writes each link's tensors.

lmjax paths are written unrolled (`layer_3/attention/query/kernel`, `encoder/layer_0/...`);
`locate` turns them into the stacked layout of `model.scan_layers` (`layers/...` with layer 3 on
axis 0, `moe_layers/moe/...` in an MoE decoder).

Hugging Face layouts: torch `Linear` weights are [out, in] (lmjax kernels are [in, out] with the
head axes split: query [D, N, H], out [N, H, D]); GPT-2's `Conv1D` weights are already [in, out].
RoPE models use the rotate-half layout on both sides, so query/key weights need no permutation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmjax.config import ModelConfig

Arrays = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Link:
    lmjax: tuple[str, ...]  # unrolled lmjax parameter paths
    hf: tuple[str, ...]  # Hugging Face tensor names
    to_lmjax: Callable[..., Arrays]  # hf arrays -> lmjax arrays
    to_hf: Callable[..., Arrays]  # lmjax arrays -> hf arrays


def same(lmjax: str, hf: str) -> Link:
    return Link((lmjax,), (hf,), lambda w: (w,), lambda w: (w,))


def linear(lmjax: str, hf: str, shape: tuple[int, ...], in_dims: int = 1) -> Link:
    """torch Linear [out, in] <-> kernel `shape` whose first `in_dims` axes are the input."""
    def to_lmjax(w: np.ndarray) -> Arrays:
        return (w.T.reshape(shape),)

    def to_hf(kernel: np.ndarray) -> Arrays:
        return (kernel.reshape(math.prod(kernel.shape[:in_dims]), -1).T,)

    return Link((lmjax,), (hf,), to_lmjax, to_hf)


def flat_bias(lmjax: str, hf: str, shape: tuple[int, ...]) -> Link:
    """Bias [prod(shape)] <-> `shape` (attention biases are [N, H] in lmjax)."""
    return Link((lmjax,), (hf,), lambda b: (b.reshape(shape),), lambda b: (b.reshape(-1),))


def norm(lmjax: str, hf: str, bias: bool, names: tuple[str, str] = ("weight", "bias")) -> list[Link]:
    links = [same(f"{lmjax}/scale", f"{hf}.{names[0]}")]
    if bias:
        links.append(same(f"{lmjax}/bias", f"{hf}.{names[1]}"))
    return links


# ----------------------------------------------------------------------------- architectures


def _attention_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, n, k, h = m.d_model, m.n_heads, m.kv_heads, m.head_size
    return {"query": (d, n, h), "key": (d, k, h), "value": (d, k, h), "out": (n, h, d)}


def _llama(m: ModelConfig, names: set[str] | None) -> list[Link]:
    shapes = _attention_shapes(m)
    links = [same("embed/embedding", "model.embed_tokens.weight"), *norm("final_norm", "model.norm", False)]
    if not m.tie_embeddings:
        links.append(linear("unembed", "lm_head.weight", (m.d_model, m.vocab_size)))
    fused = names is not None and "model.layers.0.mlp.experts.gate_up_proj" in names
    for i in range(m.n_layers):
        hf, lj = f"model.layers.{i}", f"layer_{i}"
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
            links.append(linear(f"{lj}/attention/{ours}/kernel", f"{hf}.self_attn.{theirs}.weight", shapes[ours], 2 if ours == "out" else 1))
        links += norm(f"{lj}/attention_norm", f"{hf}.input_layernorm", False) + norm(f"{lj}/mlp_norm", f"{hf}.post_attention_layernorm", False)
        if m.family == "moe":
            links += _mixtral_experts(m, hf, lj, fused)
        else:
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj")):
                links.append(linear(f"{lj}/mlp/{ours}/kernel", f"{hf}.mlp.{theirs}.weight", (m.d_model, m.d_ff)))
            links.append(linear(f"{lj}/mlp/down/kernel", f"{hf}.mlp.down_proj.weight", (m.d_ff, m.d_model)))
    return links


def _mixtral_experts(m: ModelConfig, hf: str, lj: str, fused: bool) -> list[Link]:
    """Router [D, E] and experts gate/up [E, D, F], down [E, F, D]. Files hold them per expert
    (`block_sparse_moe.experts.{e}.w1/w3/w2`, what transformers 4 and 5 save) or fused
    (`mlp.experts.gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F], transformers 5's modules)."""
    experts, f = m.moe.n_experts, m.expert_d_ff
    if fused:
        def load(gate_up, down):
            return gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1), down.transpose(0, 2, 1)

        def save(gate, up, down):
            return np.concatenate([gate, up], axis=2).transpose(0, 2, 1), down.transpose(0, 2, 1)

        return [linear(f"{lj}/mlp/router", f"{hf}.mlp.gate.weight", (m.d_model, experts)),
                Link((f"{lj}/mlp/gate", f"{lj}/mlp/up", f"{lj}/mlp/down"), (f"{hf}.mlp.experts.gate_up_proj", f"{hf}.mlp.experts.down_proj"), load, save)]
    links = [linear(f"{lj}/mlp/router", f"{hf}.block_sparse_moe.gate.weight", (m.d_model, experts))]
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        names = tuple(f"{hf}.block_sparse_moe.experts.{e}.{theirs}.weight" for e in range(experts))
        links.append(Link((f"{lj}/mlp/{ours}",), names, lambda *ws: (np.stack([w.T for w in ws]),), lambda k: tuple(e.T for e in k)))
    return links


def _gpt2(m: ModelConfig, names: set[str] | None) -> list[Link]:
    prefix = "transformer." if names is None or "transformer.wte.weight" in names else ""
    d, n, h = m.d_model, m.n_heads, m.head_size
    links = [same("embed/embedding", f"{prefix}wte.weight"), same("position_embedding", f"{prefix}wpe.weight"),
             *norm("final_norm", f"{prefix}ln_f", True)]
    if not m.tie_embeddings:
        links.append(linear("unembed", "lm_head.weight", (d, m.vocab_size)))

    def split_qkv(w, b):  # Conv1D c_attn [D, 3D], bias [3D]: query, key, value side by side
        ws, bs = np.split(w, 3, axis=1), np.split(b, 3)
        return (*(x.reshape(d, n, h) for x in ws), *(x.reshape(n, h) for x in bs))

    def join_qkv(q, k, v, qb, kb, vb):
        return np.concatenate([x.reshape(d, -1) for x in (q, k, v)], axis=1), np.concatenate([x.reshape(-1) for x in (qb, kb, vb)])

    for i in range(m.n_layers):
        hf, lj = f"{prefix}h.{i}", f"layer_{i}"
        attn = tuple(f"{lj}/attention/{p}/{kind}" for kind in ("kernel", "bias") for p in ("query", "key", "value"))
        links.append(Link(attn, (f"{hf}.attn.c_attn.weight", f"{hf}.attn.c_attn.bias"), split_qkv, join_qkv))
        links.append(Link((f"{lj}/attention/out/kernel",), (f"{hf}.attn.c_proj.weight",),
                          lambda w: (w.reshape(n, h, d),), lambda k: (k.reshape(n * h, d),)))
        links.append(same(f"{lj}/attention/out/bias", f"{hf}.attn.c_proj.bias"))
        links += [same(f"{lj}/mlp/fc_in/kernel", f"{hf}.mlp.c_fc.weight"), same(f"{lj}/mlp/fc_in/bias", f"{hf}.mlp.c_fc.bias"),
                  same(f"{lj}/mlp/down/kernel", f"{hf}.mlp.c_proj.weight"), same(f"{lj}/mlp/down/bias", f"{hf}.mlp.c_proj.bias")]
        links += norm(f"{lj}/attention_norm", f"{hf}.ln_1", True) + norm(f"{lj}/mlp_norm", f"{hf}.ln_2", True)
    return links


def _bert(m: ModelConfig, names: set[str] | None) -> list[Link]:
    prefix = "bert." if names is None or "bert.embeddings.word_embeddings.weight" in names else ""
    # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
    ln = ("gamma", "beta") if names is not None and f"{prefix}embeddings.LayerNorm.gamma" in names else ("weight", "bias")
    shapes, d, v = _attention_shapes(m), m.d_model, m.vocab_size
    e = f"{prefix}embeddings"
    links = [same("embed/embedding", f"{e}.word_embeddings.weight"), same("position_embedding", f"{e}.position_embeddings.weight"),
             *norm("embed_norm", f"{e}.LayerNorm", True, ln),
             linear("head_dense/kernel", "cls.predictions.transform.dense.weight", (d, d)),
             same("head_dense/bias", "cls.predictions.transform.dense.bias"),
             *norm("head_norm", "cls.predictions.transform.LayerNorm", True, ln)]
    if (names is None and m.tie_embeddings) or (names is not None and "cls.predictions.decoder.bias" not in names):
        links.append(same("output_bias", "cls.predictions.bias"))
    else:
        # transformers 5 adds the bias of the `decoder` Linear, tied to `cls.predictions.bias` unless
        # the files give them different values (or the head is untied): it computes with
        # `decoder.bias`, so lmjax reads that one, and writes both for an untied head.
        links.append(Link(("output_bias",), ("cls.predictions.decoder.bias", "cls.predictions.bias"), lambda used, _: (used,), lambda b: (b, b)))
    if not m.tie_embeddings:
        links.append(linear("unembed", "cls.predictions.decoder.weight", (d, v)))
    if m.type_vocab_size:
        links.append(same("token_type_embedding", f"{e}.token_type_embeddings.weight"))
    else:  # an encoder without token types is BERT with one all-zero type row (export only)
        links.append(Link((), (f"{e}.token_type_embeddings.weight",), lambda _: (), lambda: (np.zeros((1, d), np.float32),)))
    for i in range(m.n_layers):
        hf, lj = f"{prefix}encoder.layer.{i}", f"layer_{i}"
        for ours in ("query", "key", "value"):
            links.append(linear(f"{lj}/attention/{ours}/kernel", f"{hf}.attention.self.{ours}.weight", shapes[ours]))
            links.append(flat_bias(f"{lj}/attention/{ours}/bias", f"{hf}.attention.self.{ours}.bias", shapes[ours][1:]))
        links += [linear(f"{lj}/attention/out/kernel", f"{hf}.attention.output.dense.weight", shapes["out"], 2),
                  same(f"{lj}/attention/out/bias", f"{hf}.attention.output.dense.bias"),
                  linear(f"{lj}/mlp/fc_in/kernel", f"{hf}.intermediate.dense.weight", (d, m.d_ff)),
                  same(f"{lj}/mlp/fc_in/bias", f"{hf}.intermediate.dense.bias"),
                  linear(f"{lj}/mlp/down/kernel", f"{hf}.output.dense.weight", (m.d_ff, d)),
                  same(f"{lj}/mlp/down/bias", f"{hf}.output.dense.bias")]
        links += norm(f"{lj}/attention_norm", f"{hf}.attention.output.LayerNorm", True, ln) + norm(f"{lj}/mlp_norm", f"{hf}.output.LayerNorm", True, ln)
    return links


def _t5(m: ModelConfig, names: set[str] | None) -> list[Link]:
    shapes = _attention_shapes(m)
    # An unscaled head with no lm_head.weight in the files reads the shared table (transformers 5 ties it).
    head = "lm_head.weight" if names is None or "lm_head.weight" in names else "shared.weight"
    links = [same("embed/embedding", "shared.weight")]
    if not m.tie_embeddings:
        links.append(linear("unembed", head, (m.d_model, m.vocab_size)))

    def attention(lj: str, hf: str) -> list[Link]:
        return [linear(f"{lj}/{ours}/kernel", f"{hf}.{theirs}.weight", shapes[ours], 2 if ours == "out" else 1)
                for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))]

    for stack, layers in (("encoder", m.n_layers), ("decoder", m.n_decoder_layers)):
        links.append(same(f"{stack}/relative_bias/table", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        links += norm(f"{stack}/final_norm", f"{stack}.final_layer_norm", False)
        for i in range(layers):
            hf, lj = f"{stack}.block.{i}.layer", f"{stack}/layer_{i}"
            links += attention(f"{lj}/attention", f"{hf}.0.SelfAttention") + norm(f"{lj}/attention_norm", f"{hf}.0.layer_norm", False)
            mlp = 1
            if stack == "decoder":
                links += attention(f"{lj}/cross_attention", f"{hf}.1.EncDecAttention") + norm(f"{lj}/cross_attention_norm", f"{hf}.1.layer_norm", False)
                mlp = 2
            links += norm(f"{lj}/mlp_norm", f"{hf}.{mlp}.layer_norm", False)
            ff = f"{hf}.{mlp}.DenseReluDense"
            if m.ffn == "gated_gelu":
                links += [linear(f"{lj}/mlp/gate/kernel", f"{ff}.wi_0.weight", (m.d_model, m.d_ff)),
                          linear(f"{lj}/mlp/up/kernel", f"{ff}.wi_1.weight", (m.d_model, m.d_ff))]
            else:
                links.append(linear(f"{lj}/mlp/fc_in/kernel", f"{ff}.wi.weight", (m.d_model, m.d_ff)))
            links.append(linear(f"{lj}/mlp/down/kernel", f"{ff}.wo.weight", (m.d_ff, m.d_model)))
    return links


_LINKS = {"llama": _llama, "mistral": _llama, "mixtral": _llama, "gpt2": _gpt2, "bert": _bert, "t5": _t5}

# Tensors files may hold that the lmjax model has no use for (left out on import): buffers older
# transformers saved, BERT's pooler and next-sentence head, heads tied to the embedding table.
IGNORED = {
    "llama": (r".*\.rotary_emb\.inv_freq", r"lm_head\.weight"),
    "gpt2": (r".*\.attn\.(masked_)?bias", r"lm_head\.weight"),
    "bert": (r"(bert\.)?pooler\..*", r"cls\.seq_relationship\..*", r"cls\.predictions\.decoder\.(weight|bias)", r".*position_ids"),
    "t5": (r"(encoder|decoder)\.embed_tokens\.weight", r"lm_head\.weight"),
}
IGNORED["mistral"] = IGNORED["mixtral"] = IGNORED["llama"]


def links_for(model_type: str, model: ModelConfig, names: set[str] | None = None) -> list[Link]:
    """The links of `model` as `model_type`; `names` (the files' tensors) picks the file layout on
    import; None writes transformers' own layout."""
    return _LINKS[model_type](model, names)


def ignored(model_type: str, names: set[str], used: set[str]) -> set[str]:
    patterns = [re.compile(p) for p in IGNORED[model_type]]
    return {name for name in names - used if any(p.fullmatch(name) for p in patterns)}


def locate(path: str, model: ModelConfig) -> tuple[str, int | None]:
    """(path in the parameter tree, layer index on its axis 0 or None) of an unrolled lmjax path."""
    match = re.fullmatch(r"(.*?)layer_(\d+)/(.*)", path)
    if match is None or not model.scan_layers:
        return path, None
    prefix, layer, rest = match.groups()
    stack = "moe_layers/moe/" if model.family == "moe" else "layers/"
    return f"{prefix}{stack}{rest}", int(layer)
