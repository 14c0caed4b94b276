"""Hugging Face `config.json` <-> lmjax's `model` section, for the architectures lmjax reads and writes.

Reading refuses, in one line naming the option, every setting that would make lmjax compute
something else than `transformers` (an activation, a bias, a RoPE variant lmjax does not have):
an imported model either computes the same function or is not imported. Both config layouts are
read: transformers 5's (`rope_parameters`, T5's `scale_decoder_outputs`) and 4's (`rope_theta`,
`rope_scaling`, T5's `tie_word_embeddings` standing for the rescaled tied head). Writing follows
the installed transformers' major version (5 when it is not installed).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from lmjax.config import ConfigError, ModelConfig

# model_type -> the transformers class whose weights lmjax reads (the head included).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}
# Other classes whose files hold the same weights (plus parts an lmjax model has no use for, such
# as BERT's pooler and next-sentence head, which are left out).
COMPATIBLE_CLASSES = {"BertForPreTraining", "BertModel", "GPT2Model", "LlamaModel", "T5Model"}


class HFConfigError(ConfigError):
    """A Hugging Face config lmjax cannot reproduce exactly."""


def _refuse(where: str, option: str, value: Any, expected: str) -> HFConfigError:
    return HFConfigError(f"{where}: {option}={value!r} is not supported by lmjax (expected {expected}); the model would compute something else")


def model_type_of(hf: dict, where: str) -> str:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _refuse(where, "model_type", model_type, "one of " + ", ".join(ARCHITECTURES))
    for name in hf.get("architectures") or []:
        if name != ARCHITECTURES[model_type] and name not in COMPATIBLE_CLASSES:
            raise _refuse(where, "architectures", name, f"{ARCHITECTURES[model_type]} (a head lmjax does not have)")
    return model_type


def _expect(hf: dict, where: str, option: str, allowed: tuple, default: Any = None) -> Any:
    value = hf.get(option, default)
    if value not in allowed:
        raise _refuse(where, option, value, " or ".join(repr(a) for a in allowed))
    return value


# transformers' defaults of keys a config.json may leave out, where the architectures differ.
_DEFAULT_THETA = {"mixtral": 1e6}
_DEFAULT_RMS_EPS = {"mixtral": 1e-5}
_DEFAULT_WINDOW = {"mistral": 4096}  # MistralConfig's; Mixtral's is None and LLaMA has no window


def _rope(hf: dict, where: str, model_type: str) -> tuple[float, dict[str, Any]]:
    """(rope_theta, lmjax rope_scaling section) from transformers 5's `rope_parameters` or 4's
    `rope_theta` + `rope_scaling`."""
    scaling = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA.get(model_type, 10000.0))))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(where, "partial_rotary_factor", scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor")), "1.0")
    if kind == "default":
        return theta, {"kind": "none"}
    if kind not in ("linear", "llama3"):
        raise _refuse(where, "rope_parameters.rope_type", kind, "'default', 'linear' or 'llama3'")
    if "factor" not in scaling:
        raise HFConfigError(f"{where}: rope_parameters.factor is missing; {kind} RoPE scaling needs it")
    if kind == "linear":
        return theta, {"kind": "linear", "factor": float(scaling["factor"])}
    return theta, {
        "kind": "llama3", "factor": float(scaling["factor"]), "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
        # transformers falls back on max_position_embeddings, as here
        "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
    }


def _llama_like(hf: dict, where: str, model_type: str = "llama") -> dict[str, Any]:
    _expect(hf, where, "hidden_act", ("silu",), "silu")
    _expect(hf, where, "attention_bias", (False, None))
    _expect(hf, where, "mlp_bias", (False, None))
    theta, scaling = _rope(hf, where, model_type)
    heads = hf["num_attention_heads"]
    model = {
        "family": "dense", "style": "llama", "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"], "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "d_ff": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048), "rope_theta": theta, "rope_scaling": scaling,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": float(hf.get("rms_norm_eps", _DEFAULT_RMS_EPS.get(model_type, 1e-6))),
    }
    window = hf.get("sliding_window", _DEFAULT_WINDOW.get(model_type)) if model_type in ("mistral", "mixtral") else None
    if window is not None:  # LLaMA has no window: transformers ignores the key there
        model["sliding_window"] = int(window)
    return model


def _mixtral(hf: dict, where: str, model_type: str = "mixtral") -> dict[str, Any]:
    model = _llama_like(hf, where, model_type)
    if hf["num_experts_per_tok"] < 2:  # a renormalised single gate is always 1: lmjax refuses to train that router
        raise _refuse(where, "num_experts_per_tok", hf["num_experts_per_tok"], "2 or more (lmjax's top-1 routing keeps the softmax gate)")
    model["family"] = "moe"
    model["moe"] = {
        "n_experts": hf["num_local_experts"], "top_k": hf["num_experts_per_tok"], "d_ff_expert": hf["intermediate_size"],
        "n_shared_experts": 0, "first_dense_layers": 0, "interval": 1, "router_scores": "softmax", "renormalize": True,
        "dispatch": "dropless", "load_balance_loss": float(hf.get("router_aux_loss_coef", 0.001)),
    }
    return model


def _gpt2(hf: dict, where: str, model_type: str = "gpt2") -> dict[str, Any]:
    # gelu_new and gelu_pytorch_tanh are the same tanh approximation, lmjax's in gpt2 style.
    _expect(hf, where, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    _expect(hf, where, "scale_attn_weights", (True,), True)
    _expect(hf, where, "scale_attn_by_inverse_layer_idx", (False,), False)
    _expect(hf, where, "add_cross_attention", (False,), False)
    d = hf["n_embd"]
    return {
        "family": "dense", "style": "gpt2", "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["n_layer"],
        "n_heads": hf["n_head"], "d_ff": hf.get("n_inner") or 4 * d, "max_seq_len": hf["n_positions"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
    }


def _bert(hf: dict, where: str, model_type: str = "bert") -> dict[str, Any]:
    _expect(hf, where, "hidden_act", ("gelu",), "gelu")
    _expect(hf, where, "position_embedding_type", ("absolute",), "absolute")
    _expect(hf, where, "is_decoder", (False,), False)
    return {
        "family": "encoder", "style": "bert", "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"], "d_ff": hf["intermediate_size"],
        "max_seq_len": hf["max_position_embeddings"], "type_vocab_size": hf.get("type_vocab_size", 2),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
    }


def t5_scales_output(hf: dict) -> bool:
    """Whether T5's decoder output is multiplied by d_model^-0.5 before a tied head (original T5).
    transformers 5 says so in `scale_decoder_outputs`; before, `tie_word_embeddings` (default true) did."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return bool(hf.get("tie_word_embeddings", True))


def _t5(hf: dict, where: str, model_type: str = "t5") -> dict[str, Any]:
    projection = _expect(hf, where, "feed_forward_proj", ("gated-gelu", "relu"), "relu")
    return {
        "family": "t5", "style": "t5", "vocab_size": hf["vocab_size"], "d_model": hf["d_model"], "n_layers": hf["num_layers"],
        "decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"], "n_heads": hf["num_heads"], "head_dim": hf["d_kv"],
        "d_ff": hf["d_ff"], "relative_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf.get("relative_attention_max_distance", 128),
        "feed_forward": "gated_gelu" if projection == "gated-gelu" else "relu",
        # lmjax's tied T5 head is the original T5's, rescaled; an unscaled head is an `unembed` matrix.
        "tie_embeddings": t5_scales_output(hf), "norm_eps": float(hf.get("layer_norm_epsilon", 1e-6)),
    }


_READERS = {"llama": _llama_like, "mistral": _llama_like, "mixtral": _mixtral, "gpt2": _gpt2, "bert": _bert, "t5": _t5}


def model_section(hf: dict, where: str) -> dict[str, Any]:
    """lmjax's `model` section (a tree for `lmjax.config.build`) computing what `hf` describes."""
    model_type = model_type_of(hf, where)
    return _READERS[model_type](hf, where, model_type)


# ----------------------------------------------------------------------------- writing


def _transformers_major() -> int:
    try:
        return int(metadata.version("transformers").split(".")[0])
    except metadata.PackageNotFoundError:
        return 5


def export_model_type(model: ModelConfig) -> str:
    """The Hugging Face architecture an lmjax model is written as; one-line error when none computes
    the same (checked before anything is written)."""

    def refuse(key: str, value: Any, why: str) -> HFConfigError:
        return HFConfigError(f"model.{key}={value!r}: {why}; this model has no Hugging Face equivalent lmjax can write")

    if model.parameterization == "mup" and model.mup_base_width != model.d_model:
        raise refuse("parameterization", "mup", "μP away from its base width multiplies logits and attention scores, "
                     "which no transformers architecture does")
    if model.sliding_window and (model.style != "llama" or model.family not in ("dense", "moe")):
        raise refuse("sliding_window", model.sliding_window, "only Mistral and Mixtral (llama style) have a sliding window")
    if model.family == "t5":
        if model.ffn not in ("gated_gelu", "relu"):
            raise refuse("feed_forward", model.ffn, "T5ForConditionalGeneration has gated-gelu or relu feed-forwards")
        return "t5"
    if model.family == "encoder":
        if model.style != "bert" or not model.post_norm or model.use_rope or model.ffn != "gelu":
            raise refuse("style", model.style, "BertForMaskedLM is BERT style (post-norm, learned positions, an erf-GELU MLP)")
        if model.n_heads != model.kv_heads or model.head_size * model.n_heads != model.d_model:
            raise refuse("n_kv_heads", model.kv_heads, "BERT has n_heads key/value heads of d_model / n_heads")
        return "bert"
    if model.style == "gpt2":
        if model.use_rope or model.ffn != "gelu" or model.family != "dense":
            raise refuse("style", model.style, "GPT2LMHeadModel has learned positions, a GELU MLP and no MoE")
        if model.n_heads != model.kv_heads or model.head_size * model.n_heads != model.d_model:
            raise refuse("n_kv_heads", model.kv_heads, "GPT-2 has n_heads key/value heads of d_model / n_heads")
        return "gpt2"
    if model.style != "llama" or not model.use_rope or model.ffn != "swiglu":
        raise refuse("style", model.style, "LLaMA, Mistral and Mixtral are llama style (RoPE, SwiGLU, RMSNorm)")
    if model.family == "moe":
        moe = model.moe
        if moe.n_shared_experts or moe.first_dense_layers or moe.interval != 1:
            raise refuse("moe", "shared/dense layers", "Mixtral has an MoE layer of routed experts only in every layer")
        if moe.router_scores != "softmax" or not moe.renormalize:
            raise refuse("moe.router_scores", moe.router_scores, "Mixtral routes by a renormalised top-k softmax")
        return "mixtral"
    return "mistral" if model.sliding_window else "llama"


def hf_config(model: ModelConfig, dtype: str, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json of `model` (as `export_model_type` names it) for weights stored in `dtype`."""
    model_type = export_model_type(model)
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": model.vocab_size,
              "dtype" if _transformers_major() >= 5 else "torch_dtype": dtype, **token_ids}
    if model_type in ("llama", "mistral", "mixtral"):
        scaling = model.rope_scaling
        rope = {"rope_type": {"none": "default"}.get(scaling.kind, scaling.kind)}
        if scaling.kind != "none":
            rope["factor"] = scaling.factor
        if scaling.kind == "llama3":
            rope.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                        original_max_position_embeddings=scaling.original_max_position_embeddings)
        if _transformers_major() >= 5:
            rope_keys = {"rope_parameters": {**rope, "rope_theta": model.rope_theta}}
        else:
            rope_keys = {"rope_theta": model.rope_theta, "rope_scaling": None if scaling.kind == "none" else rope}
        out = {**common, "hidden_size": model.d_model, "intermediate_size": model.d_ff, "num_hidden_layers": model.n_layers,
               "num_attention_heads": model.n_heads, "num_key_value_heads": model.kv_heads, "head_dim": model.head_size,
               "hidden_act": "silu", "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
               "tie_word_embeddings": model.tie_embeddings, **rope_keys}
        if model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:
            out["sliding_window"] = model.sliding_window
        if model_type == "mixtral":
            out.update(num_local_experts=model.moe.n_experts, num_experts_per_tok=model.moe.top_k,
                       intermediate_size=model.expert_d_ff, router_aux_loss_coef=model.moe.load_balance_loss)
        return out
    if model_type == "gpt2":
        return {**common, "n_embd": model.d_model, "n_layer": model.n_layers, "n_head": model.n_heads, "n_inner": model.d_ff,
                "n_positions": model.max_seq_len, "activation_function": "gelu_new", "layer_norm_epsilon": model.norm_eps,
                "tie_word_embeddings": model.tie_embeddings}
    if model_type == "bert":
        return {**common, "hidden_size": model.d_model, "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
                # no token types in lmjax: one all-zero type row (weights.py) adds nothing
                "intermediate_size": model.d_ff, "max_position_embeddings": model.max_seq_len, "type_vocab_size": max(1, model.type_vocab_size),
                "hidden_act": "gelu", "layer_norm_eps": model.norm_eps, "position_embedding_type": "absolute",
                "tie_word_embeddings": model.tie_embeddings}
    t5 = {**common, "d_model": model.d_model, "d_kv": model.head_size, "d_ff": model.d_ff, "num_layers": model.n_layers,
          "num_decoder_layers": model.n_decoder_layers, "num_heads": model.n_heads, "relative_attention_num_buckets": model.relative_buckets,
          "relative_attention_max_distance": model.relative_max_distance, "layer_norm_epsilon": model.norm_eps,
          "feed_forward_proj": "gated-gelu" if model.ffn == "gated_gelu" else "relu", "is_encoder_decoder": True,
          "tie_word_embeddings": model.tie_embeddings}
    if _transformers_major() >= 5:
        t5["scale_decoder_outputs"] = model.tie_embeddings
    return t5
