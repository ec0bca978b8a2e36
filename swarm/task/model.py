"""The built-in model: a LLaMA-style byte-level language model (RMSNorm, rotary attention, SwiGLU).

Every transformer block has the same parameter shapes, and nothing position-dependent is a
parameter (the rotary tables are computed, non-persistent buffers), so a pipeline can cut the
model into stages of whole blocks and CheckFree can rebuild a lost block as the weighted average
of its neighbours. `forward` is `logits(run_blocks(embed_tokens(tokens)))`; a pipeline stage calls
the same three pieces on its own slice of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BYTE_VOCAB = 256
"""One token per byte value; the corpus separator (byte 0) is one of them, so no extra tokens."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    """Shape of a `ByteLM`; `SIZES` holds the named ones."""

    dim: int
    """Width of the residual stream (embedding size); a multiple of n_heads."""
    n_layers: int
    """Number of transformer blocks, all of identical shape."""
    n_heads: int
    """Attention heads per block; dim / n_heads is the head size and must be even (rotary pairs)."""
    ffn_hidden: int
    """Hidden width of the SwiGLU MLP (LLaMA uses about 8/3 * dim)."""
    max_seq_len: int
    """Longest sequence the rotary tables cover; longer inputs are refused."""
    vocab: int = BYTE_VOCAB
    """Vocabulary size: 256 byte values; more only if a task adds its own tokens."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10_000.0
    """Base of the rotary frequencies."""

    def __post_init__(self) -> None:
        for option in ("dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, option)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{option} must be a positive integer, got {value!r}")
        if self.vocab < BYTE_VOCAB:
            raise ValueError(f"model.vocab must be at least {BYTE_VOCAB} (one token per byte), got {self.vocab}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be a multiple of model.n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"model.dim / model.n_heads = {self.dim // self.n_heads} must be even for rotary embeddings; "
                "change model.dim or model.n_heads"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


SIZES: dict[str, ModelConfig] = {
    # 133,440 parameters (100,608 in blocks). For tests: a training step (AdamW) on 8 x 128
    # bytes takes about 15-20 ms on two CPU cores.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_hidden=176, max_seq_len=128),
    # 3,295,488 parameters (3,164,160 in blocks). CPU demos of `swarm local`: about 0.17 s a step
    # on 8 x 128 bytes on two CPU cores.
    "small": ModelConfig(dim=256, n_layers=4, n_heads=4, ffn_hidden=688, max_seq_len=256),
    # 85,347,072 parameters (84,953,088 in blocks): GPT-2-small's shape (and the "124M" name the
    # CheckFree paper uses for it) with a byte vocabulary, so the 38M-parameter BPE embedding of
    # GPT-2 shrinks to 2 x 196,608.
    "124m": ModelConfig(dim=768, n_layers=12, n_heads=12, ffn_hidden=2048, max_seq_len=1024),
}
"""The named model sizes `build_model` accepts; counts are pinned by tests/test_task.py."""


def rotary_tables(config: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of the rotary embedding, in float32.

    Args:
        config: gives head_dim, max_seq_len and rope_theta.
        device: where to build the tables.

    Returns:
        (cos, sin), each [max_seq_len, head_dim]: the half-width angle table repeated twice, the
        layout `_rotate_half` expects.
    """
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, device=device, dtype=torch.float64) / half))
    # float64 for the angles: position * frequency reaches ~1e3 radians at the end of a 1k sequence,
    # where float32 loses the low bits that the cosine depends on.
    angles = torch.outer(torch.arange(config.max_seq_len, device=device, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings, no biases."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # One fused projection for q, k and v: a single matmul is faster than three, and the
        # shape is still identical in every block.
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)
        cos, sin = rotary_tables(config)
        # Non-persistent: the tables are a function of the config, so they stay out of state_dict,
        # checkpoints, pseudo-gradients and CheckFree's averages.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rotary(self) -> None:
        """Recompute the rotary tables in place (needed after `to_empty`, which leaves them garbage)."""
        cos, sin = rotary_tables(self.config, device=self.rope_cos.device)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        heads, head_dim = self.config.n_heads, self.config.head_dim
        q, k, v = self.qkv(x).view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # Cast the tables to the activations' dtype: under autocast q is bf16 and a float32 table
        # would promote q and k to float32, which scaled_dot_product_attention refuses next to a bf16 v.
        cos = self.rope_cos[:seq].to(q.dtype)
        sin = self.rope_sin[:seq].to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.dim, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm transformer block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.mlp(self.mlp_norm(h))


# Projections that write into the residual stream; GPT-2 scales their init by 1/sqrt(2 * n_layers)
# so the stream's variance does not grow with depth (two such writes per block).
_RESIDUAL_OUTPUTS = ("attn.out.weight", "mlp.down.weight")
_INIT_STD = 0.02


class ByteLM(nn.Module):
    """LLaMA-style byte-level language model: embed -> blocks -> norm -> head (untied).

    `ByteLM(config)` alone keeps PyTorch's default initialisation; `build_model` gives the
    deterministic GPT-2-like one.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2-like initialisation, drawn from `generator` in parameter order, and fresh rotary tables.

        Norm gains are 1; every other weight is normal(0, 0.02), except the projections into the
        residual stream, whose std is 0.02 / sqrt(2 * n_layers).

        Args:
            generator: source of all random draws; must live on the parameters' device.
        """
        residual_std = _INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.ndim == 1:  # RMSNorm gains, the only vectors in the model
                nn.init.ones_(param)
            else:
                std = residual_std if name.endswith(_RESIDUAL_OUTPUTS) else _INIT_STD
                nn.init.normal_(param, mean=0.0, std=std, generator=generator)
        for block in self.blocks:
            block.attn.reset_rotary()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed byte tokens: the first pipeline stage's entry.

        Args:
            tokens: integer tensor [B, T] of values below config.vocab, T <= config.max_seq_len.

        Returns:
            Hidden states [B, T, dim].

        Raises:
            ValueError: tokens are not 2-D or longer than max_seq_len.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds model.max_seq_len = {self.config.max_seq_len}; "
                "lower data.seq_len or pick a larger model.max_seq_len"
            )
        return self.embed(tokens)

    def run_blocks(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks[start:stop] on hidden states: what one pipeline stage computes.

        Args:
            h: hidden states [B, T, dim].
            start: first block to run.
            stop: one past the last block to run; None runs to the end.

        Returns:
            Hidden states [B, T, dim] after those blocks.
        """
        for block in self.blocks[start:stop]:
            h = block(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: the last pipeline stage's exit.

        Args:
            h: hidden states [B, T, dim] after the last block.

        Returns:
            Logits [B, T, vocab].
        """
        return self.head(self.norm(h))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-byte logits for every position.

        Args:
            tokens: integer tensor [B, T], T <= config.max_seq_len.

        Returns:
            Logits [B, T, vocab]; position t only sees tokens 0..t.
        """
        return self.logits(self.run_blocks(self.embed_tokens(tokens)))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross entropy (nats) of a batch of windows.

        Args:
            batch: integer tensor [B, T + 1]; positions 0..T-1 are inputs, 1..T the targets.

        Returns:
            Scalar loss, float32 even when the model runs in lower precision.

        Raises:
            ValueError: the batch is not 2-D with at least two positions.
        """
        if batch.ndim != 2 or batch.shape[1] < 2:
            raise ValueError(f"batch must be [batch, seq + 1] with seq >= 1, got shape {tuple(batch.shape)}")
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def build_model(size: str | ModelConfig, seed: int = 0) -> ByteLM:
    """Build a `ByteLM` on the CPU with deterministic GPT-2-like weights.

    The same seed gives bit-identical weights on every run of the same torch build, and the
    global RNG is neither used nor advanced (the draws come from a private generator).

    Args:
        size: a name from SIZES or a ModelConfig.
        seed: seed of the initialisation.

    Returns:
        The model on the CPU in training mode; move it with `.to(device)`.

    Raises:
        ValueError: size is not a known name.
    """
    if isinstance(size, ModelConfig):
        config = size
    elif size in SIZES:
        config = SIZES[size]
    else:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    # Construct on the meta device, then allocate: PyTorch's default init would draw every weight
    # from the global RNG once only for init_weights to overwrite it.
    with torch.device("meta"):
        model = ByteLM(config)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    return model


def count_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Number of parameters (works on meta-device models).

    Args:
        model: any module; for `non_embedding`, a ByteLM.
        non_embedding: leave out the token embedding and the output head (as in scaling-law counts).

    Returns:
        The parameter count.
    """
    total = sum(p.numel() for p in model.parameters())
    if non_embedding and isinstance(model, ByteLM):
        total -= model.embed.weight.numel() + model.head.weight.numel()
    return total


def load_flat(model: nn.Module, theta: torch.Tensor) -> int:
    """Copy the flat trainable parameters `theta` (DiLoCo's θ_global: the trainable parameters in `parameters()`
    order, fp32) into `model`; returns the count.

    Raises:
        ValueError: `theta` does not have the model's trainable parameter count.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    if theta.numel() != count:
        raise ValueError(f"θ_global has {theta.numel()} values, the model has {count} trainable parameters")
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return count
