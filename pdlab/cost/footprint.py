"""What a transformer holds and computes, from its shape: parameters, model states,
activations and FLOPs per token — the arithmetic ``pdlab.cost.planner`` builds on.

- Model states (Rajbhandari et al. 2020, ZeRO, arXiv 1910.02054, §3.1 and Figure 1 / Table 1):
  mixed precision keeps fp16/bf16 parameters (2Ψ bytes) and gradients (2Ψ) and, in Adam,
  fp32 master weights, momentum and variance (KΨ, K = 12). ZeRO-1 shards the optimizer
  states over the N_d data-parallel ranks, ZeRO-2 the gradients too, ZeRO-3 the parameters.
- Activations (Korthikanti et al. 2022, arXiv 2205.05198, §4 and Table 2), bytes per
  transformer layer for s tokens, micro-batch b, width h, a heads, tensor parallelism t, with
  16-bit activations and 1-byte dropout masks:
    no parallelism                 s·b·h·(34 + 5·a·s/h)             (Eq. 1)
    tensor parallel                s·b·h·(10 + 24/t + 5·a·s/(h·t))  (Eq. 2)
    tensor + sequence parallel     s·b·h/t·(34 + 5·a·s/h)           (Table 2)
    full recompute                 2·s·b·h, only the layer's input  (Table 2; with sequence
                                   parallelism each rank keeps its 1/t of that input)
  The 5·a·s/h term is the stored attention scores; FlashAttention recomputes them in the
  backward, as the paper's selective recompute does (Table 2 without that term). The paper
  derives 34 for GPT layers (4h GeLU MLP, multi-head attention); other shapes (SwiGLU, GQA)
  are counted with the same formula, an approximation.
  Context parallelism (ring attention) gives each rank s/cp of the tokens: every term
  divides by cp.
- Mixture of experts (Switch Transformer, arXiv 2101.03961; Mixtral, arXiv 2401.04088): each
  MoE layer has E copies of the MLP and a router (h·E weights); a token runs top-k of them,
  so the FLOPs count k MLPs, and the layer keeps the MLP's activations (19·s·b·h of
  Korthikanti et al.'s 34, /t with TP) once more for each extra expert: derived, no paper.
- FLOPs per token (the PaLM / Megatron MFU accounting): 6 per weight used in a matmul
  (forward 2, backward 4) plus attention's 12·L·h·s; full recompute adds one forward,
  selective recompute the attention core's forward (4·L·h·s; Korthikanti et al. §5).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state, per activation element, and the matmul dtype."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # K in the ZeRO paper
    activation_bytes: int
    compute_dtype: str


PRECISIONS = {
    "mixed": Precision(2, 2, 12, 2, "bf16"),  # ZeRO's 2Ψ + 2Ψ + 12Ψ
    "bf16": Precision(2, 2, 4, 2, "bf16"),  # everything in bf16, Adam's moments too
    "fp32": Precision(4, 4, 8, 4, "fp32"),  # fp32 weights, gradients, Adam's two moments
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape (GPT-2 and Llama style)."""

    name: str
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    vocab_size: int
    context: int
    gated_mlp: bool = False  # SwiGLU: gate, up and down projections
    bias: bool = True  # linears and norms carry biases (GPT-2), or not (Llama)
    tied_embeddings: bool = False  # the output head reuses the token embedding
    learned_positions: bool = True  # a position table of `context` rows (GPT-2) or RoPE
    experts: int = 1  # MLPs a layer (> 1: a mixture of experts in every layer)
    top_k: int = 1  # experts a token runs

    @property
    def kv_width(self) -> int:
        return self.hidden // self.n_head * self.n_kv_head

    @property
    def mlp_params(self) -> int:
        """One MLP (one expert)."""
        h, f = self.hidden, self.ffn_hidden
        return (3 if self.gated_mlp else 2) * h * f + (f + h if self.bias else 0)

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_width
        attention = 2 * h * h + 2 * h * kv + (2 * h + 2 * kv if self.bias else 0)
        router = h * self.experts if self.experts > 1 else 0
        norms = 2 * h * (2 if self.bias else 1)
        return attention + self.experts * self.mlp_params + router + norms

    @property
    def expert_params(self) -> int:
        """The experts' weights over all layers (0 for a dense model): what expert
        parallelism splits."""
        return self.n_layer * self.experts * self.mlp_params if self.experts > 1 else 0

    @property
    def embedding_params(self) -> int:
        """Lookup tables: the token embedding and learned positions (no matmul)."""
        positions = self.context * self.hidden if self.learned_positions else 0
        return self.vocab_size * self.hidden + positions

    @property
    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab_size * self.hidden
        final_norm = self.hidden * (2 if self.bias else 1)
        return self.n_layer * self.layer_params + self.embedding_params + head + final_norm

    @property
    def matmul_params(self) -> int:
        """Weights a token uses in matmuls: the layers (top_k of the experts) and the output
        head (tied or not)."""
        unused = self.n_layer * (self.experts - self.top_k) * self.mlp_params
        return self.params - self.embedding_params + self.vocab_size * self.hidden * self.tied_embeddings - unused  # fmt: skip


LLAMA = {"gated_mlp": True, "bias": False, "learned_positions": False}  # SwiGLU, RMSNorm, RoPE
MODEL_SPECS = {
    spec.name: spec
    for spec in (
        # GPT-2 (Radford et al. 2019; Hugging Face gpt2 / gpt2-xl config.json)
        ModelSpec("gpt2-small", 12, 768, 12, 12, 3072, 50257, 1024, tied_embeddings=True),
        ModelSpec("gpt2-xl", 48, 1600, 25, 25, 6400, 50257, 1024, tied_embeddings=True),
        # Llama 3 (arXiv 2407.21783 Table 3; meta-llama/Meta-Llama-3-*/config.json: vocab 128,256)
        ModelSpec("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, **LLAMA),
        ModelSpec("llama3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, **LLAMA),
        ModelSpec("llama3-405b", 126, 16384, 128, 8, 53248, 128256, 8192, **LLAMA),
        # Mixtral 8x7B (arXiv 2401.04088, Table 1): 8 experts, top-2; 46.7B, 12.9B active
        ModelSpec(
            "mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, 32768, experts=8, top_k=2, **LLAMA
        ),
    )
}
MODEL_NAMES = ("gpt", *MODEL_SPECS)


def model_spec(name: str | ModelSpec) -> ModelSpec:
    """A named shape; ``"gpt"`` and ``"moe"`` are the lab's models (``pdlab.training.models``,
    untied head)."""
    if isinstance(name, ModelSpec):
        return name
    if name == "gpt":
        from pdlab.training.data import text_vocab_size
        from pdlab.training.models import GPTConfig

        c = GPTConfig(vocab_size=text_vocab_size())
        return ModelSpec("gpt", c.n_layer, c.n_embd, c.n_head, c.n_head, 4 * c.n_embd, c.vocab_size, c.block_size)  # fmt: skip
    if name == "moe":  # the gpt with 4 experts of top-2 in every block
        from pdlab.training.data import text_vocab_size
        from pdlab.training.models import MoEConfig

        c = MoEConfig(vocab_size=text_vocab_size())
        return ModelSpec("moe", c.n_layer, c.n_embd, c.n_head, c.n_head, c.expert_hidden, c.vocab_size, c.block_size, experts=c.n_expert, top_k=c.top_k)  # fmt: skip
    if name not in MODEL_SPECS:
        raise ValueError(
            f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}, or give a "
            "parameter count (--params 7.5e9) for model states alone"
        )
    return MODEL_SPECS[name]


def model_state_bytes(params: float, prec: Precision, zero: int, dp: int) -> dict[str, float]:
    """Per-GPU ``param_bytes``, ``grad_bytes``, ``optimizer_bytes`` of ``params`` weights under
    ZeRO stage ``zero`` (0: plain data parallel) over ``dp`` ranks (ZeRO paper, Figure 1)."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage is 0, 1, 2 or 3, got {zero!r}")
    return {
        "param_bytes": params * prec.param_bytes / (dp if zero >= 3 else 1),
        "grad_bytes": params * prec.grad_bytes / (dp if zero >= 2 else 1),
        "optimizer_bytes": params * prec.optimizer_bytes / (dp if zero >= 1 else 1),
    }


RECOMPUTE = ("none", "selective", "full")


def layer_activation_bytes(
    s: int,
    b: int,
    h: int,
    a: int,
    t: int = 1,
    *,
    sequence_parallel: bool = False,
    recompute: str = "none",
    flash_attention: bool = False,
    dropout: bool = True,
) -> float:
    """Bytes one transformer layer keeps for its backward (Korthikanti et al. 2022: Eq. 1,
    Eq. 2 and Table 2; see the module docstring). 16-bit activations. ``recompute``:
    "none", "selective" (the attention core, the 5as/h term, is recomputed) or "full".

    ``dropout=False`` (pdlab's GPT): no 1-byte masks (sbh after attention, sbh after the
    MLP, a·s²·b on the probabilities) and no dropped-out copy of the probabilities (2a·s²·b):
    34 becomes 32 and 5as/h becomes 2as/h."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute is one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    sbh = s * b * h
    if recompute == "full":  # Table 2: only the layer's input, 2sbh (its 1/t with SP)
        return 2 * sbh / (t if sequence_parallel else 1)
    masks = 2 if dropout else 0  # the two sbh masks, replicated across tp without SP
    dropped = flash_attention or recompute == "selective"
    scores = 0 if dropped else (5 if dropout else 2) * a * s / h
    if sequence_parallel:  # Table 2: sbh(34/t + 5as/(ht)), selective 34sbh/t
        return sbh / t * (32 + masks + scores)
    return sbh * (8 + masks + 24 / t + scores / t)  # Eq. 2 (Eq. 1 at t = 1)


def moe_extra_activation_bytes(s: int, b: int, h: int, top_k: int, t: int = 1) -> float:
    """What a top-k MoE layer keeps beyond a dense one: the MLP's 19·s·b·h of Korthikanti
    et al.'s 34 (its input 2, first matmul's output 8, GeLU's output 8, dropout mask 1),
    sharded by t, once for each extra expert a token runs (derived; no paper gives it)."""
    return (top_k - 1) * 19 * s * b * h / t


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Model FLOPs per token of one training step: 6 per matmul weight + 12·L·h·s (attention)."""
    return 6 * spec.matmul_params + 12 * spec.n_layer * spec.hidden * seq_len


def recompute_flops_per_token(spec: ModelSpec, seq_len: int, recompute: str) -> float:
    """FLOPs recompute adds a token: full, one forward (a third of the step's); selective,
    the attention core's forward, 4·L·h·s (Korthikanti et al. 2022, §5)."""
    if recompute == "full":
        return flops_per_token(spec, seq_len) / 3
    return 4 * spec.n_layer * spec.hidden * seq_len if recompute == "selective" else 0.0
