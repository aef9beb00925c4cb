"""`SRPOConfig`: GRPOConfig plus the routing, self-teacher and distillation knobs of method §2-§8."""

import math
import numbers
import warnings
from dataclasses import MISSING, dataclass, field, fields

import numpy
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import GRPOConfig

from .compat import adopt_activation_checkpointing_name
from .routing import ROUTING_MODES
from .teacher import TEACHER_KINDS


@dataclass
class SRPOConfig(GRPOConfig):
    r"""
    Configuration class for the [`SRPOTrainer`], Sample-Routed Policy Optimization
    ([arXiv 2604.02288](https://huggingface.co/papers/2604.02288)).

    Only the SRPO parameters are listed; every [`~trl.GRPOConfig`] parameter works as in GRPO, every `loss_type`
    included: the distillation term joins GRPO's per-token loss and is reduced with it (method §12). Defaults that differ
    from `GRPOConfig`'s follow the paper (Table 3): `learning_rate=5e-6`, `scale_rewards="none"`,
    `epsilon_high=0.28`, and token-level truncated vLLM importance sampling capped at 2
    (`vllm_importance_sampling_mode="token_truncate"`, `vllm_importance_sampling_clip_max=2.0`). `bf16` left unset
    is on where a GPU supports it, as in GRPO, and off (fp32) on a machine without one, where GRPO refuses it.

    Parameters:
        > Parameters that control routing

        routing (`str`, *optional*, defaults to `"srpo"`):
            How rollouts are trained. `"srpo"`: correct rollouts, and failed ones with no correct sibling, get GRPO's
            advantage; failed rollouts with a correct sibling are self-distilled. `"grpo"`: everything on GRPO, no
            teacher is built (equals [`~trl.GRPOTrainer`]). `"sdpo"`: every rollout with a correct sibling is
            self-distilled, the rest contribute no loss (the SDPO baseline). `"advantage_mix"`: every rollout on the
            GRPO surrogate with the token-level advantage `λ A_i + (1-λ)(log q_t(y_t) - log π_old(y_t))`.
        success_reward_threshold (`float`, *optional*, defaults to `1.0`):
            A rollout is correct iff its (weighted) reward is at least this value.

        > Parameters that control the self-teacher

        teacher_model_kind (`str`, *optional*, defaults to `"ema"`):
            Which model is the teacher (method §4), named as TRL's SDPO names them. `"ema"`: the paper's EMA of the
            student. `"base"`: the initial student, frozen (with PEFT, the base model with the adapters disabled,
            or a frozen copy of an adapter that does not start as the identity).
            `"live"`: the current student itself, no copy (with PEFT, the student's adapter). `"trust_region"`: after
            lasgroup/SDPO's trust-region teacher, the weights `(1-η) θ_0 + η θ` between the initial student `θ_0` and
            the current one, at `η = teacher_update_rate` (lasgroup mixes the two models' logits; here their weights,
            so that the teacher stays one model and one pass).
        teacher_update_rate (`float`, *optional*, defaults to `0.05`):
            EMA rate `η` of the self-teacher, `θ_T <- (1-η) θ_T + η θ`, applied after every optimizer step and
            accumulated in float32; for `teacher_model_kind="trust_region"` the share `η` of the current student.
        max_teacher_prompt_length (`int`, *optional*, defaults to `10240`):
            Teacher prompts longer than this (in tokens) are shortened by cutting the middle of the demonstration;
            the question and the closing instruction are never cut.
        teacher_feedback (`bool`, *optional*, defaults to `False`):
            Also show the teacher the reward's feedback on the rollout being distilled, after the correct solution
            (`"\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"`). A reward
            function provides it through TRL's `log_extra` argument, `log_extra("feedback", texts)` with one string
            (or `None`) per completion. Off by default: feedback can leak the answer.
        distill_without_sibling (`bool`, *optional*, defaults to `False`):
            Beyond the paper (HDPO, [arXiv 2603.23871](https://huggingface.co/papers/2603.23871)): a failed rollout of
            an all-failed group whose dataset row has a `privileged_context` (a reference solution, environment
            feedback; shown to the teacher whenever the column is present) is distilled from that context alone
            instead of falling back to GRPO. Needs a routing that distils failed rollouts (`"srpo"`, `"sdpo"`).

        > Parameters that control self-distillation

        distillation_topk (`int`, *optional*, defaults to `100`):
            Size of the student's top-k support the divergence is computed on (plus one tail bucket).
        distillation_alpha (`float`, *optional*, defaults to `0.5`):
            Interpolation `α` of the generalised Jensen-Shannon divergence; `0.0` is `KL(teacher || student)`,
            `1.0` is `KL(student || teacher)`.
        distillation_is_clip (`float`, *optional*, defaults to `2.0`):
            Cap of the importance-sampling ratio `π_θ(y_t) / π_old(y_t)` that multiplies the distillation term.
        dynamic_weighting (`bool`, *optional*, defaults to `True`):
            Entropy-aware weighting of distillation tokens, `w_t ∝ exp(-H_t / τ)` over the teacher's entropy,
            normalised to mean 1 over the step's distillation tokens. `False` is the paper's "w/o dynamic
            weighting" ablation (`w_t = 1`).
        weighting_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature `τ` of the entropy-aware weights.
        routed_grpo_weight (`float`, *optional*, defaults to `0.0`):
            Beyond the paper (`routing="srpo"` only): the fraction of its GRPO advantage a routed rollout keeps,
            trained beside its distillation term. `0.0` is SRPO as published. Where the policy already knows the
            answer and only samples it noisily, a failed rollout's distillation term pulls far less than the
            negative advantage it replaces; `1.0` keeps that advantage whole. "Does it learn?" in the README says
            when it helps.
        min_teacher_solution_prob (`float`, *optional*, defaults to `0.0`):
            Beyond the paper (`routing="srpo"` only): a reliability gate. A routed rollout is distilled only where
            the teacher uses the solution it is shown: at the token where the rollout first leaves that solution,
            the teacher must give the solution's token at least this probability; below it, the rollout goes back
            to GRPO's branch with its whole advantage (`srpo/route/gated_frac`). A rollout with no such token (it
            never leaves the solution, or no solution was shown whole: feedback or a privileged context alone)
            keeps its route. `0.0` is SRPO as published (no gate).
        advantage_mix_lambda (`float`, *optional*, defaults to `0.9`):
            `λ` of `routing="advantage_mix"`, the weight of GRPO's sequence advantage against the teacher's
            token-level log-ratio, after the combined-advantage baseline of the SDPO paper
            ([arXiv 2601.20802](https://huggingface.co/papers/2601.20802)).
    """

    routing: str = field(
        default="srpo",
        metadata={"help": "How rollouts are trained.", "choices": list(ROUTING_MODES)},
    )
    success_reward_threshold: float = field(
        default=1.0, metadata={"help": "A rollout is correct iff its reward is at least this value."}
    )
    teacher_model_kind: str = field(
        default="ema",
        metadata={
            "help": "Which model is the teacher: ema, base, live or trust_region.",
            "choices": list(TEACHER_KINDS),
        },
    )
    teacher_update_rate: float = field(
        default=0.05, metadata={"help": "EMA rate of the self-teacher after each optimizer step (fp32)."}
    )
    max_teacher_prompt_length: int = field(
        default=10240, metadata={"help": "Teacher prompts longer than this (tokens) get their demonstration cut."}
    )
    teacher_feedback: bool = field(
        default=False,
        metadata={
            "help": "Show the teacher the reward's feedback (log_extra('feedback', ...)) on the distilled rollout."
        },
    )
    distill_without_sibling: bool = field(
        default=False,
        metadata={"help": "Beyond the paper: distil all-failed groups' rollouts from their privileged_context."},
    )
    distillation_topk: int = field(default=100, metadata={"help": "Student top-k support of the divergence."})
    distillation_alpha: float = field(
        default=0.5, metadata={"help": "Generalised JSD interpolation (0: KL(q||p), 1: KL(p||q))."}
    )
    distillation_is_clip: float = field(
        default=2.0, metadata={"help": "Cap of the importance ratio on the distillation term."}
    )
    dynamic_weighting: bool = field(
        default=True, metadata={"help": "Weight distillation tokens by the teacher's confidence exp(-H/τ)."}
    )
    weighting_temperature: float = field(default=1.0, metadata={"help": "Temperature τ of the entropy weights."})
    routed_grpo_weight: float = field(
        default=0.0,
        metadata={"help": "Beyond the paper: fraction of its GRPO advantage a routed rollout keeps (0: the paper's)."},
    )
    min_teacher_solution_prob: float = field(
        default=0.0,
        metadata={
            "help": "Beyond the paper: distil a routed rollout only where the teacher gives the shown solution's "
            "token at least this probability where the rollout leaves it (0: no gate, the paper's)."
        },
    )
    advantage_mix_lambda: float = field(
        default=0.9, metadata={"help": "λ of routing='advantage_mix' (weight of GRPO's advantage)."}
    )

    # GRPOConfig fields whose defaults SRPO's paper sets differently (method §10)
    learning_rate: float = field(default=5e-6, metadata={"help": "The initial learning rate for AdamW."})
    scale_rewards: str = field(default="none", metadata={"help": "Reward scaling: 'none' (SRPO), 'group' or 'batch'."})
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clipping epsilon (DAPO's 0.28)."})
    vllm_importance_sampling_mode: str = field(
        default="token_truncate", metadata={"help": "vLLM rollout importance sampling: token-level, truncated."}
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=2.0, metadata={"help": "Cap of the vLLM rollout importance-sampling ratio."}
    )

    def __post_init__(self):
        adopt_activation_checkpointing_name(self)
        # Before the range checks below, whose comparisons would fail on a wrong type without naming the field.
        self._check_types()
        self._check_reward_weights()
        # Before GRPOConfig's own check, whose message does not name the field.
        self._check(
            "num_generations",
            self.num_generations is None or self.num_generations >= 2,
            ">= 2: routing compares each rollout with its siblings",
        )
        if self.bf16 is None and not self.fp16 and not (self.use_cpu or _bf16_accelerator()):
            # GRPOConfig's default bf16=True is refused where no accelerator supports it ("Your setup doesn't
            # support bf16/gpu"): unset, a machine without one (a CPU) trains in fp32. Set bf16 to choose.
            self.bf16 = False
        super().__post_init__()
        self._check("teacher_update_rate", 0.0 < self.teacher_update_rate <= 1.0, "in (0, 1], e.g. 0.05")
        self._check("distillation_topk", self.distillation_topk >= 1, "an integer >= 1, e.g. 100")
        self._check("distillation_alpha", 0.0 <= self.distillation_alpha <= 1.0, "in [0, 1], e.g. 0.5")
        self._check("distillation_is_clip", self.distillation_is_clip > 0.0, "> 0, e.g. 2.0")
        self._check("weighting_temperature", self.weighting_temperature > 0.0, "> 0, e.g. 1.0")
        self._check("advantage_mix_lambda", 0.0 <= self.advantage_mix_lambda <= 1.0, "in [0, 1]")
        self._check(
            "routed_grpo_weight",
            0.0 <= self.routed_grpo_weight <= 1.0
            and (self.routed_grpo_weight == 0.0 or ROUTING_MODES[self.routing].keeps_routed_advantage),
            "in [0, 1], and 0 unless routing='srpo'",
        )
        mode = ROUTING_MODES[self.routing]
        self._check(
            "min_teacher_solution_prob",
            0.0 <= self.min_teacher_solution_prob <= 1.0
            and (self.min_teacher_solution_prob == 0.0 or (mode.distils_failed and mode.grpo_for_the_rest)),
            "in [0, 1], and 0 unless routing='srpo' (a gated rollout goes back to GRPO's branch)",
        )
        self._check(
            "distill_without_sibling",
            not self.distill_without_sibling or ROUTING_MODES[self.routing].distils_failed,
            "False unless routing distils failed rollouts ('srpo' or 'sdpo')",
        )
        self._check("max_teacher_prompt_length", self.max_teacher_prompt_length >= 1, "a positive token count")
        self._check("success_reward_threshold", math.isfinite(self.success_reward_threshold), "a finite number")
        if ROUTING_MODES[self.routing].distils and self.steps_per_generation != self.gradient_accumulation_steps:
            warnings.warn(
                f"steps_per_generation={self.steps_per_generation} != gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}: SRPO's entropy weights are normalised over each generation "
                "batch, which then spans more or less than one optimizer step.",
                stacklevel=3,
            )
        if message := inert_settings_message(self):
            warnings.warn(message, stacklevel=3)

    @classmethod
    def from_grpo_config(cls, config: GRPOConfig, **changes) -> "SRPOConfig":
        """
        An `SRPOConfig` from a `GRPOConfig`: what its user set is kept, everything else takes SRPO's defaults.

        A field "set" is one whose value differs from `GRPOConfig`'s default (a field set to GRPO's own default
        therefore reads as unset). So `learning_rate`, `scale_rewards`, `epsilon_high` and the vLLM
        importance-sampling fields take the paper's values unless the GRPO config changed them (method §10); a
        warning lists those that did, with GRPO's value, to pass in `changes` where GRPO's was meant. An
        `SRPOConfig` given is copied with `changes`, its SRPO fields kept. The generation batch
        (`generation_batch_size` or `steps_per_generation`, both filled in once a config is built) is carried over as
        `steps_per_generation`, so that the same number of rollouts is generated per batch.

        Args:
            config (`GRPOConfig`):
                The GRPO configuration to convert.
            **changes:
                Further fields to set, SRPO's own included (e.g. `success_reward_threshold=2.0`).

        Example:

        ```python
        >>> from trl import GRPOConfig
        >>> from srpo_trl import SRPOConfig
        >>> grpo = GRPOConfig("out", use_cpu=True, bf16=False, num_generations=4, per_device_train_batch_size=8)
        >>> srpo = SRPOConfig.from_grpo_config(grpo, success_reward_threshold=2.0)
        >>> srpo.num_generations, srpo.learning_rate, srpo.scale_rewards
        (4, 5e-06, 'none')
        ```
        """
        if not isinstance(config, GRPOConfig):
            raise TypeError(
                f"SRPOConfig.from_grpo_config converts a GRPOConfig; got {type(config).__name__}. Build the config "
                "from settings with SRPOConfig(**settings), or convert GRPOConfig(**settings)."
            )
        base = SRPOConfig if isinstance(config, SRPOConfig) else GRPOConfig
        kept = {name: value for name, value in _fields_set(config, base).items() if name not in _GENERATION_BATCH}
        replaced = {
            name: (getattr(config, name), default)
            for name, default in _paper_defaults().items()
            if base is GRPOConfig and name not in kept and name not in changes and getattr(config, name) != default
        }
        if replaced:
            warnings.warn(
                "SRPOConfig.from_grpo_config: the GRPOConfig left these at GRPO's defaults, and they take SRPO's (the "
                "paper's): "
                + ", ".join(f"{name}={grpo!r} -> {srpo!r}" for name, (grpo, srpo) in replaced.items())
                + ". To keep GRPO's value, pass it: SRPOConfig.from_grpo_config(config, "
                + ", ".join(f"{name}={grpo!r}" for name, (grpo, _) in replaced.items())
                + ").",
                stacklevel=2,
            )
        if config.steps_per_generation != config.gradient_accumulation_steps and not _GENERATION_BATCH & set(changes):
            kept["steps_per_generation"] = config.steps_per_generation
        return cls(**{**kept, **changes})

    def _check_types(self) -> None:
        """SRPO's own fields hold the type they are declared with: a YAML `1e-2` arrives as a string, and a string or
        None would otherwise fail a comparison with a message that names no field (or, for a bool, pass silently)."""
        grpo_fields = {f.name for f in fields(GRPOConfig)}
        for spec in fields(self):
            if spec.name in grpo_fields:
                continue
            value = getattr(self, spec.name)
            is_bool = isinstance(value, (bool, numpy.bool_))
            if spec.type is bool:
                self._check(spec.name, is_bool, "True or False")
            elif spec.type is int:
                self._check(spec.name, isinstance(value, numbers.Integral) and not is_bool, "an integer")
            elif spec.type is float:
                self._check(spec.name, isinstance(value, numbers.Real) and not is_bool, "a number")
            if spec.type in (bool, int, float):  # numpy scalars (np.int64(8)) become the Python number, as in JSON
                setattr(self, spec.name, spec.type(value))
            elif spec.type is str and "choices" in spec.metadata:
                self._check(spec.name, value in spec.metadata["choices"], f"one of {tuple(spec.metadata['choices'])}")

    def _check_reward_weights(self) -> None:
        """GRPOConfig's `reward_weights` reach the rewards unchecked: a NaN weight makes every weighted reward NaN,
        which GRPOTrainer's `nansum` turns into 0 (nothing trains, nothing is said); a YAML string fails in torch."""
        if self.reward_weights is None:
            return
        weights = list(self.reward_weights) if isinstance(self.reward_weights, (list, tuple)) else None
        self._check(
            "reward_weights",
            weights is not None
            and all(
                isinstance(w, numbers.Real) and not isinstance(w, (bool, numpy.bool_)) and math.isfinite(w)
                for w in weights
            ),
            "a list of finite numbers, one per reward function (e.g. [1.0, 0.5])",
        )
        self.reward_weights = [float(w) for w in weights]

    def _check(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise ValueError(f"SRPOConfig.{name} must be {expected}; got {value!r} ({type(value).__name__}).")


# SRPO's settings that only some routings and teachers read.
_TEACHER_SETTINGS = ("teacher_model_kind", "teacher_update_rate", "max_teacher_prompt_length", "teacher_feedback")
_DISTILLATION_SETTINGS = (
    "distillation_topk", "distillation_alpha", "distillation_is_clip", "dynamic_weighting", "weighting_temperature",
)  # fmt: skip


def inert_settings_message(config: SRPOConfig) -> str | None:
    """A warning naming the SRPO settings changed from their default that the chosen routing or teacher never reads
    (an option that does nothing, where a user expects it to act), or None."""
    mode, kind = ROUTING_MODES[config.routing], TEACHER_KINDS[config.teacher_model_kind]
    unread = {}
    if not mode.uses_teacher:
        why = f"routing={config.routing!r} builds no teacher"
        unread.update(dict.fromkeys((*_TEACHER_SETTINGS, *_DISTILLATION_SETTINGS), why))
    elif not mode.distils:
        unread.update(dict.fromkeys(_DISTILLATION_SETTINGS, f"routing={config.routing!r} distils nothing"))
    if not mode.teacher_mixes_advantages:
        unread["advantage_mix_lambda"] = "only routing='advantage_mix' reads it"
    if mode.uses_teacher and not kind.updates:
        unread.setdefault(
            "teacher_update_rate", f"teacher_model_kind={config.teacher_model_kind!r} has no update rate"
        )
    if not config.dynamic_weighting:
        unread.setdefault("weighting_temperature", "dynamic_weighting=False weights every token 1")
    defaults = {spec.name: _default(spec) for spec in fields(SRPOConfig) if spec.name in unread}
    changed = [name for name in unread if getattr(config, name) != defaults[name]]
    if not changed:
        return None
    return (
        "SRPOConfig: "
        + "; ".join(f"{name}={getattr(config, name)!r} has no effect: {unread[name]}" for name in changed)
        + ". Remove it, or choose the routing or teacher that uses it."
    )


def _bf16_accelerator() -> bool:
    """Whether transformers' `TrainingArguments` accepts bf16 here without `use_cpu` (a bf16 GPU, or XLA)."""
    return is_torch_bf16_gpu_available() or is_torch_xla_available()


# GRPOConfig derives one of these from the other and refuses both: the converted config gets one of them.
_GENERATION_BATCH = {"generation_batch_size", "steps_per_generation"}


def _default(spec):
    return spec.default if spec.default_factory is MISSING else spec.default_factory()


def _paper_defaults() -> dict:
    """The GRPOConfig fields whose default SRPOConfig sets differently (method §10), with SRPO's default."""
    grpo = {spec.name: _default(spec) for spec in fields(GRPOConfig)}
    return {
        spec.name: _default(spec)
        for spec in fields(SRPOConfig)
        if spec.name in grpo and _default(spec) != grpo[spec.name]
    }


def _fields_set(config: GRPOConfig, base: type = GRPOConfig) -> dict:
    """The init fields of `config` whose value differs from their declared default in `base`. A value filled in
    by `__post_init__` (`report_to=[]` for `"none"`, `bf16` on a CPU) also differs; built again, it gives itself."""
    changed = {}
    for spec in fields(base):
        if not spec.init:
            continue
        default = _default(spec)
        value = getattr(config, spec.name)
        if value != default:
            changed[spec.name] = value
    return changed
