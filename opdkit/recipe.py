"""Recipe schema and loading (over 500 lines: the loader's errors walk the schema's own models).

YAML -> a validated recipe of its method, in two stages, no model loaded. One module on purpose:
the error messages name line numbers, "did you mean" and which method owns a key from the schema's
own models, so the two change together.

Stage 1 is the pydantic schema (unknown keys rejected, types checked, cross-field rules such as
"method opd needs teachers and a router"). Stage 2 binds every plug-in's ``params`` against its
builder's signature (:func:`opdkit.registry.check_builder_params`) without calling it.

Every problem becomes one line ``FILE:LINE: key.path: what was expected``; ``--set`` overrides
(``train.lr=3e-4``, ``rewards.0.weight=2``) are applied before validation and typed by the schema,
and problems they cause are reported as ``FILE: --set ARG: key.path: reason`` instead of a file line.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from opdkit.errors import OpdkitError, RecipeError

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # inf and nan are never a setting: refuse them where they are written, not steps later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PluginSpec(_Strict):
    """A plug-in named by registry name, ``module:function`` or ``./file.py:function``."""

    type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(PluginSpec):
    """The policy's base model. ``path`` is passed to the builder as its ``path`` argument."""

    type: str = "shapes"
    path: str | None = None

    def builder_params(self) -> dict[str, Any]:
        return {**self.params, **({"path": self.path} if self.path is not None else {})}


class KeyedValueError(ValueError):
    """A cross-field problem that belongs to one key: ``loc`` is relative to the validated model.

    Pydantic reports a model validator's error at the model itself; the loader appends ``loc`` so
    the message names the offending key (and its YAML line) instead of the whole section.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    return value


class RewardSpec(PluginSpec):
    """One term of the weighted reward R = sum_k weight_k * r_k."""

    weight: float = 1.0
    name: str | None = None  # logging name; defaults to ``type``
    tags: list[str] | None = None  # score only prompts with these task tags (0 for the others)

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, v: float) -> float:
        return _finite(v, "weight")

    @property
    def label(self) -> str:
        return self.name or self.type.rsplit(":", 1)[-1]


class TeacherSpec(PluginSpec):
    """A teacher for one task; ``name`` is what the router maps prompts to."""

    name: str = Field(min_length=1)
    path: str | None = None

    def builder_params(self) -> dict[str, Any]:
        return {**self.params, **({"path": self.path} if self.path is not None else {})}


class RegularizerSpec(PluginSpec):
    weight: float = 0.04

    @field_validator("weight")
    @classmethod
    def _weight_finite(cls, v: float) -> float:
        return _finite(v, "weight")


class PromptsSpec(_Strict):
    """Where prompts come from: a built-in set (``shapes``) or a JSONL/TXT file path."""

    dataset: str | list[str] = "shapes"  # shapes, a named prompt set, a file path, or a list of them
    # shapes only; train-minus-fold: train without the validation fold that `-p split=fold` scores
    split: Literal["train", "test", "train-minus-fold"] = "train"
    tags: list[str] | None = None  # keep only records whose task tag is listed
    tag: str | None = None  # task tag given to records that carry none (plain .txt prompt files)
    limit: int | None = Field(default=None, ge=1)
    balance_tags: bool = False  # draw each step's prompts evenly over the task tags

    @model_validator(mode="after")
    def _split_fits_sources(self) -> PromptsSpec:
        from opdkit.data.sources import prompt_split_problem

        problem = prompt_split_problem(self)
        if problem is not None:
            raise KeyedValueError(("split",), problem)
        return self


class PretrainSamplerSpec(_Strict):
    """What pretraining reads of the sampler: the image side it renders at."""

    resolution: int = Field(default=512, ge=8)


class SamplerSpec(PretrainSamplerSpec):
    """Sampling settings of the on-policy methods. sigma runs from 1 (noise) to 0 (image)."""

    steps: int = Field(default=10, ge=1)
    noise_level: float = Field(default=0.7, gt=0.0)  # 0: no noise, no log-prob (the SDE's std is 0)
    cfg: float = Field(default=4.5, ge=0.0)
    shift: float | None = Field(default=None, gt=0.0)  # None: the model's scheduler shift
    # [start, stop) of the steps that are stochastic and trained on; None: every step. flow_grpo
    # trains steps 0-8 of 10 (timestep_fraction 0.99: the last, lowest-sigma step has huge
    # likelihoods), i.e. [0, 9]; the shapes recipes train [0, 2] or [0, 3] (docs/results/grpo.md)
    train_window: tuple[int, int] | None = None
    # the images of a group start from the same initial noise (DanceGRPO), so the reward
    # differences inside a group come from the trained SDE steps alone
    shared_initial_noise: bool = False
    # the policy's log-prob (score function) sees only the k x k block means of each SDE step's
    # noise; sampling is unchanged. Fewer noise dimensions per image, less variance in the policy
    # gradient (docs/grpo.md). 1: every dimension, as Flow-GRPO.
    logprob_pool: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _window_inside(self) -> SamplerSpec:
        if self.train_window is not None:
            start, stop = self.train_window
            if not 0 <= start < stop <= self.steps:
                raise KeyedValueError(
                    ("train_window",),
                    f"[{start}, {stop}) must satisfy 0 <= start < stop <= steps ({self.steps})",
                )
        return self


class LoraSpec(_Strict):
    rank: int = Field(default=32, ge=1)
    alpha: float = Field(default=64.0, gt=0.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # module-name suffixes to adapt; None: the model family's own (SD3/FLUX/Qwen-Image attention
    # projections, see docs/models.md)
    targets: list[str] | None = None


class EmaSpec(_Strict):
    decay: float = Field(default=0.9, gt=0.0, lt=1.0)
    every: int = Field(default=8, ge=1)
    # decay min(decay, (1 + n) / (10 + n)) over the first optimizer steps n (flow_grpo's warm-up).
    # Off for the LoRA methods: their adapter starts at B = 0, the reference policy itself, so the
    # early average holds no random init to forget
    warmup: bool = False


class PretrainEmaSpec(EmaSpec):
    # on: pretraining starts from random weights, which the first averages must forget
    warmup: bool = True


class TrainSpec(_Strict):
    """Optimisation settings every method has."""

    seed: int = Field(ge=0, lt=2**63)  # required: every recipe names its seed (numpy seeds are >= 0)
    lr: float = Field(default=1e-4, gt=0.0)
    batch_size: int = Field(default=8, ge=1)  # pretrain: images; grpo/opd: prompts (x group_size images)
    max_steps: int = Field(default=100, ge=1)
    max_minutes: float | None = Field(default=None, gt=0.0)
    ema: EmaSpec | None = None
    # bf16/fp16 autocast the forward passes where the device supports it (fp16 with a gradient
    # scaler); master weights and every SDE/log-prob computation stay fp32
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    weight_decay: float = Field(default=1e-4, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    # after warm-up the lr stays constant, or falls to 0 along a cosine at lr_decay_steps (default
    # max_steps). lr_decay_steps > max_steps is "stop early": the run is the first max_steps of
    # the longer schedule, step for step
    lr_decay: Literal["constant", "cosine"] = "constant"
    lr_decay_steps: int | None = Field(default=None, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)  # newest checkpoints kept on disk
    log_every: int = Field(default=1, ge=1)

    @field_validator("lr", "weight_decay")
    @classmethod
    def _finite(cls, v: float) -> float:
        return _finite(v, "value")


class PretrainTrainSpec(TrainSpec):
    """``method: pretrain``: flow matching on rendered pairs, text encoder and transformer."""

    ema: PretrainEmaSpec | None = None
    cond_dropout: float = Field(default=0.1, ge=0.0, le=1.0)  # prompts replaced by "" (for CFG)
    # training sigmas are logit-normal(0, 1) then shifted like the sampling schedule
    # (sigma' = k s / (1 + (k - 1) s)); None uses the model's shift. Without it the high-noise
    # steps where layout is decided are almost never trained (P(sigma > 0.9) ~ 1.4%).
    sigma_shift: float | None = Field(default=None, gt=0.0)
    # how the rendered training images draw object sides (opdkit.shapes.vocab.SIDE_MODES):
    # "random" (small or large per object) or "by_count" (large alone, small in twos and more)
    object_sides: Literal["random", "by_count"] = "random"


class OnPolicyTrainSpec(TrainSpec):
    """What GRPO and OPD share: rollouts of groups, micro-batched PPO-style updates, LoRA."""

    group_size: int = Field(default=8, ge=1)  # images per prompt
    grad_accum: int = Field(default=1, ge=1)  # micro-batches per optimizer update
    micro_batch: int | None = Field(default=None, ge=1)  # images per forward; None: all
    inner_epochs: int = Field(default=1, ge=1)
    lora: LoraSpec | None = None  # None: full fine-tuning
    # recompute the transformer's block activations in the backward pass instead of keeping them
    # (same numbers, less memory, roughly one more forward of time per update)
    gradient_checkpointing: bool = False
    # full fine-tuning over several processes: shard the transformer's weights, gradients and
    # AdamW state (and the frozen reference copy) instead of replicating them. Off: replicas are
    # simplest and fastest while they fit (a LoRA run always fits); one process ignores it
    fsdp: bool = False
    clip_range: float = Field(default=1e-4, gt=0.0)
    adv_clip: float = Field(default=5.0, gt=0.0)
    kl_scaling: Literal["flow_grpo", "exact"] = "flow_grpo"
    # the CFG unconditional branch's velocity carries no gradient in the update. Off: the exact
    # gradient of the guided velocity, as flow_grpo since its 2025-08 "fix cfg gradient detach"
    # (it detached the branch from 2025-07 until then)
    detach_uncond: bool = False
    sample_every: int = Field(default=0, ge=0)  # image grid every N steps; 0: never

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> OnPolicyTrainSpec:
        images = self.batch_size * self.group_size
        if self.micro_batch is not None and images % self.micro_batch:
            raise KeyedValueError(
                ("micro_batch",), f"{self.micro_batch} must divide the {images} images of a step (batch_size x group_size)"
            )
        if self.fsdp and self.lora is not None:
            raise KeyedValueError(("fsdp",), "shards a full fine-tune; remove train.lora (adapters are small: replicate them)")
        if self.fsdp and self.precision == "fp16":
            raise KeyedValueError(
                ("fsdp",), "fp16's gradient scaler would see one shard of the gradients per process; use precision bf16 or fp32"
            )
        return self


class GrpoTrainSpec(OnPolicyTrainSpec):
    """``method: grpo``."""

    adv_std: Literal["group", "batch"] = "batch"
    kl_beta: float = Field(default=0.0, ge=0.0)
    # samples whose advantage is exactly 0 (every image of a group scored alike) leave the loss,
    # policy and KL terms alike, and each micro-batch's mean runs over the rest, as flow_grpo drops
    # them from its batch. Off: they stay, adding their KL term and diluting the mean
    drop_zero_advantage: bool = False

    @field_validator("kl_beta")
    @classmethod
    def _beta_finite(cls, v: float) -> float:
        return _finite(v, "value")


class OpdTrainSpec(OnPolicyTrainSpec):
    """``method: opd``."""

    loss_mode: Literal["kl_only", "mixed", "direct"] = "kl_only"
    detach_kl: bool = True  # the KL used as an advantage carries no gradient of its own
    # kl_only/mixed: the KL advantage from log pi - log pi_teacher at the sampled next state
    # ("sampled": action-dependent, scaled so its expected policy gradient is grad KL) or the
    # analytic KL of the state ("analytic", Flow-OPD's code: detached it has zero expected
    # gradient, so it only teaches with detach_kl: false). See opdkit/methods/opd.py.
    kl_advantage: Literal["sampled", "analytic"] = "sampled"
    adv_std: Literal["group", "batch"] = "batch"  # mixed: the task reward's advantage


class SftSpec(_Strict):
    """OPD cold start by supervised fine-tuning on teacher samples (after the merge, if any).

    Each routed teacher draws ``samples`` images once (its prompts from the recipe's prompt set,
    Euler sampler with the recipe's steps and CFG); the student then takes ``steps`` flow-matching
    steps on them (batches of ``batch_size``, its own AdamW at ``lr``), as pretraining does.
    """

    steps: int = Field(default=100, ge=1)
    samples: int = Field(default=224, ge=1)  # teacher images, drawn once before the steps
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1.0e-3, gt=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    # share of images trained with the empty prompt, so CFG's unconditional branch follows the
    # conditional one (as in pretraining); 0 trains the conditional branch alone
    cond_dropout: float = Field(default=0.1, ge=0.0, le=1.0)


class InitSpec(_Strict):
    """OPD cold start: the student's adapter starts from merged teacher adapters (or one adapter),
    then optionally fine-tunes on teacher samples (``sft``). ``method: none`` skips the merge."""

    method: Literal["mean", "weighted", "ties", "none"] = "mean"  # merged on the weight deltas B @ A
    teachers: list[str] | None = None  # LoRA teachers to merge (default: all of them)
    weights: list[float] | None = None  # for weighted / ties
    density: float = Field(default=0.2, gt=0.0, le=1.0)  # ties: fraction of entries kept
    adapter: str | None = None  # start from this adapter file or run directory instead
    sft: SftSpec | None = None  # then supervised fine-tuning on teacher samples

    @model_validator(mode="after")
    def _does_something(self) -> InitSpec:
        if self.method == "none" and self.sft is None and self.adapter is None:
            raise ValueError("method none merges nothing: add sft (fine-tune on teacher samples) or drop init")
        if self.method == "none" and self.adapter is not None:
            raise ValueError("adapter starts the student from that adapter; it cannot go with method none")
        return self

    @field_validator("weights")
    @classmethod
    def _weights_finite(cls, v: list[float] | None) -> list[float] | None:
        for w in v or []:
            _finite(w, "weight")
        return v


class EvalSpec(_Strict):
    """What `opdkit train` / `distill` evaluate on the final weights (skip with ``--no-eval``),
    into ``<run>/results/step_<N>/``."""

    benchmarks: list[str] = Field(default_factory=list)
    samples_per_prompt: int | None = Field(default=None, ge=1)  # None: the benchmark's own
    limit: int | None = Field(default=None, ge=1)  # only the first K prompts of each benchmark
    # parameters of every benchmark, as `opdkit eval -p`: a probe that chooses a setting scores
    # a validation split ({split: heldout} or {split: fold}), never the test split
    params: dict[str, Any] = Field(default_factory=dict)


class _RecipeBase(_Strict):
    """The sections every method's recipe has."""

    method: str
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)


class PretrainRecipe(_RecipeBase):
    """``method: pretrain``: a shapes-world model from scratch by flow matching on rendered pairs."""

    method: Literal["pretrain"]
    sampler: PretrainSamplerSpec = Field(default_factory=PretrainSamplerSpec)
    train: PretrainTrainSpec


class GrpoRecipe(_RecipeBase):
    """``method: grpo``: Flow-GRPO on the weighted sum of ``rewards``."""

    method: Literal["grpo"]
    rewards: list[RewardSpec] = Field(default_factory=list)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    train: GrpoTrainSpec

    @model_validator(mode="after")
    def _needs_rewards(self) -> GrpoRecipe:
        if not self.rewards:
            raise KeyedValueError(("rewards",), "method grpo needs at least one entry in 'rewards'")
        _check_group_std(self.train)
        return self


class OpdRecipe(_RecipeBase):
    """``method: opd``: Flow-OPD from ``teachers`` routed by ``router``, with ``regularizers``."""

    method: Literal["opd"]
    teachers: list[TeacherSpec] = Field(default_factory=list)
    router: PluginSpec | None = None
    regularizers: list[RegularizerSpec] = Field(default_factory=list)
    init: InitSpec | None = None  # cold start of the student (default: the base, B = 0)
    rewards: list[RewardSpec] = Field(default_factory=list)  # logged, and the task reward of mixed
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    train: OpdTrainSpec

    @model_validator(mode="after")
    def _needs(self) -> OpdRecipe:
        if not self.teachers:
            raise KeyedValueError(("teachers",), "method opd needs at least one entry in 'teachers'")
        if self.router is None:
            raise KeyedValueError(("router",), "method opd needs a 'router' (e.g. router: {type: tag})")
        seen: set[str] = set()
        for i, teacher in enumerate(self.teachers):
            if teacher.name in seen:
                raise KeyedValueError(
                    ("teachers", i, "name"), f"teacher names must be unique, {teacher.name!r} is repeated"
                )
            seen.add(teacher.name)
        if self.train.loss_mode == "mixed" and not self.rewards:
            raise KeyedValueError(("train", "loss_mode"), "mixed needs 'rewards' (the task reward)")
        if self.train.loss_mode == "mixed":
            _check_group_std(self.train)
        if self.init is not None and self.train.lora is None:
            raise KeyedValueError(("init",), "a cold start initialises the student's LoRA adapter; set train.lora")
        return self


def _check_group_std(train: GrpoTrainSpec | OpdTrainSpec) -> None:
    """One image per group has no spread: normalised by its own std, every advantage is +-adv_clip."""
    if train.adv_std == "group" and train.group_size < 2:
        raise KeyedValueError(("train", "adv_std"), "group needs train.group_size >= 2 (one image has no group spread); use batch")


# One schema per method, chosen by the recipe's ``method`` key.
Recipe = Annotated[PretrainRecipe | GrpoRecipe | OpdRecipe, Field(discriminator="method")]
RECIPE_TYPES: dict[str, type[_RecipeBase]] = {"pretrain": PretrainRecipe, "grpo": GrpoRecipe, "opd": OpdRecipe}
AnyRecipe = PretrainRecipe | GrpoRecipe | OpdRecipe
_RECIPE_ADAPTER: TypeAdapter[AnyRecipe] = TypeAdapter(Recipe)


def parse_recipe(data: Any, *, lenient: bool = False) -> AnyRecipe:
    """Validate recipe data against its method's schema (pydantic ``ValidationError`` on failure).

    ``lenient`` first drops keys the method's schema does not know: for reading the resolved
    ``recipe.yaml`` of runs written before each method had a schema of its own (those listed every
    method's keys). Never for recipes a user writes.
    """
    if lenient and isinstance(data, dict) and data.get("method") in RECIPE_TYPES:
        data = _known_keys(data, RECIPE_TYPES[data["method"]])
    return _RECIPE_ADAPTER.validate_python(data)


def _known_keys(data: Any, model: Any) -> Any:
    """``data`` without the keys ``model`` (a pydantic model class) does not declare, recursively."""
    fields = getattr(model, "model_fields", None)
    if fields is None or not isinstance(data, dict):
        return data
    kept = {}
    for key, value in data.items():
        if key not in fields:
            continue
        annotation = fields[key].annotation
        sub = _field_model(annotation)
        if sub is list and isinstance(value, list):
            item = _item_model(annotation)
            kept[key] = [_known_keys(v, item) for v in value]
        else:
            kept[key] = _known_keys(value, sub)
    return kept


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class LoadedRecipe:
    """A validated recipe plus where it came from (for error messages and the run directory)."""

    def __init__(
        self, recipe: AnyRecipe, path: Path, overrides: list[str], where: Callable[[tuple[str | int, ...]], str] | None = None
    ) -> None:
        self.recipe = recipe
        self.path = path
        self.overrides = overrides
        self._where = where

    def where(self, *loc: str | int) -> str:
        """``FILE:LINE: key.path`` of a recipe key (the ``--set`` that gave it, if one did), to
        name in errors found while running, e.g. ``where("rewards", 0)``."""
        key = ".".join(str(p) for p in loc)
        return f"{self._where(loc) if self._where is not None else self.path}: {key}" if key else str(self.path)


def resolve_recipe_path(name: str | Path) -> Path:
    """A file path, or the name of a shipped recipe (``shapes/pretrain`` or ``shapes/pretrain.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    from opdkit.recipes import shipped_recipe

    shipped = shipped_recipe(str(name))
    if shipped is not None:
        return shipped
    raise RecipeError(f"{name}: no such recipe file (nor a shipped recipe of that name; see `opdkit list recipes`)")


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_plugins: bool = True) -> LoadedRecipe:
    """Read, override, and validate a recipe; raise :class:`RecipeError` listing every problem.

    Each problem is one line of the error's message, in the form ``FILE:LINE: key.path: reason``.
    """
    overrides = list(overrides or [])
    path = resolve_recipe_path(path)
    text = _read_text(path)
    data, lines = _parse_yaml(text, path)
    set_paths: dict[tuple[str | int, ...], str] = {}
    for item in overrides:
        try:
            key_path, value = _parse_override(item)
            _apply_override(data, key_path, value, item)
        except RecipeError as exc:  # name the recipe too: `validate` may be given several
            raise RecipeError(f"{path}: {exc}") from None
        set_paths[key_path] = item

    def where(loc: tuple[str | int, ...]) -> str:
        for n in range(len(loc), 0, -1):
            if loc[:n] in set_paths:
                return f"{path}: --set {set_paths[loc[:n]]}"
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                return f"{path}:{lines[loc[:n]]}"
        return str(path)

    try:
        recipe = parse_recipe(data)
    except ValidationError as exc:
        root = RECIPE_TYPES.get(str(data.get("method")), _RecipeBase)
        problems = [_format_pydantic_error(err, where, root) for err in exc.errors()]
        raise RecipeError("\n".join(problems)) from None
    if check_plugins:
        problems = check_recipe_plugins(recipe, where)
        if problems:
            raise RecipeError("\n".join(problems))
    problem = schedule_problem(recipe.train)
    if problem is not None:
        raise RecipeError(f"{where(('train', problem[0]))}: train.{problem[0]}: {problem[1]}")
    given = data.get("train") if isinstance(data.get("train"), dict) else {}
    for key, why in keys_without_effect(recipe.train, set(given)):
        warnings.warn(f"{where(('train', key))}: train.{key} has no effect {why}; remove it", stacklevel=1)
    return LoadedRecipe(recipe, path, overrides, where)


def schedule_problem(train: TrainSpec) -> tuple[str, str] | None:
    """``(key, why)`` where a cosine lr would train steps at lr 0: its end at or before the warm-up's,
    or before ``max_steps`` (a run's recorded recipe is not judged again: only a recipe being loaded)."""
    if train.lr_decay != "cosine":
        return None
    end = train.lr_decay_steps or train.max_steps
    key = "lr_decay_steps" if train.lr_decay_steps is not None else "max_steps"
    if end <= train.warmup_steps < train.max_steps:
        return key, f"the cosine ends at step {end}, within the {train.warmup_steps} warm-up steps: the lr would be 0 after them"
    if end < train.max_steps:
        return key, f"the cosine ends at step {end}, before train.max_steps {train.max_steps}: the steps after it would train at lr 0"
    return None


def keys_without_effect(train: Any, given: set[str]) -> list[tuple[str, str]]:
    """``(key, why)`` for each key of ``given`` (the ``train`` keys a recipe sets) that OPD's
    ``train.loss_mode`` never reads: a setting that seems to act and does not."""
    if not isinstance(train, OpdTrainSpec):
        return []
    mode = f"with train.loss_mode {train.loss_mode}"
    unused = {
        "direct": {"adv_clip": mode, "kl_advantage": mode, "detach_kl": mode, "adv_std": mode},
        "kl_only": {"adv_std": f"{mode} (it normalises the task reward of mixed)"},
        "mixed": {},
    }[train.loss_mode]
    if train.loss_mode != "direct" and train.kl_advantage == "sampled":
        unused["detach_kl"] = "with train.kl_advantage sampled (that advantage carries no gradient to detach)"
    return [(key, why) for key, why in unused.items() if key in given]


def check_recipe_plugins(recipe: AnyRecipe, where: Any = None) -> list[str]:
    """Stage 2: every plug-in resolves and its params bind to its builder's signature."""
    from opdkit.registry import (
        benchmarks,
        check_builder_params,
        models,
        regularizers,
        rewards,
        routers,
        teachers,
    )

    where = where or (lambda loc: "recipe")
    problems: list[str] = []

    def check(registry: Any, spec_type: str, params: dict[str, Any], loc: tuple[str | int, ...]) -> None:
        key = ".".join(str(p) for p in loc)
        try:
            builder = registry.get(spec_type)
        except OpdkitError as exc:
            problems.append(f"{where((*loc, 'type'))}: {key}.type: {exc}")
            return
        try:
            check_builder_params(builder, params, f"{registry.kind} {spec_type!r}")
        except OpdkitError as exc:
            problems.append(f"{where((*loc, 'params'))}: {key}.params: {exc}")

    check(models, recipe.model.type, recipe.model.builder_params(), ("model",))
    from opdkit.models.loading import logprob_pool_problem, resolution_problem

    problem = resolution_problem(recipe.model.type, recipe.model.builder_params(), recipe.sampler.resolution)
    if problem is not None:
        problems.append(f"{where(('sampler', 'resolution'))}: sampler.resolution: {problem}")
    pool = getattr(recipe.sampler, "logprob_pool", 1)
    problem = None if problem is not None else logprob_pool_problem(
        recipe.model.type, recipe.model.builder_params(), recipe.sampler.resolution, pool
    )  # fmt: skip
    if problem is not None:
        problems.append(f"{where(('sampler', 'logprob_pool'))}: sampler.logprob_pool: {problem}")
    for i, spec in enumerate(getattr(recipe, "rewards", [])):
        check(rewards, spec.type, spec.params, ("rewards", i))
    for i, spec in enumerate(getattr(recipe, "teachers", [])):
        check(teachers, spec.type, spec.builder_params(), ("teachers", i))
    if getattr(recipe, "router", None) is not None:
        check(routers, recipe.router.type, recipe.router.params, ("router",))
    for i, spec in enumerate(getattr(recipe, "regularizers", [])):
        check(regularizers, spec.type, spec.params, ("regularizers", i))
    unknown, refused = benchmarks.problems(recipe.eval.benchmarks, recipe.eval.params)
    problems += [f"{where(('eval', 'benchmarks', i))}: eval.benchmarks.{i}: {e}" for i, e in unknown.items()]
    if refused is not None:  # a parameter the benchmarks refuse fails here, not after the training
        problems.append(f"{where(('eval', 'params'))}: eval.params: {refused}")
    from opdkit.data.sources import check_prompt_source

    try:
        check_prompt_source(recipe.prompts)
    except OpdkitError as exc:
        problems.append(f"{where(('prompts', 'dataset'))}: prompts.dataset: {exc}")
    return problems


def dump_recipe(recipe: AnyRecipe) -> str:
    """The resolved recipe as YAML (written into every run directory)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def read_yaml_file(path: Path, what: str = "a recipe") -> tuple[dict[str, Any], dict[tuple[str | int, ...], int]]:
    """A YAML mapping read with ``yaml.safe_load`` (size-checked, duplicate keys refused) and the
    1-based line of every key path, for one-line errors ``FILE:LINE: key.path: ...`` (study files
    use it too; ``what`` names the kind of file in the error for a document that is no mapping)."""
    return _parse_yaml(_read_text(path), path, what)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None


def _parse_yaml(text: str, path: Path, what: str = "a recipe") -> tuple[dict[str, Any], dict[tuple[str | int, ...], int]]:
    """Parse with ``yaml.safe_load`` and record the 1-based line of every key path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_size(node, path)  # before building objects: aliases can expand exponentially
        data = yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to parse; a recipe is a few levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{line}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: {what} must be a YAML mapping of sections, got {type(data).__name__}")
    lines: dict[tuple[str | int, ...], int] = {}

    def walk(n: yaml.Node, loc: tuple[str | int, ...]) -> None:
        lines[loc] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in n.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen and key != "<<":  # safe_load would silently keep the last one
                    shown = ".".join(str(p) for p in (*loc, key))
                    raise RecipeError(f"{path}:{line}: {shown}: duplicate key (first given on line {seen[key]})")
                seen[key] = line
                lines[(*loc, key)] = key_node.start_mark.line + 1
                walk(value_node, (*loc, key))
                lines[(*loc, key)] = key_node.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*loc, i))

    if node is not None:
        walk(node, ())
    return data, lines


# A recipe is a few hundred YAML nodes, a few levels deep; far more is an alias bomb or a mistake.
MAX_YAML_NODES = 20_000
MAX_YAML_DEPTH = 32


def _check_size(root: yaml.Node | None, path: Path) -> None:
    """Refuse YAML whose aliases expand past :data:`MAX_YAML_NODES` nodes or that nests deeper
    than :data:`MAX_YAML_DEPTH`, counting each alias at every place it is used."""
    count = 0
    stack = [(root, 0)] if root is not None else []
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise RecipeError(f"{path}: expands to over {MAX_YAML_NODES:,} YAML nodes (aliases?); a recipe has a few hundred")
        if depth > MAX_YAML_DEPTH:
            raise RecipeError(f"{path}:{node.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in node.value for child in pair)


def _parse_override(item: str) -> tuple[tuple[str | int, ...], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item}: expected KEY.PATH=VALUE, e.g. train.lr=3e-4")
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    if any(p == "" for p in parts):
        raise RecipeError(f"--set {item}: empty component in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return tuple(parts), value


def _apply_override(data: dict[str, Any], key_path: tuple[str | int, ...], value: Any, item: str) -> None:
    """Set ``data[key_path] = value`` after checking the path exists in the schema of the method."""
    model: Any = RECIPE_TYPES.get(str(data.get("method")), _RecipeBase)
    node: Any = data
    for depth, part in enumerate(key_path):
        last = depth == len(key_path) - 1
        shown = ".".join(str(p) for p in key_path[: depth + 1])
        if model is dict:  # free-form params: anything goes below here
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item}: {shown} is not a mapping")
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise RecipeError(f"--set {item}: index {part} out of range in {shown.rsplit('.', 1)[0]} ({size} entries)")
            if last:
                node[part] = value
                return
            node = node[part]  # ``model`` already is the item model of the list walked into
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            known = sorted(fields) if fields else []
            close = difflib.get_close_matches(str(part), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parent = ".".join(str(p) for p in key_path[:depth]) or "the recipe"
            owners = _owner_methods(key_path[: depth + 1])
            if owners:
                raise RecipeError(f"--set {item}: {shown} {_belongs(owners, data.get('method'))}")
            raise RecipeError(f"--set {item}: unknown key {part!r} in {parent}{hint}")
        if not isinstance(node, dict):
            raise RecipeError(f"--set {item}: {shown} has no parent mapping")
        if last:
            node[part] = value
            return
        annotation = fields[part].annotation
        model = _field_model(annotation)
        if model is list:
            node = node.setdefault(part, [])
            model = _item_model(annotation)
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child


def _field_model(annotation: Any) -> Any:
    """The pydantic model (or ``dict``/``list``) an annotation walks into."""
    origin = get_origin(annotation)
    if origin is list:
        return list
    if origin is dict:
        return dict
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional[Model]
        found = _field_model(arg)
        if found is not None and found is not type(None):
            return found
    return None


def _item_model(annotation: Any) -> Any:
    args = get_args(annotation)
    for arg in args:
        if get_origin(arg) is list:
            return _item_model(arg)
    return _field_model(args[0]) if args else None


def _format_pydantic_error(err: Any, where: Any, root: Any) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    if loc and loc[0] in RECIPE_TYPES:  # the discriminated union names the method first
        loc = loc[1:]
    error = (err.get("ctx") or {}).get("error")
    if isinstance(error, KeyedValueError):
        loc = (*loc, *error.loc)
    key = ".".join(str(p) for p in loc) or "(recipe)"
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        parent_loc = loc[:-1]
        model = _model_at(parent_loc, root)
        known = sorted(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        owners = _owner_methods(loc)
        if owners:
            msg = _belongs(owners, getattr(root.model_fields["method"].annotation, "__args__", ["?"])[0])
        else:
            msg = f"unknown key{hint} (allowed: {', '.join(known)})" if known else "unknown key"
    elif kind in ("union_tag_not_found", "union_tag_invalid"):
        key = "method"
        msg = f"expected one of: {', '.join(RECIPE_TYPES)}"
        if kind == "union_tag_invalid":
            msg += f" (got {(err.get('ctx') or {}).get('tag')!r})"
        else:
            msg = f"required key is missing ({msg})"
    elif kind == "missing":
        msg = "required key is missing"
    elif "input" in err and kind not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {err['input']!r})"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{where(loc)}: {key}: {msg}"


def _owner_methods(loc: tuple[str | int, ...]) -> list[str]:
    """The methods whose schema has the key at ``loc`` (for "belongs to method X" errors)."""
    owners = []
    for name, recipe_type in RECIPE_TYPES.items():
        parent = _model_at(loc[:-1], recipe_type)
        if parent is not None and loc and loc[-1] in parent.model_fields:
            owners.append(name)
    return owners


def _belongs(owners: list[str], method: Any) -> str:
    return f"belongs to method {' and '.join(owners)}, not {method} (this recipe's method): remove it"


def _model_at(loc: tuple[str | int, ...], root: Any) -> Any:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        found = _field_model(annotation)
        model = _item_model(annotation) if found is list else found
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
