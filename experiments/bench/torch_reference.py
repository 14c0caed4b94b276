"""PyTorch peer of `lmjax bench` (issue 15, "a peer in the benchmark"): the same decoder-only LM,
trained the same way, written as fast as plain PyTorch allows on CPU.

    .venv/bin/python experiments/bench/torch_reference.py --style llama --steps 10 --out peer.json

The defaults are configs/bench_cpu.yaml's model (6 x 384, 6 heads, d_ff 1024, vocab 8192, seq 256
x batch 16, fp32, tied embeddings); `experiments/bench/peer.py` derives every option from the
lmjax config so the two sides cannot drift apart. Both styles mirror lmjax/models/layers.py:

- llama: RMSNorm (eps 1e-5), RoPE in the rotate-half layout (dimension i paired with i + H/2,
  inverse frequencies theta^(-i/(H/2)) in float32), SwiGLU, no biases, GQA when --kv-heads < --heads.
- gpt2: LayerNorm with bias, a learned position table of --max-seq-len rows (lmjax's
  model.max_seq_len, 2048: the whole table counts as parameters), GELU with the tanh approximation
  (lmjax/models/activations.py), a bias on every projection.

Both: pre-norm blocks, a final norm, the token table reused as the unembedding, lmjax's init
(normal 0.02, residual writes 0.02 / sqrt(2 * layers)). Two deliberate layout choices for speed,
neither changing the function or the parameter count: Q, K and V are one [(N + 2K) H, D] Linear,
SwiGLU's gate and up one [2F, D] Linear (one larger matmul instead of two or three).

The train step matches lmjax's: mean next-token cross-entropy, global-norm clipping at 1.0, AdamW
(b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices only, not on norms, biases or the
tables: lmjax's OptimConfig defaults and decay mask), lmjax's warmup-cosine schedule.

Speed: `torch.compile` of the model with the loss inside it (forward and backward graphs by
Inductor), `F.scaled_dot_product_attention(is_causal=True)`, fused AdamW (CPU kernel; foreach if
it is missing, with a note), gradients set to None, all available cores. `--compile step` also
compiles clipping + the optimizer step (Inductor's own fused kernel; lr then lives in a tensor so
the schedule does not recompile). No grad scaler: fp32.

Input: a fixed pool of --pool batches of random token ids (default 4), made on the host before
timing and cycled, as `lmjax bench` cycles its first min(4, steps + warmup) pipeline batches.
One difference in lmjax's disfavour: lmjax's rows are packed documents, so its attention also
applies a segment mask and its loss a loss mask; here every row is one sequence.

Measurement as lmjax/bench.py: the first step (compilation included) and --warmup steps are not
timed, then each step is timed alone. `time_to_first_step_s` counts from the start of `run`
(after imports, like bench's from `run_bench`); torch compiles lazily, so `compile_time_s` is
estimated as the first step's time minus the median step, and is cold only with --cold-compile
(lmjax bench turns jax's persistent cache off; Inductor's caches stay on here by default, so a
second run starts sooner). Peak memory is this process's max RSS (Inductor's compile workers are
other processes, not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, a: argparse.Namespace):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.d_model // a.heads
        bias = a.style == "gpt2"
        self.qkv = nn.Linear(a.d_model, (a.heads + 2 * a.kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(a.heads * self.head_dim, a.d_model, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, N, K = self.head_dim, self.heads, self.kv_heads
        q, k, v = self.qkv(x).split([N * H, K * H, K * H], dim=-1)
        q, k, v = q.view(B, T, N, H), k.view(B, T, K, H), v.view(B, T, K, H)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # SDPA wants [B, heads, T, H]; query head n reads KV head n // (N / K), as jax's GQA.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != N)
        return self.out(o.transpose(1, 2).reshape(B, T, N * H))


def apply_rope(x_BTNH: torch.Tensor, cos_Th: torch.Tensor, sin_Th: torch.Tensor) -> torch.Tensor:
    """lmjax.models.rotary.apply_rope: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x_BTNH.chunk(2, dim=-1)
    cos, sin = cos_Th[:, None, :], sin_Th[:, None, :]  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
    def __init__(self, a: argparse.Namespace):
        super().__init__()
        self.swiglu = a.style == "llama"
        bias = not self.swiglu
        # SwiGLU: gate and up fused in one Linear, gate first.
        self.fc_in = nn.Linear(a.d_model, (2 if self.swiglu else 1) * a.d_ff, bias=bias)
        self.down = nn.Linear(a.d_ff, a.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


def make_norm(a: argparse.Namespace) -> nn.Module:
    return nn.LayerNorm(a.d_model, eps=a.norm_eps) if a.style == "gpt2" else nn.RMSNorm(a.d_model, eps=a.norm_eps)


class Block(nn.Module):
    def __init__(self, a: argparse.Namespace):
        super().__init__()
        self.attention_norm, self.attention = make_norm(a), Attention(a)
        self.mlp_norm, self.mlp = make_norm(a), MLP(a)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """forward(tokens [B, T]) -> float32 logits [B, T, V]; forward(tokens, targets) -> mean cross-entropy."""

    def __init__(self, a: argparse.Namespace):
        super().__init__()
        self.style, self.rope_theta, self.head_dim = a.style, a.rope_theta, a.d_model // a.heads
        self.embed = nn.Embedding(a.vocab, a.d_model)
        self.position_embedding = nn.Embedding(a.max_seq_len, a.d_model) if a.style == "gpt2" else None
        self.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.final_norm = make_norm(a)
        self._init(a)

    def _init(self, a: argparse.Namespace) -> None:
        # lmjax's init: tables and matrices N(0, 0.02); the projections that write into the
        # residual stream (attention out, MLP down) N(0, 0.02 / sqrt(2 * layers)); biases 0, norm scales 1.
        std, residual_std = a.init_std, a.init_std / math.sqrt(2 * a.layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=residual_std if name.endswith(("out.weight", "down.weight")) else std)

    def rope_tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.head_dim // 2
        inv_freq = self.rope_theta ** (-torch.arange(half, dtype=torch.float32, device=device) / half)
        angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq
        return angles.cos(), angles.sin()

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.embed(tokens)
        rope = None
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[:T]
        else:
            rope = self.rope_tables(T, tokens.device)
        for block in self.layers:
            x = block(x, rope)
        logits = F.linear(self.final_norm(x), self.embed.weight)  # tied unembedding
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def param_counts(model: DecoderLM) -> dict[str, int]:
    """As lmjax.flops.param_counts: `embedding` is the token table plus the position table."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    if model.position_embedding is not None:
        embedding += model.position_embedding.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def make_optimizer(model: DecoderLM, a: argparse.Namespace, lr) -> tuple[torch.optim.Optimizer, str]:
    """AdamW with weight decay on matrices only (lmjax's decay_mask: no decay on biases, norm
    scales, token or position tables). Fused kernel when this torch build has it for CPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_table = name.startswith(("embed.", "position_embedding."))
        (decay if p.ndim >= 2 and not is_table else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    options = dict(lr=lr, betas=(a.b1, a.b2), eps=a.eps)
    if a.compile != "step":
        try:
            return torch.optim.AdamW(groups, fused=True, **options), "AdamW fused"
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"note: fused AdamW unavailable on CPU ({e}); using foreach", file=sys.stderr)
        return torch.optim.AdamW(groups, foreach=True, **options), "AdamW foreach"
    # Compiled: Dynamo traces the single-tensor loop (the one that takes a tensor lr without
    # `capturable`) and Inductor fuses it into a few kernels.
    return torch.optim.AdamW(groups, foreach=False, **options), "AdamW compiled"


def learning_rate(step: int, a: argparse.Namespace) -> float:
    """lmjax.train.optim.make_schedule (cosine): optax's warmup_cosine_decay_schedule at step + 1."""
    s, warmup = step + 1, min(a.lr_warmup, a.schedule_steps)
    total = max(a.schedule_steps, warmup + 1)  # optax's decay_steps counts the warmup too
    if s < warmup:
        return a.lr * s / warmup
    final = a.lr * a.min_lr_ratio
    progress = min(s - warmup, total - warmup) / (total - warmup)
    return final + (a.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def make_train_step(model: DecoderLM, a: argparse.Namespace):
    """Returns (step(tokens, targets, step_index) -> loss tensor, optimizer name)."""
    params = list(model.parameters())
    tensor_lr = a.compile == "step"  # a Python float lr would be a constant in the compiled graph
    lr = torch.tensor(learning_rate(0, a)) if tensor_lr else learning_rate(0, a)
    optimizer, optimizer_name = make_optimizer(model, a, lr)
    forward = torch.compile(model, mode=a.compile_mode) if a.compile != "none" else model

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(params, a.grad_clip, foreach=True)
        optimizer.step()

    if a.compile == "step":
        update = torch.compile(update, mode=a.compile_mode)

    def step(tokens: torch.Tensor, targets: torch.Tensor, index: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            if tensor_lr:
                group["lr"].fill_(learning_rate(index, a))
            else:
                group["lr"] = learning_rate(index, a)
        loss = forward(tokens, targets)
        loss.backward()
        update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, optimizer_name


def make_batches(a: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(a.seed)
    pool = []
    for _ in range(a.pool):
        row = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), generator=gen)
        pool.append((row[:, :-1].contiguous(), row[:, 1:].contiguous()))
    return pool


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def build(a: argparse.Namespace) -> tuple[DecoderLM, Callable, str, list, int]:
    """The seeded model, its train step, the optimizer's name, the input batches and the thread count,
    with torch's threads and Inductor's caches set as `a` asks."""
    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if a.cold_compile:  # as lmjax bench, which turns jax's persistent cache off
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
    torch.manual_seed(a.seed)
    model = DecoderLM(a)
    step, optimizer_name = make_train_step(model, a)
    return model, step, optimizer_name, make_batches(a), threads


def run(a: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model, step, optimizer_name, batches, threads = build(a)
    counts = param_counts(model)
    losses = []

    t = time.perf_counter()
    losses.append(step(*batches[0], 0))
    first_step = time.perf_counter() - t
    time_to_first_step = time.perf_counter() - start
    for i in range(a.warmup):
        losses.append(step(*batches[(i + 1) % len(batches)], i + 1))
    times = []
    for i in range(a.steps):
        t = time.perf_counter()
        # CPU ops are synchronous: the step is done when step() returns.
        losses.append(step(*batches[(a.warmup + 1 + i) % len(batches)], a.warmup + 1 + i))
        times.append(time.perf_counter() - t)

    step_time = statistics.median(times)
    tokens_per_step = a.batch * a.seq_len
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    result = {
        "tokens_per_sec": tokens_per_step / step_time,
        "step_time_s": step_time,
        "step_time_p10_s": q[0],  # numpy's default (linear) percentile, as bench's np.percentile
        "step_time_p90_s": q[-1],
        "compile_time_s": max(first_step - step_time, 0.0),
        "compile_time_source": "first step minus median step (torch compiles lazily)",
        "time_to_first_step_s": time_to_first_step,
        "peak_memory_bytes": peak_rss_bytes(),
        "peak_memory_source": "host max RSS",
        "params": counts["total"],
        "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"],
        "tokens_per_step": tokens_per_step,
        "timed_steps": a.steps,
        "warmup_steps": a.warmup,
        "final_loss": float(losses[-1]),
        "losses": [float(x) for x in losses],
        "optimizer": optimizer_name,
        "compile": a.compile,
        "compile_mode": a.compile_mode,
        "compile_cache": "off" if a.cold_compile else "on (Inductor's on-disk caches; a warm one shortens the first step)",
        "threads": threads,
        "data": f"pool of {len(batches)} random-token batches, cycled",
        "device": f"cpu x {threads} threads",
        "torch_version": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": vars(a),
    }
    print(
        f"torch {torch.__version__} {a.style} {a.layers}x{a.d_model} | {counts['total'] / 1e6:.2f}M params | "
        f"step {step_time * 1e3:.1f} ms (p10 {q[0] * 1e3:.1f}, p90 {q[-1] * 1e3:.1f}) | "
        f"{result['tokens_per_sec']:,.0f} tokens/s | first step after {time_to_first_step:.1f}s "
        f"(compile ~{result['compile_time_s']:.1f}s) | peak RSS {result['peak_memory_bytes'] / 2**20:,.0f} MiB | "
        f"{optimizer_name}, compile={a.compile}, {threads} threads | loss {result['final_loss']:.3f}"
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--style", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (lmjax's n_kv_heads: null)")
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=2048, help="rows of the gpt2 position table (lmjax's model.max_seq_len)")
    p.add_argument("--norm-eps", type=float, default=1e-5)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--pool", type=int, default=4, help="distinct input batches, cycled")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup", type=int, default=100, help="lr warmup steps of the schedule (optim.warmup_steps)")
    p.add_argument("--schedule-steps", type=int, default=1000, help="length of the cosine schedule (train.steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--compile", choices=("none", "model", "step"), default="model",
                   help="model: torch.compile the model and loss; step: also clipping + the optimizer step")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--cold-compile", action="store_true", help="turn Inductor's caches off: compile time as lmjax bench's (cold)")
    p.add_argument("--threads", type=int, default=0, help="0: every core this process may use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    a = p.parse_args(argv)
    a.kv_heads = a.kv_heads or a.heads
    if a.d_model % a.heads or a.heads % a.kv_heads or (a.d_model // a.heads) % 2:
        p.error("--d-model must split into --heads heads of even size, and --heads into --kv-heads groups")
    if a.style == "gpt2" and a.seq_len > a.max_seq_len:
        p.error(f"--seq-len {a.seq_len} exceeds --max-seq-len {a.max_seq_len}")
    if a.steps < 1 or a.warmup < 0 or a.pool < 1:
        p.error("expected --steps >= 1, --warmup >= 0 and --pool >= 1")
    return a


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
