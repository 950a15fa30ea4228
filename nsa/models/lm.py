"""A small decoder-only language model with NSA attention, and its dense-attention twin.

Blocks are pre-norm: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, RMSNorm, GELU MLP. The
attention is either :class:`nsa.NSAAttention` or :class:`DenseAttention`, which has the same
query, key, value and output projections (sizes from the same :class:`~nsa.NSAConfig`), the same
RoPE, and runs torch SDPA with a causal mask.

Parameter counts of the twins differ only by NSA's own parts (see :func:`nsa_only_parameters`):
NSA has a key and a value projection per branch (three pairs; dense has one pair), the learned
phi MLPs of the compression branch (``phi_k``, ``phi_v``) and the gate MLP (``gate_proj``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nsa.backends import BACKEND_CHOICES
from nsa.config import NSAConfig
from nsa.layer import NSAAttention
from nsa.phi import BlockCompressor
from nsa.rope import RopeScaling, apply_rope, apply_rope_queries, check_rope_dim

ATTENTION_CHOICES = ("nsa", "dense")
BRANCH_INIT_CHOICES = ("shared", "independent")


@dataclass(frozen=True)
class LMConfig:
    """Hyper-parameters of :class:`RetrievalLM`.

    Attributes:
        vocab_size: token ids ``0 .. vocab_size - 1``.
        d_model: residual width.
        num_layers: blocks.
        attention: ``"nsa"`` or ``"dense"``.
        nsa: heads, head dims and (for NSA) the sparse pattern; dense uses only its head fields.
        mlp_ratio: MLP hidden width = ``mlp_ratio * d_model``.
        tie_embeddings: the output head reuses the token embedding matrix.
        rope_theta: RoPE base (a large base rotates slowly, which helps reading far beyond the
            training context).
        token_shift: add a second embedding of the previous token to each position's input, so
            a position knows its predecessor without an attention hop (retrieval "key -> the
            token after it" then takes one hop instead of an induction pair of layers; both twins
            get it, so the comparison stays fair).
        backend: NSA backend, ``"auto"``, ``"reference"`` or ``"triton"``.
        activation_checkpointing: recompute each block in backward instead of storing its
            activations (the reference NSA path stores ``T x T`` score tensors per branch).
        branch_init: how NSA's per-branch key/value projections start. ``"shared"``: the
            ``slc`` and ``win`` projections start as copies of the ``cmp`` ones (they remain
            separate parameters and diverge in training, as the spec requires); ``"independent"``:
            three independent random draws. With independent draws the shared query has to
            learn to match three unrelated key projections at once; in the CPU retrieval study
            (docs/TRAINING.md, "Why NSA learned slowly") that slowed learning markedly.
    """

    vocab_size: int
    d_model: int = 256
    num_layers: int = 4
    attention: str = "nsa"
    nsa: NSAConfig = field(default_factory=lambda: NSAConfig(num_heads=8, num_kv_heads=2, head_dim=64))
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    token_shift: bool = True
    backend: str = "auto"
    activation_checkpointing: bool = False
    branch_init: str = "shared"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"LMConfig.attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if not isinstance(self.nsa, NSAConfig):
            raise TypeError(f"LMConfig.nsa must be an nsa.NSAConfig, got {type(self.nsa).__name__}")
        if self.branch_init not in BRANCH_INIT_CHOICES:
            raise ValueError(f"LMConfig.branch_init must be one of {BRANCH_INIT_CHOICES}, got {self.branch_init!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"LMConfig.backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        check_rope_dim(self.nsa.head_dim, "LMConfig.nsa.head_dim")

    def replace(self, **changes) -> LMConfig:
        return dataclasses.replace(self, **changes)

    def twin(self) -> LMConfig:
        """The same config with the other attention kind."""
        return self.replace(attention="dense" if self.attention == "nsa" else "nsa")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["nsa"] = dataclasses.asdict(self.nsa)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LMConfig:
        return cls(**{**data, "nsa": NSAConfig(**data["nsa"])})


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (its output keeps the input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class DenseAttention(nn.Module):
    """Causal softmax attention with NSAAttention's q/k/v/o projection sizes and RoPE (torch SDPA).

    Args:
        d_model: input/output width.
        config: heads and head dims are read from it (``num_heads``, ``num_kv_heads``,
            ``head_dim``, ``v_head_dim``); the sparse fields are ignored.
        rope_theta: RoPE base.
    """

    def __init__(self, d_model: int, config: NSAConfig, *, rope_theta: float = 10000.0) -> None:
        super().__init__()
        check_rope_dim(config.head_dim, "config.head_dim")
        self.config, self.rope_theta = config, float(rope_theta)
        self.rope_scaling: RopeScaling | None = None  # as NSAAttention.rope_scaling
        hq, hk, dk, dv = config.num_heads, config.num_kv_heads, config.head_dim, config.v_head_dim
        self.q_proj = nn.Linear(d_model, hq * dk, bias=False)
        self.k_proj = nn.Linear(d_model, hk * dk, bias=False)
        self.v_proj = nn.Linear(d_model, hk * dv, bias=False)
        self.o_proj = nn.Linear(hq * dv, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d_model]`` -> ``[B, T, d_model]`` (causal)."""
        c = self.config
        batch, seq_len, _ = x.shape
        positions = torch.arange(seq_len, device=x.device)
        q = apply_rope_queries(self.q_proj(x).view(batch, seq_len, c.num_heads, c.head_dim), positions,
                               theta=self.rope_theta, scaling=self.rope_scaling)
        k = apply_rope(self.k_proj(x).view(batch, seq_len, c.num_kv_heads, c.head_dim), positions,
                       theta=self.rope_theta, scaling=self.rope_scaling)
        v = self.v_proj(x).view(batch, seq_len, c.num_kv_heads, c.v_head_dim)
        # SDPA wants [B, H, T, D]; GQA by repeating kv heads (query head h*G+g reads kv head h).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if c.group_size > 1:
            k = k.repeat_interleave(c.group_size, dim=1)
            v = v.repeat_interleave(c.group_size, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, c.num_heads * c.v_head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(config.d_model)
        if config.attention == "nsa":
            self.attn: nn.Module = NSAAttention(config.d_model, config.nsa, rope_theta=config.rope_theta)
        else:
            self.attn = DenseAttention(config.d_model, config.nsa, rope_theta=config.rope_theta)
        self.mlp_norm = RMSNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden, bias=False), nn.GELU(),
                                 nn.Linear(hidden, config.d_model, bias=False))

    def forward(self, x: torch.Tensor, want_info: bool = False):
        h = self.attn_norm(x)
        info = None
        if isinstance(self.attn, NSAAttention):
            if want_info:
                a, info = self.attn(h, backend=self.config.backend, return_info=True)
            else:
                a = self.attn(h, backend=self.config.backend)
        else:
            a = self.attn(h)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, info


class RetrievalLM(nn.Module):
    """Decoder-only LM: token embedding, ``num_layers`` pre-norm blocks, final norm, output head.

    No absolute position embedding: positions enter through RoPE inside the attention.
    """

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.prev_embed = nn.Embedding(config.vocab_size, config.d_model) if config.token_shift else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.last_infos: list = []
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers) so the
        # residual stream's variance does not grow with depth. Zero-initialised layers (the NSA
        # gate's last layer) stay zero: the spec fixes the gates' start at 0.5. phi starts as mean
        # pooling (init_phi_as_mean).
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2 or "gate_proj" in name or ".phi_" in name:
                continue
            scale = 1 / math.sqrt(2 * self.config.num_layers) if name.endswith(
                ("o_proj.weight", "mlp.2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        for module in self.modules():
            if isinstance(module, BlockCompressor) and module.kind == "mlp":
                init_phi_as_mean(module)
            if isinstance(module, NSAAttention) and self.config.branch_init == "shared":
                share_branch_init(module)

    def set_rope_scaling(self, scaling: RopeScaling | None) -> None:
        """Run every attention layer with ``scaling`` (``None``: RoPE as trained)."""
        for block in self.blocks:
            block.attn.rope_scaling = scaling

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, tokens: torch.Tensor, *, logits_at: torch.Tensor | None = None,
                collect_info: bool = False) -> torch.Tensor:
        """Logits of the next token.

        Args:
            tokens: int64 ``[B, T]``.
            logits_at: int64 ``[B, Q]`` positions to return logits for (saves the ``[B, T, V]``
                tensor at long context); ``None``: every position.
            collect_info: keep each NSA layer's :class:`~nsa.NSAInfo` in ``self.last_infos``
                (gate statistics, backend); dense layers contribute ``None``.

        Returns:
            ``[B, T, V]`` or ``[B, Q, V]`` logits (float32 under autocast too).
        """
        if tokens.dim() != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        x = self.embed(tokens)
        if self.prev_embed is not None:
            # Position 0 has no predecessor: it gets nothing added.
            x = x + F.pad(self.prev_embed(tokens[:, :-1]), (0, 0, 1, 0))
        infos = []
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, info = checkpoint(block, x, collect_info, use_reentrant=False)
            else:
                x, info = block(x, collect_info)
            infos.append(info)
        self.last_infos = infos if collect_info else []
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(*logits_at.shape, x.shape[-1]))
        x = self.norm(x)
        return F.linear(x, self.output_weight()).float()


@torch.no_grad()
def share_branch_init(layer: NSAAttention) -> None:
    """Start the ``slc`` and ``win`` key/value projections as copies of the ``cmp`` ones.

    They stay separate parameters (the spec's per-branch projections) and diverge as they train.
    Why: the query projection is shared by the three branches. With three independent random
    key projections its gradient pulls towards three unrelated targets, and each branch has to
    learn the same key match on its own; starting equal, the branches that see the same keys
    (selection and window at short context) get the same updates and learn as one, and the
    compressed keys start as block means of the same keys the selection branch reads.
    """
    for proj in (layer.k_proj, layer.v_proj):
        for branch in ("slc", "win"):
            proj[branch].weight.copy_(proj["cmp"].weight)
            if proj["cmp"].bias is not None:
                proj[branch].bias.copy_(proj["cmp"].bias)


@torch.no_grad()
def init_phi_as_mean(phi: BlockCompressor) -> None:
    """Start a learned phi as exact mean pooling, with spare hidden units free to learn.

    ``GELU(z) - GELU(-z) = z`` exactly (``z Phi(z) + z Phi(-z) = z``), so hidden units
    ``0..D-1`` computing ``+mean`` and ``D..2D-1`` computing ``-mean``, read out as their
    difference, make the MLP output the block mean. The remaining ``hidden - 2D`` units get small
    random input weights and zero output weights (so they change nothing until trained).
    Why: with a random MLP the compressed keys are a scrambled projection of the block, the
    compression scores that drive block selection start out uninformative, and in the small
    retrieval study NSA then trailed its dense twin by far (mean phi did not).
    """
    first, last = phi.mlp[0], phi.mlp[2]
    dim, block = phi.dim, phi.block
    hidden = first.out_features
    if hidden < 2 * dim:
        raise ValueError(f"phi hidden width {hidden} < 2 * dim = {2 * dim}: cannot start as mean pooling")
    mean = torch.zeros(dim, block * dim)
    for row in range(block):
        mean[:, row * dim:(row + 1) * dim] = torch.eye(dim) / block
    weight = torch.empty(hidden, block * dim).normal_(0.0, 0.02)
    weight[:dim], weight[dim:2 * dim] = mean, -mean
    first.weight.copy_(weight)
    first.bias.zero_()
    out = torch.zeros(dim, hidden)
    out[:, :dim], out[:, dim:2 * dim] = torch.eye(dim), -torch.eye(dim)
    last.weight.copy_(out)
    last.bias.zero_()


@torch.no_grad()
def copy_twin_init(nsa_model: RetrievalLM, dense_model: RetrievalLM) -> None:
    """Start ``dense_model`` from ``nsa_model``'s weights wherever the twins share a parameter.

    Embeddings, norms, MLPs, ``q_proj`` and ``o_proj`` are copied by name; dense's ``k_proj`` /
    ``v_proj`` get the NSA ``cmp`` branch's (with ``branch_init="shared"`` these equal the ``slc``
    and ``win`` ones too). Why: both twins are seeded alike, but NSA draws its extra parameters
    (per-branch projections, phi, gate) from the same random stream, so every later weight of the
    two models differed. Escaping the retrieval plateau ("grokking") depends strongly on the
    initial weights: on the CPU (docs/TRAINING.md, "GPU run 2026-11-28") a dense model started
    from NSA's initial weights had not left the plateau after 350 steps where the dense twin
    with its own draw had. With one start the loss comparison is paired in the initial weights
    as well as in the batches.
    """
    if nsa_model.config.attention != "nsa" or dense_model.config.attention != "dense":
        raise ValueError("copy_twin_init copies from an NSA model into a dense model")
    if nsa_model.config.replace(attention="dense", backend="auto") != dense_model.config.replace(backend="auto"):
        raise ValueError("copy_twin_init needs twins: the configs may differ only in the attention kind and backend")
    source = nsa_model.state_dict()
    target = dense_model.state_dict()
    for name in target:
        key = name.replace(".attn.k_proj.", ".attn.k_proj.cmp.").replace(".attn.v_proj.", ".attn.v_proj.cmp.")
        target[name] = source[key].clone()
    dense_model.load_state_dict(target)


def nsa_only_parameters(model: RetrievalLM) -> dict[str, int]:
    """Parameter counts of the NSA-specific parts of an NSA model, by kind.

    ``kv_extra``: the second and third branch's key/value projections (dense has one pair, NSA
    one per branch; the ``cmp`` pair is counted as the twin of dense's); ``phi``: the compression
    branch's learned phi (keys and values); ``gate``: the gate MLP. Dense model -> all zeros.
    """
    counts = {"kv_extra": 0, "phi": 0, "gate": 0}
    if model.config.attention != "nsa":
        return counts
    for name, p in model.named_parameters():
        if ".phi_" in name:
            counts["phi"] += p.numel()
        elif ".gate_proj." in name:
            counts["gate"] += p.numel()
        elif any(f".{proj}.{branch}." in name for proj in ("k_proj", "v_proj") for branch in ("slc", "win")):
            counts["kv_extra"] += p.numel()
    return counts


def parameter_group(name: str) -> str:
    """The group a parameter's gradient norm is logged under (by role in the model)."""
    if name.startswith(("embed.", "prev_embed.")):
        return "embed"
    if name.startswith("head."):
        return "head"
    if "norm" in name.split(".")[-2]:
        return "norm"
    if ".attn." in name:
        # phi's own MLP lives under attn, so attention parts are matched before ".mlp.".
        for part, group in (("q_proj", "attn_q"), ("k_proj", "attn_kv"), ("v_proj", "attn_kv"),
                            ("o_proj", "attn_o"), ("phi_", "attn_phi"), ("gate_proj", "attn_gate")):
            if f".{part}" in name:
                return group
    if ".mlp." in name:
        return "mlp"
    return "other"
