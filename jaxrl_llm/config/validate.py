"""The one config validator: every problem in a config, collected and raised as one ``ConfigError``.

Checks run in two passes. The first checks each key alone (unknown, missing, type, range, choices); the
second checks combinations of keys, and only among keys that passed the first, so one mistake is reported
once rather than again as every combination it touches.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from jaxrl_llm.errors import UserError

from .schema import FIELDS, FIELDS_BY_KEY, LORA_MODULES, MODEL_SIZES, ROLE_MESHES, Field, section_of

_SECTIONS = {section_of(f.key) for f in FIELDS} - {""}
_MISSING = object()
# Integers become int32 arrays and C longs (seeds, step counters, sizes); a larger one would overflow there.
INT_LIMIT = 2**31
_SHOWN_CHARS = 80


class ConfigError(UserError):
    """A configuration mistake a user made; ``problems`` holds one line per mistake."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def show(value: Any) -> str:
    """``repr(value)``, cut to its start when long: a 100,000-character override is named, not echoed."""
    text = repr(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[: _SHOWN_CHARS - 20]}... ({len(text)} characters)"


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to ``name``, also matching on the last dotted part (``lr`` -> ``optimizer.lr``)."""
    candidates = list(candidates)
    tails = {c.rpartition(".")[2]: c for c in candidates}
    if "." not in name and name in tails:  # a key's exact last part before a merely similar name (lr: lora)
        return tails[name]
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return close[0]
    close = difflib.get_close_matches(name.rpartition(".")[2], tails, n=1, cutoff=0.75)
    return tails[close[0]] if close else None


def unknown_key(key: str, value: Any = _MISSING) -> str:
    """The problem line for a key the schema does not have, with the closest known key."""
    match = suggest(key, [*FIELDS_BY_KEY, *_SECTIONS])
    hint = f"; did you mean {match}?" if match else f"; known sections: {', '.join(sorted(_SECTIONS))}"
    shown = key if value is _MISSING else f"{key}={show(value)}"
    return f"{shown}: unknown key{hint}"


def is_section(value: Any) -> bool:
    # ConfigDict is not a Mapping subclass; anything with .items() (but not a string) is a section.
    return isinstance(value, Mapping) or (hasattr(value, "items") and not isinstance(value, str | bytes))


def flatten(cfg: Any, prefix: str = "") -> tuple[dict[str, Any], list[str], set[str]]:
    """Walks ``cfg`` against the schema.

    Returns the dotted key -> value of its known keys, problem lines for its unknown or misshapen parts,
    and the sections given as a plain value (their keys are not then also reported missing).
    """
    flat: dict[str, Any] = {}
    problems: list[str] = []
    blocked: set[str] = set()
    for name, value in sorted(cfg.items()):
        key = f"{prefix}{name}"
        if key in FIELDS_BY_KEY:
            if is_section(value):
                problems.append(
                    f"{key}={_short(value)}: a section where {FIELDS_BY_KEY[key].allowed()} is expected"
                )
            else:
                flat[key] = value
        elif key in _SECTIONS:
            if is_section(value):
                sub, sub_problems, sub_blocked = flatten(value, f"{key}.")
                flat.update(sub)
                problems += sub_problems
                blocked |= sub_blocked
            else:
                problems.append(f"{key}={value!r}: must be a section with keys {key}.*, not a value")
                blocked.add(key)
        else:
            problems.append(unknown_key(key, _short(value) if is_section(value) else value))
    return flat, problems, blocked


def _short(section: Any) -> str:
    return "{" + ", ".join(str(k) for k in section.keys()) + "}"


def _type_ok(field: Field, value: Any) -> bool:
    if value is None:
        return field.nullable
    if field.type is bool:
        return isinstance(value, bool)
    if field.type is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if field.type is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, field.type)


def _in_range(field: Field, value: Any) -> bool:
    if value in field.special:
        return True
    # Comparisons are phrased as "inside" and negated so that NaN falls outside every bound.
    if field.lo is not None and not (value > field.lo if field.lo_open else value >= field.lo):
        return False
    return field.hi is None or bool(value < field.hi if field.hi_open else value <= field.hi)


def check_field(field: Field, value: Any) -> str | None:
    """The problem line for one key's value, or None when it is allowed."""
    shown = f"{field.key}={show(value)}"
    if not _type_ok(field, value):
        got = "None" if value is None else type(value).__name__
        return f"{shown}: expected {field.allowed()}, got {got}"
    if value is None:
        return None
    if field.type is float and not math.isfinite(value) and value not in field.special:
        return f"{shown}: must be a finite {field.allowed()}"
    if field.type is int and not -INT_LIMIT < value < INT_LIMIT:
        return f"{shown}: must be {field.allowed()} and fit in 32 bits (below 2**31 = {INT_LIMIT})"
    if isinstance(value, str) and "\x00" in value:
        return f"{shown}: contains a NUL character (\\x00), which no path or name can hold"
    if field.type is list:
        return _list_entries(field.key, value)
    choices = field.allowed_choices()
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{shown}: must be {field.allowed()}{hint}"
    if choices is None and field.type in (int, float) and not _in_range(field, value):
        return f"{shown}: must be {field.allowed()}"
    return None


def _list_entries(key: str, entries: list) -> str | None:
    """The entries of the list-valued keys (the type check saw only that they are lists)."""
    if key == "rollout.stop":
        for i, stop in enumerate(entries):
            if not isinstance(stop, str) or not stop:
                return f"rollout.stop[{i}]={show(stop)}: each stop string must be a non-empty string"
    if key == "reward.functions" and entries:
        # The reward registry checks names, weights and params; it loads JAX, which any run loads anyway.
        from jaxrl_llm.reward import RewardError, parse_specs

        try:
            parse_specs(entries)
        except RewardError as err:
            return str(err) if str(err).startswith(key) else f"{key}: {err}"
    return None


def validate(cfg: Any) -> None:
    """Checks ``cfg`` (a ``ConfigDict`` or nested mapping) against the schema; returns None when valid.

    Raises:
      ConfigError: listing every problem, one per line, as ``<dotted.key>=<value>: <what is allowed>``.
    """
    flat, problems, blocked = flatten(cfg)
    good: dict[str, Any] = {}
    for field in FIELDS:
        if field.key not in flat:
            if section_of(field.key) not in blocked:
                problems.append(
                    f"{field.key}: missing key (default {field.default!r}); start from base_config()"
                )
        elif problem := check_field(field, flat[field.key]):
            problems.append(problem)
        else:
            good[field.key] = flat[field.key]
    problems += _combinations(good)
    if problems:
        raise ConfigError(problems)


def _combinations(good: dict[str, Any]) -> list[str]:
    """Checks across keys; ``good`` holds only keys whose own value passed, so a bad key skips its checks."""
    problems = (
        _parallel(good)
        + _model(good)
        + _tokenizer(good)
        + _run_dir(good)
        + _freeze_pattern(good)
        + _lora(good)
        + _data(good)
        + _rl(good)
        + _canary(good)
        + _observe(good)
    )
    if "train.batch_size" in good and "train.grad_accum_steps" in good:
        bs, accum = good["train.batch_size"], good["train.grad_accum_steps"]
        if bs % accum:
            problems.append(
                f"train.batch_size={bs!r}, train.grad_accum_steps={accum!r}: "
                "train.batch_size must be divisible by train.grad_accum_steps"
            )
    if "optimizer.warmup_steps" in good and "train.steps" in good and good.get("train.epochs") is None:
        warmup, steps = good["optimizer.warmup_steps"], good["train.steps"]
        per_step = 1
        if good.get("stage") in RL_STAGES:  # an RL iteration makes mu x minibatches optimizer updates
            per_step = (good.get("rl.num_iterations") or 1) * (good.get("rl.minibatches") or 1)
        if warmup > steps * per_step:
            updates = "" if per_step == 1 else f" x {per_step} updates an iteration"
            problems.append(
                f"optimizer.warmup_steps={warmup!r}, train.steps={steps!r}{updates}: "
                "optimizer.warmup_steps (optimizer updates) must not exceed the run's updates"
            )
    return problems


def _parallel(good: dict[str, Any]) -> list[str]:
    problems = []
    fill = [k for k in ("parallel.data", "parallel.fsdp", "parallel.tensor") if good.get(k) == -1]
    if len(fill) > 1:
        named = ", ".join(f"{k}=-1" for k in fill)
        problems.append(
            f"{named}: at most one parallel axis may be -1 (fill the remaining devices); set the others"
        )
    count, index = good.get("parallel.num_processes"), good.get("parallel.process_id")
    if count is not None and index is not None and index >= count:
        problems.append(
            f"parallel.process_id={index!r}, parallel.num_processes={count!r}: "
            "parallel.process_id must be below parallel.num_processes"
        )
    address = good.get("parallel.coordinator_address") or os.environ.get("JAXRL_COORDINATOR", "")
    if count is not None and count > 1 and not address:
        problems.append(
            f"parallel.num_processes={count!r}, parallel.coordinator_address='': a multi-process run "
            "needs the coordinator's host:port (process 0)"
        )
    return problems


def _freeze_pattern(good: dict[str, Any]) -> list[str]:
    pattern = good.get("optimizer.freeze")
    if not pattern:
        return []
    try:
        re.compile(pattern)
    except re.error as err:
        return [f"optimizer.freeze={show(pattern)}: not a valid regular expression ({err})"]
    except (RecursionError, OverflowError) as err:  # groups nested too deep, a repeat count too large
        return [f"optimizer.freeze={show(pattern)}: not a usable regular expression ({err})"]
    return []


def _lora(good: dict[str, Any]) -> list[str]:
    """``lora.targets`` must be a regex that finds at least one projection (named when it finds none)."""
    targets = good.get("lora.targets")
    if not good.get("lora.rank") or not targets:
        return []
    try:
        regex = re.compile(targets)
    except (re.error, RecursionError, OverflowError) as err:
        return [f"lora.targets={show(targets)}: not a valid regular expression ({err})"]
    paths = [f"blocks/{m}" for m in LORA_MODULES]
    if not any(regex.search(p) for p in paths):
        return [f"lora.targets={show(targets)}: matches none of the projections; they are {', '.join(paths)}"]
    return []


def _run_dir(good: dict[str, Any]) -> list[str]:
    """The run directory, or else the nearest of its parents that exists, must be a directory."""
    path = good.get("run_dir")
    if not path:
        return []
    here = os.path.abspath(path)
    while True:
        try:
            mode = os.stat(here).st_mode
            break
        except (FileNotFoundError, NotADirectoryError):  # not made yet, or below a file: look further up
            if os.path.dirname(here) == here:
                return []
            here = os.path.dirname(here)
        except OSError as err:  # a name too long, no permission
            return [f"run_dir={show(path)}: cannot be created ({err.strerror})"]
    if stat.S_ISDIR(mode):
        return []
    if here == os.path.abspath(path):
        return [f"run_dir={show(path)}: exists and is not a directory"]
    return [f"run_dir={show(path)}: cannot be created, {here} is a file, not a directory"]


def _model(good: dict[str, Any]) -> list[str]:
    """Checks that need the architecture: from the checkpoint when model.path is set, else the preset."""
    if "model.path" not in good:
        return []
    if good["model.path"]:
        return _checkpoint_checks(good, good["model.path"])
    preset = good.get("model.preset")
    if preset is None:
        return []
    from jaxrl_llm.models.presets import get_preset

    base = get_preset(preset)
    arch: dict[str, tuple[int, str]] = {}
    for name in ("num_heads", "num_kv_heads", "max_seq_len"):
        key = f"model.{name}"
        if key not in good:
            continue
        if good[key] is None:
            arch[name] = (getattr(base, name), f"{key}={getattr(base, name)!r} (preset {preset!r})")
        else:
            arch[name] = (good[key], f"{key}={good[key]!r}")
    problems = []
    if "num_heads" in arch and "num_kv_heads" in arch and arch["num_heads"][0] % arch["num_kv_heads"][0]:
        problems.append(
            f"{arch['num_heads'][1]}, {arch['num_kv_heads'][1]}: "
            "model.num_heads must be a multiple of model.num_kv_heads"
        )
    return problems + _seq_len(good, arch)


def _checkpoint_checks(good: dict[str, Any], path: str) -> list[str]:
    problems = []
    sizes = [f"model.{n}={good[f'model.{n}']!r}" for n in MODEL_SIZES if good.get(f"model.{n}") is not None]
    if sizes:
        problems.append(
            f"model.path={path!r} with {', '.join(sizes)}: the sizes come from the checkpoint; "
            "leave the model sizes None (or clear model.path to build model.preset)"
        )
    arch, problem = _checkpoint_arch(path)
    if problem is None and not good.get("tokenizer.path"):
        problem = _checkpoint_tokenizer(path)
    return problems + ([problem] if problem else []) + _seq_len(good, arch)


def _checkpoint_tokenizer(path: str) -> str | None:
    """With no tokenizer.path the tokenizer is read from the checkpoint directory, which must hold one."""
    from jaxrl_llm.models.hf_io import checkpoint_dir
    from jaxrl_llm.render.tokenizer import missing_tokenizer_files

    problem = missing_tokenizer_files(checkpoint_dir(path))
    if problem is None:
        return None
    return f"model.path={show(path)}: {problem}; set tokenizer.path to the model's tokenizer"


def _seq_len(good: dict[str, Any], arch: dict[str, tuple[int, str]]) -> list[str]:
    seq_len = good.get("train.seq_len")
    if seq_len is None or "max_seq_len" not in arch or seq_len <= arch["max_seq_len"][0]:
        return []
    return [
        f"train.seq_len={seq_len!r}, {arch['max_seq_len'][1]}: "
        "train.seq_len must not exceed the model's max_seq_len"
    ]


def _checkpoint_arch(path: str) -> tuple[dict[str, tuple[int, str]], str | None]:
    """Reads what the checks need from ``<path>/config.json``, with the loader's own reading and errors."""
    from jaxrl_llm.errors import UserError
    from jaxrl_llm.models import from_hf_config, read_hf_config

    try:
        arch = from_hf_config(read_hf_config(path))
    except UserError as err:
        reason = str(err).removeprefix(f"{path}: ")  # the key already names the path
        return {}, f"model.path={show(path)}: {reason}"
    except OSError as err:  # a name too long, no permission, an unreadable config.json
        return {}, f"model.path={show(path)}: cannot be read ({err.strerror or err})"
    max_len = arch.max_seq_len
    where = os.path.join(path, "config.json")
    return {"max_seq_len": (max_len, f"max_position_embeddings={max_len} (in {where})")}, None


def _tokenizer(good: dict[str, Any]) -> list[str]:
    path = good.get("tokenizer.path")
    if path and not os.path.exists(path):
        return [f"tokenizer.path={show(path)}: no such file or directory"]
    return []


def _data(good: dict[str, Any]) -> list[str]:
    lo, hi = good.get("data.min_tokens"), good.get("data.max_tokens")
    if lo is not None and hi is not None and lo > hi:
        return [
            f"data.min_tokens={lo!r}, data.max_tokens={hi!r}: data.min_tokens must not exceed data.max_tokens"
        ]
    eval_path, split = good.get("data.eval_path"), good.get("data.eval_split")
    if eval_path and split:
        return [
            f"data.eval_path={eval_path!r}, data.eval_split={split!r}: evaluate on a separate file or on a "
            "held-out split of data.path, not both"
        ]
    generate = good.get("train.eval_generate")
    if generate and eval_path == "" and split == 0:
        return [
            f"train.eval_generate={generate!r}: there is no evaluation set to generate from; set "
            "data.eval_split or data.eval_path"
        ]
    if generate and good.get("stage") == "pt":
        return [f"train.eval_generate={generate!r}, stage='pt': raw text has no answers to compare with"]
    processes = good.get("parallel.num_processes")
    if good.get("data.process_split") == "records" and processes is not None and processes > 1:
        bucketed = good.get("stage") not in ("sft", "pt") or good.get("data.packing") == "bucket"
        if bucketed:
            what = (
                "data.packing='bucket'"
                if good.get("data.packing") == "bucket"
                else f"stage={good.get('stage')!r}"
            )
            return [
                f"data.process_split='records', {what}, parallel.num_processes={processes!r}: processes reading "
                "their own records would pick different row lengths on the same step; use "
                "data.process_split='rows'"
            ]
    info, name = good.get("data.dataset_info"), good.get("data.name")
    if info is None or name is None:
        return []
    if bool(info) != bool(name):
        return [
            f"data.dataset_info={info!r}, data.name={name!r}: set both (a LLaMA-Factory registry and the "
            "dataset name in it) or neither"
        ]
    if info and not os.path.isfile(info):
        return [f"data.dataset_info={show(info)}: no such file"]
    return []


RL_STAGES = ("grpo", "ppo")


def _rl(good: dict[str, Any]) -> list[str]:
    """The RL stages' combinations: rewards to learn from, groups a std or a leave-one-out baseline can
    use, and rows that split into the minibatches and micro-batches."""
    if good.get("stage") not in RL_STAGES:
        return []
    problems = []
    if good.get("reward.functions") == []:
        problems.append(
            f"reward.functions=[]: stage={good['stage']!r} needs at least one reward (python -m jaxrl_llm.reward "
            'lists them), e.g. --config.reward.functions=\'[{"name": "math_verify"}]\''
        )
    from .schema import RL_ALGORITHMS

    algorithm = good.get("rl.algorithm")
    if algorithm in RL_ALGORITHMS and good.get("rl.group_size") is not None:
        from jaxrl_llm.objectives.rl import RL_ALGORITHMS as PRESETS

        preset = PRESETS[algorithm]
        group = good["rl.group_size"]
        for key, bad in (("rl.scale", "group_std"), ("rl.baseline", "leave_one_out")):
            value = good.get(key) or preset[key.split(".")[1]]
            if key in good and value == bad and group < 2:
                source = (
                    f"{key}={value!r}" if good.get(key) else f"rl.algorithm={algorithm!r} ({key} {value!r})"
                )
                problems.append(
                    f"rl.group_size={group!r}, {source}: a group of one sample has "
                    + ("no spread to scale by" if bad == "group_std" else "no other members for a baseline")
                    + "; raise rl.group_size or choose another "
                    + key
                )
    problems += _role_meshes(good)
    p, g, m = (good.get(k) for k in ("rl.prompts_per_iteration", "rl.group_size", "rl.minibatches"))
    accum = good.get("train.grad_accum_steps")
    if None not in (p, g, m, accum):
        rows = p * g
        if rows % m:
            problems.append(
                f"rl.prompts_per_iteration={p!r} x rl.group_size={g!r} = {rows} samples, rl.minibatches={m!r}: "
                "the samples must split evenly into the minibatches"
            )
        elif (rows // m) % accum:
            problems.append(
                f"{rows // m} samples per minibatch, train.grad_accum_steps={accum!r}: each minibatch must split "
                "evenly into the micro-batches"
            )
    return problems


def _role_meshes(good: dict[str, Any]) -> list[str]:
    """Meshes of their own for the RL roles: readable shapes, a reference only where there is one, and
    one-step off-policy only with a rollout mesh and with the rollout correction."""
    from jaxrl_llm.parallel.mesh import MeshError, parse_mesh

    problems = []
    for key in ROLE_MESHES:
        if good.get(key):
            try:
                parse_mesh(good[key], key)
            except MeshError as err:
                problems.append(str(err))
    reference = good.get("rl.reference_mesh")
    if reference and good.get("stage") in ("grpo", "ppo"):
        if good.get("stage") == "grpo" and not good.get("rl.beta"):
            problems.append(
                f"rl.reference_mesh={reference!r}, rl.beta=0: a grpo run without a KL penalty has no reference "
                "model to place; set rl.beta > 0 or leave rl.reference_mesh empty"
            )
        if good.get("stage") == "ppo" and not good.get("rl.kl_coef") and good.get("rl.kl_target") is None:
            problems.append(
                f"rl.reference_mesh={reference!r}, rl.kl_coef=0: a ppo run without a KL term has no reference "
                "model to place; set rl.kl_coef (or rl.kl_target) or leave rl.reference_mesh empty"
            )
    return problems + _off_policy(good)


def _off_policy(good: dict[str, Any]) -> list[str]:
    mesh, off_policy = good.get("rollout.mesh"), good.get("rollout.off_policy")
    if off_policy and not mesh:
        return [
            "rollout.off_policy=True, rollout.mesh='': off-policy rollouts overlap the update on devices of "
            "their own; set rollout.mesh (e.g. 'data=4')"
        ]
    if off_policy and good.get("rl.dynamic_sampling"):
        return [
            "rollout.off_policy=True, rl.dynamic_sampling=True: refill rounds wait for their own rollouts, "
            "so nothing would overlap the update; turn one of them off"
        ]
    if off_policy and good.get("rl.rollout_is") == "none":
        return [
            "rollout.off_policy=True, rl.rollout_is='none': samples one step stale need the rollout "
            "correction; set rl.rollout_is='token' (or 'sequence')"
        ]
    return []


def _observe(good: dict[str, Any]) -> list[str]:
    """An unknown logger in observe.report_to is named at parse time (wandb's presence is checked at start)."""
    from jaxrl_llm.observe.reporting import parse_report_to

    if "observe.report_to" not in good:
        return []
    try:
        parse_report_to(good["observe.report_to"])
    except UserError as err:
        return [str(err)]
    return []


def _canary(good: dict[str, Any]) -> list[str]:
    if good.get("canary.every") and not good.get("canary.prompts") and not good.get("canary.path"):
        return [
            f"canary.every={good['canary.every']!r}: set canary.prompts or canary.path (the canary's prompts)"
        ]
    return []
