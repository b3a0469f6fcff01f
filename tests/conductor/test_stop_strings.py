"""StopStringMatcher over streamed text: what is emitted, what is held back, what is dropped."""

from __future__ import annotations

from conductor.stop_strings import StopStringMatcher


def feed(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    return [matcher.push(p) for p in pieces]


def test_no_stops_passes_everything_through_unchanged() -> None:
    m = StopStringMatcher([])
    assert feed(m, ["Hel", "lo", " wor", "ld"]) == ["Hel", "lo", " wor", "ld"]
    assert m.flush() == ""
    assert not m.stopped


def test_empty_stop_strings_are_ignored() -> None:
    m = StopStringMatcher(["", ""])
    assert m.push("abc") == "abc"
    assert not m.stopped


def test_stop_inside_one_push_truncates_and_drops_the_rest() -> None:
    m = StopStringMatcher(["END"])
    assert m.push("one two END three") == "one two "
    assert m.stopped
    assert m.push(" more text") == ""
    assert m.flush() == ""


def test_stop_split_across_pushes() -> None:
    m = StopStringMatcher(["</s>"])
    assert m.push("hello <") == "hello "       # "<" could start the stop string
    assert not m.stopped
    assert m.push("/") == ""                   # "</" still could
    assert m.push("s> tail") == ""             # completes it: nothing after is emitted
    assert m.stopped
    assert m.push("x") == ""
    assert m.flush() == ""


def test_stop_split_over_many_single_characters() -> None:
    m = StopStringMatcher(["STOP"])
    out = feed(m, list("abSTOPcd"))
    assert "".join(out) == "ab"
    assert m.stopped


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    m = StopStringMatcher(["</s>"])
    assert m.push("a <") == "a "
    assert m.push("b") == "<b"                 # "<b" can no longer become "</s>"
    assert not m.stopped


def test_held_prefix_is_released_by_flush_at_the_end() -> None:
    m = StopStringMatcher(["###"])
    assert m.push("answer ##") == "answer "
    assert not m.stopped
    assert m.flush() == "##"
    assert m.flush() == ""                     # released once


def test_only_the_longest_possible_prefix_is_held() -> None:
    m = StopStringMatcher(["abc"])
    assert m.push("xaab") == "xa"              # "ab" held: the first "a" can no longer start "abc"
    assert m.push("c!") == ""
    assert m.stopped


def test_overlapping_partial_match_restarts_inside_held_text() -> None:
    m = StopStringMatcher(["aab"])
    assert m.push("aa") == ""
    assert m.push("ab") == "a"                 # "aaab": the stop starts at index 1
    assert m.stopped


def test_multiple_stops_earliest_in_text_wins() -> None:
    m = StopStringMatcher(["world", "lo"])
    assert m.push("hello world") == "hel"
    assert m.stopped


def test_multiple_stops_earliest_wins_across_pushes() -> None:
    m = StopStringMatcher(["XYZ", "Q"])
    assert m.push("abXY") == "ab"              # "XY" held for "XYZ"
    assert m.push("Q") == "XY"                 # "XYQ": "Q" matches at 2, "XYZ" never will
    assert m.stopped


def test_hold_back_uses_the_longest_prefix_over_all_stops() -> None:
    m = StopStringMatcher(["ab", "xyzw"])
    assert m.push("--xyz") == "--"
    assert m.push("a") == "xyz"                # "a" is held for "ab"
    assert m.flush() == "a"


def test_text_emitted_so_far_plus_flush_equals_input_when_no_stop_occurs() -> None:
    pieces = ["The ", "end", " is ", "e", "n", "d", "e"]
    m = StopStringMatcher(["ended", "\n\n"])
    out = "".join(feed(m, pieces)) + m.flush()
    assert out == "".join(pieces)
    assert not m.stopped
