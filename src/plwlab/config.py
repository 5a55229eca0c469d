"""The configs and their one validation layer: the typed Hydra schemas of train.py (:class:`TrainConfig`) and
evaluate.py (:class:`EvaluateConfig`), so ``plw=0`` arrives as a float and typos fail; the choices each value may
take; the checks that turn bad values into one-line :class:`ConfigError` s before any work (:func:`validate_train`,
:func:`validate_evaluate`; the code behind them trusts the values); the resolvers (:func:`register`); and what
derives from a train config, its batch geometry (:func:`batch_geometry`).

Light on purpose: no torch, Lightning, transformers or peft at import, so a sweep's every point and an evaluation
config are checked in milliseconds (peft is imported only to check a config that sets ``model.lora``, torch only to
count GPUs for ``${plwlab.gpus:}``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ConfigTypeError, InterpolationResolutionError, ValidationError

from plwlab import ASSETS, CONF_DIR
from plwlab.data.segments import weight_table
from plwlab.data.sources import CHAT_FORMATS, FORMATS
from plwlab.data.variants import VARIANTS
from plwlab.files import is_folder_name, safe_dirname

# the choices of the config values below; the code that acts on them reads them from here
BATCHING = ("padded", "length_grouped", "packed")  # data.batching (plwlab.data.batching)
NORMALIZATIONS = ("weight_sum", "nonzero", "completion", "share")  # loss.normalization (plwlab.training.loss)
# loss.denominator_scope: over which tokens D is taken, the whole optimizer step (all micro-batches and ranks) or
# each micro-batch
DENOMINATOR_SCOPES = ("step", "micro_batch")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")  # optim.optimizer_impl (plwlab.training.optim)
JUDGE_STYLES = ("alpaca_eval_guanaco", "alpaca_eval_ranking", "pandalm")  # eval.judges.*.style (evaluation.judges)
JUDGE_MODES = ("generate", "logprob")
JUDGE_BACKENDS = ("local", "openai", "alpaca_eval")
ENGINES = ("hf", "openai", "vllm")  # engine.name (plwlab.evaluation.engines)
HALF_DTYPES = ("bfloat16", "float16")
HALF_TRUE_PRECISIONS = ("bf16-true", "16-true")  # Lightning casts every weight to half precision


class ConfigError(ValueError):
    """An invalid configuration value."""


@dataclass
class ModelConfig:  # arguments of plwlab.training.model.load_model
    name: str = MISSING
    tokenizer: str = MISSING
    name_or_path: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    dtype: str = "float32"
    add_pad_token: bool = False
    attn_implementation: Optional[str] = "auto"  # varlen on CUDA, else sdpa (plwlab.training.attention)
    gradient_checkpointing: Any = False  # true | false | auto (off when the memory plan fits without it)
    compile: bool = False  # torch.compile each decoder layer (not yet measured on a GPU: off by default)
    chat_template: Optional[str] = None  # chatml | a .jinja file | a template string (default: the tokenizer's)
    lora: Any = None  # peft.LoraConfig kwargs, e.g. {r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}


@dataclass
class DataConfig:  # arguments of plwlab.data.datamodule.InstructionDataModule (tokenizer and seed come from model and seed)
    path: str = MISSING  # a local .json/.jsonl/.parquet file or an HF hub dataset id
    name: str = "alpaca"
    format: str = "alpaca"  # alpaca | prompt_completion | messages | sharegpt
    split: str = "train"  # of a hub dataset
    columns: Any = None  # plwlab's name -> the dataset's column, e.g. {output: response}
    roles: Any = None  # chat: the dataset's role name -> system | user | assistant
    think_tags: Optional[list[str]] = None  # chat: [open, close] around a reasoning span in assistant turns
    max_length: int = 512
    val_size: float = 0.05
    batch_size: int = 4
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    limit: Optional[int] = None
    empty_completion: str = "keep"
    batching: str = "length_grouped"  # length_grouped | padded (experiment=paper: the paper's) | packed
    on_invalid: str = "error"
    empty_output: str = "keep"  # keep (Stanford: trains on EOS alone) | skip
    duplicates: str = "keep"  # exact repeats: keep (trained on as often as they occur) | drop; never split apart
    variant: str = "as_is"
    target_rg: Optional[float] = None
    cache_dir: Optional[str] = "outputs/data"  # built variants + tokenized data (null: no tokenized cache)
    weight_column: Optional[str] = None  # a numeric column: each example's weight, multiplying its tokens' weights


@dataclass
class LossConfig:  # loss arguments of plwlab.training.module.PLWModule
    # per-segment weights over the plw default (plwlab.data.segments), e.g. {template: 0, earlier_assistant: 0.1}
    segment_weights: Any = None
    completion_weight: float = 1.0  # the completion segments' weight (WIT's λr; plw is its λp)
    normalization: str = "weight_sum"
    denominator_scope: str = "step"
    chunk_tokens: Optional[int] = None  # memory-lean loss: logits computed this many targets at a time


@dataclass
class OptimConfig:  # optimizer arguments of plwlab.training.module.PLWModule (Stanford Alpaca defaults)
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    optimizer_impl: str = "auto"  # auto (fused where supported) | fused | foreach | for_loop


@dataclass
class TrainConfig:
    plw: float = 0.1
    allow_plw_above_one: bool = False
    # sequences (packed rows) per optimizer step over all devices; null = data.batch_size x devices (no
    # accumulation). Gradient accumulation = global_batch_size / (data.batch_size x devices x nodes).
    global_batch_size: Optional[int] = None
    allow_low_precision_weights: bool = False  # let AdamW update bf16/fp16 parameters (no fp32 master weights)
    matmul_precision: Optional[str] = None  # torch.set_float32_matmul_precision: "high" = TF32 on Ampere+
    resume: bool = True  # skip a finished run, resume an interrupted one from checkpoints/last.ckpt
    # resume even though the data file or tokenizer changed since the checkpoint (the run then mixes both)
    allow_data_change: bool = False
    plan_only: bool = False  # with -m: print the sweep plan and stop
    seed: int = 42
    name: str = "plwlab"
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # kwargs of lightning.Trainer
    strategy: dict[str, Any] = field(default_factory=dict)  # {} = "auto", or a _target_ strategy
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> _target_ callback (null disables)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> _target_ logger
    paths: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemorizationConfig:  # eval.memorization: corpus BLEU of greedy generations for training prompts
    n: int = 10000
    max_new_tokens: int = 256


@dataclass
class GenerationsConfig:  # eval.generations.<name>: greedy responses to an instruction set, and their lengths
    instructions: str = MISSING
    limit: Optional[int] = None
    max_new_tokens: int = 512


@dataclass
class TaskConfig:  # eval.lm_eval.tasks.<name>: an lm-eval task, from local files where data is set
    num_fewshot: int = 0
    data: Optional[str] = None
    fewshot_data: Optional[str] = None
    limit: Optional[int] = None  # this task's items (null: lm_eval.limit)


@dataclass
class LmEvalConfig:
    add_bos_token: Optional[bool] = False
    limit: Optional[int] = None
    max_gen_toks: int = 256
    tasks: dict[str, TaskConfig] = field(default_factory=dict)


@dataclass
class JudgeConfig:  # eval.judges.<name>: a pairwise judge of eval.generations.<generations> against reference
    generations: str = MISSING
    reference: Optional[str] = None
    backend: str = "local"
    model: str = "self"
    dtype: Optional[str] = None
    device: Optional[str] = None
    style: str = "alpaca_eval_guanaco"
    mode: str = "generate"
    max_new_tokens: Optional[int] = None
    decoding: Any = None
    randomize_order: bool = True
    order_seed: int = 0
    annotators_config: Optional[str] = None
    base_url: Optional[str] = None  # backend=openai (and alpaca_eval's client): the judge's server, e.g. http://host:8000/v1
    served_model: Optional[str] = None  # the name the server gives the judge (null: `model`, what `vllm serve <model>` uses)
    concurrency: int = 16  # backend=openai: requests in flight
    timeout_s: float = 600.0
    max_retries: int = 6
    api_key_env: str = "OPENAI_API_KEY"


@dataclass
class EngineConfig:  # engine= (conf/engine/): arguments of plwlab.evaluation.engines.make_engine
    name: str = "hf"  # hf (the run's model in this process) | openai (a served model) | vllm (vLLM's offline LLM)
    base_url: Optional[str] = None  # openai: e.g. http://127.0.0.1:8000/v1
    model: Optional[str] = None  # openai: the served name; null = the run's hf_model path; may hold {run_name}
    concurrency: int = 16  # openai: requests in flight
    timeout_s: float = 600.0  # openai: per request
    max_retries: int = 6  # openai: on 408/409/429/5xx and lost connections, exponential backoff (0.5 s to 8 s)
    api_key_env: str = "OPENAI_API_KEY"  # openai: the variable holding the key (read, never logged or written)
    tensor_parallel_size: int = 1  # vllm
    data_parallel_size: int = 1  # vllm (lm-eval's harness tasks)
    gpu_memory_utilization: float = 0.9  # vllm
    max_model_len: Optional[int] = None  # vllm (null: the model's)
    enforce_eager: bool = False  # vllm: no CUDA graphs / torch.compile (starts faster; on CPU, for debugging)


@dataclass
class EvalSuiteConfig:  # the eval= preset (conf/eval/)
    memorization: Optional[MemorizationConfig] = None
    generations: dict[str, GenerationsConfig] = field(default_factory=dict)
    lm_eval: Optional[LmEvalConfig] = None
    judges: dict[str, JudgeConfig] = field(default_factory=dict)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "plwlab"
    group: Optional[str] = None
    offline: bool = False


@dataclass
class EvaluateConfig:  # evaluate.py (conf/evaluate.yaml)
    run_dir: Any = MISSING  # a run folder or a glob over a sweep, or a list of them
    results: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: Any = "auto"  # an int, or auto: generation from the prompts and free memory
    seed: int = 42
    shard: int = 0
    num_shards: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # the eval= preset: an EvalSuiteConfig, kept a plain mapping so a section can be dropped (~eval.judges); its
    # types and keys are checked by validate_evaluate
    eval: dict[str, Any] = field(default_factory=dict)


DTYPES = ("float32", "bfloat16", "float16")


def typed_suite(suite: DictConfig) -> EvalSuiteConfig:
    """The ``eval`` preset typed as :class:`EvalSuiteConfig` (as a DictConfig): an unknown key or a value of the
    wrong type is a one-line :class:`ConfigError` naming it."""
    try:
        return OmegaConf.merge(OmegaConf.structured(EvalSuiteConfig), suite)
    except (ValidationError, ConfigKeyError, ConfigTypeError) as e:
        key = f"eval.{e.full_key}" if getattr(e, "full_key", None) else "eval"
        field_name = str(e.full_key or "").split(".")[-1]
        close = difflib.get_close_matches(field_name, _suite_keys(str(e.full_key or "")), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close and close[0] != field_name else ""
        raise ConfigError(f"{key}: {str(e).strip().splitlines()[0]}{hint}") from None


def _suite_keys(full_key: str) -> list[str]:
    """The keys a section of :class:`EvalSuiteConfig` may have at ``full_key`` (for a did-you-mean)."""
    parts = full_key.split(".")
    section = {"memorization": MemorizationConfig, "generations": GenerationsConfig, "lm_eval": LmEvalConfig,
               "judges": JudgeConfig}.get(parts[0]) if len(parts) > 1 else EvalSuiteConfig  # fmt: skip
    if parts[0] == "lm_eval" and len(parts) > 3:
        section = TaskConfig
    return [f.name for f in dataclasses.fields(section)] if section else []


def validate_evaluate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with a one-line message for an evaluate.py config value that cannot be right,
    before any run is loaded: the shard, the dtypes, sizes, judges' choices and the generations each judge reads."""
    if not 0 <= cfg.shard < cfg.num_shards:
        raise ConfigError(f"shard must be in [0, num_shards={cfg.num_shards}), got {cfg.shard}")
    suite = typed_suite(cfg.eval)
    if cfg.batch_size != "auto" and not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1):
        raise ConfigError(f"batch_size must be auto or an integer >= 1, got {cfg.batch_size!r}")
    for name, generations in suite.generations.items():
        if generations.max_new_tokens < 1:
            raise ConfigError(f"eval.generations.{name}.max_new_tokens must be >= 1, got {generations.max_new_tokens}")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if suite.memorization is not None and suite.memorization.n < 1:
        raise ConfigError(f"eval.memorization.n must be >= 1, got {suite.memorization.n}")
    for name, judge in suite.judges.items():
        key = f"eval.judges.{name}"
        for field_name, allowed in (("backend", JUDGE_BACKENDS), ("style", JUDGE_STYLES), ("mode", JUDGE_MODES)):
            if judge[field_name] not in allowed:
                raise ConfigError(f"{key}.{field_name} must be one of {allowed}, got {judge[field_name]!r}")
        if judge.dtype is not None and judge.dtype not in DTYPES:
            raise ConfigError(f"{key}.dtype must be one of {DTYPES} or null, got {judge.dtype!r}")
        if judge.generations not in suite.generations:
            raise ConfigError(f"{key} compares eval.generations.{judge.generations}, which this preset lacks "
                              f"(it has {sorted(suite.generations) or 'none'})")  # fmt: skip
        if judge.backend == "alpaca_eval" and not judge.annotators_config:
            raise ConfigError(f"{key}.backend=alpaca_eval needs {key}.annotators_config (e.g. guanaco_33b)")
        if judge.backend == "alpaca_eval" and judge.base_url is not None:  # the package's annotator, served
            _check_served(key, judge.base_url, judge.concurrency, judge.timeout_s, judge.max_retries)
        if judge.backend == "openai":
            _check_served(key, judge.base_url, judge.concurrency, judge.timeout_s, judge.max_retries)
            if judge.mode != "generate":
                raise ConfigError(f"{key}.backend=openai judges with mode=generate only (a served model's text), got "
                                  f"mode={judge.mode}")  # fmt: skip
            beams = (judge.decoding or {}).get("num_beams", 1) if judge.decoding is not None else (
                4 if judge.style == "pandalm" else 1)  # fmt: skip
            if beams != 1:
                raise ConfigError(f"{key}.backend=openai decodes greedily: set {key}.decoding={{}} (PandaLM's default "
                                  "is a 4-beam search, which OpenAI-compatible servers do not offer)")  # fmt: skip
    engine = cfg.engine
    if engine.name not in ENGINES:
        raise ConfigError(f"engine.name must be one of {ENGINES}, got {engine.name!r}")
    if engine.name == "openai":
        _check_served("engine", engine.base_url, engine.concurrency, engine.timeout_s, engine.max_retries)
    for name, judge in suite.judges.items():
        if engine.name != "hf" and judge.model == "self" and judge.mode == "logprob":
            raise ConfigError(f"eval.judges.{name}: model=self mode=logprob scores with the run's model in this process; "
                              f"with engine={engine.name} set eval.judges.{name}.mode=generate")  # fmt: skip
    for key in ("tensor_parallel_size", "data_parallel_size"):
        if engine[key] < 1:
            raise ConfigError(f"engine.{key} must be >= 1, got {engine[key]}")


def _check_served(key: str, base_url: str | None, concurrency: int, timeout_s: float, max_retries: int) -> None:
    """The settings of a client of an OpenAI-compatible server (``key`` names the section in messages)."""
    if not base_url or not str(base_url).startswith(("http://", "https://")):
        raise ConfigError(f"{key}.base_url must be the server's http(s) URL, e.g. http://127.0.0.1:8000/v1, got "
                          f"{base_url!r}")  # fmt: skip
    if concurrency < 1 or timeout_s <= 0 or max_retries < 0:
        raise ConfigError(f"{key}: concurrency must be >= 1, timeout_s > 0 and max_retries >= 0, got {concurrency}, "
                          f"{timeout_s} and {max_retries}")  # fmt: skip


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig}  # typed ones
SECTIONS_EVAL = {"engine": EngineConfig, "wandb": WandbConfig, "eval": EvalSuiteConfig}  # (eval: a mapping, checked as this)


def visible_gpus() -> int:
    """CUDA GPUs this process can use (``CUDA_VISIBLE_DEVICES`` applies); 0 on a machine without any."""
    import torch  # only where a config asks (trainer=auto): checking a config needs no torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def register(resolvers: Mapping[str, Callable[..., Any]] | None = None) -> None:
    """Register the schemas (``train_schema``, ``evaluate_schema``) and the resolvers ``${plwlab.asset:NAME}`` (path
    of a bundled asset), ``${plwlab.safe_dirname:TEXT}`` (a flat run-directory name), ``${plwlab.gpus:}``
    (:func:`visible_gpus`) and ``${plwlab.on_gpu:A,B}`` (A on a machine with GPUs, else B: what ``trainer=auto`` is
    made of), plus ``resolvers`` a stage adds (training: ``${plwlab.smollm2:MODEL_DIR}``,
    :data:`plwlab.training.smollm2.RESOLVERS`)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    every = {
        "plwlab.asset": lambda name: str(ASSETS / name),
        "plwlab.safe_dirname": safe_dirname,
        "plwlab.gpus": lambda: visible_gpus(),
        "plwlab.on_gpu": lambda on_gpu, on_cpu: on_gpu if visible_gpus() else on_cpu,
        **(resolvers or {}),
    }
    for name, resolver in every.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def to_dict(node: DictConfig) -> dict[str, Any]:
    """A config node as plain Python containers, interpolations resolved."""
    return OmegaConf.to_container(node, resolve=True)


@dataclass(frozen=True)
class BatchGeometry:
    """How the sequences of one optimizer step are laid out: ``micro_batch`` per process and forward pass, on
    ``devices`` x ``nodes`` processes, over ``accumulation`` micro-batches. Computed once, by :func:`batch_geometry`."""

    micro_batch: int
    devices: int
    nodes: int
    accumulation: int

    @property
    def world_size(self) -> int:
        """Processes: devices x nodes."""
        return self.devices * self.nodes

    @property
    def global_batch(self) -> int:
        """Sequences (packed rows) per optimizer step."""
        return self.micro_batch * self.world_size * self.accumulation


def batch_geometry(cfg: DictConfig) -> BatchGeometry:
    """The run's :class:`BatchGeometry`: ``data.batch_size`` per process, ``trainer.devices`` (a count or a list of
    device ids) x ``trainer.num_nodes`` processes, and the accumulation that makes ``global_batch_size`` (null: no
    accumulation)."""
    devices = cfg.trainer.get("devices", 1)
    count = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else devices
    if not isinstance(count, int) or count < 1:
        raise ConfigError(
            f"trainer.devices={devices} makes the global batch depend on the devices visible; name the count "
            "(e.g. trainer.devices=4)"
        )
    nodes = int(cfg.trainer.get("num_nodes", 1))
    per_step = cfg.data.batch_size * count * nodes
    if cfg.global_batch_size is None:
        return BatchGeometry(cfg.data.batch_size, count, nodes, 1)
    if cfg.global_batch_size < per_step or cfg.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not a positive multiple of data.batch_size {cfg.data.batch_size} x "
            f"{count * nodes} processes = {per_step}"
        )
    return BatchGeometry(cfg.data.batch_size, count, nodes, cfg.global_batch_size // per_step)


def unknown_key(cfg: DictConfig | dict[str, Any], schema: type = TrainConfig, prefix: str = "") -> str | None:
    """The first key of ``cfg`` that its dataclass ``schema`` does not have (keys forced in with ``+key=``), with a
    close match if there is one; None when every key is known. Free-form sections (trainer, callbacks, ...) are
    not checked."""
    fields = {f.name: f.type for f in dataclasses.fields(schema)}
    for key in cfg:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            return f"unknown config key '{prefix}{key}'{hint}"
        section = SECTIONS.get(key)
        if schema is TrainConfig and section is not None and cfg[key] is not None:
            found = unknown_key(cfg[key], section, f"{key}.")
            if found:
                return found
    return None


def unknown_override(overrides: list[str], schema: type) -> str | None:
    """The first command-line override that sets a key the config does not have, without ``+`` (``plww=0.1``), as
    one line with a close match: Hydra's own message is six lines and no suggestion. Keys of config ``groups``
    (``model=...``, the folders of ``conf/``), of free-form sections (``trainer.*``), of Hydra and forced ones (``+``,
    ``~``) pass."""
    groups = {d.name for d in CONF_DIR.iterdir() if d.is_dir()}
    sections = {f.name: f.type for f in dataclasses.fields(schema)}
    for override in overrides:
        if override.startswith(("-", "+", "~")) or "=" not in override:
            continue
        key = override.split("=", 1)[0]
        if "@" in key or "/" in key or key.startswith("hydra") or key in groups:
            continue
        top, _, rest = key.partition(".")
        problem = unknown_key({top: None}, schema) if top not in sections else None
        section = SECTIONS.get(top) if schema is TrainConfig else SECTIONS_EVAL.get(top)
        if problem is None and section is not None and rest:
            problem = unknown_key({rest.split(".")[0]: None}, section, f"{top}.")
        if problem:
            return f"{problem} in {override}; the schema is plwlab.config.{schema.__name__}"
    return None


NAME_LIMIT = 200  # characters of a folder name plwlab makes (plwlab.files.safe_dirname); file systems allow 255 bytes


def check_name(name: Any, key: str = "name") -> None:
    """Refuse a name that would not stay one folder inside its root (``..``, ``a/b``, an absolute path, empty) or
    that is longer than a folder name may be (:data:`NAME_LIMIT`)."""
    if len(str(name)) > NAME_LIMIT:
        raise ConfigError(f"{key} is {len(str(name))} characters long; a folder name may have at most {NAME_LIMIT}: "
                          f"shorten it ({key}={str(name)[:40]}...)")  # fmt: skip
    if not is_folder_name(str(name)):
        raise ConfigError(f"{key}={name!r} must be a plain folder name (letters, digits and ._=,+-): it names a folder "
                          "inside paths.output_dir")  # fmt: skip


def validate_train(cfg: DictConfig) -> BatchGeometry:
    """Raise :class:`ConfigError` with a one-line message for a train config value that cannot be right; return the
    batch geometry. Loads no weights (``model=smollm2`` converts its model once, in its resolver): a sweep checks every
    point with it before the first trains."""
    problem = unknown_key(cfg)
    if problem:
        raise ConfigError(f"{problem}; the schema is plwlab.config.TrainConfig")
    check_name(cfg.name)
    try:  # the model's paths may come from a resolver (model=smollm2 converts its model there)
        OmegaConf.to_container(cfg.model, resolve=True)
    except InterpolationResolutionError as e:
        raise ConfigError(str(e).splitlines()[0].split(" raised while resolving interpolation: ")[-1]) from None
    if not str(cfg.data.path or "").strip():
        raise ConfigError("data.path is empty: name a .json/.jsonl/.parquet file or a hub dataset id")
    for key in ("max_steps", "max_epochs"):
        if cfg.trainer.get(key) == 0:
            raise ConfigError(f"trainer.{key}=0 would train nothing; use a positive number (-1/null: no limit)")
    if not (isinstance(cfg.optim.lr, (int, float)) and math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0):
        raise ConfigError(f"optim.lr must be a finite number > 0, got {cfg.optim.lr}")
    if cfg.model.lora:
        check_lora(cfg.model.lora)
    if not (isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32):
        raise ConfigError(f"seed must be an integer in [0, 2^32), got {cfg.seed}")
    if not math.isfinite(cfg.plw):
        raise ConfigError(f"plw must be a finite number, got {cfg.plw}")
    if cfg.plw < 0:
        raise ConfigError(f"plw must be >= 0, got {cfg.plw}")
    if cfg.plw > 1 and not cfg.allow_plw_above_one:
        raise ConfigError(f"plw={cfg.plw} > 1 up-weights prompts over completions; set allow_plw_above_one=true if meant")
    if cfg.loss.normalization not in NORMALIZATIONS:
        raise ConfigError(f"loss.normalization must be one of {NORMALIZATIONS}, got {cfg.loss.normalization!r}")
    if cfg.loss.denominator_scope not in DENOMINATOR_SCOPES:
        raise ConfigError(f"loss.denominator_scope must be one of {DENOMINATOR_SCOPES}, got {cfg.loss.denominator_scope!r}")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 (a token and its successor), got {cfg.data.max_length}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if cfg.data.format not in FORMATS:
        raise ConfigError(f"data.format must be one of {FORMATS}, got {cfg.data.format!r}")
    if cfg.data.think_tags is not None and (len(cfg.data.think_tags) != 2 or cfg.data.format not in CHAT_FORMATS):
        raise ConfigError(f"data.think_tags must be [open, close] on chat data (format messages or sharegpt), got "
                          f"{list(cfg.data.think_tags)} with format {cfg.data.format}")  # fmt: skip
    try:
        weight_table(cfg.plw, cfg.loss.segment_weights, cfg.loss.completion_weight)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.get("weight_column") and (cfg.data.on_invalid != "error" or cfg.data.empty_output != "keep"
                                          or cfg.data.variant != "as_is"):  # fmt: skip
        raise ConfigError("data.weight_column needs every row to become one example (data.on_invalid=error, "
                          f"data.empty_output=keep, data.variant=as_is), got on_invalid={cfg.data.on_invalid}, "
                          f"empty_output={cfg.data.empty_output}, variant={cfg.data.variant}")  # fmt: skip
    if cfg.data.variant not in VARIANTS:
        raise ConfigError(f"data.variant must be one of {VARIANTS}, got {cfg.data.variant!r}")
    if cfg.data.variant == "rg_target" and not (cfg.data.target_rg or 0) > 0:
        raise ConfigError(f"data.variant=rg_target needs data.target_rg > 0, got {cfg.data.target_rg}")
    if cfg.data.batching not in BATCHING:
        raise ConfigError(f"data.batching must be one of {BATCHING}, got {cfg.data.batching!r}")
    for key, allowed in (("empty_completion", ("keep", "drop", "error")), ("on_invalid", ("error", "skip")),
                         ("empty_output", ("keep", "skip")), ("duplicates", ("keep", "drop"))):  # fmt: skip
        if cfg.data[key] not in allowed:
            raise ConfigError(f"data.{key} must be one of {allowed}, got {cfg.data[key]!r}")
    if cfg.optim.optimizer_impl not in OPTIMIZER_IMPLS:
        raise ConfigError(f"optim.optimizer_impl must be one of {OPTIMIZER_IMPLS}, got {cfg.optim.optimizer_impl!r}")
    if not 0 <= cfg.data.val_size:
        raise ConfigError(f"data.val_size must be a fraction in [0, 1) or a count, got {cfg.data.val_size}")
    if "accumulate_grad_batches" in cfg.trainer:
        raise ConfigError("trainer.accumulate_grad_batches is derived: set global_batch_size (= data.batch_size x "
                          "accumulation x devices x nodes) instead")  # fmt: skip
    check_master_weights(cfg)
    return batch_geometry(cfg)


def check_lora(lora: DictConfig) -> None:
    """Refuse ``model.lora`` keys that are no ``peft.LoraConfig`` argument (with a close match) and values peft
    refuses, or a rank that is not a positive integer (peft checks that only when it builds the layers)."""
    from peft import LoraConfig  # peft (and torch under it) only for a config that sets model.lora

    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for key in lora:
        if key not in lora_fields:
            close = difflib.get_close_matches(str(key), sorted(lora_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"model.lora.{key} is not a peft.LoraConfig argument{hint}")
    values = OmegaConf.to_container(lora, resolve=True)
    try:
        rank = LoraConfig(task_type="CAUSAL_LM", **values).r
        if not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"r must be a positive integer, got {rank}")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.lora={values}: {str(e).strip().splitlines()[0]}") from None


def check_master_weights(cfg: DictConfig) -> None:
    """Refuse a config that would make AdamW update bf16/fp16 parameters, unless ``allow_low_precision_weights``."""
    if cfg.allow_low_precision_weights:
        return
    if cfg.model.dtype in HALF_DTYPES and not cfg.model.lora:
        setting, dtype = f"model.dtype={cfg.model.dtype}", cfg.model.dtype
    elif str(cfg.trainer.get("precision")) in HALF_TRUE_PRECISIONS:
        setting, dtype = f"trainer.precision={cfg.trainer.precision}", cfg.trainer.precision.removesuffix("-true")
    else:
        return
    raise ConfigError(
        f"{setting} makes AdamW update {dtype} weights (most lr 2e-5 updates round away); keep fp32 master weights "
        "(model.dtype=float32 with trainer.precision=bf16-mixed) or set allow_low_precision_weights=true"
    )
