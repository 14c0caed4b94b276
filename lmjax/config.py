"""The run configuration: its schema, loading (YAML + `a.b.c=value` overrides) and validation.

One frozen dataclass per component, defaults and allowed values next to each field. A run is a
function of its `Config`; the resolved tree is written to `run_dir/config.yaml`, so
`lmjax train run_dir/config.yaml` reproduces it.

Building the tree from YAML is `lmjax.config_tree`'s work; every error raised here or there is a
`ConfigError` whose message names the key at fault and what was expected; the CLI prints it on
one line and exits non-zero.
"""

from __future__ import annotations

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
from lmjax.config_checks import MESH_AXES, resolve_mesh_shape, validate  # noqa: F401


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
    # document (segment) is cut into groups of capacity_group positions from its start, and each
    # expert takes at most ceil(top_k * capacity_group * capacity_factor / n_experts) tokens per
    # group and drops the rest (GShard, Switch); earlier tokens of a group win. So a document's
    # drops depend on neither its neighbours in a packed row nor the row length; decoding (KV
    # cache) never drops.
    dispatch: str = choices("dropless", "capacity", default="dropless")
    capacity_factor: float = 1.25
    capacity_group: int = 128  # positions per capacity group (capacity dispatch only)
    load_balance_loss: float = 1e-2  # Switch: alpha * n_experts * sum_i f_i * P_i per MoE layer
    router_z_loss: float = 1e-3  # ST-MoE: mean over tokens of logsumexp(router logits)^2 per MoE layer
    router_lr_scale: float = 1.0  # the router's Adam step times this (optim.lr x scale; with μP's 1/m on top)

    def layer_indices(self, n_layers: int) -> tuple[int, ...]:
        """Indices of the MoE layers of an n_layers-deep decoder."""
        return tuple(range(self.first_dense_layers + self.interval - 1, n_layers, self.interval))


@dataclass(frozen=True)
class RopeScalingConfig:
    """Rescaled RoPE frequencies for contexts beyond pretraining (`model.rope_scaling`), as Hugging
    Face's `rope_scaling` / `rope_parameters` (transformers' modeling_rope_utils); attention is not rescaled."""

    # none: theta^(-2i/H). linear: every frequency divided by factor (position interpolation).
    # llama3 (Llama 3.1): frequencies of wavelength over original/low_freq_factor divided by factor,
    # under original/high_freq_factor kept, smoothly interpolated in between.
    kind: str = choices("none", "linear", "llama3", default="none")
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only, as the next two
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # the pretraining context length


@dataclass(frozen=True)
class ModelConfig:
    # `family` selects the model class (the Levanter-style `type:` key): dense and moe are
    # decoder-only LMs (lmjax/models/decoder.py), encoder a BERT-style masked LM (encoder.py), t5
    # an encoder-decoder (t5.py).
    family: str = choices("dense", "moe", "encoder", "t5", default="dense")
    # A preset of layer choices. llama: RMSNorm, RoPE, SwiGLU, no biases. gpt2: LayerNorm, learned
    # positions, GELU (tanh approximation) MLP, biases. bert: as gpt2 with the exact (erf) GELU and
    # post-norm blocks (Devlin et al. 2019). t5 (family t5 only): T5 v1.1, RMSNorm, bucketed
    # relative position biases, unscaled attention scores, gated-GELU, no biases, T5X's init.
    style: str = choices("llama", "gpt2", "bert", "t5", default="llama")
    # auto: RoPE for llama style, relative position biases for t5, a learned table otherwise.
    positions: str = choices("auto", "rope", "learned", "relative", default="auto")
    # The MLP. auto: swiglu for llama, gated_gelu for t5 (T5 v1.1), gelu for gpt2 and bert.
    # relu with tie_embeddings: true is the original T5 (Raffel et al. 2020).
    feed_forward: str = choices("auto", "swiglu", "gated_gelu", "gelu", "relu", default="auto")
    # auto: post for bert style (x = norm(x + f(x)), BERT), pre otherwise (x = x + f(norm(x))).
    # Decoders are pre-norm only.
    norm_position: str = choices("auto", "pre", "post", default="auto")
    type_vocab_size: int = 0  # encoder: token-type (segment A/B) embeddings; 0 = none, BERT: 2
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4  # the encoder's layers in family t5
    decoder_layers: int | None = None  # family t5: None = n_layers
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 2048  # size of the learned position table (gpt2 style)
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # RoPE positions only
    # Mistral's (Hugging Face's) sliding_window, decoder families only: a query attends to at most
    # this many most recent keys, itself included (key j visible from query i when i - j < window).
    # None: no window. FLOP counts (lmjax.flops) ignore it and count the full causal attention.
    sliding_window: int | None = None
    relative_buckets: int = 32  # positions: relative (T5): buckets of relative distance, half per direction
    relative_max_distance: int = 128  # distances beyond this share the last bucket
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # sp: standard parameterization. mup: μP (Tensor Programs V, for Adam; lmjax/models/mup.py): with
    # m = d_model / mup_base_width, hidden matrices get init std * sqrt(1/m) and Adam lr * 1/m, the
    # logits are multiplied by 1/m, attention scores by sqrt(base head_dim) / head_dim; embeddings,
    # norms, biases and the readout keep SP's. At m = 1 it is SP exactly. Every width (d_ff, heads
    # x head_dim) is assumed to grow with d_model; with head_dim unset, n_heads is the base model's.
    parameterization: str = choices("sp", "mup", default="sp")
    mup_base_width: int | None = None  # mup: the d_model of the base model (whose hyperparameters transfer)
    # mup: zero-initialised query projection and untied readout `unembed` (TP5's option). With
    # tie_embeddings: true the readout is the token table, which cannot be zero: only the query is.
    mup_zero_init: bool = False
    dtype: str = choices("float32", "bfloat16", default="float32")  # compute dtype
    param_dtype: str = choices("float32", "bfloat16", default="float32")
    # Activation checkpointing of each block: none, full (save only block inputs), or dots
    # (save matmul outputs, recompute elementwise ops).
    remat: str = choices("none", "full", "dots", default="none")
    scan_layers: bool = True  # stack layers with nn.scan: compile time independent of depth
    # Attention kernel for training and eval: xla (jax.nn.dot_product_attention) everywhere, cudnn (flash) on GPU,
    # blockwise (lmjax/models/flash_attention.py: flash attention, memory linear in seq_len; float32 on a CPU runs
    # in a native kernel, lmjax/models/attention_cpu.cc), blockwise_xla (the same in XLA ops only, on every backend).
    attention: str = choices("xla", "cudnn", "blockwise", "blockwise_xla", default="xla")
    # Matmuls of Dense layers and the fused cross-entropy: auto runs float32 ones on a single CPU device through
    # MKL where the optional `mkl` extra is installed (lmjax/models/cpu_matmul.py), XLA's dots elsewhere; xla:
    # XLA's dots everywhere.
    matmul: str = choices("auto", "xla", default="auto")
    # causal_lm/sft: fused readout + cross-entropy in chunks of this many tokens, keeping no fp32 [tokens, V] logits (fused_cross_entropy.py)
    loss_chunk_tokens: int | None = None  # None: full logits
    moe: MoEConfig = field(default_factory=MoEConfig)  # read when family is moe

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ffn(self) -> str:
        """The feed-forward kind, `feed_forward` with auto resolved by style."""
        if self.feed_forward != "auto":
            return self.feed_forward
        return {"llama": "swiglu", "t5": "gated_gelu"}.get(self.style, "gelu")

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.ffn in ("swiglu", "gated_gelu") else 2

    @property
    def position_kind(self) -> str:
        """rope, learned or relative: `positions` with auto resolved by style."""
        if self.positions != "auto":
            return self.positions
        return {"llama": "rope", "t5": "relative"}.get(self.style, "learned")

    @property
    def use_rope(self) -> bool:
        return self.position_kind == "rope"

    @property
    def n_decoder_layers(self) -> int:
        return self.decoder_layers if self.decoder_layers is not None else self.n_layers

    @property
    def attention_scale(self) -> float | None:
        """Multiplier of the attention scores under SP; None = 1/sqrt(head_dim). T5 folds it into its
        init. Attention reads `lmjax.models.mup.attention_scale`, which is this under SP."""
        return 1.0 if self.style == "t5" else None

    @property
    def post_norm(self) -> bool:
        return self.norm_position == "post" or (self.norm_position == "auto" and self.style == "bert")

    @property
    def use_bias(self) -> bool:
        """Biases in every projection and LayerNorm (instead of RMSNorm) in gpt2 and bert style."""
        return self.style in ("gpt2", "bert")

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
    # Reserved pieces, ids after pad/unk/bos/eos: the MLM mask and separators, then the chat role
    # markers of `chat` (so a pretrained run's tokenizer already holds what SFT and DPO need).
    special_tokens: tuple[str, ...] = ("<mask>", "<sep>", "<cls>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    # T5 sentinels <extra_id_0> ... <extra_id_{n-1}>, reserved after special_tokens (span_corruption).
    sentinels: int = 0
    # Training the tokenizer reads at most this many characters of the corpus.
    train_chars: int = 20_000_000


@dataclass(frozen=True)
class DataConfig:
    # Text (.txt, .md, .py, ...) or JSONL files, paths or globs. Empty: the built-in corpus (the
    # Python standard library's own sources).
    paths: tuple[str, ...] = ()
    text_key: str = "text"  # field of each JSONL record holding the document
    # Validation files (paths or globs). Empty: validation documents are chosen by content hash
    # (val_fraction); given: these files are the validation split and every data.paths file trains.
    val_paths: tuple[str, ...] = ()
    seq_len: int = 128
    global_batch_size: int = 16  # sequences per optimizer step, over all hosts and micro-batches
    val_fraction: float = 0.02  # documents put in validation, chosen by a stable content hash
    max_documents: int | None = None  # cap on documents read (quick runs); None = all
    # Seed of the training order and of the masking draws (mlm, span corruption); None = the run's
    # `seed`. Apart from `seed`, it tells how much of a run-to-run spread is data order, not init.
    seed: int | None = None
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
    # The evaluation at the last step (summary.json's final_eval_*, the loss scaling fits read):
    # 0 reads the same eval_batches as the others; N reads the first ceil(N / tokens per batch)
    # validation batches, at most the whole split, and adds final_eval_loss_stderr (the standard
    # error of the mean over batches). Sweeps set it from their `eval_tokens`.
    final_eval_tokens: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    microbatches: int = 1  # gradient accumulation: global batch split in this many parts
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2) (PaLM); 0 disables
    # What is trained (lmjax/tasks/): causal_lm (next token, decoder families), mlm (masked
    # tokens, the encoder family), span_corruption (T5's denoising) or seq2seq (input -> target
    # pairs), both for family t5; sft (chat examples, loss on the assistant's tokens) and dpo
    # (preference pairs against a frozen reference), both for decoder families.
    objective: str = choices("causal_lm", "mlm", "span_corruption", "seq2seq", "sft", "dpo", default="causal_lm")
    # A finished (or interrupted) lmjax run directory: training starts from its latest checkpoint's
    # parameters (fresh optimizer, step 0); its model config and tokenizer are used (lmjax/train/init_from.py).
    init_from: str | None = None
    # Multi-process runs: a process whose peers stop sending heartbeats for this long exits with
    # a one-line error naming the lost process (lmjax/distributed.py); jax's own timeout is later.
    peer_timeout_s: float = 120.0


@dataclass(frozen=True)
class MLMConfig:
    """Masked-LM corruption (`train.objective: mlm`, lmjax/data/masking.py), BERT's recipe by default."""

    mask_prob: float = 0.15  # fraction of non-special tokens (or words) selected for prediction
    mask_token_fraction: float = 0.8  # of the selected: replaced by <mask>
    random_token_fraction: float = 0.1  # of the selected: replaced by a random regular token; the rest stay
    whole_word: bool = False  # select whole words (all pieces of a word together), not pieces
    mask_token: str = "<mask>"  # a special token of the tokenizer (data.tokenizer.special_tokens)


@dataclass(frozen=True)
class SpanCorruptionConfig:
    """T5's noise (`train.objective: span_corruption`, lmjax/data/span_corruption.py)."""

    noise_density: float = 0.15  # fraction of each example's tokens that become targets
    mean_noise_span_length: float = 3.0  # each span of noise is replaced by one sentinel


@dataclass(frozen=True)
class Seq2SeqConfig:
    """JSONL input/target pairs (`train.objective: seq2seq`, lmjax/data/seq2seq.py).

    The encoder reads `data.seq_len` tokens per row, the decoder `target_len`."""

    input_key: str = "input"
    target_key: str = "target"
    target_len: int = 128
    pack: bool = True  # several pairs per row (segment ids keep them apart); false: one pair per row
    overlong: str = choices("truncate", "drop", default="truncate")  # pairs longer than a row


@dataclass(frozen=True)
class ChatConfig:
    """The chat template of SFT, DPO and chat prompts (lmjax/data/chat.py): every message is its
    role's marker, its content, then `end_of_turn`. Markers are whole pieces of the tokenizer
    (data.tokenizer.special_tokens reserves these by default)."""

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end_of_turn: str = "<|end|>"


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning examples (`train.objective: sft`, lmjax/data/chat.py): JSONL records
    with `prompt_key` and `response_key` strings, or `messages_key` [{"role", "content"}, ...]."""

    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    pack: bool = True  # several examples per row (segment ids keep them apart); false: one per row
    overlong: str = choices("truncate", "drop", default="truncate")  # examples longer than a row


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (`train.objective: dpo`, lmjax/tasks/dpo.py)."""

    beta: float = 0.1  # strength of the implicit KL penalty to the reference
    # sigmoid: Rafailov et al. 2023; ipo: Azar et al. 2023; conservative: sigmoid with labels
    # flipped with probability `label_smoothing` (Mitchell 2023, cDPO).
    loss: str = choices("sigmoid", "ipo", "conservative", default="sigmoid")
    label_smoothing: float = 0.1  # conservative only
    # model: the initial policy kept as frozen parameters, sharded like the policy; precomputed:
    # its log-probabilities of every pair computed once before step 1 and saved in the run
    # directory (half the parameter memory, no second forward pass per step).
    reference: str = choices("model", "precomputed", default="model")
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    pack: bool = True
    overlong: str = choices("truncate", "drop", default="truncate")


@dataclass(frozen=True)
class MeshConfig:
    # Mesh axis sizes; -1 on one axis fills it with the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # CPU backend only: split this process's cores into this many XLA devices, which the axes above
    # then span (jax_num_cpu_devices; the devices share the cores): a sharded run on a laptop without
    # XLA_FLAGS, and on a 2-core machine 0-5% faster steps with 2 (experiments/bench/README.md, tenth
    # round). null: JAX's own count (1, or XLA_FLAGS' --xla_force_host_platform_device_count). Applied
    # when the mesh is made, before JAX starts; where JAX has started, it must already match. Readers
    # of a run (eval, generate, export) use the devices they have.
    cpu_devices: int | None = None
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
    span_corruption: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)
    seq2seq: Seq2SeqConfig = field(default_factory=Seq2SeqConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)  # read by sft, dpo and chat prompts
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def data_seed(cfg: Config) -> int:
    """The seed of the data's order and random layouts: `data.seed`, or the run's `seed` when unset."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config (device-independent checks)."""
    tree = load_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        set_path(tree, key, value)
    from lmjax.config_source import take_source_model  # it reads Config: imported here, not at the top

    take_source_model(tree)
    cfg = build(Config, tree)
    validate(cfg)
    return cfg


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))
