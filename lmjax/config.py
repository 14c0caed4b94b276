"""The run configuration: its schema, loading (YAML + `a.b.c=value` overrides) and validation.

One frozen dataclass per component, defaults and allowed values next to each field. A run is a
function of its `Config`; the resolved tree is written to `run_dir/config.yaml`, so
`lmjax train run_dir/config.yaml` reproduces it.

Building the tree from YAML is `lmjax.config_tree`'s work; every error raised here or there is a
`ConfigError` whose message names the key at fault and what was expected; the CLI prints it on
one line and exits non-zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The tree machinery, re-exported: `from lmjax.config import ConfigError, replace, ...` is how the
# rest of lmjax reads it.
from lmjax.config_tree import (  # noqa: F401
    ConfigError,
    build,
    choices,
    flatten_dotted,
    load_yaml,
    parse_override,
    replace,
    set_path,
    to_dict,
)


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers, used when `model.family` is moe (lmjax/models/moe.py).

    Layer i (0-based) is an MoE layer when i >= first_dense_layers and (i - first_dense_layers + 1)
    is a multiple of `interval`; the other layers keep the dense FFN of width `model.d_ff`.
    """

    n_experts: int = 8
    top_k: int = 2  # experts per token: 1 = Switch, 2 = Mixtral
    d_ff_expert: int | None = None  # None: model.d_ff. More, smaller experts = fine-grained (DeepSeekMoE)
    n_shared_experts: int = 0  # experts of width d_ff_expert that every token goes through (DeepSeekMoE)
    first_dense_layers: int = 0
    interval: int = 1  # 2: every other layer after the dense prefix is MoE (GShard, Switch)
    router_scores: str = choices("softmax", "sigmoid", default="softmax")  # sigmoid: DeepSeek-V3
    renormalize: bool = True  # top-k weights divided by their sum (Mixtral); false keeps the raw scores
    # dropless: every token reaches its experts (sorted by expert, grouped matmuls). capacity: each
    # expert takes at most ceil(top_k * seq_len * capacity_factor / n_experts) tokens per row and
    # drops the rest (GShard, Switch); earlier tokens of a row win.
    dispatch: str = choices("dropless", "capacity", default="dropless")
    capacity_factor: float = 1.25
    load_balance_loss: float = 1e-2  # Switch: alpha * n_experts * sum_i f_i * P_i per MoE layer
    router_z_loss: float = 1e-3  # ST-MoE: mean over tokens of logsumexp(router logits)^2 per MoE layer

    def layer_indices(self, n_layers: int) -> tuple[int, ...]:
        """Indices of the MoE layers of an n_layers-deep decoder."""
        return tuple(range(self.first_dense_layers + self.interval - 1, n_layers, self.interval))


@dataclass(frozen=True)
class ModelConfig:
    # `family` selects the model class (the Levanter-style `type:` key): dense and moe are
    # decoder-only LMs (lmjax/models/decoder.py), encoder a BERT-style masked LM (encoder.py).
    family: str = choices("dense", "moe", "encoder", default="dense")
    # A preset of layer choices. llama: RMSNorm, RoPE, SwiGLU, no biases. gpt2: LayerNorm, learned
    # positions, GELU (tanh approximation) MLP, biases. bert: as gpt2 with the exact (erf) GELU and
    # post-norm blocks (Devlin et al. 2019).
    style: str = choices("llama", "gpt2", "bert", default="llama")
    # auto: RoPE for llama style, a learned position table otherwise.
    positions: str = choices("auto", "rope", "learned", default="auto")
    # auto: post for bert style (x = norm(x + f(x)), BERT), pre otherwise (x = x + f(norm(x))).
    # Decoders are pre-norm only.
    norm_position: str = choices("auto", "pre", "post", default="auto")
    type_vocab_size: int = 0  # encoder: token-type (segment A/B) embeddings; 0 = none, BERT: 2
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 2048  # size of the learned position table (gpt2 style)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = choices("float32", "bfloat16", default="float32")  # compute dtype
    param_dtype: str = choices("float32", "bfloat16", default="float32")
    # Activation checkpointing of each block: none, full (save only block inputs), or dots
    # (save matmul outputs, recompute elementwise ops).
    remat: str = choices("none", "full", "dots", default="none")
    scan_layers: bool = True  # stack layers with nn.scan: compile time independent of depth
    # Attention kernel for jax.nn.dot_product_attention: xla everywhere, cudnn (flash) on GPU.
    attention: str = choices("xla", "cudnn", default="xla")
    moe: MoEConfig = field(default_factory=MoEConfig)  # read when family is moe

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.style == "llama" else 2

    @property
    def use_rope(self) -> bool:
        return self.positions == "rope" or (self.positions == "auto" and self.style == "llama")

    @property
    def post_norm(self) -> bool:
        return self.norm_position == "post" or (self.norm_position == "auto" and self.style == "bert")

    @property
    def use_bias(self) -> bool:
        """Biases in every projection and LayerNorm (instead of RMSNorm) in gpt2 and bert style."""
        return self.style != "llama"

    @property
    def expert_d_ff(self) -> int:
        """Width of one routed (and one shared) expert of an MoE layer."""
        return self.moe.d_ff_expert if self.moe.d_ff_expert is not None else self.d_ff


@dataclass(frozen=True)
class TokenizerConfig:
    # An existing sentencepiece .model file; when None, one is trained on the training corpus
    # (vocab = model.vocab_size) and cached by corpus fingerprint and settings.
    path: str | None = None
    model_type: str = choices("bpe", "unigram", default="bpe")
    # Reserved for later objectives (MLM mask, T5 sentinels, chat turns); ids follow pad/unk/bos/eos.
    special_tokens: tuple[str, ...] = ("<mask>", "<sep>", "<cls>")
    # Training the tokenizer reads at most this many characters of the corpus.
    train_chars: int = 20_000_000


@dataclass(frozen=True)
class DataConfig:
    # Text (.txt, .md, .py, ...) or JSONL files, paths or globs. Empty: the built-in corpus (the
    # Python standard library's own sources).
    paths: tuple[str, ...] = ()
    text_key: str = "text"  # field of each JSONL record holding the document
    seq_len: int = 128
    global_batch_size: int = 16  # sequences per optimizer step, over all hosts and micro-batches
    val_fraction: float = 0.02  # documents put in validation, chosen by a stable content hash
    max_documents: int | None = None  # cap on documents read (quick runs); None = all
    cache_dir: str = "~/.cache/lmjax"  # tokenizers and tokenized corpora, keyed by content
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # By default no decay on norms, biases and embeddings (decay applies to matmul weights).
    decay_embeddings: bool = False
    schedule: str = choices("cosine", "wsd", "constant", default="cosine")
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and wsd
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final decay
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    microbatches: int = 1  # gradient accumulation: global batch split in this many parts
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) (PaLM); 0 disables
    # What is trained (lmjax/tasks/): causal_lm (next token, decoder families) or mlm (masked
    # tokens, the encoder family).
    objective: str = choices("causal_lm", "mlm", default="causal_lm")


@dataclass(frozen=True)
class MLMConfig:
    """Masked-LM corruption (`train.objective: mlm`, lmjax/data/masking.py), BERT's recipe by default."""

    mask_prob: float = 0.15  # fraction of non-special tokens (or words) selected for prediction
    mask_token_fraction: float = 0.8  # of the selected: replaced by <mask>
    random_token_fraction: float = 0.1  # of the selected: replaced by a random regular token; the rest stay
    whole_word: bool = False  # select whole words (all pieces of a word together), not pieces
    mask_token: str = "<mask>"  # a special token of the tokenizer (data.tokenizer.special_tokens)


@dataclass(frozen=True)
class MeshConfig:
    # Mesh axis sizes; -1 on one axis fills it with the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # Logical axis -> mesh axes. A logical axis is sharded over the first of its mesh axes not
    # already used by another dimension of the same array (flax's rule resolution).
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp", "expert")),
        ("length", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("expert", "expert"),
        ("layers", None),
    )


@dataclass(frozen=True)
class LoggingConfig:
    # auto: log to wandb offline (no account needed) unless WANDB_MODE/WANDB_API_KEY say online.
    wandb: str = choices("auto", "offline", "online", "off", default="auto")
    wandb_project: str = "lmjax"
    progress: bool = True  # console progress bar


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)  # read when train.objective is mlm
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config (device-independent checks)."""
    tree = load_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    cfg = build(Config, tree)
    validate(cfg)
    return cfg


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))


# ----------------------------------------------------------------------------- validation


def _positive(value: Any, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Checks that need no devices. `resolve_mesh_shape` does the device-dependent ones."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
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
    _positive(m.type_vocab_size, "model.type_vocab_size", allow_zero=True)
    if m.family != "encoder":
        if m.post_norm:
            raise ConfigError(f"model.norm_position=post needs model.family=encoder (decoders are pre-norm), got family {m.family}")
        if m.type_vocab_size:
            raise ConfigError(f"model.type_vocab_size needs model.family=encoder, got family {m.family}")
    objective_families = {"causal_lm": ("dense", "moe"), "mlm": ("encoder",)}
    if m.family not in objective_families[t.objective]:
        raise ConfigError(
            f"train.objective={t.objective} needs model.family {' or '.join(objective_families[t.objective])}, got {m.family}"
        )
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
        if m.style != "llama":
            raise ConfigError(f"model.family=moe needs model.style=llama (SwiGLU experts), got {m.style}")
        for key in ("n_experts", "top_k", "interval"):
            _positive(getattr(e, key), f"model.moe.{key}")
        for key in ("n_shared_experts", "first_dense_layers", "load_balance_loss", "router_z_loss"):
            _positive(getattr(e, key), f"model.moe.{key}", allow_zero=True)
        _positive(e.capacity_factor, "model.moe.capacity_factor")
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
    if not m.use_rope and d.seq_len > m.max_seq_len:
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
    for rule in cfg.mesh.rules:
        if len(rule) != 2:
            raise ConfigError(f"mesh.rules: each rule is [logical_axis, mesh_axes], got {list(rule)}")
        targets = rule[1] if isinstance(rule[1], (list, tuple)) else [rule[1]]
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules: '{rule[0]}' maps to unknown mesh axis '{axis}'; expected one of {', '.join(MESH_AXES)}")


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def resolve_mesh_shape(cfg: Config, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes for `n_devices`, with -1 filled in; checks the batch divides evenly."""
    sizes = {k: getattr(cfg.mesh, k) for k in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            if n_devices % fixed:
                raise ConfigError(
                    f"mesh: cannot fill mesh.{k}: the other axes ({fixed} devices) do not divide the {n_devices} devices"
                )
            sizes[k] = n_devices // fixed
    product = math.prod(sizes.values())
    if product != n_devices:
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"mesh: {shape} = {product} devices, but {n_devices} are available; set one axis to -1 to fill")
    batch_parallel = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.data.global_batch_size // cfg.train.microbatches
    if micro % batch_parallel:
        raise ConfigError(
            f"data.global_batch_size ({cfg.data.global_batch_size}) / train.microbatches ({cfg.train.microbatches}) = {micro} "
            f"must be divisible by the data-parallel size data*fsdp*expert = {batch_parallel}"
        )
    return sizes
