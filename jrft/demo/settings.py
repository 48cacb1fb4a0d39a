"""The demo's own settings: a small frozen schema for ``configs/demo.yaml`` (not a ``RunConfig``).

The demo runs several stages (build, SFT, GRPO / DPO / reward model + PPO, evaluation); each stage's
``RunConfig`` is derived from these settings in :mod:`jrft.demo.stages`. Loading reuses the strict loader of
:mod:`jrft.config`: unknown keys and ill-typed values are errors naming the file and the dotted key, and
``key=value`` overrides work as for the training commands (``jrft demo grpo.steps=100``).

Defaults follow the probe in shared/NOTES.md ("Can a tiny model trained from scratch here learn ..."): a
0.8M-parameter Llama, SFT on 200 labelled problems (plateaus around 30% exact match), then GRPO on fresh
unlabelled prompts with a correctness + format reward at lr 1e-4.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from jrft.config import check_field, check_nonnegative, check_positive, load_yaml_config


@dataclass(frozen=True)
class ModelSize:
    """The tiny Llama built from scratch (~0.8M parameters with the defaults)."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    # Tied input/output embeddings, as in the probe: fewer parameters for a 25-token vocabulary.
    tie_embeddings: bool = True

    def __post_init__(self):
        check_positive(
            self, "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"
        )
        check_field(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")


@dataclass(frozen=True)
class TaskSettings:
    """The synthetic addition task (jrft.data.synthetic.AdditionTask) and its split sizes."""

    num_digits: int = 3
    # Labelled problems for SFT: few, so SFT plateaus and leaves room for RL (measured with the defaults,
    # seed 0: 300 problems -> 87% held-out exact match, no room; 100 -> 1%; 200 -> 30%, flat after step 300).
    num_sft: int = 200
    # Unlabelled RL prompts (disjoint from the SFT problems); answers reach only the reward function.
    num_rl_prompts: int = 8000
    # Held-out problems for exact-match accuracy; 500 keeps the standard error near 2 points.
    num_heldout: int = 500
    # Preference pairs for DPO / the reward model, on problems of the RL pool (chosen = the correct trace,
    # rejected = a wrong or malformed one): more pairs than labelled SFT problems, as such data is cheap.
    num_preference: int = 2000

    def __post_init__(self):
        check_field(1 <= self.num_digits <= 9, "num_digits", "must be in [1, 9]")
        check_positive(self, "num_sft", "num_rl_prompts", "num_heldout", "num_preference")


@dataclass(frozen=True)
class SFTStage:
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    log_every: int = 10
    # Held-out exact match every this many steps (0 = only after SFT): shows where SFT plateaus.
    eval_every: int = 50

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "lr")
        check_nonnegative(self, "eval_every")


@dataclass(frozen=True)
class GRPOStage:
    steps: int = 200
    # Prompts per step; each gets num_generations completions (a group).
    prompts_per_step: int = 32
    num_generations: int = 8
    # lr 3e-4 collapsed to 0% accuracy in the probe and 2e-4 dipped to 10%; 1e-4 with warm-up learned.
    lr: float = 1e-4
    # 30 steps: with 10, held-out accuracy fell in the first 20 steps (seed 4: 38.4% -> 25.2%) while the
    # full learning rate met a peaked policy whose groups mostly carried no signal (README, issue [learning]).
    warmup_steps: int = 30
    # DAPO's dynamic sampling (Yu et al. 2025): groups whose G rewards are all equal carry no gradient; they
    # are dropped and more prompts sampled (at most max_sampling_rounds rounds per step) so that the update
    # sees only groups with signal. The SFT policy is sharply peaked (it memorised its 200 problems): about
    # half its groups are all-wrong copies of one answer, and without this the weaker seeds barely moved.
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 48
    # Reward = accuracy (1 for a correct answer) + format_weight * format (strict think/answer).
    format_weight: float = 0.1
    # KL penalty to the SFT model. 0 as in the probe: no reference forward per step (faster), and so no KL
    # curve either; > 0 tracks (and penalises) the KL.
    beta: float = 0.0
    # Held-out evaluation every this many steps (0 = only before and after).
    eval_every: int = 25
    # The reported "after" accuracy is the mean of the last this-many evaluations (each ~2 points of noise).
    eval_last: int = 3

    def __post_init__(self):
        check_positive(self, "steps", "prompts_per_step", "lr", "max_sampling_rounds")
        check_field(self.num_generations >= 2, "num_generations", "must be >= 2 (group-relative advantages)")
        check_nonnegative(self, "eval_every", "beta")
        check_field(self.eval_last >= 1, "eval_last", "must be >= 1")


@dataclass(frozen=True)
class DPOStage:
    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 0.1
    warmup_steps: int = 10

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "lr", "beta")


@dataclass(frozen=True)
class RewardStage:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 20
    # Draws of the SFT policy per preference prompt (temperature 1): its first wrong or malformed draw
    # replaces the hand-made rejected answer (jrft.demo.preferences), so the reward model learns the
    # mistakes PPO will make, not only the corruptions of jrft.data.synthetic. 0 = hand-made pairs only.
    on_policy_samples: int = 2
    # The trained reward model ranks rank_samples draws (temperature 1) of the SFT policy on rank_prompts
    # held-out preference prompts: pairwise accuracy within a prompt, and whether its top-scored draw beats
    # the greedy answer (jrft.demo.preferences.rank_draws). 0 = skip.
    rank_samples: int = 8
    rank_prompts: int = 300
    # reward.likelihood_coef of the reward model's run: its score adds this x the answer's summed log-prob
    # under its own language model (jrft.train.objectives.reward.sequence_rewards). 0 = the scalar head only:
    # it ranks the SFT policy's own draws badly (best-of-8 below greedy); PPO lowers exact match against it.
    likelihood_coef: float = 1.0
    # reward.sft_coef: the chosen answers' negative log-likelihood joins the loss (keeps its LM a generator;
    # without it the likelihood term alone ranks well but its LM decodes garbage, which PPO then chases).
    sft_coef: float = 1.0

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "lr", "rank_prompts")
        check_nonnegative(self, "on_policy_samples", "rank_samples", "likelihood_coef", "sft_coef")


@dataclass(frozen=True)
class PPOStage:
    # 128 prompts in 4 mini-batches at lr 1e-5: with the task's checker as the reward these settings raise
    # held-out exact match (scripts/rlhf_probe.py); 32 prompts at lr 5e-5 (the old defaults) lowered it.
    steps: int = 40
    prompts_per_step: int = 128
    mini_batches: int = 4
    lr: float = 1e-5
    warmup_steps: int = 10
    kl_coef: float = 0.02
    max_new_tokens: int = 48

    def __post_init__(self):
        check_positive(self, "steps", "prompts_per_step", "mini_batches", "lr")
        check_field(
            self.prompts_per_step % self.mini_batches == 0,
            "mini_batches",
            f"must divide prompts_per_step={self.prompts_per_step}, got {self.mini_batches}",
        )


@dataclass(frozen=True)
class ToolsStage:
    """``--objective tools`` (jrft.demo.tools_demo): ``a*b=`` with a ``calc`` tool. SFT takes ``sft.*`` and
    GRPO ``grpo.*`` (lr, G, temperature, beta, max_sampling_rounds, eval_last) except what is set here."""

    digits_a: int = 3
    digits_b: int = 3
    # SFT conversations; a tool_fraction of them call the tool, the rest answer directly (and the model
    # cannot learn to multiply from them: those answers teach only the format).
    num_sft: int = 200
    tool_fraction: float = 0.5
    num_rl_prompts: int = 4000
    num_heldout: int = 500
    sft_steps: int = 300
    # Held-out evaluation (multi-turn, greedy, with the tool) during SFT every this many steps (0: none).
    eval_every_sft: int = 0
    # Held-out accuracy rose 38% -> 79% in 10 steps and plateaued at ~83% from step 20 (seed 0, 60 steps).
    grpo_steps: int = 30
    prompts_per_step: int = 16
    warmup_steps: int = 10
    dynamic_sampling: bool = True
    # Model turns per trajectory (a call, then the answer) and the token budget of the whole continuation
    # (model and tool tokens: a call is ~70 character tokens here).
    max_turns: int = 2
    max_new_tokens: int = 96
    eval_every: int = 5

    def __post_init__(self):
        check_field(
            1 <= self.digits_a <= 6 and 1 <= self.digits_b <= 6, "digits_a", "digits must be in [1, 6]"
        )
        check_positive(self, "num_sft", "num_rl_prompts", "num_heldout", "sft_steps", "grpo_steps")
        check_positive(self, "prompts_per_step", "max_turns", "max_new_tokens")
        check_field(0.0 <= self.tool_fraction <= 1.0, "tool_fraction", "must be in [0, 1]")
        check_nonnegative(self, "eval_every_sft", "eval_every", "warmup_steps")


@dataclass(frozen=True)
class LoRAStage:
    """LoRA adapters (jrft's ``lora:`` section) on the stage after SFT: GRPO, DPO or PPO (the reward model
    and the SFT of the model built from scratch stay full fine-tuning). Off unless ``enabled``
    (``jrft demo --lora``); then ``rank``/``alpha`` go to every projection and ``lr`` replaces the stage's
    learning rate (adapters start at B = 0 and need a larger step than full fine-tuning)."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-3

    def __post_init__(self):
        check_positive(self, "rank", "alpha", "lr")


@dataclass(frozen=True)
class EvalSettings:
    # Prompts per greedy generate call (the last chunk is padded, so one compiled shape).
    batch_size: int = 256
    max_new_tokens: int = 48
    # Sample completions shown before/after in the report.
    num_samples: int = 4

    def __post_init__(self):
        check_positive(self, "batch_size", "max_new_tokens")


@dataclass(frozen=True)
class DemoConfig:
    """Everything ``jrft demo`` does; ``objective`` picks the stages after SFT."""

    objective: str = "grpo"
    seed: int = 0
    output_dir: str = "runs/demo"
    # Data-parallel devices (1: the demo is a single-CPU program; -1: all devices).
    mesh_data: int = 1
    model: ModelSize = field(default_factory=ModelSize)
    task: TaskSettings = field(default_factory=TaskSettings)
    sft: SFTStage = field(default_factory=SFTStage)
    grpo: GRPOStage = field(default_factory=GRPOStage)
    dpo: DPOStage = field(default_factory=DPOStage)
    reward: RewardStage = field(default_factory=RewardStage)
    ppo: PPOStage = field(default_factory=PPOStage)
    tools: ToolsStage = field(default_factory=ToolsStage)
    lora: LoRAStage = field(default_factory=LoRAStage)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        check_field(
            self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}, got {self.objective!r}"
        )
        check_nonnegative(self, "seed")


OBJECTIVES = ("grpo", "dpo", "rlhf", "tools")

# ``--quick``: the same stages at toy sizes, to check the plumbing in well under a minute (no learning).
QUICK_OVERRIDES: tuple[str, ...] = (
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "task.num_sft=32",
    "task.num_rl_prompts=64",
    "task.num_heldout=16",
    "task.num_preference=32",
    "sft.steps=4",
    "sft.batch_size=8",
    "sft.log_every=2",
    "sft.eval_every=2",
    "grpo.steps=2",
    "grpo.prompts_per_step=4",
    "grpo.num_generations=2",
    "grpo.eval_every=1",
    "grpo.eval_last=2",
    "grpo.max_new_tokens=40",
    "dpo.steps=3",
    "dpo.batch_size=8",
    "reward.steps=3",
    "reward.batch_size=8",
    "reward.rank_samples=2",
    "reward.rank_prompts=8",
    "ppo.steps=2",
    "ppo.prompts_per_step=4",
    "ppo.mini_batches=1",
    "tools.num_sft=32",
    "tools.num_rl_prompts=64",
    "tools.num_heldout=16",
    "tools.sft_steps=4",
    "tools.grpo_steps=2",
    "tools.prompts_per_step=4",
    "tools.eval_every=1",
    "tools.dynamic_sampling=false",  # the untrained toy model earns no reward: no group would be kept
    "eval.batch_size=16",
    "eval.max_new_tokens=40",
    "eval.num_samples=2",
)


def load_demo_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *, quick: bool = False
) -> DemoConfig:
    """Reads ``path`` (None: the defaults), then ``QUICK_OVERRIDES`` when ``quick``, then ``overrides``.

    Raises:
      ConfigError: naming the file (or "command line") and the dotted key.
    """
    return load_yaml_config(path, [*(QUICK_OVERRIDES if quick else ()), *overrides], DemoConfig)
