r"""Math-answer verification for rule-based rewards (GSM8K and MATH style), with regexes and fractions only.

Extraction (``extract_answer``): the first rule that yields a non-empty answer wins.

1. GSM8K's ``#### N``: the last marker whose line goes on with something that can begin an answer (a digit,
   a sign, a decimal point, a currency symbol, a parenthesis or a LaTeX command); the rest of that line is
   the answer. A Markdown heading such as ``#### Step 2`` is not a marker. A marker beats everything after it.
2. The last balanced ``\boxed{...}`` or ``\fbox{...}``: nested braces are allowed, escaped ``\{``/``\}`` do
   not count, and an unclosed box is ignored (an earlier closed one still counts).
3. The last "answer is N" / "answer: N" phrase, case-insensitive (so "The final answer is: N" and
   "Answer: N" too). The answer runs to the end of its sentence (a period followed by whitespace or the end)
   or of its line; when the phrase ends its line, the answer is on the next non-blank line.
4. The last line that starts with "A: N".
5. The last number anywhere in the text: an integer (comma thousands separators allowed), a decimal,
   scientific notation (``1e3``, ``1.5 \times 10^{3}``), a fraction ``a/b``, a mixed number ``1 1/2`` or
   ``\frac{a}{b}``.

A number counts only when nothing glued to it makes it part of a larger expression, and an answer phrase
keeps its whole sentence: ``\boxed{2^{10}}``, ``\boxed{5!}``, ``\boxed{3x}``, ``\boxed{1, 2, 3}`` and
"The answer is 18 because 9 * 2 = 18" are not the numbers 2, 5, 3, 1 or 18 (they are compared as text).

Comparison (``math_verify``): the ground truth is used as given unless it holds ``####`` or a box, in which
case its answer is extracted the same way (so a whole GSM8K solution works as a ground truth). A leading
single-variable assignment (``x = 5``, ``y_1=2``) is dropped from both answers. When both answers parse as
numbers (``parse_number``) they are equal when the fractions are equal or ``|a - b| <= 1e-6 * max(1, |b|)``
(``b`` the ground truth; infinities and NaN never match). Otherwise their ``normalize_answer`` forms must be
equal and non-empty. A percent sign is only stripped: ``50%`` equals ``50`` but not ``0.5``. Anything that
fails to parse scores 0.0: ``math_verify`` never raises and runs in linear time.
"""

from __future__ import annotations

import math
import re
from collections import deque
from fractions import Fraction

__all__ = ["extract_answer", "math_verify", "normalize_answer", "parse_number"]

Number = Fraction | float

_REL_TOL = 1e-6
# Longer digit strings or larger exponents are parsed as floats, never as exact (and slow) fractions.
_MAX_EXACT_DIGITS = 300
_MAX_EXACT_EXPONENT = 300
_MAX_UNWRAP = 4

# --- extraction ---------------------------------------------------------------------------------------------

_GSM8K_MARKER = re.compile(r"####[ \t]*([-+−$€£¥.\d(\\][^\n]*)")
_BRACE = re.compile(r"(?<!\\)[{}]")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:is\b|:)", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^[ \t]*A[ \t]*:[ \t]*(\S[^\n]*)", re.MULTILINE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_LAST_NUMBER = re.compile(
    r"(?<![\w.])[-−]?(?:"
    r"\\[dt]?frac\s*(?:\{\s*-?[\d.]+\s*\}|\d)\s*(?:\{\s*-?[\d.]+\s*\}|\d)"
    r"|\d+[ \t]+\d+/\d+(?![\d/])"
    r"|(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"(?:[eE][-+]?\d+|[ \t]*(?:\\times|×)[ \t]*10\^(?:\{-?\d+\}|\d)|/\d+)?"
    r"|\.\d+"
    r")"
)


def extract_answer(text: str) -> str | None:
    """The final answer ``text`` states, by the rules in the module docstring, stripped; None if none.

    Works for a model's completion and for a reference solution alike. The result is the raw substring
    (``"$18"``, ``"\\frac{1}{2}"``, ``"1,234"``); ``parse_number``/``normalize_answer`` canonicalize it.
    """
    for rule in (_from_gsm8k_marker, _from_box, _from_answer_phrase, _from_answer_line, _from_last_number):
        answer = rule(text)
        if answer:
            return answer
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    matches = deque(pattern.finditer(text), maxlen=1)
    return matches[0] if matches else None


def _from_gsm8k_marker(text: str) -> str | None:
    last = _last_match(_GSM8K_MARKER, text)
    return last.group(1).strip() if last else None


def _from_box(text: str) -> str | None:
    opens = [m.end() - 1 for m in _BOX_OPEN.finditer(text)]
    if not opens:
        return None
    closes = _matching_braces(text)
    for start in reversed(opens):
        end = closes.get(start)
        if end is not None:
            return text[start + 1 : end].strip()
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each balanced ``{`` -> index of its ``}``; braces escaped with a backslash are skipped."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            pairs[stack.pop()] = brace.start()
    return pairs


def _from_answer_phrase(text: str) -> str | None:
    last = _last_match(_ANSWER_PHRASE, text)
    if last is None:
        return None
    rest = text[last.end() :].lstrip(" \t:")
    rest = rest.lstrip()  # an answer on the next line
    line = rest.split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    return (line[: end.start()] if end else line).strip()


def _from_answer_line(text: str) -> str | None:
    last = _last_match(_ANSWER_LINE, text)
    return last.group(1).strip() if last else None


def _from_last_number(text: str) -> str | None:
    last = _last_match(_LAST_NUMBER, text)
    return last.group(0).strip() if last else None


# --- cleaning and normalization -------------------------------------------------------------------------------

_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"))
_WRAPPER = re.compile(r"\\(?:boxed|fbox|text|textbf|textrm|mathrm|mathbf|mbox)\s*\{")
_INLINE_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\(?:left|right)(?![A-Za-z])|\\[!,;:]|\\ ")
_ASSIGNMENT = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")


def _clean(s: str) -> str:
    """Shared clean-up: wrappers, delimiters and LaTeX spacing gone, trailing period dropped."""
    s = s.strip().replace("−", "-").replace("{,}", ",")
    s = _SPACING.sub("", s)
    for _ in range(_MAX_UNWRAP):
        unwrapped = _strip_delimiters(_strip_wrapper(s))
        if unwrapped == s:
            break
        s = unwrapped
    for _ in range(_MAX_UNWRAP):
        s, count = _INLINE_WRAPPER.subn(r"\1", s)
        if not count:
            break
    return s.strip().removesuffix(".").strip()


def _strip_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in _DELIMITERS:
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : -len(right)].strip()
    return s


def _strip_wrapper(s: str) -> str:
    """``\\boxed{X}`` / ``\\text{X}`` / ... -> ``X`` when the wrapper spans the whole string."""
    match = _WRAPPER.match(s)
    if match and s.endswith("}") and _matching_braces(s).get(match.end() - 1) == len(s) - 1:
        return s[match.end() : -1].strip()
    return s


def _strip_assignment(cleaned: str) -> str:
    """``x = 5`` -> ``5``: a leading single-variable assignment is not part of the answer."""
    match = _ASSIGNMENT.match(cleaned)
    return cleaned[match.end() :] if match else cleaned


def normalize_answer(s: str) -> str:
    r"""Canonical text of an answer for non-numeric comparison.

    Strips whitespace, surrounding ``$...$``/``$$...$$``/``\(...\)``/``\[...\]`` (and Markdown ``**``),
    ``\boxed{}``/``\text{}``/``\mathrm{}``-style wrappers (keeping their content), a trailing period,
    ``\left``/``\right`` and the spacing commands ``\!``, ``\,``, ``\;``, ``\:``; writes ``\dfrac``/``\tfrac``
    as ``\frac`` and ``\%`` as ``%``; removes all remaining whitespace and lowercases.
    """
    return _normalize_cleaned(_clean(s))


def _normalize_cleaned(s: str) -> str:
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s).replace("\\%", "%")
    return re.sub(r"\s+", "", s).lower()


# --- numbers --------------------------------------------------------------------------------------------------

_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_FRAC_ARG = rf"(?:\{{\s*([-+]?{_DECIMAL})\s*\}}|(\d))"
_LATEX_FRAC = rf"\\[dt]?frac\s*{_FRAC_ARG}\s*{_FRAC_ARG}"
_PREFIX = re.compile(r"([-+]?)\s*(?:(?:\\?\$|€|£|¥|US\$|USD|EUR|GBP)\s*)?([-+]?)\s*")
_FRACTION_FORMS = (
    re.compile(rf"(\d+)\s*{_LATEX_FRAC}"),  # mixed: 1\frac{1}{2}
    re.compile(_LATEX_FRAC),
    re.compile(r"(\d+)[ \t]+(\d+)\s*/\s*(\d+)(?![\d.])"),  # mixed: 1 1/2
    re.compile(rf"({_DECIMAL})\s*/\s*({_DECIMAL})(?![\d.])"),
)
_PLAIN = re.compile(
    r"(?:\d{1,3}(?:,\d{3})+(?!,?\d)|\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?![ \u00a0\u2009\u202f]?\d)"
    r"|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?(?![\d.])"
    r"|\.\d+(?:[eE][-+]?\d+)?(?![\d.])"
)
_TIMES_TEN = re.compile(r"\s*(?:\\times|\\cdot|×)\s*10\s*\^\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))")
_SUFFIX = re.compile(r"(?:\s*(?:\\?%|°|\^\s*\{?\s*\\circ\s*\}?|€|£|¥|\$))?")
# Something glued to the number that makes it part of a larger expression ("3x", "2^{10}", "5!", "3+x").
_CONTINUATION = re.compile(r"[\w^_\\/*+\-=<>({\[!]|\s*[\\^_/*+\-=<>{\[]")
# A digit in the remainder that is not part of a unit name ("m^2", "km2"): a second number.
_OTHER_NUMBER = re.compile(r"(?<![A-Za-z^_{])\d")


def parse_number(s: str) -> Number | None:
    r"""The number an answer string states, or None.

    Accepts thousands separators (``1,234,567``, ``1 234``), a currency symbol or code before or after the
    number (``$``, ``\$``, ``€``, ``£``, ``¥``, ``USD``), a percent sign (kept as the number: ``25%`` -> 25),
    degrees, and words or units after it (``18 eggs``, ``5 km/h``, ``3 hours``, ``$18 every day``); negative
    numbers, decimals (``.5``, ``3.``), ``3/4``, mixed numbers (``1 1/2``, ``1\frac{1}{2}``),
    ``\frac{3}{4}``/``\dfrac``/``\tfrac``/``\frac34`` (``-\frac{1}{2}``, ``\frac{-1}{2}``), scientific
    notation (``1e3``, ``1.5 \times 10^{3}``). Math delimiters and ``\text{}``-style wrappers are removed
    first. The result is an exact ``Fraction``, or a float for very long digit strings or huge exponents.
    None when the string does not start with a number or the number is part of a larger expression
    (``3x``, ``2^{10}``, ``3 + x``, ``1, 2, 3``). Never raises.
    """
    return _parse_cleaned(_clean(s))


def _parse_cleaned(s: str) -> Number | None:
    try:
        return _parse_number(s)
    except (ValueError, ArithmeticError):  # 1/0, an exponent past float range, an absurdly long integer
        return None


def _parse_number(s: str) -> Number | None:
    prefix = _PREFIX.match(s)
    if prefix is None:  # cannot happen: every part of _PREFIX is optional
        return None
    negative = (prefix.group(1) == "-") != (prefix.group(2) == "-")
    body = s[prefix.end() :]
    parsed = _parse_fraction(body) or _parse_plain(body)
    if parsed is None:
        return None
    value, end = parsed
    suffix = _SUFFIX.match(body, end)
    if not _rest_is_words(body[suffix.end() if suffix else end :]):
        return None
    return -value if negative else value


def _parse_fraction(body: str) -> tuple[Number, int] | None:
    for form in _FRACTION_FORMS:
        match = form.match(body)
        if match is None:
            continue
        parts = [g for g in match.groups() if g is not None]
        value = _divide(_exact(parts[-2]), _exact(parts[-1]))
        if len(parts) == 3:
            value = _exact(parts[0]) + value
        return value, match.end()
    return None


def _parse_plain(body: str) -> tuple[Number, int] | None:
    match = _PLAIN.match(body)
    if match is None:
        return None
    value = _exact(re.sub(r"[,\s]", "", match.group(0)))
    times_ten = _TIMES_TEN.match(body, match.end())
    if times_ten is None:
        return value, match.end()
    exponent = int(times_ten.group(1) or times_ten.group(2))
    if abs(exponent) > _MAX_EXACT_EXPONENT or isinstance(value, float):
        return float(value) * 10.0**exponent, times_ten.end()  # OverflowError -> parse_number's None
    return value * Fraction(10) ** exponent, times_ten.end()


def _rest_is_words(rest: str) -> bool:
    """What follows a number may be units or words, not more of an expression or a second number."""
    if not rest.strip():
        return True
    if _CONTINUATION.match(rest):
        return False
    return _OTHER_NUMBER.search(rest) is None


def _exact(text: str) -> Number:
    """A decimal string as an exact Fraction, or as a float when it is too long or its exponent too large."""
    mantissa, _, exponent = text.lower().partition("e")
    too_big = len(mantissa) > _MAX_EXACT_DIGITS or len(exponent.lstrip("+-")) > 3
    if too_big or (exponent and abs(int(exponent)) > _MAX_EXACT_EXPONENT):
        return float(text)
    return Fraction(text)


def _divide(numerator: Number, denominator: Number) -> Number:
    if isinstance(numerator, float) or isinstance(denominator, float):
        return float(numerator) / float(denominator)
    return numerator / denominator


def _numbers_equal(a: Number, b: Number) -> bool:
    if any(isinstance(x, float) and not math.isfinite(x) for x in (a, b)):
        return False
    if a == b:
        return True
    return abs(a - b) <= _REL_TOL * max(1, abs(b))


# --- verification ---------------------------------------------------------------------------------------------


def math_verify(completion: str, ground_truth: str) -> float:
    """1.0 when the completion's final answer equals the ground truth, else 0.0; never raises.

    ``ground_truth`` is a bare answer (``"72"``, ``"1/2"``, ``"\\frac{1}{2}"``, ``"$18"``) or a whole solution
    holding ``#### N`` or a box, whose answer is then extracted. The comparison rules are in the module
    docstring.
    """
    try:
        if not isinstance(completion, str) or not isinstance(ground_truth, str):
            return 0.0
        reference = _reference_answer(ground_truth)
        answer = extract_answer(completion)
        if not reference or not answer:
            return 0.0
        return 1.0 if _answers_match(answer, reference) else 0.0
    except Exception:  # a reward must not stop training: anything unparseable scores 0
        return 0.0


def _reference_answer(ground_truth: str) -> str:
    if "####" in ground_truth or _BOX_OPEN.search(ground_truth):
        return extract_answer(ground_truth) or ground_truth.strip()
    return ground_truth.strip()


def _answers_match(answer: str, reference: str) -> bool:
    answer, reference = _strip_assignment(_clean(answer)), _strip_assignment(_clean(reference))
    a, b = _parse_cleaned(answer), _parse_cleaned(reference)
    if a is not None and b is not None:
        return _numbers_equal(a, b)
    expected = _normalize_cleaned(reference)
    return bool(expected) and _normalize_cleaned(answer) == expected
