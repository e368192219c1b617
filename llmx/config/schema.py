"""Typed schema of every llmx config.

Each config group (`conf/<group>/*.yaml`) is validated against one dataclass here, registered in
Hydra's ConfigStore by `register()`. Because the root schema is a structured config in struct mode,
an unknown key, a wrong type or a bad enum value fails at compose time, naming the full key, before
any model is built. Later issues extend a group by subclassing its dataclass (for example an
optimizer with extra fields) and registering the subclass as that option's schema.

This module imports only the standard library, omegaconf and hydra: `llmx list` and `llmx validate`
must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class RecipeKind(str, Enum):
    pretrain = "pretrain"
    sparsify = "sparsify"
    merge = "merge"
    rl = "rl"
    generate_bench = "generate_bench"
    synthesize = "synthesize"  # training data generated from documents by LLMs (NaturalReasoning)
    eval = "eval"  # lm-evaluation-harness on a model, a run's output or a method applied in memory


class ModelSource(str, Enum):
    preset = "preset"  # a transformers config built from the fields below, trained from scratch
    hf = "hf"  # a Hugging Face directory (or hub id, where the network allows)
    gguf = "gguf"  # a GGUF file, optionally located inside an installed Python package


class InitDevice(str, Enum):
    auto = "auto"  # meta when the model is larger than trainer.meta_init_threshold parameters
    cpu = "cpu"
    meta = "meta"


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = ModelSource.preset
    arch: str = "llama"  # transformers model_type used to build a preset
    # Preset shape (transformers LlamaConfig names). vocab_size null: taken from the tokenizer.
    vocab_size: Optional[int] = None
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Pretrained weights: a directory or file path, a hub id, or a file inside a Python package.
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    package: Optional[str] = None
    dtype: str = "float32"  # dtype the weights are held in for training (bf16 autocast is separate)
    attn_implementation: str = "sdpa"
    init_device: InitDevice = InitDevice.auto
    # An earlier llmx run in `path` (llmx.models.runs): which sparsity level of an R-Sparse/TEAL run to load, and
    # the token mode its sparse layers run in (null: the mode the artifact was evaluated with).
    level: Optional[float] = None
    token_mode: Optional[str] = None


class DataSource(str, Enum):
    pydoc = "pydoc"  # embedded offline corpus: Python's documentation topics (PSF license)
    pylib = "pylib"  # built offline: docstrings and comments of the installed stdlib and packages
    files = "files"  # local .txt / .jsonl / .json / .parquet files or globs
    hub = "hub"  # a Hugging Face dataset name (needs the network), streaming or not
    synthetic = "synthetic"  # a generator registered in llmx.data.synthetic
    graph_paths = "graph_paths"  # shortest paths on random graphs (llmx.graphs.paths; Spectral Journey's task)
    latent_cot = "latent_cot"  # prompt / chain of thought / solution triples (Token Assorted; data.latent)


class TokenizerSource(str, Enum):
    trained = "trained"  # byte-level BPE trained on the training text, cached by content
    pretrained = "pretrained"  # tokenizer.path: a HF directory or hub id
    model = "model"  # the tokenizer that ships with the pretrained model


@dataclass
class TokenizerConfig:
    source: TokenizerSource = TokenizerSource.trained
    path: Optional[str] = None
    vocab_size: int = 4096  # for source=trained
    train_chars: int = 5_000_000  # cap on the text used to train a BPE tokenizer


# Distributions whose documentation text makes up the pylib corpus (llmx.data.pylib), besides the
# standard library: llmx's runtime dependencies with the most text, all under permissive licences.
PYLIB_PACKAGES = [
    "accelerate", "anyio", "click", "datasets", "dill", "filelock", "fonttools", "fsspec", "httpx",
    "huggingface_hub", "hydra-core", "jinja2", "markdown", "matplotlib", "mpmath", "networkx", "numpy",
    "omegaconf", "packaging", "pandas", "pillow", "pyarrow", "pydantic", "pygments", "pyparsing",
    "python-dateutil", "requests", "rich", "safetensors", "scipy", "sympy", "tensorboard", "torch",
    "transformers", "triton", "typer", "urllib3", "wandb", "werkzeug",
]


@dataclass
class PylibConfig:
    packages: List[str] = field(default_factory=lambda: list(PYLIB_PACKAGES))


@dataclass
class GraphsConfig:
    """data.source=graph_paths: the Spectral Journey task (llmx.graphs.paths has every choice's why)."""

    nodes: List[int] = field(default_factory=lambda: [3, 10])  # inclusive range of graph sizes
    node_tokens: int = 10  # label tokens 0..node_tokens-1 (>= the largest graph)
    sampler: str = "gnp"  # gnp | tree_plus
    edge_prob: List[float] = field(default_factory=lambda: [0.15, 0.45])  # p ~ U(min, max) per graph
    query: str = "by_distance"  # by_distance (distance uniform, then a pair) | uniform (a uniform pair)
    target: str = "canonical"  # training path on ties: canonical (lexicographically smallest) | random
    test_fraction: float = 0.2  # isomorphism classes held out for test
    split_salt: str = "llmx-graphs"
    seed: int = 0  # data seed (the run's seed sets initialisation and data order)
    train_per_size: int = 2000
    val_per_size: int = 50  # held-out examples of training-side graphs (validation loss)
    test_per_size: int = 200  # test-side examples per size before isomorphism dedup
    test_sizes: List[int] = field(default_factory=list)  # empty: every size of `nodes` with test classes
    test_dir: Optional[str] = None  # evaluate on this `generate_bench` shortest_path dataset instead


@dataclass
class LatentDataConfig:
    """data.source=latent_cot: (prompt, chain of thought, solution) examples for Token Assorted
    (llmx/recipes/token_assorted.py has the format of each task)."""

    task: str = "keys_maze"  # keys_maze | gsm_infinite (llmx.bench generators) | jsonl (MetaMathQA-style files)
    options: Dict[str, Any] = field(default_factory=dict)  # the generator's options (keys_maze: MazeSpec fields)
    subset: str = "medium"  # gsm_infinite subset
    ops: List[int] = field(default_factory=lambda: [1, 2])  # op counts, examples spread evenly over them
    train_examples: int = 4000
    val_examples: int = 100
    test_examples: int = 200
    seed: int = 0  # data seed (the run's seed sets initialisation and data order)
    workers: int = 1  # generation processes
    paths: List[str] = field(default_factory=list)  # task=jsonl: training files
    test_paths: List[str] = field(default_factory=list)  # task=jsonl: test files
    prompt_field: str = "query"
    response_field: str = "response"
    answer_marker: str = "The answer is:"  # task=jsonl: the response's CoT ends where the solution starts


@dataclass
class DataConfig:
    name: str = MISSING
    source: DataSource = DataSource.pydoc
    paths: List[str] = field(default_factory=list)
    val_paths: List[str] = field(default_factory=list)  # empty: hold out val_fraction of documents
    text_field: str = "text"
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"
    hub_val_split: Optional[str] = "validation"
    streaming: bool = False
    generator: Optional[str] = None  # source=synthetic: registered generator name
    generator_args: Dict[str, Any] = field(default_factory=dict)
    seq_len: int = 128
    val_fraction: float = 0.05
    # Held-out splits (llmx.data.split): paragraphs shorter than dedup_min_chars are never deduplicated,
    # and no overlap_window-character substring of validation text occurs in the training text.
    dedup_min_chars: int = 32
    overlap_window: int = 64
    pylib: PylibConfig = field(default_factory=PylibConfig)
    graphs: GraphsConfig = field(default_factory=GraphsConfig)
    latent: LatentDataConfig = field(default_factory=LatentDataConfig)
    val_max_sequences: int = 256  # evaluation uses at most this many held-out sequences
    # Training uses at most this many blocks, evenly spaced over the training split (null: every block).
    train_max_sequences: Optional[int] = None
    shuffle: bool = True
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: Optional[str] = None  # null: $LLMX_CACHE or ~/.cache/llmx
    num_proc: int = 1


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Step each parameter inside backward (post-accumulate-grad hooks) and free its gradient at once.
    in_backward: bool = False
    grad_clip: Optional[float] = 1.0  # global grad-norm clipping; null disables
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine and linear
    # Parameters matching these name patterns (fnmatch) get weight_decay 0.
    no_decay: List[str] = field(default_factory=lambda: ["*bias", "*norm*", "*embed*"])
    # Name pattern (fnmatch) -> multiplier of the scheduled lr; the first matching pattern wins, other
    # parameters get 1.0. Lets matrices and embeddings/norms train at different rates, as GaLore's do.
    lr_scales: Dict[str, float] = field(default_factory=dict)


class ProjType(str, Enum):
    std = "std"  # project the smaller side (GaLore's default)
    reverse_std = "reverse_std"  # project the larger side
    left = "left"
    right = "right"
    full = "full"  # both sides: an r x r core


class SVDMethod(str, Enum):
    exact = "exact"  # torch.linalg.svd in fp32 (GaLore 1)
    randomized = "randomized"  # range finder with oversampling and power iterations (GaLore 2)


class MomentPolicy(str, Enum):
    keep = "keep"  # the reference: moments stay as they are when the subspace changes
    reproject = "reproject"  # rotate the first moment into the new basis (second moment: squared rotation)
    reset = "reset"  # zero both moments at each refresh


class ProjPrecision(str, Enum):
    ieee = "ieee"  # fp32 operands and products (the oracle)
    tf32 = "tf32"  # fp32 operands, TF32 tensor cores on CUDA
    bf16 = "bf16"  # bf16 operands, fp32 accumulation


class BasisDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class GaLoreOptimConfig(OptimConfig):
    """GaLore / GaLore 2 (llmx.optim.galore). Parameters matching `targets` (2-D weights of attention and
    MLP by default) are optimized in a rank-`rank` gradient subspace; the rest with plain AdamW."""

    name: str = "galore_adamw"
    eps: float = 1e-6  # galore-torch's AdamW default
    rank: int = 128
    update_proj_gap: int = 200  # T: steps between subspace refreshes
    scale: float = 0.25  # alpha
    proj_type: ProjType = ProjType.std
    svd: SVDMethod = SVDMethod.exact
    oversample: int = 10  # randomized SVD: extra columns of the sketch
    power_iters: int = 1  # randomized SVD: subspace iterations
    moments: MomentPolicy = MomentPolicy.keep
    targets: List[str] = field(default_factory=lambda: ["*self_attn.*_proj.weight", "*mlp.*_proj.weight"])
    rank_overrides: Dict[str, int] = field(default_factory=dict)  # name pattern -> rank
    quant_bits: Optional[int] = None  # 8 or 4: store projection matrices quantized (Q-GaLore)
    quant_group_size: int = 256
    tucker: bool = True  # parameters with more than 2 dims get a Tucker projector
    optim_bits: int = 32  # 8: 8-bit Adam states through bitsandbytes
    fused: bool = False  # Triton fused step (CUDA); the PyTorch path otherwise
    precision: ProjPrecision = ProjPrecision.ieee  # how the projection GEMMs multiply (both paths)
    basis_dtype: Optional[BasisDtype] = None  # how the basis is stored; null: the gradient's dtype


class Precision(str, Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class TrainerConfig:
    max_steps: int = 100
    batch_size: int = 16  # global sequences per optimizer step
    micro_batch_size: int = 16  # sequences per forward pass on one rank
    eval_every: int = 50
    eval_batches: int = 8  # micro-batches of held-out data per evaluation, over all ranks together
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end of the run
    keep_last: int = 2  # completed checkpoints kept in the run directory
    save_final: bool = True
    export_hf: bool = True  # write a transformers-loadable copy to <run_dir>/hf at the end
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Precision = Precision.auto
    compile: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # FSDP2: free gathered parameters after each block's forward
    meta_init_threshold: int = 1_000_000_000  # parameters above which init_device=auto uses meta
    detect_nan: bool = True
    max_seconds: Optional[float] = None  # stop (with a checkpoint) after this much training time


class LoggerBackend(str, Enum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.none
    progress: bool = True  # rich progress bar (rank 0, interactive or not)
    project: str = "llmx"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # wandb mode; null: WANDB_MODE from the environment, else online


class LauncherName(str, Enum):
    local = "local"
    torchrun = "torchrun"
    slurm = "slurm"


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None  # multi-node torchrun: host:port of node 0
    # Slurm (hydra-submitit-launcher); copied into hydra.launcher by conf/launcher/slurm.yaml.
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 60
    constraint: Optional[str] = None


@dataclass
class BenchConfig:
    """What a generate-bench recipe generates (conf/bench/)."""

    generator: str = "gsm_infinite"  # a name registered with llmx.bench.register_bench
    options: Dict[str, Any] = field(default_factory=dict)  # the generator's own options
    subsets: List[str] = field(default_factory=lambda: ["symbolic"])
    lengths: List[str] = field(default_factory=lambda: ["0"])  # 0, 8k (8000 tokens), 16k, ..., or token counts
    ops: Any = "1-8"  # [1, 2, 5] | "1-8" | "2-30:2" | "1,2,5"
    # Per-subset ops, optionally per length: {medium: "2-30", symbolic: {"0": "1-50", "8k": "1-30"}}.
    ops_by_subset: Dict[str, Any] = field(default_factory=dict)
    per_op: int = 20  # problems per (subset, length, op)
    workers: int = 1  # generator processes
    verify: bool = True  # re-solve every problem with the independent solver before writing it
    formats: List[str] = field(default_factory=lambda: ["arrow"])  # arrow and/or jsonl
    out_dir: Optional[str] = None  # null: <run_dir>/bench
    dataset_dir: Optional[str] = None  # evaluate this existing benchmark instead of generating one
    tokenizer: Optional[str] = None  # tokenizer that measures context length; null: the model group's


class EvalBackend(str, Enum):
    none = "none"  # generate only
    hf = "hf"  # the model group's model, loaded locally with transformers
    openai = "openai"  # any OpenAI-compatible HTTP endpoint (vLLM, SGLang, ...)
    oracle = "oracle"  # replies with each problem's reference solution: checks the graders end to end


@dataclass
class EvalConfig:
    """Downstream tasks through lm-evaluation-harness (conf/eval/; llmx.evaluate.harness)."""

    name: str = "local"
    tasks: List[str] = field(default_factory=lambda: ["llmx_gsm_infinite_mc", "llmx_pydoc_next"])
    include_paths: List[str] = field(default_factory=list)  # directories of extra task YAMLs
    local_tasks: bool = True  # put llmx's offline tasks (llmx.evaluate.local_tasks) on the include path
    num_fewshot: Optional[int] = None  # null: each task's own default
    limit: Optional[float] = None  # items per task (a fraction when < 1); null: all
    batch_size: str = "auto"  # "auto" (lm-eval finds the largest that fits) or an integer
    max_batch_size: int = 64
    cache: bool = True  # lm-eval's request cache, per model fingerprint: a killed evaluation resumes from it
    log_samples: bool = False  # every request and answer in the run directory (large)
    bootstrap_iters: int = 100000  # lm-eval's default; standard errors of non-mean metrics
    device: str = "auto"


@dataclass
class EvaluatorConfig:
    """How a generate-bench recipe evaluates a model on the benchmark (conf/evaluator/)."""

    backend: EvalBackend = EvalBackend.none
    limit_per_op: Optional[int] = None  # evaluate the first N problems (by index) of each split
    num_samples: int = 1
    pass_k: List[int] = field(default_factory=list)  # empty: 1, 2, 4, ... up to num_samples
    pass_estimator: str = "reference"  # reference: 1-(1-c/n)^k, as the paper; unbiased: Chen et al.
    temperature: float = 0.0
    # Per-subset sampling temperature, e.g. {symbolic: 1.0} (the reference samples symbolic problems at 1.0
    # and realistic ones at 0.0); subsets not named use `temperature`.
    temperature_by_subset: Dict[str, float] = field(default_factory=dict)
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    system_prompt: Optional[str] = None
    stop: List[str] = field(default_factory=list)
    cache: Optional[str] = None  # replies cache (JSONL); null: <output_root>/bench_cache/<hash>.jsonl
    # hf
    batch_size: int = 8
    chat_template: bool = True
    device: str = "auto"
    # openai
    base_url: Optional[str] = None
    model_name: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    api: str = "chat"  # chat | completions
    concurrency: int = 16
    max_retries: int = 6
    timeout_s: float = 600.0
    extra_body: Dict[str, Any] = field(default_factory=dict)
    # Symbolic grading: rules (a rule-based extractor) | llm (an LLM rewrites each reply as a variable list,
    # as the reference does; served at extractor_base_url, OpenAI-compatible).
    symbolic_extractor: str = "rules"
    extractor_base_url: Optional[str] = None
    extractor_model: Optional[str] = None


class SparsityMethod(str, Enum):
    rsparse = "rsparse"  # R-Sparse: exact columns for large |x_j| * ||W[:, j]||, a rank-r SVD for the rest
    teal = "teal"  # magnitude sparsity on |x| (R-Sparse with alpha = 1)
    dense = "dense"  # no sparsity: the baseline, through the same evaluation
    sharp = "sharp"  # SHARP: adjacent-layer MLP sharing with low-rank recovery (SLW, then SFT); sparsify.sharp


class Allocation(str, Enum):
    uniform = "uniform"  # every layer at the target s (and sparsify.alpha)
    greedy = "greedy"  # TEAL's block-wise greedy allocation of s (teal: alpha = 1; rsparse: alpha = sparsify.alpha)
    search = "search"  # R-Sparse's evolutionary search of per-layer (s, alpha)


class TokenMode(str, Enum):
    all = "all"  # every token sparse (the worst case)
    decode = "decode"  # single-token calls (generated tokens) sparse, prompts dense
    last_fraction = "last_fraction"  # the last token_fraction of every sequence (the reference's evaluation)


@dataclass
class SearchConfig:
    population: int = 8
    generations: int = 6
    seed: int = 0
    init_greedy: bool = False  # seed the population with TEAL's greedy plan (its paths are cached and shared)
    mode: str = "s_alpha"  # s_alpha: per-module s and alpha | alpha: s fixed (target, or greedy s), alphas searched


class SharpRecovery(str, Enum):
    lora = "lora"  # W_ref + B A on each of sharp.targets (gate/up/down)
    parallel = "parallel"  # MLP_ref(x) + U V x: a low-rank linear map beside the shared MLP
    none = "none"  # Direct Sharing: the reference's MLP as it is (the paper's baseline)


class SharpReference(str, Enum):
    adjacent = "adjacent"  # SHARP: the nearest earlier kept layer
    permuted = "permuted"  # control: that reference seen through a random residual-stream permutation
    distant = "distant"  # control: a random kept layer at distance >= 2
    prune = "prune"  # control: no reference; the MLP deleted and a rank-r gated MLP in its place (init=svd)


class SharpInit(str, Enum):
    zero = "zero"  # LoRA's init (B = 0): training starts at Direct Sharing
    svd = "svd"  # lora only: the truncated SVD of W_layer - W_reference


@dataclass
class InstructSourceConfig:
    """One source of instruction data (llmx.data.instruct): kind file | pydoc_qa | gsm_infinite."""

    kind: str = "pydoc_qa"
    path: Optional[str] = None  # kind=file: a .jsonl / .json file (Alpaca, prompt/response or messages records)
    n: Optional[int] = None  # training examples (gsm_infinite: how many to generate; others: a cap)
    n_val: int = 200  # gsm_infinite: validation problems generated
    val_fraction: float = 0.1  # kind=file: the share held out (by a stable hash of the prompt)
    args: Dict[str, Any] = field(default_factory=dict)  # pydoc_qa: max_words; gsm_infinite: subset, ops


@dataclass
class SharpSLWConfig:
    """Stage 1, Single Layer Warmup: each replaced layer's recovery fitted to the original MLP's output."""

    steps: int = 200  # Adam steps per layer (0: skip the stage)
    lr: float = 1e-3
    batch_tokens: int = 1024  # rows (token positions) per step
    sequences: int = 16  # calibration sequences whose MLP inputs and outputs are captured
    max_tokens: int = 16384  # captured real-token rows per layer (padding is dropped)
    holdout: float = 0.1  # share of the calibration sequences held out, whole, to report the error
    data: str = "sft"  # sft: the SFT training sequences; text: the data group's training split


@dataclass
class SharpSFTConfig:
    """Stage 2: every recovery parameter trained together on instruction data, through the trainer core
    (batch sizes, checkpoints, logging from the trainer group; optim.* as for any run)."""

    steps: int = 100  # optimizer steps (0: skip the stage)
    lr: float = 1e-3
    warmup_steps: int = 10
    seq_len: int = 512
    chat_template: bool = True  # render with the tokenizer's chat template when it has one
    sources: List[InstructSourceConfig] = field(
        default_factory=lambda: [InstructSourceConfig(kind="pydoc_qa"), InstructSourceConfig(kind="gsm_infinite", n=1000)])
    eval_sequences: int = 16  # held-out packed sequences for the instruction perplexity


@dataclass
class SharpConfig:
    """SHARP (sparsify.method=sharp): which layers share, the recovery parameterization, the two stages."""

    # Replaced layers: a list of indices, or "start:stop:step" over them (negative from the end; a number
    # with a decimal point is a fraction of the depth: "0.5::2" = every second layer of the later half).
    layers: Any = "0.5::2"
    recovery: SharpRecovery = SharpRecovery.lora
    rank: int = 16  # lora rank on gate/up/down; with match_params, the parameter budget of other choices
    targets: List[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    match_params: bool = True  # other recoveries/targets get the rank with lora(gate,up,down, rank)'s count
    init: SharpInit = SharpInit.zero
    # What a replaced layer shares (llmx.sharing.sharp's docstring): SHARP, or one of its controls.
    reference: SharpReference = SharpReference.adjacent
    recovery_dtype: Optional[str] = "float32"  # master weights of the recovery parameters; null: the model's
    slw: SharpSLWConfig = field(default_factory=SharpSLWConfig)
    sft: SharpSFTConfig = field(default_factory=SharpSFTConfig)
    # Also fine-tune the original (unshared) model with the same recovery modules on its own MLPs and the
    # same SFT: the fair reference for an in-distribution perplexity after SFT.
    baseline_sft: bool = False
    save_dtype: Optional[str] = None  # dtype of the compact checkpoint; null: the model's
    compare_storage: bool = True  # also save the original model to time loading and size it on disk


@dataclass
class SparsifyConfig:
    """What a sparsify recipe does to a pretrained model (conf/sparsify/)."""

    method: SparsityMethod = SparsityMethod.rsparse
    levels: List[float] = field(default_factory=lambda: [0.5])  # model-level sparsities, each evaluated and saved
    allocation: Allocation = Allocation.search
    alpha: float = 0.95  # uniform allocation's share of the budget for exact columns (rsparse); the paper's 0.95
    targets: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    token_mode: TokenMode = TokenMode.all
    token_fraction: float = 0.1  # last_fraction: the share of each sequence that is sparse
    calib_sequences: int = 16  # training-split sequences (data.seq_len tokens each) for thresholds and search
    calib_max_values: int = 65536  # per-layer subsample of |x| kept for the threshold quantiles
    eval_sequences: Optional[int] = None  # validation sequences for perplexity; null: all
    search: SearchConfig = field(default_factory=SearchConfig)
    save: bool = True  # write the artifact (thresholds, ranks, factors) per level
    decode_tokens: int = 0  # > 0: also time batch-1 greedy decoding of this many tokens, dense vs sparse
    # Matched sparsity: one scale of every threshold, set so that the sparsity achieved on match_sequences validation
    # windows that are not scored (those after the eval_sequences) is within match_tolerance of the level.
    match_sparsity: bool = False
    match_sequences: int = 16
    match_tolerance: float = 0.002
    greedy_step: float = 0.05  # TEAL greedy: one move raises a projection by greedy_step x (q_proj size / its size)
    sharp: SharpConfig = field(default_factory=SharpConfig)  # method=sharp


class MergeMethod(str, Enum):
    paramdelta = "paramdelta"  # ParamΔ: new_base + scale * (post - base)
    task_arithmetic = "task_arithmetic"  # base + sum_i weight_i * (model_i - base)
    linear = "linear"  # sum_i weight_i * model_i (weights normalized unless params.normalize=false)
    ties = "ties"  # TIES: trim each delta to its top density, elect signs, average the agreeing entries
    dare_linear = "dare_linear"  # DARE: drop delta entries with probability 1 - density, rescale, add
    dare_ties = "dare_ties"  # DARE's drop-and-rescale, then TIES's sign election


class VocabPolicy(str, Enum):
    error = "error"  # a vocabulary-size mismatch between the inputs is an error
    post = "post"  # embedding/output rows beyond the shared vocabulary come from the post-trained model
    new_base = "new_base"  # ... from the new base


class MergeDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


@dataclass
class MergeModelConfig:
    path: str = MISSING  # a Hugging Face directory (safetensors) or hub id
    weight: float = 1.0


@dataclass
class DemoStageConfig:
    """One training stage of the merge recipe's ParamΔ demonstration (paramdelta_tiny). The trainer,
    optimizer and data groups give everything else (batch size, seq_len, schedule, evaluation)."""

    max_steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    # A registered synthetic generator (llmx.data.synthetic): the stage's data; for pretrain, documents added
    # to the data group's (together: corpus A; null: the data group alone).
    generator: Optional[str] = None
    generator_args: Dict[str, Any] = field(default_factory=dict)
    # Share of the stage's training sequences drawn from corpus A, as continued pretraining and post-training
    # mix general text back in to limit forgetting; 0: the stage's data only.
    replay: float = 0.0


@dataclass
class ParamDeltaDemoConfig:
    """The stages of a self-contained ParamΔ demonstration: pretrain a base on the data group (corpus A),
    post-train it on a task, continue pretraining the base on corpus B, merge, evaluate all four."""

    pretrain: DemoStageConfig = field(default_factory=DemoStageConfig)
    post_train: DemoStageConfig = field(default_factory=lambda: DemoStageConfig(generator="arithmetic"))
    continue_pretrain: DemoStageConfig = field(default_factory=lambda: DemoStageConfig(generator="facts"))
    answer_only_loss: bool = True  # post-training loss on answer tokens only (false: on every token)
    eval_questions: int = 200  # held-out task questions (never in the post-training data), greedy exact match
    max_answer_tokens: int = 8
    eval_sequences: int = 64  # held-out blocks of corpus A and corpus B for the loss columns


@dataclass
class MergeConfig:
    """What a merge recipe merges and how (conf/merge/). Inputs are Hugging Face directories (or hub ids)."""

    method: MergeMethod = MergeMethod.paramdelta
    # paramdelta: new_base + scale * (post - base)
    post: Optional[str] = None
    base: Optional[str] = None  # also the base of task_arithmetic / ties / dare
    new_base: Optional[str] = None
    scale: float = 1.0
    # the other methods: the models and their weights
    models: List[MergeModelConfig] = field(default_factory=list)
    params: Dict[str, Any] = field(default_factory=dict)  # method parameters (density, lambda, normalize, ...)
    config_from: Optional[str] = None  # null: the method's default (paramdelta: new_base)
    tokenizer_from: Optional[str] = None  # null: the method's default (paramdelta: post)
    include: List[str] = field(default_factory=list)  # tensor-name patterns merged (empty: all) ...
    exclude: List[str] = field(default_factory=list)  # ... minus these (copied: from new_base / the base)
    vocab_policy: VocabPolicy = VocabPolicy.error
    dtype: Optional[MergeDtype] = None  # saved dtype; null: the inputs' dtype
    compute_dtype: MergeDtype = MergeDtype.float32
    shard_size: str = "5GB"  # largest output shard
    allow_pickle: bool = False  # load .bin/.pt weights (with weights_only=True) when no safetensors exist
    out_dir: Optional[str] = None  # null: <run_dir>/merged
    overwrite: bool = False  # replace an existing out_dir (only once the new output is complete)
    demo: Optional[ParamDeltaDemoConfig] = None  # set: train the inputs first (paramdelta_tiny)


class RLMethod(str, Enum):
    zero_shot = "zero_shot"  # the policy as it is (after warmstart, if any)
    rft = "rft"  # rejection fine-tuning: SFT on the successful trajectories
    mtdpo = "mtdpo"  # multi-turn DPO on trajectory pairs, every agent turn, no critic
    sweet = "sweet"  # SWEET-RL: critic with training-time information, per-turn DPO
    sweet_no_info = "sweet_no_info"  # ablation: the critic never sees the reference solution
    sweet_no_norm = "sweet_no_norm"  # ablation: advantages summed over a turn's tokens, not averaged
    sweet_value = "sweet_value"  # ablation: a value-head critic (success from history + reference)


class CriticNorm(str, Enum):
    turn = "turn"  # Σ_t of each turn's mean token log-ratio (paper Eq. 2-3)
    trajectory = "trajectory"  # one mean over all agent tokens of the trajectory (the reference code)
    none = "none"  # summed log-ratios (the "w/o normalization" ablation)


@dataclass
class RLTasksConfig:
    source: str = "generate"  # generate: llmx.rl.colbench's offline families; file: ColBench JSONL files
    train_path: Optional[str] = None  # source=file: official backend_tasks/train.jsonl (or our own)
    test_path: Optional[str] = None  # source=file: the first `n_test` records are the test set
    seed: int = 0  # generation seed; the splits below never share a task
    n_warmstart: int = 0  # tasks whose scripted episodes warm-start a from-scratch policy by SFT
    n_train: int = 5000  # offline-data tasks (collected `collect.copies` times)
    n_test: int = 1000


@dataclass
class RLAgentConfig:
    backend: str = "hf"  # hf: the model group's model, locally; openai: a served copy (collection only)
    system_prompt: Optional[str] = None  # null: llmx.rl.colbench.AGENT_SYSTEM_PROMPT
    temperature: float = 1.0  # the reference samples the agent at 1.0 (collection and evaluation)
    max_new_tokens: int = 1024
    batch_size: int = 32
    base_url: Optional[str] = None
    model_name: Optional[str] = None
    concurrency: int = 64


@dataclass
class RLEnvConfig:
    max_rounds: int = 10
    reply_chars: int = 400
    end_marker: str = "I WANT TO ANSWER:"
    simulator: str = "rule"  # rule: deterministic, from the hidden slots (generated tasks); llm: the evaluator group
    call_timeout_s: float = 1.0  # per test call, as the reference's alarm(1)
    memory_mb: int = 512
    workers: int = 2  # sandboxed evaluations in parallel


@dataclass
class RLWarmstartConfig:
    ask_prob: float = 0.5  # the scripted collaborator asks each hidden detail with this probability
    junk_prob: float = 0.1
    episodes_per_task: int = 1  # scripted episodes of each warm-start task (each its own draw of questions)
    guess: str = "default"  # what the scripted agent writes for a detail it did not ask: default | random
    vocab_size: int = 1024
    steps: int = 0  # 0: no warm start (a pretrained instruct policy)
    lr: float = 3e-3
    batch_size: int = 32


@dataclass
class RLTrainConfig:
    """One training stage (critic, actor, rft, mtdpo): Table 5's columns."""

    lr: float = 2e-7
    beta: float = 0.1
    nll: float = 0.01
    batch_size: int = 8
    micro_batch_size: int = 1
    epochs: float = 1.0
    warmup_steps: int = 0


@dataclass
class RLCriticConfig(RLTrainConfig):
    epochs: float = 4.0
    normalize: CriticNorm = CriticNorm.turn
    info_template: str = "In light that the final answer is:\n{ground_truth}"
    # The reference term of Eq. 3 conditions on c (paper); the reference code scores without it (config).
    reference_with_info: bool = True
    value_pairs_per_trajectory: int = 0  # value-head critic: turns per trajectory used (0: all)


@dataclass
class RLConfig:
    methods: List[RLMethod] = field(default_factory=lambda: [RLMethod.zero_shot, RLMethod.rft, RLMethod.mtdpo,
                                                             RLMethod.sweet])
    tasks: RLTasksConfig = field(default_factory=RLTasksConfig)
    agent: RLAgentConfig = field(default_factory=RLAgentConfig)
    env: RLEnvConfig = field(default_factory=RLEnvConfig)
    warmstart: RLWarmstartConfig = field(default_factory=RLWarmstartConfig)
    copies: int = 3  # offline episodes per training task (the reference: 15k = 5k tasks x 3)
    # Train on an existing trajectory file (the reference's colbench_code_offline_15k_llama8b.jsonl, or one llmx
    # wrote) instead of collecting: the collect stage validates and copies it.
    offline_data: Optional[str] = None
    critic: RLCriticConfig = field(default_factory=RLCriticConfig)
    candidates: int = 16  # per sampled turn (§4.3)
    data_fraction: float = 0.1  # share of trajectories whose turns are resampled (the reference's 10%)
    pairs_per_turn: int = 4
    actor: RLTrainConfig = field(default_factory=lambda: RLTrainConfig(epochs=1.0))
    rft: RLTrainConfig = field(default_factory=lambda: RLTrainConfig(batch_size=32, epochs=4.0, nll=1.0))
    mtdpo: RLTrainConfig = field(default_factory=lambda: RLTrainConfig(epochs=4.0))
    mtdpo_normalize: CriticNorm = CriticNorm.none  # summed log-ratio over every agent token (standard DPO)
    best_of_n: List[int] = field(default_factory=list)  # critic-selected best-of-N probe (Fig. 3a), e.g. [1, 4, 16]
    best_of_n_tasks: int = 0  # the probe's test tasks: the first this many (0: all); N=16 costs 16 samples a turn
    eval_copies: int = 1  # episodes per test task


@dataclass
class SynthDocsConfig:
    source: str = "builtin"  # files | hub | builtin (llmx.reasoning.documents: worked problems + pydoc sections)
    paths: List[str] = field(default_factory=list)  # files: .txt/.jsonl/.json/.parquet (optionally .gz), dirs, globs
    text_field: str = "text"
    hub_name: Optional[str] = None  # hub: e.g. mlfoundations/dclm-baseline-1.0, HuggingFaceTB/finemath (streamed)
    hub_config: Optional[str] = None
    split: str = "train"
    limit: Optional[int] = None  # the first N documents (after exact-duplicate removal); null: all
    builtin_worked: int = 200  # builtin: GSM-Infinite worked solutions
    builtin_docs: int = 200  # builtin: Python documentation sections
    max_chars: int = 6000  # what the judge and the writer see of a document


@dataclass
class SynthLLMConfig:
    """The model behind one stage. hf: the model group's model, locally; openai: a served model (vLLM, SGLang,
    `llmx serve`); rules: llmx.reasoning.rules (annotate, synthesize); oracle: respond with the document's own
    worked solution (builtin documents)."""

    backend: str = "hf"
    base_url: Optional[str] = None
    model_name: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    max_retries: int = 6
    timeout_s: float = 600.0
    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    device: str = "auto"
    chat_template: bool = True


@dataclass
class SynthSelfTrainConfig:
    samples: int = 8  # responses sampled per question (the paper: 32)
    temperature: float = 0.8
    max_new_tokens: int = 192
    # self_consistency | self_score (log p(yes) - log p(no) of the model's own judgement) | random (the control:
    # any answered sample, no selection; llmx.reasoning.selftrain)
    scorer: str = "self_consistency"
    self_score_filter: bool = False  # drop a question whose best response self-scores < 0


@dataclass
class SynthTrainConfig:
    lr: float = 1e-5
    epochs: float = 1.0
    batch_size: int = 16
    micro_batch_size: int = 4
    beta: float = 0.1  # DPO
    nll: float = 0.0  # DPO: weight of the chosen response's NLL
    warmup_steps: int = 0
    seq_len: int = 512  # longest prompt + response kept (longer are dropped, counted)


@dataclass
class SynthConfig:
    # all: every phase in this process; generate (annotate + synthesize, sharded) -> filter (merge shards, dedup,
    # decontaminate) -> respond (sharded) -> assemble (the dataset) -> train (the uses): for Slurm arrays.
    phase: str = "all"
    work_dir: Optional[str] = None  # shared by every shard and phase; null: the run directory
    shard_index: int = 0
    shard_count: int = 1
    docs: SynthDocsConfig = field(default_factory=SynthDocsConfig)
    judge: SynthLLMConfig = field(default_factory=SynthLLMConfig)
    writer: SynthLLMConfig = field(default_factory=SynthLLMConfig)
    teacher: SynthLLMConfig = field(default_factory=lambda: SynthLLMConfig(max_new_tokens=512))
    min_score: int = 4  # rubric total (-2..6) a document needs to be kept
    dedup_threshold: float = 0.55
    dedup_num_perm: int = 128
    dedup_shingle: int = 3
    benchmarks: List[str] = field(default_factory=list)  # MATH / GPQA / MMLU-Pro files, GSM-Infinite output dirs
    ngram: int = 13
    responses_per_question: int = 1
    eval_fraction: float = 0.2  # documents held out (by id) for the uses' evaluation
    eval_max_new_tokens: int = 192
    eval_batch_size: int = 16  # the student's generation batch (evaluation and self-training samples)
    uses: List[str] = field(default_factory=list)  # distill | rft | dpo
    selftrain: SynthSelfTrainConfig = field(default_factory=SynthSelfTrainConfig)
    train: SynthTrainConfig = field(default_factory=SynthTrainConfig)


@dataclass
class SpectralConfig:
    """Evaluation and interpretation of a graph_paths model (llmx.graphs.spectral, recipe spectral_journey)."""

    eval_examples: int = 0  # test examples decoded (0: all)
    probe_graphs: int = 300  # test graphs whose edge representations are probed
    probe_k: int = 4  # eigenvectors of the line-graph Laplacian the probe compares with
    probe_kinds: List[str] = field(default_factory=lambda: ["combinatorial", "normalized"])
    probe_scale: str = "none"  # eigenvectors as they are (none) | divided by sqrt(eigenvalue) (resistance)
    probe_sweep_ks: List[int] = field(default_factory=lambda: [2, 4, 8, 0])  # at the best layer, both scalings
    edge_position: str = "second"  # an edge's representation: its second token (second) | mean of its two
    sln_ks: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8, 0])  # 0: every non-trivial eigenvector
    sln_kinds: List[str] = field(default_factory=lambda: ["combinatorial", "normalized"])
    sln_rules: List[str] = field(default_factory=lambda: ["nearest", "mean"])
    sln_scale: str = "resistance"  # with all eigenvectors unscaled every edge pair is equidistant
    plots: bool = True


@dataclass
class VQVAETrainConfig:
    """The VQ-VAE that makes latent tokens (llmx.latent.vqvae has every choice's why)."""

    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_prompt_len: int = 256
    beta: float = 0.25  # commitment weight
    codebook_update: str = "ema"  # ema | loss
    ema_decay: float = 0.99
    dead_code_steps: int = 100  # restart a code unused this many steps (0: never)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class LatentConfig:
    """Token Assorted (llmx.latent, recipe token_assorted): the variant trained, the mixing, the VQ-VAE, evaluation."""

    variant: str = "latent"  # sol_only | cot | latent
    mix: str = "random"  # random (the method) | all | curriculum | poisson (the paper's ablations) | none
    m_set: List[int] = field(default_factory=lambda: [0, 16, 32, 48])  # leading CoT tokens replaced, per example
    chunk_len: int = 16  # L
    compression: int = 16  # r: one latent per r tokens
    codebook_size: int = 64
    vqvae: VQVAETrainConfig = field(default_factory=VQVAETrainConfig)
    vqvae_dir: Optional[str] = None  # a trained VQ-VAE to use (null: train one, cached by data and settings)
    embed_noise: float = 1.0  # new embedding rows: mean + embed_noise * std * N(0, 1) of the old rows
    samples: int = 10  # keys_maze: k of 1-Feasible-k (sampled); other tasks decode greedily once
    top_k: int = 10  # top-k filter of the sampled decoding
    temperature: float = 1.0
    max_new_tokens: int = 256
    eval_batch_size: int = 64


@dataclass
class SAETrainConfig:
    """A TopK sparse autoencoder on the model group's residual stream (llmx.concept.sae, recipe sae_*); the steps,
    lr and blocks per step come from the trainer and optim groups."""

    train: bool = False  # true: this run trains an SAE (pretrain kind, llmx/recipes/sae.py)
    layer: int = 0  # residual after this decoder block (0-based, "resid_post")
    n_latents: int = 4096
    k: int = 32
    normalize: bool = True
    aux_k: int = 256
    aux_coef: float = 0.03125
    dead_tokens: int = 1_000_000
    skip_first: int = 1  # leading positions of each block left out (the first token's residual is an outlier)
    init_blocks: int = 8  # training blocks whose mean activation initialises b_pre
    eval_blocks: int = 32  # held-out blocks for the final quality figures
    name: Optional[str] = None  # published as cache_dir/sae/<name> (null: the recipe name)


@dataclass
class CoCoMixConfig:
    """CoCoMix and its baselines (llmx.concept.cocomix, recipe cocomix_*): what trains, the concepts, the teacher."""

    # null: not a CoCoMix run. cocomix | ntp | kd | pause (baselines) | prediction_only | add (the paper's ablations);
    # activation-value selection is cocomix with selection=activation.
    method: Optional[str] = None
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="smollm2_135m"))
    sae: str = "sae_smollm2"  # an SAE directory, or the name of one published in cache_dir/sae by an sae recipe
    insert_layer: int = 1  # the student block before which concepts are predicted and mixed in
    lam: float = 0.1  # lambda: weight of the concept loss
    top: int = 4  # concept labels per token (attribution top-4)
    k: int = 32  # predicted concept logits kept for the compression
    selection: str = "attribution"  # attribution | activation
    labels: str = "online"  # online: teacher forward+backward each step | cached: computed once, before training
    label_batch_size: int = 8  # blocks per teacher pass when building the cache
    concept_position: str = "same"  # RoPE position of c_t: same as h_t | sequential
    kd_alpha: float = 0.5  # kd: (1 - alpha) NTP + alpha T^2 KL
    kd_temperature: float = 1.0
    match_parameters: bool = True  # ntp / kd: widen the student to CoCoMix's parameter count
    steer_tokens: int = 24  # after training: tokens generated for the steering demonstration (0: none)


@dataclass
class LlmxConfig:
    # Which recipe runs, and how `llmx list` describes it. Set by conf/recipe/<name>.yaml.
    name: str = MISSING
    kind: RecipeKind = RecipeKind.pretrain
    paper: str = ""
    description: str = ""
    fits_cpu: bool = True
    cpu_time: str = ""  # wall time of a default run on 2 CPU cores, as measured (and any one-time first-run cost)
    seed: int = 0
    # null: start fresh; auto: newest complete checkpoint of this recipe if any (says so if none);
    # latest: like auto but an error when none exists; else a checkpoint or run directory path.
    resume: Optional[str] = None
    # A resume whose config differs from the checkpoint's outside the resumable settings (run length, logging,
    # evaluation and checkpoint cadence, launcher) is refused with the differences; true continues anyway.
    resume_force: bool = False
    output_root: str = "outputs"
    run_dir: Optional[str] = None  # set at launch to the job's output directory
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)
    cocomix: CoCoMixConfig = field(default_factory=CoCoMixConfig)


# optim.name -> the schema of that optimizer's config (a saved config is re-typed with it on load).
OPTIM_SCHEMAS = {"adamw": OptimConfig, "galore_adamw": GaLoreOptimConfig}


def typed(raw) -> Any:
    """A saved, resolved config (a DictConfig) re-validated against the schema, with the optim node
    typed by its optimizer's own schema."""
    from omegaconf import OmegaConf

    optim_cls = OPTIM_SCHEMAS.get(str(raw.get("optim", {}).get("name", "adamw")), OptimConfig)
    base = OmegaConf.merge(OmegaConf.structured(LlmxConfig), {"optim": OmegaConf.structured(optim_cls)})
    return OmegaConf.merge(base, raw)


# The ConfigStore the schemas were last stored in. Storing converts every dataclass to a structured
# config, a third of the time of each compose(); validate_all() and sweeps compose dozens of times.
_registered_in: Any = None


def register() -> None:
    """Store the schemas in Hydra's ConfigStore: the root (conf/config.yaml extends it) and the subclasses
    that group options extend (idempotent; a no-op when this ConfigStore already has them)."""
    global _registered_in
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    if cs is _registered_in:
        return
    cs.store(name="llmx_schema", node=LlmxConfig)
    # Group options that extend a group's schema start their defaults list with one of these.
    cs.store(group="optim", name="galore_schema", node=GaLoreOptimConfig)
    _registered_in = cs
