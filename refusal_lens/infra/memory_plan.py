"""The memory plan of a whole run, printed before the work (:func:`plan_for_config`, ``refusal-lens plan``, logged
at the start of every pipeline command): device memory per stage from the model's config alone (the model is built
on the meta device to count its weights; nothing is loaded): collect (generation's KV cache, the collector's forward
and cache), train-saes (one SAE with Adam, a training step, the splice evaluation) and discover (the spliced SAEs,
node values, the attribution pass's forward and backward), each with the weights, and the peak, compared with the
CUDA device's memory when there is one. Within 20% of the real peak allocation of a small Llama-style model in
float32 and bfloat16 on the CPU (tests/infra/test_memory_plan.py); not yet checked on a GPU, whose kernels
(flash/mem-efficient sdpa, cuBLAS workspaces) allocate somewhat differently. The storage estimate of a hook set is
:mod:`refusal_lens.infra.storage_estimate`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from refusal_lens.infra.storage_estimate import DTYPE_BYTES, _human

logger = logging.getLogger(__name__)

# The model is built on the meta device to count its weights (no memory, no download beyond
# config.json); activations follow from the config by arithmetic. The per-token constants are those of
# a Llama-style block (Llama, Mistral, Qwen2: RMSNorm in fp32, gated MLP) as PyTorch allocates them,
# measured on the CPU with torch's memory profiler in float32 and bfloat16 (tests/infra/test_memory_plan.py
# checks the plan against a small model's real peak allocation, within 20%).

#: activations per token the widest point of a Llama-style block holds in a no-grad forward pass
#: (``4 d_model + 3 d_mlp`` values at the MLP).
BLOCK_WIDTH = (4, 3)
#: TopK/BatchTopK/standard/JumpReLU SAE-Lens training step: activation bytes per (token x d_sae) in fp32
#: units, gradients of the weights aside (measured 6.8-7.0, 8.0, 5.8, 7.3).
SAE_STEP_FACTOR = {"topk": 7.0, "batchtopk": 8.0, "standard": 6.0, "jumprelu": 7.5}
#: positions per prompt assumed for ``positions: post_instruction`` (templates have 1-8 such tokens).
POST_INSTRUCTION_POSITIONS = 8
#: prompts per forward pass of the SAE stage's splice evaluation (refusal_lens.stages.saes.evaluate): its full
#: float32 logits and log-softmax over the vocabulary scale with it (8 took the main job's train-saes part to
#: 1.5 GiB above the resident model; bench/README.md), and a CPU pass of one 288-token chat is already large.
SPLICE_BATCH = 1


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from a Hugging Face config."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int
    n_params: int  # counted on the meta device (tied weights once)
    buffer_bytes: int  # rotary frequencies and the like (kept in float32)
    dtype_bytes: int
    hf_eager: bool  # the HF model's own attention is eager (T x T scores in memory), e.g. Gemma-2

    @classmethod
    def from_hf_config(cls, config, torch_dtype: str) -> ModelShape:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
        n_heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        return cls(
            n_layers=int(config.num_hidden_layers), d_model=d_model, d_mlp=int(config.intermediate_size),
            n_heads=n_heads, n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
            d_head=int(getattr(config, "head_dim", None) or d_model // n_heads), d_vocab=int(config.vocab_size),
            n_params=int(n_params), buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
            dtype_bytes=DTYPE_BYTES[torch_dtype],
            hf_eager=model.config._attn_implementation == "eager",
        )

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.dtype_bytes + self.buffer_bytes


def forward_bytes(s: ModelShape, batch: int, seq: int, *, eager: bool, logit_rows: int) -> int:
    """Peak transient of a no-grad forward pass: the widest point of a block, eager attention's scores
    with their fp32 softmax and 4-D mask, or the logits (``logit_rows`` positions of them)."""
    n, b = batch * seq, s.dtype_bytes
    block = n * (BLOCK_WIDTH[0] * s.d_model + BLOCK_WIDTH[1] * s.d_mlp) * b
    attention = (batch * s.n_heads * seq * seq * 8 + batch * seq * seq * 4 + n * 4 * s.d_model * b) if eager else 0
    logits = logit_rows * s.d_vocab * b + n * s.d_model * b
    return max(block, attention, logits)


def kv_cache_bytes(s: ModelShape, batch: int, seq: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``seq`` tokens (generation)."""
    return 2 * s.n_layers * batch * seq * s.n_kv_heads * s.d_head * s.dtype_bytes


def backward_bytes(s: ModelShape, batch: int, seq: int, layers: int, n_hooks: int) -> int:
    """Forward + backward of the attribution pass through the bridge (eager-like attention, parameters
    frozen, gradients only for activations): what autograd saves in ``layers`` blocks (their gated MLP
    in the model dtype, the two RMSNorm inputs in fp32, q/k/v, the softmax in fp32 and, below fp32, its
    cast), plus the gradients of the ``n_hooks`` spliced activations and the widest backward step."""
    n, b = batch * seq, s.dtype_bytes
    scores = batch * s.n_heads * seq * seq
    per_layer = n * (3 * s.d_mlp * b + 2 * s.d_model * 4 + 3 * s.d_model * b) + scores * (4 + (b if b != 4 else 0))
    saved = layers * per_layer + n * s.d_model * 4
    # the widest backward step is partly in fp32 below fp32 (norm and softmax gradients): 3 bytes per
    # value in half precision fit the measurements (within 15%)
    step = n * (BLOCK_WIDTH[0] * s.d_model + BLOCK_WIDTH[1] * s.d_mlp) * max(b, 3)
    transient = n_hooks * n * s.d_model * b + max(step, 2 * scores * 4)
    return saved + transient


def sae_param_count(d_in: int, d_sae: int, architecture: str) -> int:
    return 2 * d_in * d_sae + d_sae + d_in + (d_sae if architecture == "jumprelu" else 0)


def sae_step_bytes(d_in: int, d_sae: int, architecture: str, batch: int) -> int:
    """One SAE-Lens training step in fp32: the weights' gradients and the step's activations."""
    return 4 * sae_param_count(d_in, d_sae, architecture) + int(SAE_STEP_FACTOR[architecture] * batch * d_sae * 4)


def node_values_bytes(s: ModelShape, n_tokens: int, d_sae: int, n_hooks: int) -> int:
    """The discover stage's node values of ``n_hooks`` spliced hooks over ``n_tokens`` (features in fp32,
    error and input in the model dtype) and the work space of the effects (two fp32 feature-sized tensors)."""
    return n_hooks * n_tokens * (d_sae * 4 + 2 * s.d_model * s.dtype_bytes) + 2 * n_tokens * d_sae * 4


@dataclass(frozen=True)
class PlanItem:
    """Device memory a stage holds on top of the weights: always (``alternative=False``), or in one of
    its phases (the stage needs the largest of its alternatives)."""

    what: str
    bytes: int
    alternative: bool = False


@dataclass(frozen=True)
class MemoryPlan:
    """Device memory of each stage: the model's weights plus the stage's own items."""

    model: str
    weights: int
    stages: dict[str, list[PlanItem]]
    notes: tuple[str, ...] = ()

    def stage_bytes(self, stage: str) -> int:
        items = self.stages[stage]
        return (self.weights + sum(i.bytes for i in items if not i.alternative)
                + max((i.bytes for i in items if i.alternative), default=0))

    @property
    def peak(self) -> int:
        return max(self.stage_bytes(s) for s in self.stages)

    def lines(self, capacity: int | None = None) -> list[str]:
        out = [f"memory plan for {self.model} (device memory, from its config; nothing loaded)",
               f"  weights: {_human(self.weights)}"]
        for stage, items in self.stages.items():
            out.append(f"  {stage}: {_human(self.stage_bytes(stage))} with the weights")
            out += [f"    {'the larger of: ' if i.alternative else ''}{i.what}: {_human(i.bytes)}" for i in items]
        out.append(f"  peak: {_human(self.peak)}")
        if capacity is not None:
            verdict = "fits" if self.peak <= capacity else "does NOT fit"
            out.append(f"  device: {_human(capacity)} -> {verdict} ({self.peak / capacity:.0%} of it)")
        return out + [f"  note: {n}" for n in self.notes]

    def to_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "peak": self.peak, "notes": list(self.notes),
                "stages": {s: {"total": self.stage_bytes(s), "items": [asdict(i) for i in items]}
                           for s, items in self.stages.items()}}


def _kept_positions(positions: str, seq: int) -> int:
    return {"last": 1, "post_instruction": POST_INSTRUCTION_POSITIONS}.get(positions, seq)


def plan_memory(cfg, shape: ModelShape, *, device_type: str = "cuda") -> MemoryPlan:
    """The memory plan of ``cfg`` (a :class:`refusal_lens.config.Config`) for a model of ``shape``."""
    from refusal_lens.core.hooks import LayerSpecError, parse_hook_name, resolve_layer_specs

    inf, sae, circ = cfg.inference, cfg.sae, cfg.circuits
    b, d = shape.dtype_bytes, shape.d_model
    notes = []
    try:
        hooks = resolve_layer_specs(list(cfg.model.activation_layers), shape.n_layers)
    except LayerSpecError:  # raw hook names need a loaded model: plan the block hooks only
        hooks = [s for s in cfg.model.activation_layers if isinstance(s, str) and parse_hook_name(s)]
        notes.append("raw hook names other than block hooks are not counted")
    batch = inf.batch_size if isinstance(inf.batch_size, int) else (64 if device_type == "cuda" else 8)
    if not isinstance(inf.batch_size, int):
        notes.append(f"inference.batch_size=auto starts at {batch} (halved on out-of-memory)")
    seq = inf.max_prompt_tokens + (inf.max_new_tokens if inf.store_response_activations else 0)
    collector = inf.collector if inf.collector != "auto" else ("hf_hooks" if device_type == "cuda" else "bridge")
    kept = batch * _kept_positions(inf.positions, seq) if inf.save_activations else 0
    stored = len(hooks) if inf.save_activations else 0
    eager = shape.hf_eager if collector == "hf_hooks" else True
    if collector == "hf_hooks":
        forward = forward_bytes(shape, batch, seq, eager=eager, logit_rows=batch)
        cache = kept * stored * d * DTYPE_BYTES[inf.storage_dtype]
    else:
        forward = forward_bytes(shape, batch, seq, eager=True, logit_rows=batch * seq)
        cache = batch * seq * stored * d * b
    prompt = inf.max_prompt_tokens
    collect = [
        PlanItem(f"generation ({batch} x {prompt} prompt + {inf.max_new_tokens} new tokens: KV cache and prefill)",
                 kv_cache_bytes(shape, batch, prompt + inf.max_new_tokens)
                 + forward_bytes(shape, batch, prompt, eager=shape.hf_eager, logit_rows=batch), alternative=True),
        PlanItem(f"forward, collector {collector} ({batch} x {seq} tokens), with its cache ({stored} hooks x "
                 f"{kept} positions)", forward + cache, alternative=True),
    ]
    d_sae = d * sae.expansion_factor
    n_sae = sae_param_count(d, d_sae, sae.architecture)
    sae_hooks = _planned_hooks(sae.hooks, shape.n_layers, hooks)
    splice = forward_bytes(shape, SPLICE_BATCH, seq, eager=True, logit_rows=SPLICE_BATCH * seq) \
        + 3 * SPLICE_BATCH * seq * shape.d_vocab * 4
    train = [
        PlanItem(f"one SAE {d} -> {d_sae} ({sae.architecture}, fp32): weights and Adam state", 12 * n_sae),
        PlanItem(f"training step ({sae.train_batch_size_tokens} tokens): gradients and activations",
                 sae_step_bytes(d, d_sae, sae.architecture, sae.train_batch_size_tokens), alternative=True),
        PlanItem(f"splice evaluation ({SPLICE_BATCH} x {seq} tokens, full logits and log-softmax)", splice,
                 alternative=True),
    ]
    discover = _discover_items(cfg, shape, sae_hooks, n_sae, d_sae)
    return MemoryPlan(cfg.model.name, shape.weight_bytes, {"collect": collect, "train-saes": train, "discover": discover},
                      tuple(notes))


def _discover_items(cfg, shape: ModelShape, sae_hooks: list[str], n_sae: int, d_sae: int) -> list[PlanItem]:
    """The discover stage's items: the spliced SAEs, the node values and the attribution backward pass."""
    from refusal_lens.core.hooks import parse_hook_name

    inf, circ = cfg.inference, cfg.circuits
    spliced = _planned_hooks(circ.hooks, shape.n_layers, sae_hooks)
    sites = [parse_hook_name(h) for h in spliced]
    first = min((s.layer + (1 if s.point == "hook_resid_post" else 0) for s in sites if s), default=0)
    layers = max(shape.n_layers - first, 0)
    n_attr = circ.batch_size * inf.max_prompt_tokens
    return [
        PlanItem(f"{len(spliced)} SAEs (fp32)", 4 * n_sae * len(spliced)),
        PlanItem(f"node values of {len(spliced)} hooks ({circ.batch_size} x {inf.max_prompt_tokens} tokens: "
                 "features, error, input) and the effects' work space",
                 node_values_bytes(shape, n_attr, d_sae, len(spliced))),
        PlanItem(f"attribution forward + backward ({layers} layers from the first spliced hook)",
                 backward_bytes(shape, circ.batch_size, inf.max_prompt_tokens, layers, len(spliced))),
    ]


def _planned_hooks(specs, n_layers: int, default: list[str]) -> list[str]:
    from refusal_lens.core.hooks import LayerSpecError, resolve_layer_specs

    if not specs:
        return list(default)
    try:
        return resolve_layer_specs(list(specs), n_layers)
    except LayerSpecError:
        return list(default)


def plan_for_config(cfg) -> MemoryPlan:
    """The memory plan of ``cfg``, reading only the model's config.json (local folder, embedded model or
    the hub cache); the device is ``model.device`` (``auto`` = CUDA when available)."""
    import torch
    from transformers import AutoConfig

    from refusal_lens.models.loading import resolve_source

    device = cfg.model.device
    device_type = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(resolve_source(cfg.model.name)), cfg.model.torch_dtype)
    return plan_memory(cfg, shape, device_type=device_type)


def device_capacity(device: str) -> int | None:
    """Total memory of a CUDA ``device`` ("cuda", "cuda:N", "auto"), or None without one."""
    import torch

    if not torch.cuda.is_available() or not (device.startswith("cuda") or device == "auto"):
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    return int(torch.cuda.get_device_properties(index).total_memory)
