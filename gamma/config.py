"""One validated configuration for the whole project, read from ``params.yaml``.

Every field has a default that serves the embedded run, so an empty ``params.yaml`` is valid.
A bad value fails here, before any work starts, with the field's dotted name and the value.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SUPPORTED_BITS = (2, 3, 4, 8)
UNQUANTIZED = 16  # a candidate width: the module left at float16 (listed in the export's ignore)
EMBEDDED = "embedded"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(EMBEDDED, description="'embedded' (SmolLM2-135M) or a local HF model directory")
    data_dir: str = Field("data", description="where converted models and prepared text live")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the weights are held in on the host; auto: the checkpoint's torch_dtype")
    device: str = Field("auto", description="where each phase computes, one block at a time: auto (CUDA when "
                                            "present, else CPU), cpu, cuda, cuda:N")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda or cuda:N")
        return v


class TextConfig(_Section):
    source: str = Field(EMBEDDED, description="'embedded' (gensim's Wikipedia sample) or a text file/folder")
    eval_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    split_seed: int = 0
    calibration_sequences: int = Field(32, ge=1)
    sequence_length: int = Field(512, ge=8)
    seed: int = 0


class GPTQConfig(_Section):
    damping: float = Field(0.01, gt=0.0, le=1.0, description="fraction of mean(diag(H)) added to H")
    act_order: bool = False
    block_size: int = Field(128, ge=1)
    sink_weight: float = Field(64.0, gt=0.0, description="weight of position 0 (attention sink) in H")
    token_clip: float = Field(0.0, ge=0.0, description="cap each token's norm in H at this x median; 0 = off")
    clip_search: bool = Field(True, description="search each group's clip (diag(H)-weighted error grid) over min/max")
    sequential: bool = Field(True, description="take each block's Hessians from the quantized prefix")


class QuantizerConfig(_Section):
    method: Literal["rtn", "gptq"] = "rtn"
    group_size: int = Field(64, ge=-1, description="-1 means one group per output row")
    symmetric: bool = False
    gptq: GPTQConfig = GPTQConfig()
    candidate_store: Literal["auto", "held", "rebuilt"] = Field("auto", description=(
        "held: every module's candidates quantized once and held packed on the host (b/8 bytes per weight "
        "per width); rebuilt: quantized again on the device whenever a block needs them, nothing held (RTN "
        "only: GPTQ's come from the calibration Hessians); auto: rebuilt for RTN on a CUDA device, else held"))

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v == 0:
            raise ValueError("group_size must be -1 (per row) or positive, got 0")
        return v

    def store_on(self, device_type: str) -> str:
        """``candidate_store`` resolved for a device type: ``auto`` rebuilds RTN's on CUDA, where
        quantizing a block costs milliseconds and holding 2/3/4-bit candidates costs the host 0.56x
        the bf16 model; on the CPU rebuilding costs time on every Stage I step."""
        if self.candidate_store != "auto":
            return self.candidate_store
        return "rebuilt" if self.method == "rtn" and device_type == "cuda" else "held"

    @model_validator(mode="after")
    def _rebuilt_needs_rtn(self):
        if self.candidate_store == "rebuilt" and self.method != "rtn":
            raise ValueError(f"quantizer.candidate_store='rebuilt' needs a quantizer without Hessians (rtn), not "
                             f"{self.method!r}: its candidates come from the calibration Hessians; use held or auto")
        return self


class VllmConfig(_Section):
    python: str = Field("", description="python of a separate vLLM environment; empty: $GAMMA_VLLM_PYTHON")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when nvidia-smi finds a GPU")
    fallback: Literal["transformers", "fail"] = Field(
        "transformers", description="when vLLM cannot run or cannot load the variant")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="of RAM on vLLM's CPU build")
    timeout_s: int = Field(3600, ge=10)


class EvaluationConfig(_Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm: VllmConfig = VllmConfig()
    context_length: int = Field(512, ge=16)
    max_tokens: int = Field(16384, ge=16, description="evaluation tokens for perplexity")
    zero_shot_tasks: list[str] = ["hellaswag", "piqa", "arc_easy", "winogrande", "lambada"]
    zero_shot_items: int = Field(100, ge=0, description="items per task; 0 skips zero-shot")
    kl_tokens: int = Field(4096, ge=0, description=(
        "tokens (the first evaluation windows) on which the KL divergence from the unquantized model is measured; "
        "0: not measured. Its reference takes windows x context x vocabulary x 2 bytes in <output_dir>/reference"))
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one_window(self) -> EvaluationConfig:
        if self.max_tokens < self.context_length:
            raise ValueError(f"evaluation.max_tokens={self.max_tokens} is below one window of "
                             f"evaluation.context_length={self.context_length}: no perplexity could be measured")
        return self


END_TO_END_LOSSES = ("end_to_end", "next_token")  # Stage I losses taken through the whole model (end_to_end.py)


class Stage1Config(_Section):
    budget: float = Field(3.0, description="training budget B_train in average bits")
    relaxation: Literal["soft", "hard"] = "soft"
    loss: Literal["output", "update", "fisher", "end_to_end", "next_token"] = Field("fisher", description=(
        "teacher-forced block losses (output, update, fisher), or through the whole model, blocks fed "
        "their mixed predecessors' outputs: end_to_end, the final next-token KL from the full-precision "
        "model; next_token, the next-token loss on the calibration text's own tokens (what perplexity measures)"))
    init: Literal["uniform", "proxy"] = "proxy"
    steps: int = Field(100, ge=0, description="Adam steps; 0: the untrained (proxy-initialised) table")
    sequences_per_step: int = Field(2, ge=1)
    tokens_per_sequence: int = Field(256, ge=8, description="loss positions per sequence (from the start); "
                                                          ">= text.sequence_length: the whole sequence")
    lr: float = Field(0.05, gt=0.0)
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature at the start")
    temperature_end: float = Field(1.0, gt=0.0, description="temperature at the last step (geometric schedule)")
    penalty: float = Field(10.0, gt=0.0, description="initial rho of the augmented Lagrangian")
    penalty_growth: float = Field(2.0, ge=1.0)
    penalty_max: float = Field(1000.0, gt=0.0)
    multiplier_interval: int = Field(5, ge=1, description="K: steps between multiplier updates")
    multiplier_init: Literal["zero", "feasible"] = "feasible"
    samples: int = Field(1, ge=1, description="hard: straight-through draws per step (their mean gradient)")
    antithetic: bool = Field(False, description="hard: draws in pairs from Gumbel noise u and 1 - u")
    fisher_weight: Literal["token", "channel"] = Field(
        "token", description="fisher loss: G^2 per token, or per channel averaged over all calibration tokens")
    tolerance: float = Field(0.01, gt=0.0, description="|E - B_train| accepted, in bits")
    proxy_scale: float = Field(0.0, ge=0.0, description="s in alpha=-cost/s; 0 picks it automatically")
    proxy_clip: float = Field(0.0, ge=0.0, description=(
        "proxy init: logits clipped to this many units below each module's best (keeps every candidate's "
        "gradient alive, but a clipped table no longer ranks like the proxy); 0: no clip"))
    checkpoint_every: int = Field(20, ge=1)
    checkpoint_seconds: float = Field(120.0, gt=0.0, description="also checkpoint when this long has passed since "
                                                                 "the last checkpoint (slow steps of a large model)")
    max_host_activations_gb: float = Field(
        16.0, gt=0.0, description="teacher hidden states and gradients beyond this go to memory-mapped files "
                                  "in the run directory instead of host memory")
    seed: int = 0
    processes: int = Field(1, ge=1, description="data-parallel processes (accelerate launch); GPUs when present")
    extra_budgets: list[float] = Field(default_factory=list, description=(
        "more training budgets, one score table each; Stage II projects every budget from the table "
        "learned nearest to it"))

    @model_validator(mode="after")
    def _sampling_needs_hard(self):
        if self.relaxation == "soft" and (self.samples > 1 or self.antithetic):
            raise ValueError(f"stage1.samples={self.samples} / stage1.antithetic={self.antithetic} draw "
                             "straight-through samples: they need stage1.relaxation='hard' (soft has nothing to draw)")
        if self.steps == 0 and self.init != "proxy":
            raise ValueError("stage1.steps=0 keeps the initial table, which only means something with "
                             f"stage1.init='proxy' (got init={self.init!r})")
        if self.antithetic and self.samples % 2:
            raise ValueError(f"stage1.antithetic pairs draws: stage1.samples={self.samples} must be even")
        return self

    @property
    def training_budgets(self) -> list[float]:
        return sorted({self.budget, *self.extra_budgets})


class Stage2Config(_Section):
    budgets: list[float] = Field([2.5, 3.0, 3.5], min_length=1, description=(
        "the budgets to serve, in stage2.unit; text with a unit sets it: 3bit, 95MB, 1.5GiB (B/kB/MB/GB/KiB/MiB/GiB)"))
    unit: Literal["nominal", "effective", "bytes"] = Field("nominal", description=(
        "nominal: average code bits per weight; effective: with scales and zero-points; bytes: the checkpoint's "
        "tensors, everything counted"))
    window: float = Field(0.005, ge=0.0, description="delta: the solution spends at least B - delta bits")
    time_limit: float = Field(60.0, gt=0.0)
    min_bits: dict[str, int] = Field(default_factory=dict, description="module-name substring -> lowest bits allowed")
    solver: Literal["auto", "cbc", "hull"] = Field(
        "auto", description="cbc: exact MIP; hull: LP greedy with proven bound (10^5 items); auto picks by size")

    @model_validator(mode="before")
    @classmethod
    def _budgets_with_units(cls, data):
        """``95MB`` and ``3bit`` read into numbers in one unit, before the numbers are validated."""
        from gamma.stage2.budgets import parse_budgets

        if not isinstance(data, dict) or not isinstance(data.get("budgets"), list) or not data["budgets"]:
            return data
        budgets, unit = parse_budgets(data["budgets"], data.get("unit", "nominal"))
        if "unit" in data and unit != data["unit"]:
            raise ValueError(f"stage2.budgets {data['budgets']} are in {unit} but stage2.unit={data['unit']}")
        return {**data, "budgets": budgets, "unit": unit}


# the allocators that keep allocation units (modules sharing one width) whole
UNIT_KEEPING_ALLOCATORS = ("gamma", "hawq", "uniform")


# the allocators that solve budgets in effective bits and bytes as well as in nominal bits
ANY_UNIT_ALLOCATORS = ("gamma", "hawq")


def check_budget_unit(name: str, unit: str) -> None:
    """Refuse, before any work, an allocator that cannot solve budgets in ``unit``."""
    if unit != "nominal" and name not in ANY_UNIT_ALLOCATORS:
        raise ValueError(f"allocator {name!r} solves budgets in nominal bits only (stage2.unit={unit!r}): use one "
                         f"of {list(ANY_UNIT_ALLOCATORS)} for budgets in {unit}")


def shares_widths(ties: str, experts: str) -> bool:
    """Whether some modules form one allocation unit (settings other than the defaults)."""
    return (ties, experts) != ("none", "per_expert")


def check_keeps_units(name: str, ties: str, experts: str) -> None:
    """Refuse, before any work, an allocator that cannot keep the configured units whole."""
    if name not in UNIT_KEEPING_ALLOCATORS and shares_widths(ties, experts):
        raise ValueError(f"allocator {name!r} does not keep allocation units whole (allocation.ties={ties!r}, "
                         f"allocation.experts={experts!r}): use one of {list(UNIT_KEEPING_ALLOCATORS)}, or "
                         "ties: none and experts: per_expert")


AllocatorName = Literal["gamma", "gamma-blocks", "uniform", "hawq", "higgs", "scalebits", "windquant", "evopress"]


class HiggsConfig(_Section):
    calibration_sequences: int = Field(4, ge=1, description="sequences per noise measurement")
    noise_bits: int = Field(3, description="noise as large as the median relative error of this candidate")
    draws: int = Field(1, ge=1, description="noise draws per module (their mean)")


class ScaleBitsConfig(_Section):
    width: int = Field(0, ge=0, description="columns per block, a multiple of the group size; 0: the group size")
    reorder: bool = Field(True, description="reorder input channels by Fisher sensitivity before cutting blocks")


class GammaBlocksConfig(ScaleBitsConfig):
    """gamma-blocks cuts the same column blocks as ScaleBITS."""


class WindQuantConfig(_Section):
    width: int = Field(0, ge=0, description="columns per chunk, a multiple of the group size; 0: the group size")
    iterations: int = Field(60, ge=1, description="PPO iterations (each a batch of episodes)")
    episodes: int = Field(16, ge=2)
    epochs: int = Field(4, ge=1, description="PPO epochs per batch")
    lr: float = Field(3e-3, gt=0.0)


class EvoPressConfig(_Section):
    generations: int = Field(40, ge=1)
    offspring: int = Field(8, ge=1)
    survivors: int = Field(2, ge=1, description="children rescored on the selection sequences")
    switches: int = Field(2, ge=1, description="level switches per mutation")
    screen_tokens: int = Field(256, ge=8, description="tokens of the cheap first fitness")
    select_sequences: int = Field(4, ge=1, description="calibration sequences of the deciding fitness")


class AllocationConfig(_Section):
    methods: list[AllocatorName] = Field(["gamma"], description=(
        "allocators the pipeline fans out over the budgets (each variant registered with its name)"))
    ties: Literal["none", "fused"] = Field("none", description=(
        "allocation units: none (every module its own) or fused (q/k/v, and gate/up, share one width, "
        "as vLLM's fused layers need)"))
    experts: Literal["per_expert", "per_layer"] = Field("per_expert", description=(
        "mixture-of-experts units: per_expert, or per_layer (every expert of a layer one width, as vLLM's "
        "fused MoE layer needs)"))
    higgs: HiggsConfig = HiggsConfig()
    gamma_blocks: GammaBlocksConfig = Field(GammaBlocksConfig(), description=(
        "gamma-blocks: GAMMA (stage1 settings) with one preference row per column block"))
    scalebits: ScaleBitsConfig = ScaleBitsConfig()
    windquant: WindQuantConfig = WindQuantConfig()
    evopress: EvoPressConfig = EvoPressConfig()

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"allocation.methods must list each allocator once, at least one, got {v}")
        return v

    @model_validator(mode="after")
    def _methods_keep_units(self) -> AllocationConfig:
        for name in self.methods:
            check_keeps_units(name, self.ties, self.experts)
        return self


class TrackingConfig(_Section):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (SQLite file by default, or a server)")
    experiment: str = "gamma"
    artifacts: str = Field("mlartifacts", description="artifact root for a new experiment (local path or URI)")
    model_name: str = Field("", description="registry prefix; empty: the model directory's name")
    log_checkpoints: bool = Field(False, description="also copy each variant's full checkpoint into MLflow")


class PipelineConfig(_Section):
    dvc: bool = Field(True, description="version the prepared data with DVC (repro + push) when in a DVC repo")
    workers: int = Field(1, ge=1, description="budgets solved/quantized/evaluated at once (each uses every core)")
    retries: int = Field(1, ge=0, description="retries of a failed variant task (not for infeasible budgets)")
    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="thread: a pool in this process; dask: a Dask cluster (local, or dask_address)")
    dask_address: str = Field("", description="scheduler of a running Dask cluster, e.g. tcp://head:8786; "
                                              "empty: a local cluster of `workers` processes")


class ScheduleConfig(_Section):
    pipeline_cron: str = Field("0 2 * * 1", description="the whole pipeline (Mondays 02:00)")
    reevaluate_cron: str = Field("0 3 * * *", description="re-evaluation of registered variants (daily 03:00)")

    @field_validator("pipeline_cron", "reevaluate_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {v!r}")
        return v


class ServingConfig(_Section):
    profile: Literal["research", "transformers", "vllm-marlin", "vllm-humming"] = Field("research", description=(
        "the engine the variants are made for: its widths, symmetry, group sizes and allocation units "
        "(gamma/operations/profiles.py); research: everything gamma can represent"))
    from_profile: list[str] = Field([], description=(
        "the settings this run took from the profile because params.yaml and --set left them out "
        "(written by load_config)"))

    @property
    def zero_points(self) -> str:
        """The layout of asymmetric zero-points the profile's loader reads (``packed`` or ``padded``)."""
        from gamma.operations.profiles import PROFILES  # pure data

        return PROFILES[self.profile].zero_points


class GammaConfig(_Section):
    model: ModelConfig = ModelConfig()
    text: TextConfig = TextConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    candidates: list[int] = [2, 3, 4]
    evaluation: EvaluationConfig = EvaluationConfig()
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    allocation: AllocationConfig = AllocationConfig()
    serving: ServingConfig = ServingConfig()
    uniform_bits: list[int] = Field([2, 3, 4], description="uniform baselines evaluated by the main job")
    tracking: TrackingConfig = TrackingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    output_dir: str = "runs"

    @field_validator("candidates", "uniform_bits")
    @classmethod
    def _bits(cls, v: list[int], info) -> list[int]:
        allowed = (*SUPPORTED_BITS, UNQUANTIZED) if info.field_name == "candidates" else SUPPORTED_BITS
        bad = [b for b in v if b not in allowed]
        if bad or (not v and info.field_name == "candidates"):
            raise ValueError(f"bit widths must be among {allowed} (candidates non-empty), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"bit widths must not repeat, got {v}")
        return sorted(v)

    def for_training_budget(self, budget: float) -> GammaConfig:
        """This configuration with Stage I at ``budget`` alone: the settings of one score table."""
        return self.model_copy(update={"stage1": self.stage1.model_copy(update={"budget": budget,
                                                                               "extra_budgets": []})})

    # first: outside its profile, the other checks' complaints (a budget outside the widths) follow from it
    @model_validator(mode="after")
    def _inside_the_serving_profile(self) -> GammaConfig:
        from gamma.operations.profiles import profile_problems  # pure data, no heavy imports

        q, a = self.quantizer, self.allocation
        problems = profile_problems(self.serving.profile, self.candidates, q.symmetric, q.group_size, a.ties,
                                    a.experts)
        if problems:
            raise ValueError(f"serving.profile={self.serving.profile} does not take " + "; ".join(problems)
                             + ". Leave these out of params.yaml and --set to take the profile's own (gamma profiles)")
        return self

    @model_validator(mode="after")
    def _budgets_in_range(self) -> GammaConfig:
        lo, hi = min(self.candidates), max(self.candidates)
        if not lo <= self.stage1.budget <= hi:
            raise ValueError(
                f"stage1.budget={self.stage1.budget} lies outside the candidate range [{lo}, {hi}]"
            )
        outside = [b for b in self.stage1.extra_budgets if not lo <= b <= hi]
        if outside:
            raise ValueError(f"stage1.extra_budgets {outside} lie outside the candidate range [{lo}, {hi}]")
        for name, bits in self.stage2.min_bits.items():
            if bits not in self.candidates:
                raise ValueError(f"stage2.min_bits[{name!r}]={bits} is not a candidate in {self.candidates}")
        return self

    @model_validator(mode="after")
    def _methods_solve_the_unit(self) -> GammaConfig:
        for name in self.allocation.methods:
            check_budget_unit(name, self.stage2.unit)
        return self


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        if not field:  # a check across settings: its message names the values, not the whole input
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def validate_config(data: dict | None) -> GammaConfig:
    """Build a ``GammaConfig`` from plain data, raising ``ConfigError`` that names each bad field."""
    try:
        return GammaConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path = "params.yaml", overrides: dict | None = None) -> GammaConfig:
    """Read ``params.yaml`` (missing file: every default), apply nested ``overrides``, then take what
    both leave out of ``PROFILE_SETTINGS`` from the serving profile (``serving.from_profile`` names it)."""
    path = Path(path)
    data: dict = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parents[:i + 1])} is a value ({node!r}), not a "
                                  "section with settings inside")
        node[leaf] = value
    from gamma.operations.profiles import fill_from_profile  # pure data

    filled = fill_from_profile(data, ServingConfig.model_fields["profile"].default)
    if filled and isinstance(data.get("serving"), dict):
        data["serving"]["from_profile"] = filled
    elif filled and data.get("serving") is None:
        data["serving"] = {"from_profile": filled}
    return validate_config(data)


def parse_overrides(pairs: list[str] | None) -> dict:
    """``--set key=value`` options as ``load_config`` overrides, each value read as YAML (``[2.5]``
    is a list, ``3`` a number); the one parser of the command line and the benchmarks."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {pair!r}: {value!r} is not a valid YAML value") from None
    return out


def command_line(command: str, overrides: dict | None = None, *arguments: str) -> list[str]:
    """``gamma <command> <arguments> --set key=value ...`` for a subprocess, run by this interpreter:
    the one builder of the launcher's and the benchmarks' command lines (values written as JSON,
    which ``parse_overrides`` reads back as YAML)."""
    sets = [a for key, value in (overrides or {}).items() for a in ("--set", f"{key}={json.dumps(value)}")]
    return [sys.executable, "-m", "gamma.cli", command, *arguments, *sets]
