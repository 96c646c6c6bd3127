"""The math-answer verifier: extraction rules and their priority, number parsing, comparison, robustness."""

from __future__ import annotations

import json
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest

from jaxrl_llm.reward.math_answers import extract_answer, math_verify, normalize_answer, parse_number

GSM8K_TEST = Path(__file__).parent / "data" / "gsm8k" / "test.jsonl"


# --- real data ----------------------------------------------------------------------------------------------


def _gsm8k_records() -> list[dict[str, str]]:
    with GSM8K_TEST.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_gsm8k_test_set_solutions_verify_against_their_answers():
    records = _gsm8k_records()
    assert len(records) == 1319
    finals = [record["answer"].rsplit("####", 1)[1].strip() for record in records]
    values = [parse_number(final) for final in finals]
    assert all(value is not None for value in values)

    matches_final = matches_self = rejects_other = 0
    for i, record in enumerate(records):
        solution = record["answer"]
        j = (i + 1) % len(records)
        while values[j] == values[i]:  # the next record whose answer differs numerically
            j = (j + 1) % len(records)
        matches_final += math_verify(solution, finals[i]) == 1.0
        matches_self += math_verify(solution, solution) == 1.0
        rejects_other += math_verify(solution, finals[j]) == 0.0
    assert (matches_final, matches_self, rejects_other) == (1319, 1319, 1319)


def test_gsm8k_answers_with_thousands_separators_parse_to_their_value():
    finals = [record["answer"].rsplit("####", 1)[1].strip() for record in _gsm8k_records()]
    with_commas = [final for final in finals if "," in final]
    assert with_commas  # e.g. "1,450,000"
    for final in with_commas:
        assert parse_number(final) == int(final.replace(",", ""))
        assert math_verify(f"The answer is {final}.", final.replace(",", "")) == 1.0


# --- tricky formats -------------------------------------------------------------------------------------------

TRICKY = [
    # Numbers in words and markup.
    ("The answer is 1,234.", "1234", 1.0),
    ("The answer is 1234.", "1,234", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{\tfrac{3}{4}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\frac34}", "0.75", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{\frac{-1}{2}}", r"-\frac{1}{2}", 1.0),
    ("#### $18", "18", 1.0),
    ("#### 18", "$18", 1.0),
    ("So she makes $18 every day.", "18", 1.0),
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.", "18", 1.0),
    ("Answer: 18 eggs", "18", 1.0),
    ("A: -3", "-3", 1.0),
    ("A: −3", "-3", 1.0),  # Unicode minus
    ("the answer is 2.50", "2.5", 1.0),
    ("The final answer is: **42**", "42", 1.0),
    ("The answer is $\\frac{1}{2}$. Hope this helps!", "1/2", 1.0),
    ("1 1/2 cups", "1.5", 1.0),
    (r"\boxed{1\frac{1}{2}}", "3/2", 1.0),
    ("1e3", "1000", 1.0),
    (r"\boxed{1.5 \times 10^{3}}", "1500", 1.0),
    ("50%", "50", 1.0),
    (r"\boxed{50\%}", "50", 1.0),
    ("0.5", "50%", 0.0),  # a percent sign is stripped, not divided by 100
    (r"\boxed{\$1,000.50}", "1000.5", 1.0),
    ("It costs €12.", "12", 1.0),
    ("The answer is 120 dollars.", "$120", 1.0),
    ("The speed is 5 km/h", "5", 1.0),
    ("The answer is 3 hours", "3", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    ("The answer is .5", "1/2", 1.0),
    ("The answer is 3.", "3", 1.0),
    ("$0.3333333$", "1/3", 1.0),  # within the 1e-6 relative tolerance
    ("I think 5... no wait, 7", "7", 1.0),  # last number
    # Wrong answers.
    (r"\boxed{18}", "19", 0.0),
    ("about 3.0001", "3", 0.0),
    ("The answer is 18", "-18", 0.0),
    ("The answer is 1/3", "0.33", 0.0),
    (r"\boxed{2^{10}}", "2", 0.0),  # part of a larger expression, not the number 2
    (r"\boxed{5!}", "5", 0.0),
    (r"\boxed{3x}", "3", 0.0),
    (r"\boxed{1, 2, 3}", "1", 0.0),
    ("The answer is 18 because 9 * 2 = 18", "18", 0.0),  # answer text is "18 because 9 * 2 = 18"
    ("", "7", 0.0),
    ("no numbers here", "7", 0.0),
    ("The answer is 7", "", 0.0),
    (r"\boxed{}", "", 0.0),
    (r"\boxed{", "7", 0.0),
    ("1e999", "1e999", 0.0),  # infinities never match
    # Non-numeric answers: compared as normalized text.
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{\dfrac{\sqrt{2}}{2}}", r"$\frac{\sqrt{2}}{2}$", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{2}}{2}", 0.0),
    (r"\boxed{\text{Monday}}", "monday", 1.0),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0),
    (r"\boxed{\pi}", r"\(\pi\)", 1.0),
    # A leading single-variable assignment is dropped.
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{x=5}", "x = 5", 1.0),
    (r"\boxed{y = 2x + 3}", "2x+3", 1.0),
    (r"\boxed{x = 5}", "6", 0.0),
    # Priority: #### beats everything, the last box beats phrases and numbers.
    (r"\boxed{1} then \boxed{2}", "2", 1.0),
    (r"\boxed{1} then \boxed{2}", "1", 0.0),
    ("#### 72\nThat took 3 steps.", "72", 1.0),
    ("#### 72\nThe answer is 5", "5", 0.0),
    ("The answer is 5. Double-checking: 2 + 2 = 4", "5", 1.0),
    (r"The answer is 4, i.e. \boxed{5}", "5", 1.0),
    ("#### Step 1\nThe answer is 4", "4", 1.0),  # a Markdown heading is not a GSM8K marker
    # Ground truth given as a whole solution.
    ("The total is 72.", "48 + 24 = <<48+24=72>>72 clips\n#### 72", 1.0),
    (r"so \boxed{\frac{1}{4}}", r"Hence the probability is $\boxed{\frac14}$.", 1.0),
]


@pytest.mark.parametrize(("completion", "ground_truth", "expected"), TRICKY)
def test_tricky_formats(completion: str, ground_truth: str, expected: float):
    assert math_verify(completion, ground_truth) == expected


# --- extract_answer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # 1. #### (the last marker; the rest of its line).
        ("Work: 1 + 2 = 3\n#### 3", "3"),
        ("#### 1\n#### 2\nthen 9", "2"),
        ("#### $1,200 \n", "$1,200"),
        ("#### -7", "-7"),
        ("#### Step 1\nwe get 8", "8"),
        ("####\n5", "5"),  # an empty marker: falls through to the last number
        # 2. The last balanced box.
        (r"\boxed{1} and \boxed{2}", "2"),
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
        (r"\fbox{ 42 }", "42"),
        (r"\boxed {7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{3} then \boxed{4", "3"),  # an unclosed box is ignored
        (r"\boxed{}", None),
        (r"The answer is 4. \boxed{5}", "5"),
        (r"#### 6 \boxed{5}", r"6 \boxed{5}"),
        # 3. Answer phrases (case-insensitive, last one; to the end of the sentence or line).
        ("The answer is 12.", "12"),
        ("THE ANSWER IS 12", "12"),
        ("the final answer is: 2.5 hours. Done", "2.5 hours"),
        ("Answer: 18 eggs", "18 eggs"),
        ("The answer is 3. No, the answer is 4.", "4"),
        ("The answer is:\n\n  17\n", "17"),
        ("The answer is 5 and 7 is wrong", "5 and 7 is wrong"),
        ("He answered 5, then 6", "6"),  # "answered" is not a phrase: last number
        # 4. An answer line.
        ("Q: how many?\nA: 9 apples\n", "9 apples"),
        ("  A:  -2", "-2"),
        ("A: 1\nA: 2\n", "2"),
        # 5. The last number.
        ("I think 5... no wait, 7", "7"),
        ("It costs $1,234,567 in total", "1,234,567"),
        ("Half is 1/2 here", "1/2"),
        ("1 1/2 cups", "1 1/2"),
        (r"so it is \frac{3}{4} of it", r"\frac{3}{4}"),
        ("We get 3.25.", "3.25"),
        ("tiny .5", ".5"),
        ("x is -4", "-4"),
        ("5-3", "3"),
        ("1e3", "1e3"),
        # Nothing.
        ("", None),
        ("no numbers here", None),
        ("   \n\t", None),
    ],
)
def test_extract_answer(text: str, expected: str | None):
    assert extract_answer(text) == expected


def test_extract_answer_priority_order():
    text = "A: 1\nThe answer is 2.\n\\boxed{3}\n#### 4\nand 5 more"
    assert extract_answer(text) == "4"
    assert extract_answer(text.replace("#### 4", "")) == "3"
    assert extract_answer(text.replace("#### 4", "").replace("\\boxed{3}", "")) == "2"
    assert extract_answer("A: 1\nand 5 more") == "1"
    assert extract_answer("and 5 more") == "5"


# --- parse_number and normalize_answer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", 72),
        ("-3", -3),
        ("+3", 3),
        ("−3", -3),
        ("1,234,567", 1234567),
        ("1 234", 1234),
        (r"1\,234", 1234),
        ("1{,}234", 1234),
        ("2.50", Fraction(5, 2)),
        (".5", Fraction(1, 2)),
        ("3.", 3),
        ("3/4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("1 1/2", Fraction(3, 2)),
        ("-1 1/2", Fraction(-3, 2)),
        (r"\frac{3}{4}", Fraction(3, 4)),
        (r"\dfrac{3}{4}", Fraction(3, 4)),
        (r"\tfrac{3}{4}", Fraction(3, 4)),
        (r"\frac34", Fraction(3, 4)),
        (r"\frac {1.5} {3}", Fraction(1, 2)),
        (r"-\frac{1}{2}", Fraction(-1, 2)),
        (r"\frac{-1}{2}", Fraction(-1, 2)),
        (r"2\frac{1}{4}", Fraction(9, 4)),
        ("1e3", 1000),
        ("2.5E-2", Fraction(1, 40)),
        (r"1.5 \times 10^{3}", 1500),
        ("$18", 18),
        (r"\$18.90", Fraction(189, 10)),
        ("-$18", -18),
        ("$-18", -18),
        ("€5", 5),
        ("£5", 5),
        ("¥5", 5),
        ("5€", 5),
        ("USD 18", 18),
        ("18 USD", 18),
        ("18 dollars", 18),
        ("25%", 25),
        (r"25\%", 25),
        ("18 eggs", 18),
        ("5 km/h", 5),
        ("3 hours", 3),
        ("4 m^2", 4),
        ("$18 every day", 18),
        ("18.", 18),
        (r"90^\circ", 90),
        ("90°", 90),
        ("$5$", 5),
        (r"\(5\)", 5),
        (r"\boxed{5}", 5),
        (r"\text{18 eggs}", 18),
        (r"18 \text{ eggs}", 18),
        ("**18**", 18),
        ("3x", None),
        ("3 + x", None),
        ("2^{10}", None),
        (r"3\pi", None),
        (r"3 \pi", None),
        (r"\sqrt{2}", None),
        ("5!", None),
        ("1, 2, 3", None),
        ("18 eggs and 2 hens", None),
        ("1/0", None),
        ("x = 5", None),  # parse_number does not drop assignments (math_verify does)
        ("approximately 5", None),
        ("", None),
        ("abc", None),
        ("-", None),
        ("$", None),
    ],
)
def test_parse_number(text: str, expected: int | Fraction | None):
    value = parse_number(text)
    if expected is None:
        assert value is None
    else:
        assert isinstance(value, Fraction) and value == expected


def test_parse_number_huge_values_are_floats():
    assert parse_number("1e999") == float("inf")
    assert parse_number("9" * 5000) == float("inf")
    assert parse_number("1e-999") == 0.0
    assert isinstance(parse_number("1" + "0" * 400), float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Monday. ", "monday"),
        (r"$\frac{\sqrt{2}}{2}$", r"\frac{\sqrt{2}}{2}"),
        (r"\(\dfrac{\sqrt{2}}{2}\)", r"\frac{\sqrt{2}}{2}"),
        (r"\[ x^2 \]", "x^2"),
        (r"\text{Tuesday}", "tuesday"),
        (r"\mathrm{B}", "b"),
        (r"the \text{red} one", "theredone"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"3\!\,\;x", "3x"),
        (r"50\%", "50%"),
        (r"\boxed{\text{(C)}}", "(c)"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str):
    assert normalize_answer(text) == expected


# --- robustness -----------------------------------------------------------------------------------------------

_FRAGMENTS = [
    "\\boxed{",
    "\\fbox{",
    "}",
    "{",
    "\\{",
    "####",
    "The answer is",
    "answer:",
    "\nA: ",
    "\\frac",
    "\\dfrac{",
    "$",
    "\\(",
    "\\)",
    "\\text{",
    "\\left(",
    "1,",
    "234",
    "/",
    ".",
    "-",
    "e",
    "%",
    "x =",
    " ",
    "\n",
    "\\",
    "^",
    "\\times 10^",
    "−",
    "€",
    "é",
    "日本",
    "\x00",
    "\ud800",  # a lone surrogate
    "😀",
    "1e99999",
]


def _garbage(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(40)))
    return "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(25)))


def test_never_raises_on_garbage():
    rng = random.Random(1234)
    for _ in range(3000):
        completion, ground_truth = _garbage(rng), _garbage(rng)
        assert math_verify(completion, ground_truth) in (0.0, 1.0)
        assert math_verify(completion, completion) in (0.0, 1.0)
        extract_answer(completion)
        parse_number(completion)
        normalize_answer(completion)


@pytest.mark.parametrize(
    "text",
    [r"\boxed{", r"\boxed{\frac{1}{", "}}}{{{", "#### ", "The answer is", "A:", r"\frac{1}{0}", r"\\boxed{{"],
)
def test_unbalanced_and_degenerate_inputs_score_zero(text: str):
    assert math_verify(text, "7") == 0.0
    assert math_verify("7", text) == 0.0


def test_non_string_inputs_score_zero():
    assert math_verify(None, "7") == 0.0  # type: ignore[arg-type]
    assert math_verify("7", 7) == 0.0  # type: ignore[arg-type]


_HUGE = 100_000


def _random_text(length: int) -> str:
    rng = random.Random(0)
    parts: list[str] = []
    while sum(map(len, parts)) < length:
        parts.extend(rng.choice(_FRAGMENTS) for _ in range(1000))
    return "".join(parts)


_PATHOLOGICAL = {
    "digits": "9" * _HUGE,
    "boxes": "\\boxed{" * (_HUGE // 7),
    "nested_boxes": "\\boxed{" + "{" * (_HUGE // 2) + "}" * (_HUGE // 2) + "}",
    "braces": "{" * _HUGE,
    "wrappers": "\\text{" * (_HUGE // 7) + "}" * (_HUGE // 7),
    "phrases": "the answer is " * (_HUGE // 14),
    "phrase_then_spaces": "answer" + " " * _HUGE,
    "markers": "#### " * (_HUGE // 5),
    "commas": "1," * (_HUGE // 2),
    "spaced_groups": "1 000 " * (_HUGE // 6),
    "mixed_numbers": "1 1/" * (_HUGE // 4),
    "answer_lines": "A: 1\n" * (_HUGE // 5),
    "digit_then_spaces": "1" + " " * _HUGE,
    "dollars": "$" * _HUGE,
    "exponents": "1e" * (_HUGE // 2),
    "fracs": "\\frac{1}{" * (_HUGE // 9),
    "times_ten": "1 \\times 10^" * (_HUGE // 12),
    "random": _random_text(_HUGE),
}


@pytest.mark.parametrize("name", sorted(_PATHOLOGICAL))
def test_100k_character_inputs_are_fast(name: str):
    text = _PATHOLOGICAL[name]
    assert len(text) >= 90_000
    start = time.perf_counter()
    assert math_verify(text, "7") in (0.0, 1.0)
    assert math_verify("7", text) in (0.0, 1.0)
    assert math_verify(text, text) in (0.0, 1.0)
    assert time.perf_counter() - start < 1.0
