"""Frozen configuration dataclasses and named presets.

Every architecture number lives here, once; the model, the loaders and the
tests read it from a `ModelConfig` and never hard-code it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import typing

import jax.numpy as jnp

from grpo_jax.rewards import RewardConfig

# Validation runs in each config's __post_init__; a CLI parser that builds configs
# field by field defers it (see `deferred_validation`) so bad input ends in one
# line of ours instead of the parser's own error box.
_VALIDATE = contextvars.ContextVar("grpo_jax_validate_configs", default=True)


def _validated(post_init):
    def run(self):
        if _VALIDATE.get():
            post_init(self)
    run.check = post_init
    return run


@contextlib.contextmanager
def deferred_validation():
    token = _VALIDATE.set(False)
    try:
        yield
    finally:
        _VALIDATE.reset(token)


def validate(cfg) -> None:
    """Run every (nested) config dataclass's checks, innermost first."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(type(cfg).__post_init__, "check", None)
    if check is not None:
        check(cfg)


ATTENTION_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Gemma 3 decoder architecture (text only)."""

    name: str
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffw_dim: int
    sliding_window: int
    # Every `global_every`-th layer (1-based) attends globally, the rest locally.
    global_every: int = 6
    rope_base_local: float = 10_000.0
    rope_base_global: float = 1_000_000.0
    # Linear RoPE position scaling on global layers (4B and larger use 8).
    rope_scale_global: float = 1.0
    # Queries are scaled by query_pre_attn_scalar ** -0.5.
    query_pre_attn_scalar: float = 256.0
    rms_eps: float = 1e-6
    # Compute dtype: float32 on CPU (XLA:CPU bf16 is slow), bfloat16 on TPU.
    dtype: str = "float32"
    # Storage dtype of the weights.
    param_dtype: str = "float32"
    # Attention: "xla" (dense masked einsums) or "pallas" (grpo_jax/kernels/: flash attention for
    # the forward and backward, decode attention for the sampler; TPU interpret mode
    # off a TPU, so only for tests there).
    attention_impl: str = "xla"

    @_validated
    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim",
                      "ffw_dim", "sliding_window", "global_every"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"ModelConfig.{field} must be float32, bfloat16 or float16")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation {self.attention_impl!r}: choose one of "
                             f"{', '.join(ATTENTION_IMPLS)}")

    def is_global_layer(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)


# LoRA target names -> the projections they adapt ("kv" adapts keys and values).
LORA_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "q": (("attn", "q"),),
    "kv": (("attn", "k"), ("attn", "v")),
    "o": (("attn", "o"),),
    "gate": (("mlp", "gate"),),
    "up": (("mlp", "up"),),
    "down": (("mlp", "down"),),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the base projections: W x + (alpha / rank) * B(A x)."""

    rank: int = 16
    """Adapter rank r."""
    alpha: float = 16.0
    """Scale numerator: the adapter output is multiplied by alpha / rank."""
    targets: tuple[str, ...] = ("q", "kv", "o", "gate", "up", "down")
    """Projections to adapt: any of q, kv, o, gate, up, down."""

    @_validated
    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)} invalid; choose from "
                             f"{', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def projections(self) -> tuple[tuple[str, str], ...]:
        return tuple(p for t in self.targets for p in LORA_TARGETS[t])


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How completions are drawn."""

    max_new_tokens: int = 256
    """Token budget per completion; generation stops earlier at a stop token."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy decoding."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    stop_ids: tuple[int, ...] = (1, 106)
    """Token ids that end a completion (EOS and <end_of_turn>); kept in the output."""
    stop_strings: tuple[str, ...] = ()
    """Text that ends a completion once written (e.g. '</answer>'), even mid-token; kept
    in the completion, which ends with the token that completes it."""
    prompt_bucket: int = 32
    """Prompt lengths are padded up to a multiple of this, to bound recompiles."""

    @_validated
    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prompt_bucket <= 0:
            raise ValueError(f"prompt_bucket must be positive, got {self.prompt_bucket}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty, got {list(self.stop_strings)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GEMMA3_270M = ModelConfig(
    name="gemma3-270m", vocab_size=262_144, embed_dim=640, num_layers=18, num_heads=4,
    num_kv_heads=1, head_dim=256, ffw_dim=2048, sliding_window=512)

GEMMA3_1B = ModelConfig(
    name="gemma3-1b", vocab_size=262_144, embed_dim=1152, num_layers=26, num_heads=4,
    num_kv_heads=1, head_dim=256, ffw_dim=6912, sliding_window=512)

GEMMA3_4B = ModelConfig(
    name="gemma3-4b", vocab_size=262_208, embed_dim=2560, num_layers=34, num_heads=8,
    num_kv_heads=4, head_dim=256, ffw_dim=10_240, sliding_window=1024, rope_scale_global=8.0)

# A random tiny Gemma for tests: small window so short prompts cross it.
TINY = ModelConfig(
    name="tiny", vocab_size=512, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
    head_dim=16, ffw_dim=128, sliding_window=4, global_every=2, query_pre_attn_scalar=16.0)

MODEL_PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (GEMMA3_270M, GEMMA3_1B, GEMMA3_4B, TINY)}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(MODEL_PRESETS)}") from None


DATASETS = ("gsm_symbolic", "gsm8k")
PROMPT_STYLES = ("chat", "plain")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the math word problems come from."""

    dataset: str = "gsm_symbolic"
    """gsm_symbolic (reasoning-gym generator, offline), gsm8k (openai/gsm8k through
    `datasets`), or a path to a local .jsonl / .json / .parquet file of GSM8K rows
    ({"question", "answer": "... #### N"})."""
    eval_dataset: str | None = None
    """Held-out problems: default gsm_symbolic with eval_seed, the gsm8k test split,
    or for a local file this path (required then)."""
    num_train: int = 2000
    """Problems generated for training (gsm_symbolic only)."""
    num_eval: int = 100
    """Problems generated for evaluation (gsm_symbolic only)."""
    train_seed: int = 1
    """Generator seed of the training problems (gsm_symbolic)."""
    eval_seed: int = 2
    """Generator seed of the held-out problems; must differ from train_seed."""
    shuffle_seed: int = 0
    """Seed of the training order (a fresh permutation every epoch)."""
    on_malformed: str = "skip"
    """A row without a question or a numeric answer: 'skip' it (reported with its
    index) or 'error' (refuse the file)."""
    prompt_style: str = "chat"
    """chat: the instruction and problem as a Gemma user turn (instruction-tuned
    models); plain: the instruction, 'Problem: ...' and 'Solution:' as plain text
    (base models, which do not follow the chat template)."""
    prefill: str = ""
    """Text that opens the model's answer, written into the prompt (e.g. '<reasoning>'
    for a base model); the rewards and the evaluation score prefill + completion."""

    @_validated
    def __post_init__(self):
        if self.on_malformed not in ("skip", "error"):
            raise ValueError(f"on_malformed must be 'skip' or 'error', got {self.on_malformed!r}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"data.prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                             f"got {self.prompt_style!r}")
        if self.num_train <= 0 or self.num_eval <= 0:
            raise ValueError("num_train and num_eval must be positive")
        if self.train_seed == self.eval_seed:
            raise ValueError(f"train_seed and eval_seed are both {self.train_seed}: "
                             "held-out problems must come from a different seed")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The GRPO objective and batch shape."""

    num_prompts: int = 4
    """Distinct prompts per step (B)."""
    group_size: int = 4
    """Completions sampled per prompt (G); advantages are relative within a group."""
    num_iterations: int = 1
    """Optimizer passes over each sampled batch (mu). 1 is on-policy: ratio 1."""
    micro_batch: int = 0
    """Rows per gradient micro-batch (0: the whole batch); must divide B*G."""
    epsilon_low: float = 0.2
    """Lower clip range of the ratio."""
    epsilon_high: float = 0.2
    """Upper clip range of the ratio (raise it for DAPO's clip-higher)."""
    beta: float = 0.04
    """Weight of the KL penalty to the reference (base weights, LoRA off); 0 skips it."""
    kl_estimator: str = "k3"
    """k3 (default; loss term exp(ref-logp)-(ref-logp)-1: gradient of KL(ref||pi), the
    GRPO paper's), k2 (loss term 1/2 (logp-ref)^2: gradient of KL(pi||ref)), or k1 (no
    loss term: beta*(logp-ref) summed over each completion is subtracted from its reward
    before advantages, PPO-style; gradient of KL(pi||ref) through the policy gradient).
    The logged KL is k3's value, an unbiased estimate of KL(pi||ref), for all three."""
    aggregation: str = "seq-mean-token-mean"
    """seq-mean-token-mean (GRPO), token-mean (DAPO), seq-mean-token-sum-norm (Dr. GRPO)."""
    ratio_level: str = "token"
    """token (GRPO) or sequence (GSPO)."""
    scale_advantages_by_std: bool = True
    """Divide advantages by the group std (False: Dr. GRPO)."""
    logprob_chunk: int = 256
    """Positions per chunk of the vocabulary projection in the log-prob pass."""
    share_prompt: bool = True
    """Run each prompt once per group in the log-prob and update passes (its G
    completions packed behind it) instead of once per completion: same numbers,
    less compute. Applies when micro_batch is 0 or a multiple of group_size."""

    @_validated
    def __post_init__(self):
        for field in ("num_prompts", "group_size", "num_iterations", "logprob_chunk"):
            if getattr(self, field) <= 0:
                raise ValueError(f"grpo.{field} must be positive, got {getattr(self, field)}")
        if self.group_size < 2:
            raise ValueError("grpo.group_size must be at least 2: advantages compare samples "
                             "of the same prompt")
        batch = self.num_prompts * self.group_size
        if self.micro_batch < 0 or (self.micro_batch and batch % self.micro_batch):
            raise ValueError(f"grpo.micro_batch={self.micro_batch} does not divide the batch of "
                             f"{batch} completions ({self.num_prompts} prompts x {self.group_size})")
        if self.kl_estimator not in ("k3", "k2", "k1"):
            raise ValueError(
                f"grpo.kl_estimator must be k3, k2 or k1, got {self.kl_estimator!r}")
        if self.aggregation not in ("seq-mean-token-mean", "token-mean",
                                    "seq-mean-token-sum-norm"):
            raise ValueError(f"grpo.aggregation {self.aggregation!r} unknown")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"grpo.ratio_level must be token or sequence, got {self.ratio_level!r}")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("grpo.beta and the epsilons must be >= 0")

    @property
    def batch_size(self) -> int:
        return self.num_prompts * self.group_size

    def packing_group(self, rows: int) -> int:
        """The `group` argument of grpo.per_token_logprobs for passes over `rows` rows."""
        return self.group_size if self.share_prompt and rows % self.group_size == 0 else 1


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on the LoRA parameters, linear warmup then cosine decay."""

    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    """Fraction of the optimizer updates spent warming up."""
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.99
    max_grad_norm: float = 0.1
    """Global-norm gradient clipping (0: off)."""

    @_validated
    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optimizer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("optimizer.max_grad_norm and weight_decay must be >= 0")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised warm-up before GRPO: LoRA on the NLL of worked solutions in the
    answer format (data.sft_target), prompt and padding masked. Its adapters are then
    merged into the base weights, which become GRPO's starting point and its KL
    reference (LoRA off = the SFT policy); GRPO trains a fresh LoRA on top. Why: a KL
    to the raw base would pull GRPO back toward a model that never writes the format,
    and merging keeps one copy of the weights in memory (no second reference model)."""

    steps: int = 0
    """SFT steps before the GRPO steps (0: GRPO from the base model, no warm-up)."""
    batch_size: int = 8
    """Problems per SFT step."""
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    """Global-norm gradient clipping of the SFT updates (0: off)."""
    max_tokens: int = 256
    """Longest SFT target in tokens (stop token included): problems with longer targets
    are left out of SFT, since a cut target never shows the closing tags. Targets are
    padded to the longest kept one (one program for the whole phase)."""

    @_validated
    def __post_init__(self):
        for field in ("batch_size", "max_tokens"):
            if getattr(self, field) <= 0:
                raise ValueError(f"sft.{field} must be positive, got {getattr(self, field)}")
        if self.steps < 0:
            raise ValueError(f"sft.steps must be >= 0, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"sft.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1 or self.max_grad_norm < 0:
            raise ValueError("sft.warmup_ratio must be in [0, 1) and sft.max_grad_norm >= 0")

    def optimizer(self, base: OptimizerConfig) -> OptimizerConfig:
        """The GRPO optimizer's settings with SFT's learning rate, warmup and clipping."""
        return dataclasses.replace(base, learning_rate=self.learning_rate,
                                   warmup_ratio=self.warmup_ratio,
                                   max_grad_norm=self.max_grad_norm)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (data x fsdp x tensor); their product must equal the
    device count. 1 x 1 x 1 is a single device."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @_validated
    def __post_init__(self):
        for field in ("data", "fsdp", "tensor"):
            if getattr(self, field) <= 0:
                raise ValueError(f"mesh.{field} must be positive, got {getattr(self, field)}")

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    def check_devices(self, devices: int) -> None:
        if self.size != devices:
            raise ValueError(
                f"--mesh.data {self.data} x --mesh.fsdp {self.fsdp} x --mesh.tensor "
                f"{self.tensor} = {self.size} devices, but this process has {devices}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Several hosts (processes) in one run, through `jax.distributed.initialize`. Unset
    fields come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with
    no coordinator anywhere the run is one process (on a TPU pod slice, `auto` lets JAX
    find the hosts itself)."""

    coordinator: str | None = None
    """host:port of process 0's coordination service."""
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    """Call jax.distributed.initialize() without arguments (TPU pods, SLURM)."""

    @_validated
    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None and \
                not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"distributed.process_id {self.process_id} is not in "
                             f"[0, {self.num_processes})")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """GRPO with LoRA on Gemma 3. Every field has a preset default; flags override it."""

    preset: str = "cpu-270m"
    """Named starting point: cpu-270m (default: embedded Gemma 3 270M base on
    gsm_symbolic, SFT warm-up then GRPO, ~30 min on 2 CPU cores), cpu-270m-long (the
    same recipe, longer: 33 min measured on an AVX-512 2-core machine, ~1.5 hours
    estimated on the slowest), tiny (random tiny Gemma, byte tokenizer, for tests),
    v5e-8-gemma3-1b (Gemma 3 1B-IT from --checkpoint, TPU v5e-8)."""
    model: str = "gemma3-270m"
    """Model preset (architecture); its weights are embedded (gemma3-270m), random (tiny),
    or read from --checkpoint / --gguf."""
    checkpoint: str | None = None
    """Base weights: an orbax (Kaggle) or HF safetensors checkpoint directory."""
    gguf: str | None = None
    """Base weights from a GGUF file instead."""
    dtype: str | None = None
    """Compute dtype override (float32 on CPU, bfloat16 on TPU)."""
    attention: str = "xla"
    """Attention implementation: xla (dense masked einsums) or pallas (the grpo_jax/kernels/ flash
    and decode kernels: compiled on a TPU, interpreted, slowly, elsewhere)."""
    output_dir: str = "runs/cpu-270m"
    """Checkpoints, metrics.jsonl, samples.jsonl, TensorBoard events and eval.json go here;
    re-running with the same directory resumes from its latest complete checkpoint."""
    steps: int = 20
    """GRPO steps (each: sample B x G completions, score, update), after sft.steps
    SFT steps; checkpoints and metrics number both phases in one sequence."""
    seed: int = 0
    """Seeds LoRA init and every step's sampling key (fold_in(seed, step))."""
    save_every: int = 5
    """Checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk (the newest)."""
    log_samples: int = 2
    """Completions per step written to samples.jsonl."""
    max_consecutive_skips: int = 3
    """Stop the run after this many steps in a row with a non-finite loss or gradient."""
    eval_problems: int = 50
    """Held-out problems evaluated (greedy) for the base and the trained model at the end
    (0: skip)."""
    eval_every: int = 0
    """Also evaluate the trained model every this many steps (0: only at the end); the
    figures go into that step's metrics row as eval/<figure>_accuracy."""
    eval_max_new_tokens: int = 192
    """Token budget of each evaluation answer."""
    eval_batch_size: int = 64
    """Evaluation rows decoded together; a row that stops takes the next problem at once
    (continuous batching). Larger batches use the CPU's matmul units better."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    lora: LoraConfig = LoraConfig()
    sampler: SamplerConfig = SamplerConfig(max_new_tokens=192)
    grpo: GRPOConfig = GRPOConfig(num_prompts=2)
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    """The SFT warm-up before GRPO; its adapters are merged into the base, which is
    then GRPO's start and KL reference (the SFT policy, not the raw base)."""
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    rewards: RewardConfig = RewardConfig()
    dry_run: bool = False
    """Compile the step, reference pass and sampler for the mesh on abstract shapes (no
    weights loaded) and print per-chip memory, FLOPs, bytes and roofline times; for
    --topology's TPU when libtpu is installed (.[tpu-aot]), else for this machine's CPU
    devices. Nothing is trained or written."""
    topology: str = "v5e:2x4"
    """TPU topology the dry run compiles for (v5e:2x4 is a TPU v5e-8)."""
    dry_run_json: str | None = None
    """Also write the dry run's figures to this JSON file."""
    dry_run_attention: tuple[str, ...] = ("xla", "pallas")
    """Attention implementations the dry run compiles and reports side by side (besides
    --attention, the run's own)."""

    @_validated
    def __post_init__(self):
        for field in ("steps", "save_every", "keep_checkpoints", "eval_batch_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        for field in ("log_samples", "eval_problems", "max_consecutive_skips", "eval_every"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.checkpoint is not None and self.gguf is not None:
            raise ValueError("pass either --checkpoint or --gguf, not both")
        model_preset(self.model)  # unknown model: one clear error
        for impl in (self.attention, *self.dry_run_attention):
            if impl not in ATTENTION_IMPLS:
                raise ValueError(f"attention implementation {impl!r}: choose one of "
                                 f"{', '.join(ATTENTION_IMPLS)}")
        if self.sampler.greedy:
            raise ValueError("sampler.temperature must be > 0 for training: greedy samples "
                             "make every group identical, so no advantage is ever non-zero")

    @property
    def total_updates(self) -> int:
        """GRPO optimizer updates (the GRPO learning-rate schedule's length)."""
        return self.steps * self.grpo.num_iterations

    @property
    def total_steps(self) -> int:
        """SFT then GRPO steps: the run's step numbers are 1 .. total_steps."""
        return self.sft.steps + self.steps

    def is_sft_step(self, step: int) -> bool:
        return step <= self.sft.steps

    def data_position(self, step: int) -> int:
        """Training problems used up after `step`: SFT takes sft.batch_size a step,
        GRPO then continues the same stream with num_prompts a step."""
        sft = min(step, self.sft.steps)
        return sft * self.sft.batch_size + (step - sft) * self.grpo.num_prompts

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint's state means: resuming into anything else is refused."""
        return {"model": self.model, "checkpoint": self.checkpoint, "gguf": self.gguf,
                "lora": dataclasses.asdict(self.lora)}


# TrainConfig fields (dotted paths) that a resumed run may change: they do not change
# what a step computes. Evaluation, logging and checkpointing settings, and the
# memory/speed knobs whose results agree to float rounding (micro-batches add up to
# the whole batch; shared prompts and log-prob chunks compute the same numbers).
# Every other field is the run's identity: a resume that changes it is refused.
RESUMABLE_FIELDS = frozenset({
    "preset", "output_dir", "save_every", "keep_checkpoints", "log_samples",
    "max_consecutive_skips", "eval_problems", "eval_every", "eval_max_new_tokens",
    "eval_batch_size", "tensorboard", "data.eval_dataset", "data.num_eval", "data.eval_seed",
    "grpo.micro_batch", "grpo.logprob_chunk", "grpo.share_prompt", "attention",
    # Where it runs: a mesh or host count computes the same steps (to float rounding).
    "mesh.data", "mesh.fsdp", "mesh.tensor", "distributed.coordinator",
    "distributed.num_processes", "distributed.process_id", "distributed.auto", "dry_run",
    "topology", "dry_run_json", "dry_run_attention",
})


def flat_fields(cfg) -> dict[str, object]:
    """A (nested) config dataclass as {"dotted.path": value}, tuples as lists (the
    form config.json holds)."""
    out: dict[str, object] = {}

    def walk(prefix, value):
        for key, v in value.items():
            if isinstance(v, dict):
                walk(f"{prefix}{key}.", v)
            else:
                out[prefix + key] = v

    walk("", json.loads(json.dumps(dataclasses.asdict(cfg))))
    return out


def changed_identity_fields(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """The fields outside RESUMABLE_FIELDS whose values differ, as "name (old -> new)"."""
    a, b = flat_fields(saved), flat_fields(new)
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_FIELDS and a.get(k) != b.get(k)]


# The CPU recipe for the embedded Gemma 3 270M *base* model: a plain-text prompt whose
# answer opens with '<reasoning>', an SFT warm-up on gold solutions of at most 128
# tokens (which teaches the format), then GRPO from the SFT model, sampling until
# '</answer>'. Budgets, on the slowest 2-core machine measured (AVX2, ~90 GFLOP/s
# f32; an SFT step ~46 s, a GRPO step ~85 s): 30 minutes (cpu-270m) and under 2 hours
# (cpu-270m-long: 40 SFT + 30 GRPO steps, ~1.5 h, sized so that the run and its
# 500-problem evaluation fit in one 3-hour session); docs/cpu_recipe.md has the figures.
_CPU_RECIPE = TrainConfig(
    steps=4, eval_problems=32, eval_max_new_tokens=200,
    sampler=SamplerConfig(max_new_tokens=160, stop_strings=("</answer>",)),
    sft=SFTConfig(steps=16, batch_size=8, learning_rate=1e-3, max_tokens=128),
    data=DataConfig(prompt_style="plain", prefill="<reasoning>"))

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "cpu-270m": _CPU_RECIPE,
    "cpu-270m-long": dataclasses.replace(
        _CPU_RECIPE, preset="cpu-270m-long", output_dir="runs/cpu-270m-long", steps=30,
        save_every=10, eval_problems=64,
        sft=dataclasses.replace(_CPU_RECIPE.sft, steps=40)),
    "tiny": TrainConfig(
        preset="tiny", model="tiny", output_dir="runs/tiny", steps=4, save_every=2,
        eval_problems=4, eval_max_new_tokens=16, log_samples=1,
        lora=LoraConfig(rank=4, alpha=8.0),
        sampler=SamplerConfig(max_new_tokens=16, temperature=1.0, stop_ids=(1,),
                              prompt_bucket=256),
        grpo=GRPOConfig(num_prompts=2, group_size=4, logprob_chunk=64),
        data=DataConfig(num_train=16, num_eval=8)),
    "v5e-8-gemma3-1b": TrainConfig(
        preset="v5e-8-gemma3-1b", model="gemma3-1b", dtype="bfloat16",
        output_dir="runs/v5e-8-gemma3-1b", steps=500, save_every=50,
        lora=LoraConfig(rank=64, alpha=64.0, targets=("q", "kv", "o", "gate", "up", "down")),
        sampler=SamplerConfig(max_new_tokens=512, temperature=1.0),
        grpo=GRPOConfig(num_prompts=16, group_size=4, micro_batch=32),
        optimizer=OptimizerConfig(learning_rate=3e-6),
        data=DataConfig(dataset="gsm8k", eval_dataset="gsm8k"),
        mesh=MeshConfig(data=8),
        # Compiled for v5e (docs/tpu.md): update peak 6.0 against 6.6 GiB a chip, the
        # step's roofline 4.61 against 4.72 s. Estimates, not measurements: --attention
        # xla is the fallback.
        attention="pallas"),
}


def train_preset(name: str) -> TrainConfig:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}") from None


def config_from_dict(cls, values: dict):
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output read back
    from JSON: nested dicts become their dataclasses, lists become tuples."""
    hints = typing.get_type_hints(cls)

    def convert(value, hint):
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            return config_from_dict(hint, value)
        if isinstance(value, list):
            return tuple(convert(v, None) for v in value)
        return value

    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: convert(v, hints.get(k)) for k, v in values.items()})
