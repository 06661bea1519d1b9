"""The search spec: one YAML file, validated with pydantic before any work starts.

Every section forbids unknown keys so that a typo is an error naming the key, not a silently
ignored setting.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoprune.errors import AutopruneError

STRATEGIES = ("optuna", "uniform", "global", "lamp", "netadapt", "random")
SAMPLERS = ("tpe", "nsga2", "gp", "random")
CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random", "obd", "apoz", "fpgm")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Section):
    factory: str = Field(description="package.module:callable returning an nn.Module")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    input_shape: list[int] | None = Field(None, description="per-sample input shape, e.g. [1, 40]; optional: the example "
                                          "input for tracing, costs and latency comes from a real batch of the data")

    @field_validator("factory")
    @classmethod
    def _factory_path(cls, v: str) -> str:
        if ":" not in v or not all(v.split(":", 1)):
            raise ValueError(f"{v!r} is not of the form 'package.module:callable'")
        return v

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(d <= 0 for d in v)):
            raise ValueError(f"must be a non-empty list of positive integers, got {v}")
        return v


class DataSpec(_Section):
    factory: str = "autoprune.model.data:mnist1d"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(128, gt=0)

    _factory_path = field_validator("factory")(ModelSpec._factory_path.__func__)  # type: ignore[attr-defined]


TASK_KINDS = ("classification", "regression", "distillation", "language_modeling", "model_loss")


class TaskSpec(_Section):
    """What is scored and what fine-tuning minimises (see autoprune.model.task)."""

    kind: Literal[TASK_KINDS] = "classification"  # type: ignore[valid-type]
    factory: str | None = Field(None, description="package.module:callable returning an autoprune.model.task.Task (custom task)")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    output: str = Field("auto", description="the output field to score: auto | logits | last_hidden_state | "
                        "pooler_output | pooled (mean over attention_mask; distillation) | a dict key")
    loss: str | None = Field(None, description="distillation loss: kl | mse | cosine (default by output)")
    metric: str | None = Field(None, description="distillation metric: cosine | agreement (default by output); "
                               "language_modeling: neg_nll (default) | token_accuracy")
    temperature: float = Field(1.0, gt=0)

    @field_validator("factory")
    @classmethod
    def _factory_path(cls, v: str | None) -> str | None:
        return None if v is None else ModelSpec._factory_path.__func__(cls, v)  # type: ignore[attr-defined]


class TrainSpec(_Section):
    epochs: int = Field(20, ge=0)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    sparsity_l1: float = Field(0.0, ge=0, description="L1 penalty on BN scales (Network Slimming)")


class PruningSpec(_Section):
    mode: Literal["structured", "unstructured"] = "structured"
    criterion: Literal[CRITERIA] = "l2"  # type: ignore[valid-type]
    ignore: list[str] = Field(default_factory=list)
    round_to: int = Field(1, ge=1)
    max_ratio: float = Field(0.9, gt=0, lt=1)
    attention_heads: Literal["auto", "key_value", "query"] = Field(
        "auto", description="what a grouped-query attention loses: whole key/value heads with their query heads "
        "('key_value'), or query heads, as many from each key/value head ('query'); 'auto': query heads where a "
        "layer has more query heads per key/value head than key/value heads (finer steps), else key/value heads")


class BudgetSpec(_Section):
    macs: float | None = Field(None, description="fraction of the unpruned model's MACs, in (0, 1)")
    params: float | None = Field(None, description="fraction of the unpruned model's parameters, in (0, 1)")
    latency_ms: float | None = Field(None, gt=0, description="absolute limit in ms on `device`")
    latency: float | None = Field(None, description="fraction of the unpruned model's latency, measured on `device` "
                                  "when the search starts (robust to a machine that is faster or slower today)")
    device: str = "cpu"
    batch_size: int = Field(1, gt=0)
    threads: int | None = Field(1, gt=0)

    @field_validator("macs", "params", "latency")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(f"must be a fraction strictly between 0 and 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "BudgetSpec":
        named = [k for k in ("macs", "params", "latency_ms", "latency") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(
                f"give exactly one of macs, params, latency_ms, latency (got {named or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("macs", "params", "latency_ms", "latency") if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


class SearchSpec(_Section):
    strategy: Literal[STRATEGIES] = "optuna"  # type: ignore[valid-type]
    sampler: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    objectives: list[Literal["accuracy", "metric", "macs", "params", "latency"]] = Field(
        default_factory=lambda: ["accuracy"]
    )
    n_trials: int = Field(60, gt=0)
    priors: Literal["auto", "sensitivity", "none"] = Field(
        "auto", description="sensitivity: sweep each group before the search for its bound and the "
        "sensitivity-greedy warm start; none: no sweep, every group in [0, max_ratio]; auto (the default): "
        "sensitivity, unless timeout_s is set, the sweep is not cached, and it would take more than 2/3 of "
        "the time left (its evaluations at most x one evaluation of the unpruned model, timed)")
    budget_mode: Literal["projection", "constraint"] | None = Field(
        None, description="projection (default for one objective) or constraint (default for several)"
    )
    tolerance: float = Field(0.05, gt=0, description="sensitivity drop that bounds a group's ratio")
    storage: str | None = None
    seed: int = 0
    backend: Literal["optuna", "ray"] = "optuna"
    cpus_per_trial: float = Field(1, gt=0)
    gpus_per_trial: float = Field(0, ge=0)
    max_concurrent_trials: int = Field(1, gt=0)
    ray_address: str | None = None
    ray_runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env for the trials, e.g. {working_dir: ., pip: [...]}; merged over the "
        "py_modules autoprune ships itself on a cluster (the user's keys win)")
    netadapt_step: float = Field(0.1, gt=0, lt=1, description="cost cut per NetAdapt step, fraction of the unpruned cost")
    rerank_top_k: int = Field(0, ge=0, description="re-rank the k best trials, plus the uniform, global and LAMP "
                              "plans (enqueued as warm starts), by val after a short fine-tune before picking the best; 0: off")
    rerank_steps: int = Field(50, gt=0, description="fine-tune steps of each re-ranked candidate")
    recovery_rungs: list[int] = Field(
        default_factory=list, description="multi-fidelity search: fine-tune steps of each rung after the proxy "
        "(e.g. [50, 200]); successive halving (Optuna's pruner; Ray Tune's ASHA on the ray backend) promotes "
        "the best 1/rung_reduction of a rung to the next; a trial's metric is the one after its last rung; []: one fidelity (the proxy)")
    centre: Literal["none", "lamp"] = Field(
        "none", description="none: each trial proposes a pruning ratio per group; lamp: it proposes, per group, a "
        "multiple (1/centre_span to centre_span) of the LAMP plan's kept width, all scaled by one factor onto the "
        "budget (the search explores shapes around LAMP's); optuna strategy, one objective")
    centre_span: float = Field(2.0, gt=1.0, description="how far a centred search may move a group's width from "
                               "the reference plan's, as a factor either way")
    rung_reduction: int = Field(3, ge=2, description="successive halving's reduction factor")
    recovery_lr: float | None = Field(None, gt=0, description="learning rate of every recovery fine-tune: the "
                                      "rungs' and `autoprune finetune`'s (default train.lr / 10)")
    score: Literal["auto", "metric", "loss", "balanced"] = Field(
        "auto", description="what a trial's plan is ranked by, on val after the proxy's BN recalibration: metric (the "
        "task's metric), loss (minus the task's loss, from the same forward pass: smoother than a count of right "
        "answers), balanced (the metric plus balance_weight x the pruned model's width balance: minus the "
        "coefficient of variation of its convolutions' output widths, 0 for a model with fewer than two "
        "convolutions), or auto (the default): balanced for the optuna strategy with one objective and no "
        "recovery_rungs, the metric otherwise. Every trial records its metric, which the results report. loss and "
        "balanced: single objective, no recovery_rungs")
    balance_weight: float = Field(0.2, gt=0, description="under score: balanced (and auto), the weight of the width "
                                  "balance added to the metric")
    timeout_s: float | None = Field(None, gt=0, description="wall-time limit of the whole search, sensitivity "
                                    "sweep included: no trial starts once it has passed (n_trials stays the maximum; "
                                    "at least one trial runs; optuna and random strategies, both backends); None: none")

    @field_validator("recovery_rungs")
    @classmethod
    def _rungs(cls, v: list[int]) -> list[int]:
        if any(s <= 0 for s in v) or v != sorted(set(v)):
            raise ValueError(f"recovery_rungs must be increasing positive step counts, e.g. [50, 200]; got {v}")
        return v

    @model_validator(mode="after")
    def _rungs_backend(self) -> "SearchSpec":
        if self.recovery_rungs and len(self.objectives) > 1:
            raise ValueError("recovery_rungs (multi-fidelity) needs one objective; got " + str(self.objectives))
        if self.score not in ("metric", "auto") and (len(self.objectives) > 1 or self.recovery_rungs):
            raise ValueError(f"search.score: {self.score} ranks single-objective searches without recovery_rungs (a "
                             "Pareto front and the rungs compare plans by the metric); set score: metric")
        return self

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        if not v or v[0] not in ("accuracy", "metric"):
            raise ValueError("the first objective must be 'accuracy' (or 'metric'); e.g. [accuracy, macs]")
        if len(set(v)) != len(v):
            raise ValueError(f"objectives repeat: {v}")
        return v


class EvaluationSpec(_Section):
    calibration_batches: int = Field(20, ge=0)
    finetune_steps: int = Field(0, ge=0)
    finetune_lr: float | None = Field(None, gt=0)
    metric: str = "accuracy"
    max_val_samples: int | None = Field(None, gt=0)
    device: str = "cpu"
    reconstruct: bool = False
    recovery_distill: float = Field(
        0.0, ge=0, description="weight of knowledge distillation from the unpruned model (KL divergence of the "
        "softened outputs) added to the task's loss in every recovery fine-tune (multi-fidelity rungs, "
        "`autoprune finetune`); 0: the task's loss alone; a distillation task is distilled already and ignores it")


DEFAULT_SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)


class SensitivitySpec(_Section):
    # three ratios, not nine: on the peer benchmark (ResNet-20 at 50/30/15 %, MobileNetV2 at 50/30 % MACs, 3 seeds)
    # the searched plans were as good after recovery (within the seed spread) at half the search's wall time
    ratios: list[float] = Field(default_factory=lambda: list(DEFAULT_SENSITIVITY_RATIOS), description="pruning "
                                "ratios each group is evaluated at, alone, before the search (bounds and warm starts)")
    stop_drop: float = Field(0.5, gt=0, description="stop a group's sweep once the drop exceeds this")
    # off by default: it halves ResNeXt-20's sweep, but the sensitivity-greedy warm start needs the smaller ratios'
    # drops to spread its cuts (all-MiniLM-L6-v2 at 60 % MACs: its plan's proxy 0.830 instead of 0.858)
    skip_insensitive: bool = Field(False, description="evaluate each group at its largest ratio first and skip its "
                                   "smaller ratios when its drop there is within search.tolerance (an insensitive "
                                   "group keeps max_ratio as its bound either way); a cheaper sweep and a coarser "
                                   "sensitivity-greedy warm start")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r < 1 for r in v):
            raise ValueError(f"ratios must be in (0, 1), got {v}")
        return sorted(set(v))


class Spec(_Section):
    name: str
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    task: TaskSpec = Field(default_factory=TaskSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    budget: BudgetSpec
    search: SearchSpec = Field(default_factory=SearchSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    sensitivity: SensitivitySpec = Field(default_factory=SensitivitySpec)
    output: str = "runs"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"{v!r} must start with a letter or digit and use only letters, digits, '_', '-', '.' "
                "(it names the run directory)"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Spec":
        if self.pruning.mode == "unstructured" and self.budget.kind != "params":
            raise ValueError(
                "unstructured pruning keeps dense MACs and latency; use budget: {params: ...} with it"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output) / self.name

    @property
    def recovery_lr(self) -> float:
        """The learning rate of a recovery fine-tune (rungs, `autoprune finetune`): search.recovery_lr, else
        1/10 of the training lr (common practice for fine-tuning a model trained at train.lr)."""
        return self.search.recovery_lr or self.train.lr / 10


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    """One line per problem: the dotted key, what is wrong, and the value given."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for key 'a.b' (sections created as needed): what `--set a.b=...` does."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise AutopruneError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


# the spec a search ran with, written into its run directory, so that a run directory stands for its spec
SPEC_FILE = "spec.json"


def _run_spec(run_dir: Path, overrides: dict[str, Any] | None) -> Spec:
    """The spec a search wrote into `run_dir` (`SPEC_FILE`), with its output set to where the directory is now (a
    run directory read from elsewhere, or moved, is still itself)."""
    path = run_dir / SPEC_FILE
    if not path.is_file():
        raise AutopruneError(f"{str(run_dir)!r} is a directory without {SPEC_FILE} (a search writes it there): give "
                             "the spec file (YAML or JSON) of the run instead")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise AutopruneError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("name") == run_dir.name:
        data["output"] = str(run_dir.parent)
    return load_spec(data, overrides)


def load_spec(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Spec:
    """Read a spec from a YAML/JSON path, a run directory (the spec its search ran with), a YAML string or a dict;
    apply dotted-key overrides."""
    if isinstance(source, dict):
        data = dict(source)
        where = "spec"
    else:
        text = None
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        if path is not None:
            if not path.exists():
                raise AutopruneError(f"spec file {str(path)!r} does not exist")
            if path.is_dir():
                return _run_spec(path, overrides)
            text = path.read_text()
            where = f"spec {path}"
        else:
            text = str(source)
            where = "spec"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise AutopruneError(f"{where} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise AutopruneError(f"{where} must be a mapping of keys (name, model, budget, ...), got {type(data).__name__}")
    import copy

    data = copy.deepcopy(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            set_dotted(data, k, v)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise AutopruneError(format_validation_error(e, where)) from None
