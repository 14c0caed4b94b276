"""Validation of a `Config`: `validate` needs no devices, `resolve_mesh_shape` fits the mesh to the
devices there are. Every failure is a one-line `ConfigError` naming the key and what was expected."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lmjax.config_tree import ConfigError

if TYPE_CHECKING:
    from lmjax.config import Config

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Checks that need no devices. `resolve_mesh_shape` does the device-dependent ones."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    if d.seed is not None and not 0 <= d.seed < 2**32:
        raise ConfigError(f"data.seed must be null (the run's seed) or in [0, 2**32), got {d.seed}")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        _positive(getattr(m, key), f"model.{key}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must divide model.d_model ({m.d_model})")
    if m.n_kv_heads is not None:
        _positive(m.n_kv_heads, "model.n_kv_heads")
        if m.n_heads % m.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads})")
    if m.head_dim is not None:
        _positive(m.head_dim, "model.head_dim")
    if m.attention == "cudnn" and m.dtype != "bfloat16":
        raise ConfigError(f"model.attention=cudnn needs model.dtype=bfloat16 (cuDNN flash attention has no float32 kernel), got {m.dtype}")
    if m.use_rope and m.head_size % 2:
        raise ConfigError(f"model.head_dim ({m.head_size}) must be even for RoPE")
    _validate_rope_scaling_and_window(cfg)
    _positive(m.type_vocab_size, "model.type_vocab_size", allow_zero=True)
    if m.family != "encoder":
        if m.post_norm:
            raise ConfigError(f"model.norm_position=post needs model.family=encoder (decoders are pre-norm), got family {m.family}")
        if m.type_vocab_size:
            raise ConfigError(f"model.type_vocab_size needs model.family=encoder, got family {m.family}")
    _validate_t5(cfg)
    _validate_mup(cfg)
    _validate_post_training(cfg)
    objective_families = {"causal_lm": ("dense", "moe"), "mlm": ("encoder",), "span_corruption": ("t5",), "seq2seq": ("t5",),
                          "sft": ("dense", "moe"), "dpo": ("dense", "moe")}
    if m.family not in objective_families[t.objective]:
        raise ConfigError(
            f"train.objective={t.objective} needs model.family {' or '.join(objective_families[t.objective])}, got {m.family}"
        )
    if m.loss_chunk_tokens is not None:
        _positive(m.loss_chunk_tokens, "model.loss_chunk_tokens")
        if m.family not in ("dense", "moe") or t.objective not in ("causal_lm", "sft"):
            raise ConfigError(f"model.loss_chunk_tokens needs a decoder (model.family dense or moe) trained with train.objective causal_lm "
                              f"or sft, got family {m.family} with objective {t.objective}; set it to null")
    if t.objective == "mlm":
        k = cfg.mlm
        if not 0.0 < k.mask_prob < 1.0:
            raise ConfigError(f"mlm.mask_prob must be in (0, 1), got {k.mask_prob}")
        for key in ("mask_token_fraction", "random_token_fraction"):
            if not 0.0 <= getattr(k, key) <= 1.0:
                raise ConfigError(f"mlm.{key} must be in [0, 1], got {getattr(k, key)}")
        if k.mask_token_fraction + k.random_token_fraction > 1.0:
            raise ConfigError(
                f"mlm.mask_token_fraction + mlm.random_token_fraction must be <= 1, got "
                f"{k.mask_token_fraction} + {k.random_token_fraction}"
            )
        if cfg.data.tokenizer.path is None and k.mask_token not in cfg.data.tokenizer.special_tokens:
            raise ConfigError(
                f"mlm.mask_token {k.mask_token!r} is not among data.tokenizer.special_tokens {list(cfg.data.tokenizer.special_tokens)}"
            )
    if m.family == "moe":
        e = m.moe
        if m.style != "llama" or m.ffn != "swiglu":
            raise ConfigError(f"model.family=moe needs model.style=llama and SwiGLU feed-forward layers (its experts), "
                              f"got style {m.style} with feed_forward {m.feed_forward}")
        for key in ("n_experts", "top_k", "interval", "capacity_group"):
            _positive(getattr(e, key), f"model.moe.{key}")
        for key in ("n_shared_experts", "first_dense_layers", "load_balance_loss", "router_z_loss"):
            _positive(getattr(e, key), f"model.moe.{key}", allow_zero=True)
        _positive(e.capacity_factor, "model.moe.capacity_factor")
        _positive(e.router_lr_scale, "model.moe.router_lr_scale")
        if e.d_ff_expert is not None:
            _positive(e.d_ff_expert, "model.moe.d_ff_expert")
        if e.top_k > e.n_experts:
            raise ConfigError(f"model.moe.top_k ({e.top_k}) must be <= model.moe.n_experts ({e.n_experts})")
        if e.renormalize and e.top_k == 1:
            raise ConfigError("model.moe.renormalize=true with top_k=1 makes every gate 1, so the LM loss cannot train the router; set renormalize=false")
        moe_span = m.n_layers - e.first_dense_layers
        if moe_span < e.interval or moe_span % e.interval:
            raise ConfigError(
                f"model.n_layers ({m.n_layers}) - model.moe.first_dense_layers ({e.first_dense_layers}) must be a positive "
                f"multiple of model.moe.interval ({e.interval})"
            )
    for key in ("seq_len", "global_batch_size"):
        _positive(getattr(d, key), f"data.{key}")
    if m.position_kind == "learned" and d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if d.max_documents is not None:
        _positive(d.max_documents, "data.max_documents")
    _positive(o.lr, "optim.lr")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    _positive(o.warmup_steps, "optim.warmup_steps", allow_zero=True)
    _positive(o.grad_clip, "optim.grad_clip", allow_zero=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    _positive(t.steps, "train.steps")
    for key in ("log_every", "checkpoint_every", "eval_batches", "microbatches", "keep_checkpoints"):
        _positive(getattr(t, key), f"train.{key}")
    _positive(t.eval_every, "train.eval_every", allow_zero=True)
    _positive(t.final_eval_tokens, "train.final_eval_tokens", allow_zero=True)
    _positive(t.z_loss, "train.z_loss", allow_zero=True)
    if d.global_batch_size % t.microbatches:
        raise ConfigError(
            f"data.global_batch_size ({d.global_batch_size}) must be divisible by train.microbatches ({t.microbatches})"
        )
    sizes = {k: getattr(cfg.mesh, k) for k in MESH_AXES}
    fills = [k for k, v in sizes.items() if v == -1]
    if len(fills) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + k for k in fills)}")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k} must be a positive size or -1, got {v}")
    if cfg.mesh.cpu_devices is not None and cfg.mesh.cpu_devices < 1:
        raise ConfigError(f"mesh.cpu_devices must be a positive number of devices or null, got {cfg.mesh.cpu_devices}")
    for rule in cfg.mesh.rules:
        if len(rule) != 2:
            raise ConfigError(f"mesh.rules: each rule is [logical_axis, mesh_axes], got {list(rule)}")
        targets = rule[1] if isinstance(rule[1], (list, tuple)) else [rule[1]]
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules: '{rule[0]}' maps to unknown mesh axis '{axis}'; expected one of {', '.join(MESH_AXES)}")


def _validate_rope_scaling_and_window(cfg: Config) -> None:
    m, r = cfg.model, cfg.model.rope_scaling
    if r.kind != "none":
        if not m.use_rope:
            raise ConfigError(f"model.rope_scaling.kind={r.kind} needs RoPE positions (model.positions=rope), got positions {m.position_kind}")
        if r.factor < 1.0:
            raise ConfigError(f"model.rope_scaling.factor must be >= 1 (it stretches the pretraining context), got {r.factor}")
    if r.kind == "llama3":
        if not 0.0 < r.low_freq_factor < r.high_freq_factor:
            raise ConfigError(f"model.rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                              f"low_freq_factor {r.low_freq_factor} and high_freq_factor {r.high_freq_factor}")
        _positive(r.original_max_position_embeddings, "model.rope_scaling.original_max_position_embeddings")
    if m.sliding_window is not None:
        if m.family not in ("dense", "moe"):
            raise ConfigError(f"model.sliding_window needs a decoder (model.family dense or moe; causal self-attention), got family {m.family}")
        if m.sliding_window < 1:
            raise ConfigError(f"model.sliding_window must be >= 1 (keys a query sees, itself included) or null, got {m.sliding_window}")


def _validate_t5(cfg: Config) -> None:
    """The encoder-decoder family, its objectives and what it needs from the tokenizer."""
    m, t = cfg.model, cfg.train
    if (m.family == "t5") != (m.style == "t5"):
        raise ConfigError(f"model.family=t5 and model.style=t5 go together (T5's layers), got family {m.family} with style {m.style}")
    if (m.family == "t5") != (m.position_kind == "relative"):
        raise ConfigError(f"model.positions=relative (T5's position biases) goes with model.family=t5, got family {m.family} "
                          f"with positions {m.position_kind}")
    if m.decoder_layers is not None and m.family != "t5":
        raise ConfigError(f"model.decoder_layers needs model.family=t5 (a separate decoder), got family {m.family}")
    if m.family == "t5":
        if m.decoder_layers is not None:
            _positive(m.decoder_layers, "model.decoder_layers")
        if m.attention == "cudnn":
            raise ConfigError("model.attention=cudnn is not available for model.family=t5 (its relative position biases "
                              "are untested in the cuDNN kernel); use model.attention=xla")
        if m.attention in ("blockwise", "blockwise_xla"):
            raise ConfigError(f"model.attention={m.attention} has no effect for model.family=t5 (its self-attention adds "
                              "relative position biases, which the blockwise kernel does not take); use model.attention=xla")
        _positive(m.relative_buckets, "model.relative_buckets")
        if m.relative_buckets % 2:
            raise ConfigError(f"model.relative_buckets must be even (half per direction in the encoder), got {m.relative_buckets}")
        if m.relative_max_distance <= m.relative_buckets // 2:
            raise ConfigError(f"model.relative_max_distance ({m.relative_max_distance}) must exceed half of model.relative_buckets "
                              f"({m.relative_buckets // 2}): the buckets past the exact ones are logarithmic up to it")
    _positive(cfg.data.tokenizer.sentinels, "data.tokenizer.sentinels", allow_zero=True)
    if t.objective == "span_corruption":
        k = cfg.span_corruption
        if not 0.0 < k.noise_density < 1.0:
            raise ConfigError(f"span_corruption.noise_density must be in (0, 1), got {k.noise_density}")
        if k.mean_noise_span_length < 1.0:
            raise ConfigError(f"span_corruption.mean_noise_span_length must be >= 1, got {k.mean_noise_span_length}")
        if cfg.data.tokenizer.path is None and cfg.data.tokenizer.sentinels == 0:
            raise ConfigError("train.objective=span_corruption needs sentinel tokens: set data.tokenizer.sentinels (T5: 100)")
    if t.objective == "seq2seq":
        _positive(cfg.seq2seq.target_len, "seq2seq.target_len")
        if cfg.seq2seq.input_key == cfg.seq2seq.target_key:
            raise ConfigError(f"seq2seq.input_key and seq2seq.target_key must differ, both are {cfg.seq2seq.input_key!r}")


def _validate_mup(cfg: Config) -> None:
    """μP (`model.parameterization: mup`, lmjax/models/mup.py)."""
    m = cfg.model
    if m.parameterization != "mup":
        if m.mup_zero_init:
            raise ConfigError(f"model.mup_zero_init needs model.parameterization=mup, got {m.parameterization}")
        return
    if m.mup_base_width is None:
        raise ConfigError("model.mup_base_width is required with model.parameterization=mup (the d_model of the base model)")
    _positive(m.mup_base_width, "model.mup_base_width")
    if m.family == "t5" or m.style == "t5":
        raise ConfigError(f"model.parameterization=mup is not supported for T5 (family {m.family}, style {m.style}): its "
                          f"fan-in init and unscaled attention scores have no μP rules here; use parameterization=sp")
    if m.head_dim is None and m.mup_base_width % m.n_heads:
        raise ConfigError(f"model.mup_base_width ({m.mup_base_width}) must be a multiple of model.n_heads ({m.n_heads}): with "
                          f"model.head_dim unset the base model has the same heads, of mup_base_width / n_heads")


def _distinct(values: dict[str, str], what: str) -> None:
    for key, value in values.items():
        if not value:
            raise ConfigError(f"{key} must be a non-empty string ({what})")
    seen: dict[str, str] = {}
    for key, value in values.items():
        if value in seen:
            raise ConfigError(f"{seen[value]} and {key} must differ ({what}), both are {value!r}")
        seen[value] = key


def _validate_post_training(cfg: Config) -> None:
    """The chat template and the sft / dpo sections."""
    _distinct({f"chat.{k}": getattr(cfg.chat, k) for k in ("system", "user", "assistant", "end_of_turn")}, "chat role markers")
    if cfg.train.objective == "sft":
        _distinct({f"sft.{k}": getattr(cfg.sft, k) for k in ("prompt_key", "response_key", "messages_key")}, "record keys")
    if cfg.train.objective == "dpo":
        p = cfg.dpo
        _distinct({f"dpo.{k}": getattr(p, k) for k in ("prompt_key", "chosen_key", "rejected_key")}, "record keys")
        _positive(p.beta, "dpo.beta")
        if p.loss == "conservative" and not 0.0 < p.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in (0, 0.5) with dpo.loss=conservative, got {p.label_smoothing}")
        if cfg.train.z_loss:
            raise ConfigError("train.z_loss is a language-modelling regulariser; train.objective=dpo does not apply it: set it to 0")


CPU_DEVICES_HINT = " (on a CPU, mesh.cpu_devices=N splits its cores into N devices)"


def resolve_mesh_shape(cfg: Config, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes for `n_devices`, with -1 filled in; checks the batch divides evenly."""
    sizes = {k: getattr(cfg.mesh, k) for k in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            if n_devices % fixed:
                raise ConfigError(
                    f"mesh: cannot fill mesh.{k}: the other axes ({fixed} devices) do not divide the {n_devices} devices{CPU_DEVICES_HINT}"
                )
            sizes[k] = n_devices // fixed
    product = math.prod(sizes.values())
    if product != n_devices:
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"mesh: {shape} = {product} devices, but {n_devices} are available; set one axis to -1 to fill{CPU_DEVICES_HINT}")
    batch_parallel = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.data.global_batch_size // cfg.train.microbatches
    if micro % batch_parallel:
        raise ConfigError(
            f"data.global_batch_size ({cfg.data.global_batch_size}) / train.microbatches ({cfg.train.microbatches}) = {micro} "
            f"must be divisible by the data-parallel size data*fsdp*expert = {batch_parallel}"
        )
    return sizes
