"""The formulas of generation evaluation: pass@k, majority voting and the answers a vote counts.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374, eq. 1): of
``n`` i.i.d. samples of a problem, ``c`` are correct; the probability that at least one of ``k`` samples drawn
without replacement from them is correct is

    pass@k = 1 - C(n - c, k) / C(n, k)

(1 when ``n - c < k``: every draw of ``k`` holds a correct one), computed as the paper's numerically stable
product ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``. Averaged over problems it is an unbiased estimate of
the probability that ``k`` fresh samples hold a correct answer; pass@1 is ``c / n``.

maj@k (majority voting, self-consistency; Wang et al. 2022, arXiv:2203.11171): the answer most of ``k``
samples give (ties: the one given first) is the problem's answer, worth 1 when it is correct. The ``n``
samples are i.i.d., so each of their ``n // k`` disjoint runs of ``k`` is a fair draw: maj@k is the mean over
those runs (so maj@1 equals pass@1, and maj@n votes over all of them). A sample's vote is its final
answer as the verifier reads it (``vote_key``): for ``math_verify`` the extracted answer in canonical form
(``85``, ``85.0`` and ``$85`` vote together), otherwise the whole stripped text. A sample without an
extractable answer does not vote; with no votes at all maj@k is 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from jaxrl_llm.reward.math_answers import extract_answer, normalize_answer, parse_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``c`` correct of ``n`` samples (module docstring)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def sample_ks(n: int) -> tuple[int, ...]:
    """The k reported for ``n`` samples: the powers of two up to ``n``, and ``n`` itself."""
    ks = [k for k in (2**i for i in range(n.bit_length())) if k <= n]
    return tuple(ks if ks[-1] == n else [*ks, n])


def vote_key(text: str, verifier: str | None) -> str | None:
    """The answer ``text`` votes for (module docstring); None when it states none."""
    if verifier == "math_verify":
        answer = extract_answer(text)
        if not answer:
            return None
        number = parse_number(answer)
        return f"={number}" if number is not None else (normalize_answer(answer) or None)
    return text.strip() or None


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most voted answer among ``keys`` is correct (judged by the first sample that gave it)."""
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]  # equal counts keep first-seen order
    return bool(correct[list(keys).index(winner)])


def maj_at_k(keys: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """maj@k of one problem from its ``n`` samples' votes and correctness: the mean over the ``n // k``
    disjoint runs of ``k`` samples of whether the run's majority answer is correct."""
    if not 1 <= k <= len(keys) or len(keys) != len(correct):
        raise ValueError(f"maj@k needs 1 <= k <= n and one verdict per vote, got k={k}, n={len(keys)}")
    runs = range(0, len(keys) // k * k, k)
    return sum(majority_correct(keys[i : i + k], correct[i : i + k]) for i in runs) / len(runs)
