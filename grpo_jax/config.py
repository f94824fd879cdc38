"""The run's configuration: frozen dataclasses for sampling, data, GRPO, the optimizer,
SFT, the mesh, distributed start-up and the whole run (`TrainConfig`), each field
documented with its default; every choice list defined once, here."""
from __future__ import annotations

import dataclasses
import typing

from grpo_jax.model.config import (ATTENTION_IMPLS, DTYPE_CHOICES, MATMUL_CHOICES, LoraConfig,
                                   model_preset)
from grpo_jax.rewards import RewardConfig
from grpo_jax.validation import validated

# The GRPO loss's choices (grpo.policy_loss reads them from here).
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k3", "k2", "k1")
RATIO_LEVELS = ("token", "sequence")

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
    tools: tuple[str, ...] = ()
    """A tool the policy may call while it writes (`calculator`; `tools.register_tool`
    adds others): its results are written into the completion as context and left out
    of every loss term. Empty: no tool."""
    tool_call: tuple[str, str, str] = ("<<", "=", ">>")
    """The call's markers: the policy writes OPEN call CLOSE, the tool writes its result
    and RESULT_CLOSE (GSM8K's `<<28*4=` then `112>>`)."""
    max_tool_calls: int = 8
    """Calls answered per completion; a later call gets no result (the policy writes on)."""
    tool_result_tokens: int = 24
    """The most tokens a result takes (closing marker included); a longer one is
    replaced by an error text."""
    tool_timeout_s: float = 2.0
    """A call that runs longer is answered with an error text."""

    @validated
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
        if len(self.tools) > 1:
            raise ValueError(f"sampler.tools takes one tool (one set of call markers), got "
                             f"{list(self.tools)}")
        if len(self.tool_call) != 3 or any(not isinstance(m, str) or not m
                                           for m in self.tool_call):
            raise ValueError(f"sampler.tool_call must be three non-empty markers (open, "
                             f"close, result close), got {list(self.tool_call)}")
        if self.max_tool_calls < 0 or self.tool_result_tokens <= 0:
            raise ValueError("sampler.max_tool_calls must be >= 0 and "
                             "sampler.tool_result_tokens positive")
        if not 0 < self.tool_timeout_s < float("inf"):
            raise ValueError(f"sampler.tool_timeout_s must be positive and finite, got "
                             f"{self.tool_timeout_s}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
    max_prompt_tokens: int | None = None
    """Cut longer prompts to their BOS and last max_prompt_tokens - 1 tokens, as TRL's
    max_prompt_length does (in training, SFT and evaluation alike). The cut drops the
    instruction and the question's start, so real runs leave it off (None): it bounds
    the sequence length of the random tiny model's runs, whose byte tokenizer turns a
    problem into 450-900 tokens."""

    @validated
    def __post_init__(self):
        if self.on_malformed not in ("skip", "error"):
            raise ValueError(f"on_malformed must be 'skip' or 'error', got {self.on_malformed!r}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"data.prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                             f"got {self.prompt_style!r}")
        if self.num_train <= 0 or self.num_eval <= 0:
            raise ValueError("num_train and num_eval must be positive")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 2:
            raise ValueError(f"data.max_prompt_tokens must be at least 2 (BOS and one token) "
                             f"or None, got {self.max_prompt_tokens}")
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
    filter_zero_variance: bool = False
    """Dynamic sampling (DAPO): leave out groups whose G rewards are all equal (zero
    advantage: no policy gradient) and sample num_prompts more prompts, round after round,
    until the step holds num_prompts groups with a signal or max_resample_rounds extra
    rounds are spent; a batch still short is topped up with the left-out groups. Every
    round uses up num_prompts problems of the stream; shapes and programs are unchanged."""
    max_resample_rounds: int = 2
    """Extra sampling rounds a step may draw when filter_zero_variance is on (each costs
    one sampler pass over num_prompts prompts)."""

    @validated
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
        for name, choices in (("kl_estimator", KL_ESTIMATORS), ("aggregation", AGGREGATIONS),
                              ("ratio_level", RATIO_LEVELS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"grpo.{name} must be one of {', '.join(choices)}, got "
                                 f"{getattr(self, name)!r}")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError("grpo.beta and the epsilons must be >= 0")
        if self.max_resample_rounds < 0:
            raise ValueError(f"grpo.max_resample_rounds must be >= 0, got "
                             f"{self.max_resample_rounds}")

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

    @validated
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
    pack_length: int = 0
    """0: one problem per row, the prompt left-padded and the target right-padded. N > 0:
    each step's problems (prompt, then target) packed end to end into rows of N tokens,
    each attending to itself only (segment ids), so no compute goes to padding; the rows
    per step are the most any step of the run needs. Problems whose prompt and target
    exceed N are left out."""
    tool_results: bool = False
    """With a tool (sampler.tools): also train on the results the tool would write in
    the gold targets. Off, only the policy's tokens are targets and the model never
    learns to write a call's result without the tool. The results are correct text, so
    training on them is sound in SFT; GRPO masks tool tokens either way (its policy did
    not sample them)."""

    @validated
    def __post_init__(self):
        for field in ("batch_size", "max_tokens"):
            if getattr(self, field) <= 0:
                raise ValueError(f"sft.{field} must be positive, got {getattr(self, field)}")
        if self.pack_length < 0:
            raise ValueError(f"sft.pack_length must be >= 0 (0: no packing), got "
                             f"{self.pack_length}")
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

    @validated
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

    @validated
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
    gsm_symbolic, SFT warm-up then GRPO, on 2 CPU cores), cpu-270m-long (the same
    recipe, longer), tiny (random tiny Gemma, byte tokenizer, for tests),
    v5e-8-gemma3-1b (Gemma 3 1B-IT from --checkpoint, TPU v5e-8). Wall times:
    docs/cpu_recipe.md."""
    model: str = "gemma3-270m"
    """Model preset (architecture); its weights are embedded (gemma3-270m), random (tiny),
    or read from --checkpoint / --gguf."""
    checkpoint: str | None = None
    """Base weights: an orbax (Kaggle) or HF safetensors checkpoint directory."""
    gguf: str | None = None
    """Base weights from a GGUF file instead."""
    dtype: str | None = None
    """Compute dtype of the base model: float32, bfloat16, or auto (the faster of the two
    on this machine, measured once by a matmul probe at the model's shapes: bfloat16 on
    an accelerator and, measured, on CPUs with AVX-512 BF16 and on AMX CPUs; expected
    float32 on AVX2-only ones; with --matmul auto the probe also times oneDNN);
    unset: the model's own (float32). LoRA, optimizer, log-softmax and losses stay
    float32 either way."""
    matmul: str = "auto"
    """The model's matmuls: xla, onednn (oneDNN's bfloat16 matmul, a custom call built
    on first use: AMX on Intel CPUs that have it; needs bfloat16 compute and one
    device), or auto (with --dtype auto, whichever of the two the probe measures
    faster; XLA's otherwise). In bfloat16 on one device of an AMX CPU, the sampler's
    decode steps multiply on AMX tiles (a custom call built on first use) unless this
    is xla."""
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

    @validated
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
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.matmul not in MATMUL_CHOICES:
            raise ValueError(f"matmul implementation {self.matmul!r}: choose one of "
                             f"{', '.join(MATMUL_CHOICES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation {self.attention!r}: choose one of "
                             f"{', '.join(ATTENTION_IMPLS)}")
        if self.sampler.greedy:
            raise ValueError("sampler.temperature must be > 0 for training: greedy samples "
                             "make every group identical, so no advantage is ever non-zero")
        if self.sft.tool_results and not self.sampler.tools:
            raise ValueError("sft.tool_results trains on a tool's results: it needs "
                             "--sampler.tools")

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
    def rounds_per_step(self) -> int:
        """The most sampling rounds one GRPO step may draw."""
        g = self.grpo
        return 1 + (g.max_resample_rounds if g.filter_zero_variance else 0)

    def data_position_bounds(self, step: int) -> tuple[int, int]:
        """The least and most problems used up after `step`: equal unless dynamic
        sampling lets a GRPO step draw extra rounds, whose count depends on the rewards."""
        least = self.data_position(step)
        extra = (self.rounds_per_step - 1) * self.grpo.num_prompts
        return least, least + max(step - self.sft.steps, 0) * extra


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
