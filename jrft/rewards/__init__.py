"""Programmable reward functions on the host: TRL's contract, built-ins, a parallel runner, a code sandbox.

See ``docs/rewards.md`` for the contract and an example. Host-side only (Python + NumPy, no JAX).
"""

from jrft.rewards.accuracy import AccuracyReward as AccuracyReward
from jrft.rewards.accuracy import answers_match as answers_match
from jrft.rewards.citations import CitationReward as CitationReward
from jrft.rewards.citations import find_citations as find_citations
from jrft.rewards.code_execution import CodeExecutionReward as CodeExecutionReward
from jrft.rewards.combine import COMBINERS as COMBINERS
from jrft.rewards.combine import group_normalize as group_normalize
from jrft.rewards.extract import extract_answer as extract_answer
from jrft.rewards.extract import parse_number as parse_number
from jrft.rewards.formatting import ThinkAnswerFormatReward as ThinkAnswerFormatReward
from jrft.rewards.harmful import HarmfulContentReward as HarmfulContentReward
from jrft.rewards.json_reward import JsonSchemaReward as JsonSchemaReward
from jrft.rewards.json_reward import JsonValidReward as JsonValidReward
from jrft.rewards.json_reward import extract_json as extract_json
from jrft.rewards.length import LengthReward as LengthReward
from jrft.rewards.length import RepetitionPenaltyReward as RepetitionPenaltyReward
from jrft.rewards.length import SoftOverlongReward as SoftOverlongReward
from jrft.rewards.length import soft_overlong_penalty as soft_overlong_penalty
from jrft.rewards.loading import RewardLoadError as RewardLoadError
from jrft.rewards.loading import load_reward_function as load_reward_function
from jrft.rewards.protocol import RewardFunction as RewardFunction
from jrft.rewards.protocol import RewardSignatureError as RewardSignatureError
from jrft.rewards.protocol import completion_text as completion_text
from jrft.rewards.registry import BUILTINS as BUILTINS
from jrft.rewards.registry import build_reward as build_reward
from jrft.rewards.registry import make_builtin as make_builtin
from jrft.rewards.runner import RewardFunctionError as RewardFunctionError
from jrft.rewards.runner import RewardResult as RewardResult
from jrft.rewards.runner import RewardRunner as RewardRunner
from jrft.rewards.runner import reward_stats as reward_stats
from jrft.rewards.sandbox import SandboxLimits as SandboxLimits
from jrft.rewards.sandbox import run_python as run_python
