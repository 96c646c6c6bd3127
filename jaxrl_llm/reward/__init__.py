"""Rewards: jittable device rewards, host verifiers (math answers, formats, tool calls, sandboxed code),
learned reward models, combined with weights and reported component by component."""

from .base import KINDS, REGISTRY, RewardError, RewardFn, RewardSpec, get_reward, parse_specs, register
from .combine import RewardResult, RewardSet, arrays_for
from .device import SampleArrays
from .host import parse_tool_calls, tool_call_problems
from .math_answers import extract_answer, math_verify
from .model import RewardModel
from .sandbox import CodeExecutor, SandboxResult, code_exec_reward, extract_code, run_python

__all__ = [
    "KINDS",
    "REGISTRY",
    "CodeExecutor",
    "RewardError",
    "RewardFn",
    "RewardModel",
    "RewardResult",
    "RewardSet",
    "RewardSpec",
    "SampleArrays",
    "SandboxResult",
    "arrays_for",
    "code_exec_reward",
    "extract_answer",
    "extract_code",
    "get_reward",
    "math_verify",
    "parse_specs",
    "parse_tool_calls",
    "register",
    "run_python",
    "tool_call_problems",
]
