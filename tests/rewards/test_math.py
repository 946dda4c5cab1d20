"""Math grading: box extraction, the CWM format, math-verify equivalence, hacks, timeouts."""

import subprocess
import sys
import time

import pytest

from rewards.math import MathVerdict, agrade_math, check_format, extract_boxed, grade_math, grades_in_process, verify_in_worker
from rewards.pool import VerifierPool

# sympy evaluates this integer power tower in C when comparing: it never finishes.
POWER_TOWER = "9^{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=5.0) as pool:
        pool.start()
        yield pool


@pytest.fixture
def closed_pool():
    """A pool that raises if used: proves a verdict was reached without math-verify."""
    pool = VerifierPool(num_workers=1)
    pool.close()
    return pool


def grade(response, gold, pool, **kwargs) -> MathVerdict:
    return grade_math(response, gold, pool=pool, **kwargs)


# ---- extract_boxed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, boxes",
    [
        ("no box here", []),
        ("so \\boxed{72}.", ["72"]),
        ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
        ("\\boxed{\\{1, 2\\}}", ["\\{1, 2\\}"]),  # escaped braces do not close the box
        ("\\boxed{a^{b^{c}}} then \\fbox{7}", ["a^{b^{c}}", "7"]),
        ("\\boxed {5}", ["5"]),
        ("\\boxed{1} and \\boxed{2}", ["1", "2"]),
        ("\\boxed{\\boxed{3}}", ["\\boxed{3}"]),  # a nested box counts once, with its outer box
        ("\\boxed{}", [""]),
        ("\\boxed{72", []),  # unclosed
        ("\\boxedx{72}", []),  # another command
        ("\\boxed{\\text{a \\\\ b}}", ["\\text{a \\\\ b}"]),
    ],
)
def test_extract_boxed(text, boxes):
    assert extract_boxed(text) == boxes


# ---- check_format ---------------------------------------------------------------------------


def test_check_format_plain_returns_the_whole_response():
    assert check_format("it is \\boxed{4}", think=False) == ("it is \\boxed{4}", None)


def test_check_format_think_returns_the_text_after_think():
    answer, error = check_format("<think>maybe \\boxed{3}? no</think> it is \\boxed{4}", think=True)
    # A box in the thinking is ignored when there is exactly one after </think>.
    assert (answer, error) == (" it is \\boxed{4}", None)


@pytest.mark.parametrize(
    "response, think, message",
    [
        ("the answer is 4", False, "found 0 \\boxed{} answers; exactly one is required"),
        ("\\boxed{4} or \\boxed{5}", False, "found 2 \\boxed{} answers; exactly one is required"),
        ("\\boxed{ }", False, "the \\boxed{} answer is empty"),
        ("no end tag \\boxed{4}", True, "found 0 </think> tags; exactly one is required"),
        ("<think>a</think>b</think>\\boxed{4}", True, "found 2 </think> tags; exactly one is required"),
        ("<think>\\boxed{4}</think> done", True, "a box inside the thinking does not count"),
    ],
)
def test_check_format_errors_name_the_problem(response, think, message):
    answer, error = check_format(response, think=think)
    assert answer is None
    assert message in error


# ---- grade_math: equivalence ------------------------------------------------------------------


@pytest.mark.parametrize(
    "boxed, gold",
    [
        ("72", "72"),
        ("72.0", "72"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("\\frac12", "1/2"),
        ("\\dfrac{3}{4}", "3/4"),
        ("7/2", "3.5"),
        ("2(x+1)", "2x+2"),
        ("1 + x^{2}", "x^2+1"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("\\sqrt{2}", "2^{1/2}"),
        ("x = 3", "3"),
        ("\\{1, 2\\}", "\\{2, 1\\}"),
        ("\\$72", "72"),
        ("5", "\\$5"),  # an escaped dollar in the gold is money, not a math delimiter
        ("5", "$5$"),
    ],
)
def test_equivalent_forms_are_correct(pool, boxed, gold):
    verdict = grade(f"The answer is \\boxed{{{boxed}}}.", gold, pool)
    assert verdict.status == "correct", verdict.reason
    assert verdict.correct
    assert verdict.extracted == boxed
    assert verdict.gold == gold


@pytest.mark.parametrize(
    "boxed, gold",
    [
        ("71", "72"),
        ("0.51", "1/2"),
        ("x^2-1", "x^2+1"),
        ("2x", "2y"),
        ("72, 73", "72"),  # listing candidates is not an answer
        ("72 \\text{ or } 73", "72"),
        ("\\{72, 73\\}", "72"),
        ("???", "72"),  # unparseable prediction: wrong, not an error
    ],
)
def test_wrong_answers_are_wrong(pool, boxed, gold):
    verdict = grade(f"\\boxed{{{boxed}}}", gold, pool)
    assert verdict.status == "wrong", verdict.reason
    assert not verdict.correct
    assert repr(gold) in verdict.reason


# ---- grade_math: format and hacks (no math-verify call) ---------------------------------------


@pytest.mark.parametrize(
    "response, think",
    [
        ("The answer is 72.", False),
        ("\\boxed{72} \\boxed{13}", False),  # gold first, hedge second
        ("\\boxed{13} \\boxed{72}", False),
        ("\\boxed{72} \\boxed{72}", False),
        ("\\boxed{}", False),
        ("\\boxed{72}", True),  # no </think>
        ("<think>\\boxed{72}</think> so that is it", True),  # box only inside the thinking
        ("<think>x</think></think>\\boxed{72}", True),
    ],
)
def test_format_violations_never_score(closed_pool, response, think):
    verdict = grade(response, "72", closed_pool, think=think)
    assert verdict.status == "format_error"
    assert verdict.extracted is None
    assert not verdict.correct


def test_think_mode_grades_the_answer_after_think(pool):
    verdict = grade("<think>2+2 is 4</think>\nSo \\boxed{4}.", "4", pool, think=True)
    assert verdict.status == "correct", verdict.reason


def test_think_tags_are_just_text_when_think_is_off(pool):
    verdict = grade("<think>hmm</think></think> \\boxed{4}", "4", pool)
    assert verdict.status == "correct", verdict.reason


def test_overlong_response_is_a_format_error_without_verifying(closed_pool):
    response = "x" * 20_001 + "\\boxed{72}"
    verdict = grade(response, "72", closed_pool)
    assert verdict.status == "format_error"
    assert verdict.reason == f"response is {len(response)} chars; limit is 20000"
    short = grade("\\boxed{72}" + "x" * 50, "72", closed_pool, max_response_chars=20)
    assert short.reason == "response is 60 chars; limit is 20"


# ---- grade_math: plain integers, graded without math-verify ------------------------------------

INTEGER_PAIRS = [("72", "72"), ("007", "7"), ("+5", "5"), ("-0", "0"), ("-5", "5"), ("71", "72"), ("10", "1"),
                 ("123456789012345678901234567890", "123456789012345678901234567890"), ("72", " 72 "), ("72", "-72")]


@pytest.mark.parametrize("boxed, gold", INTEGER_PAIRS)
def test_plain_integers_are_graded_in_process_as_math_verify_grades_them(closed_pool, boxed, gold):
    response = f"So \\boxed{{{boxed}}}."
    assert grades_in_process(response, gold)
    verdict = grade(response, gold, closed_pool)  # the closed pool raises if it is asked
    assert verdict.status == ("correct" if verify_in_worker(boxed, gold) else "wrong"), verdict.reason
    assert verdict.extracted == boxed


@pytest.mark.parametrize("boxed, gold", [("72.0", "72"), ("1,000", "1000"), ("\\frac{4}{2}", "2"), ("٧٢", "72"), ("72", "7/1"),
                                         ("1" * 51, "1" * 51)])
def test_anything_but_two_plain_integers_goes_to_math_verify(pool, boxed, gold):
    assert not grades_in_process(f"\\boxed{{{boxed}}}", gold)
    assert grade(f"\\boxed{{{boxed}}}", gold, pool).status == ("correct" if verify_in_worker(boxed, gold) else "wrong")


async def test_agrade_math_grades_plain_integers_in_process(closed_pool):
    assert (await agrade_math("\\boxed{72}", "72", pool=closed_pool)).status == "correct"
    assert (await agrade_math("\\boxed{-72}", "72", pool=closed_pool)).status == "wrong"


def test_format_errors_are_graded_in_process():
    assert grades_in_process("no box", "72") and grades_in_process("\\boxed{1} \\boxed{2}", "72")
    assert not grades_in_process("<think>x</think>\\boxed{1/2}", "0.5", think=True)


# ---- grade_math: verifier failures ------------------------------------------------------------


def test_pathological_answer_times_out_and_the_pool_recovers(pool):
    start = time.monotonic()
    verdict = grade(f"\\boxed{{{POWER_TOWER}}}", "72", pool, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert verdict.status == "timeout", verdict.reason
    assert not verdict.correct
    assert verdict.extracted == POWER_TOWER
    assert 1.0 <= elapsed < 4.0  # its own 1 s, not the pool default of 5 s (margin for a loaded machine)
    assert grade("\\boxed{72}", "72", pool).status == "correct"


@pytest.mark.parametrize("gold", ["???", "", "\\frac{"])
def test_unparseable_gold_is_an_error_naming_the_gold(pool, gold):
    verdict = grade("\\boxed{72}", gold, pool)
    assert verdict.status == "error"
    assert f"gold answer {gold!r} could not be parsed" in verdict.reason
    assert not verdict.correct


def test_non_string_gold_raises_naming_the_fix(pool):
    with pytest.raises(TypeError, match="str\\(gold\\)"):
        grade("\\boxed{72}", 72, pool)


# ---- entry points -----------------------------------------------------------------------------


async def test_agrade_math(pool):
    verdicts = [
        await agrade_math("\\boxed{\\frac{1}{2}}", "0.5", pool=pool),
        await agrade_math("\\boxed{3}", "0.5", pool=pool),
        await agrade_math("no box", "0.5", pool=pool),
    ]
    assert [v.status for v in verdicts] == ["correct", "wrong", "format_error"]


def test_grade_math_uses_the_default_pool_when_none_is_given():
    assert grade_math("\\boxed{6}", "6").status == "correct"


def test_pool_workers_are_warm_before_their_first_job():
    # Cold, math-verify takes 0.1-0.3 s on a fraction; warm_up_worker runs before the first job.
    with VerifierPool(num_workers=1) as fresh:
        fresh.start()
        result = fresh.run(verify_in_worker, "\\frac{3}{4}", "0.75")
    with VerifierPool(num_workers=1, preload=()) as unwarmed:  # no warm_up_worker: the first call pays it
        unwarmed.start()
        cold = unwarmed.run(verify_in_worker, "\\frac{3}{4}", "0.75")
    assert result.value is True and cold.value is True
    assert result.elapsed_s < cold.elapsed_s / 2, (result.elapsed_s, cold.elapsed_s)  # a load slows both alike


def test_verify_in_worker_runs_in_process_too():
    assert verify_in_worker("\\frac{2}{4}", "0.5") is True
    assert verify_in_worker("3", "0.5") is False
    with pytest.raises(ValueError, match="could not be parsed"):
        verify_in_worker("3", "???")


def test_importing_rewards_math_does_not_import_sympy():
    code = "import sys, rewards.math; print('sympy' in sys.modules, 'math_verify' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
