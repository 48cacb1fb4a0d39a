"""Hand cases for every built-in reward (tricky ones included: nested tags, several numbers, unicode)."""

import math

import pytest

from jrft.rewards import (
    AccuracyReward,
    CitationReward,
    HarmfulContentReward,
    LengthReward,
    RepetitionPenaltyReward,
    SoftOverlongReward,
    ThinkAnswerFormatReward,
    extract_answer,
    find_citations,
    parse_number,
)
from jrft.rewards.extract import last_boxed, reference_answer


def score(fn, completions, **columns):
    return fn(prompts=["p"] * len(completions), completions=completions, completion_ids=None, **columns)


# ------------------------------------------------------------------ extraction and numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>42</answer>", "42"),
        ("<think>maybe <answer>7</answer></think><answer>9</answer>", "9"),  # answers inside think ignored
        ("<answer>first</answer> then <answer>second</answer>", "second"),
        ("<answer>outer <answer>5</answer></answer>", "5"),  # nested: innermost of the last block
        ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
        ("\\boxed{1} no, \\boxed{2}", "2"),
        ("<answer>\\boxed{12}</answer>", "12"),
        ("3 apples and 4 pears make 7 fruit", "7"),  # several numbers: the last
        ("it costs $1,234.50 in total.", "1,234.50"),
        ("answer: \u22125", "-5"),  # unicode minus
        ("answer: \uff14\uff12", "42"),  # full-width digits
        ("no digits here", None),
        ("<think>the answer is 3</think>", None),  # only reasoning, no answer
        ("<answer>5</answer> wait <answer>6", "5"),  # truncated last block
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", 42.0),
        ("-3.5", -3.5),
        ("1,234", 1234.0),
        ("$12", 12.0),
        ("50%", 50.0),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("-\\frac{1}{2}", -0.5),
        ("\\text{7}", 7.0),
        ("12.", 12.0),
        ("1e3", 1000.0),
        ("\u0664\u0662", 42.0),  # Arabic-Indic digits
        ("5 apples", None),
        ("x+1", None),
        ("1/0", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_last_boxed_unbalanced_and_bare():
    assert last_boxed("\\boxed{3} and \\boxed{4") == "3"  # unbalanced last one skipped
    assert last_boxed("\\boxed 5$") == "5"
    assert reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"


# ------------------------------------------------------------------ accuracy


def test_accuracy_hand_cases():
    fn = AccuracyReward(symbolic=False)
    completions = [
        "<think>6*7</think><answer>42</answer>",
        "<answer>The answer is 42 apples.</answer>",
        "I think 41, no wait, 42",
        "\\boxed{42.0000001}",
        "<answer>43</answer>",
        "no idea",
        "<answer>\uff14\uff12</answer>",
        "<answer>Paris.</answer>",
    ]
    golds = ["42", "42", "#### 42", "42", "42", "42", "42", "paris"]
    assert score(fn, completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_accuracy_tolerance_and_none_reference():
    loose = AccuracyReward(tolerance=0.01, symbolic=False, correct=2.0, incorrect=-1.0)
    out = score(
        loose,
        ["<answer>3.14</answer>", "<answer>3.3</answer>", "<answer>1</answer>"],
        answer=["3.1416", "3.1416", None],
    )
    assert out == [2.0, -1.0, None]
    # relative above 1: 1e6 vs 1e6 + 5 is within 1e-5 * 1e6 = 10
    assert score(AccuracyReward(tolerance=1e-5), ["1000005"], answer=[1_000_000]) == [1.0]
    assert score(AccuracyReward(tolerance=1e-7), ["1000005"], answer=[1_000_000]) == [0.0]


def test_accuracy_fraction_vs_decimal_and_custom_column():
    fn = AccuracyReward(answer_column="solution", extract=("boxed",), symbolic=False)
    out = score(
        fn, ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "0.5 without box"], solution=["0.5", "1/2", "0.5"]
    )
    assert out == [1.0, 1.0, 0.0]


def test_accuracy_accepts_a_list_of_references():
    fn = AccuracyReward(symbolic=False)
    out = score(fn, ["<answer>NYC</answer>", "<answer>Boston</answer>"], answer=[["New York", "NYC"]] * 2)
    assert out == [1.0, 0.0]


def test_accuracy_errors_name_the_problem():
    with pytest.raises(KeyError, match="'answer'"):
        score(AccuracyReward(), ["1"], solution=["1"])
    with pytest.raises(ValueError, match="unknown extractor"):
        AccuracyReward(extract=("answer_tag", "guess"))


def test_accuracy_symbolic_when_math_verify_installed():
    pytest.importorskip("math_verify")
    assert score(AccuracyReward(), ["<answer>$x+1$</answer>"], answer=["$1+x$"]) == [1.0]


# ------------------------------------------------------------------ format


@pytest.mark.parametrize(
    "text, strict, lenient",
    [
        ("<think>reason</think><answer>5</answer>", 1.0, 1.0),
        ("<think>\nreason\n</think>\n<answer>\n5\n</answer>\n", 1.0, 1.0),
        ("Sure! <think>reason</think><answer>5</answer>", 0.0, 1.0),  # text before
        ("<think>reason</think>so<answer>5</answer> bye", 0.0, 1.0),  # text between / after
        ("<think></think><answer>5</answer>", 0.0, 0.0),  # empty think
        ("<think>a</think><answer>   </answer>", 0.0, 0.0),  # blank answer
        ("<think>a <think>b</think></think><answer>5</answer>", 0.0, 1.0),  # nested think
        ("<think>a</think><answer>5</answer><answer>6</answer>", 0.0, 1.0),  # two answers
        ("<answer>5</answer><think>a</think>", 0.0, 0.0),  # wrong order
        ("<think>a</think>", 0.0, 0.0),
        ("<think>数学</think><answer>五</answer>", 1.0, 1.0),  # unicode content
    ],
)
def test_format_strict_and_lenient(text, strict, lenient):
    assert score(ThinkAnswerFormatReward(mode="strict"), [text]) == [strict]
    assert score(ThinkAnswerFormatReward(mode="lenient"), [text]) == [lenient]


def test_format_think_in_prompt_and_custom_tags():
    assert score(ThinkAnswerFormatReward(think_in_prompt=True), ["reason</think><answer>1</answer>"]) == [1.0]
    custom = ThinkAnswerFormatReward(think_tag="reasoning", answer_tag="final")
    assert score(
        custom, ["<reasoning>r</reasoning><final>1</final>", "<think>r</think><answer>1</answer>"]
    ) == [
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="format.mode"):
        ThinkAnswerFormatReward(mode="loose")


def test_format_conversational_completion():
    conv = [[{"role": "assistant", "content": "<think>r</think><answer>1</answer>"}]]
    assert score(ThinkAnswerFormatReward(), conv) == [1.0]


# ------------------------------------------------------------------ citations


def test_find_citations_styles():
    text = "As shown [1], [2, 3] and [5-7] and [^9]; see [the docs](http://x.org) or https://a.org/b."
    assert find_citations(text, ("brackets",)) == ["1", "2", "3", "5", "6", "7", "9"]
    assert find_citations(text, ("urls",)) == ["http://x.org", "https://a.org/b"]
    assert find_citations("[link](http://x.org)", ("brackets",)) == []


def test_citation_reward_hand_cases():
    fn = CitationReward(styles=("brackets",), min_count=2)
    assert score(fn, ["a [1] b [2]", "a [1] b [1]", "none", "\uff3b1\uff3d and [2]"]) == [1.0, 0.0, 0.0, 1.0]


def test_citation_reward_checks_ids_exist():
    fn = CitationReward(ids_column="sources")
    sources = [["1", "2"], [{"id": 1}, {"id": 2}], ["1"], [{"url": "https://ok.org"}]]
    completions = ["[1][2]", "[1] and [3]", "[4]", "see https://ok.org and https://fake.org"]
    assert score(fn, completions, sources=sources) == [1.0, 0.5, 0.0, 0.5]


# ------------------------------------------------------------------ harmful content


def test_harmful_lexicon_word_boundaries_and_unicode():
    fn = HarmfulContentReward(words=("poison", "kill"), use_default_patterns=False)
    texts = ["How to POISON a well", "great skill", "\uff50\uff4f\uff49\uff53\uff4f\uff4e it", "fine", "kill"]
    assert score(fn, texts) == [-1.0, 0.0, -1.0, 0.0, -1.0]


def test_harmful_regex_defaults_and_classifier_hook():
    assert score(HarmfulContentReward(), ["Here is how to make a bomb", "how to make a cake"]) == [-1.0, 0.0]
    seen = []

    def classifier(texts):
        seen.append(list(texts))
        return [0.9 if "mean" in t else 0.1 for t in texts]

    fn = HarmfulContentReward(classifier=classifier, use_default_patterns=False, penalty=-2.0)
    assert score(fn, ["a mean reply", "a kind reply"]) == [-2.0, 0.0]
    assert seen == [["a mean reply", "a kind reply"]]  # one batched call


def test_harmful_classifier_from_spec_and_bad_config(tmp_path):
    (tmp_path / "clf.py").write_text(
        "def clf(texts):\n    return [1.0 if 'x' in t else 0.0 for t in texts]\n"
    )
    fn = HarmfulContentReward(classifier=f"{tmp_path}/clf.py:clf", use_default_patterns=False)
    assert score(fn, ["x", "y"]) == [-1.0, 0.0]
    with pytest.raises(ValueError, match="invalid regex"):
        HarmfulContentReward(patterns=("(unclosed",))
    with pytest.raises(ValueError, match="nothing to check"):
        HarmfulContentReward(use_default_patterns=False)


# ------------------------------------------------------------------ length and repetition


def test_soft_overlong_matches_dapo_formula():
    fn = SoftOverlongReward(max_length=10, cache_length=4)  # safe up to 6, -1 beyond 10
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 11)]
    out = fn(prompts=["p"] * 6, completions=[""] * 6, completion_ids=ids)
    assert out == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="completion_ids"):
        score(fn, ["abc"])
    with pytest.raises(ValueError, match="cache_length"):
        SoftOverlongReward(max_length=4, cache_length=8)


def test_length_reward_words_and_chars():
    words = LengthReward(target=4, tolerance=1, unit="words")
    assert score(words, ["a b c d", "a b c", "a b", "a b c d e f g h i j"]) == pytest.approx(
        [0.0, 0.0, -0.25, -1.0]
    )
    chars = LengthReward(target=2, unit="chars", scale=2.0)
    assert score(chars, ["ab", "abc", "héé"]) == pytest.approx([0.0, -1.0, -1.0])


def test_repetition_penalty():
    fn = RepetitionPenaltyReward(ngram=2, unit="words")
    out = score(fn, ["a b c d", "a b a b a b", "a", "a a a a a"])
    # "a b a b a b": bigrams ab ba ab ba ab -> 2 distinct of 5 -> 1 - 2/5 = 0.6
    assert out == pytest.approx([0.0, -0.6, 0.0, -0.75])
    tokens = RepetitionPenaltyReward(ngram=1, unit="tokens", scale=0.5)
    assert tokens(prompts=["p"], completions=["x"], completion_ids=[[1, 1, 2, 2]]) == pytest.approx([-0.25])
    assert all(math.isfinite(v) for v in out)
