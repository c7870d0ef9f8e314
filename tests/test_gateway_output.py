"""ChoiceOutput alone: hand-made token events in, text deltas out."""
import pytest

from fastserve.common.schemas import TokenEvent
from fastserve.gateway.model_info import ModelInfo
from fastserve.gateway.output import ChoiceOutput, held_back


@pytest.mark.parametrize(
    "text, stops, expected",
    [("abc", ["cd"], 1), ("abc", ["bcx"], 2), ("abc", ["x"], 0), ("abc", ["abcd", "cz"], 3), ("", ["a"], 0),
     ("xab", ["b", "abc"], 2)],
)
def test_held_back(text, stops, expected):
    assert held_back(text, stops) == expected


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ModelInfo.load(tiny_model_dir, "tiny")


def _feed(model, text, stop, chunks=1, include_stop=False):
    """Feed `text`'s tokens one event per token; return (deltas, choice)."""
    ids = model.encode(text)
    c = ChoiceOutput(0, model, [], stop, include_stop=include_stop)
    deltas = []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        d = c.add(TokenEvent("j", [t], finish_reason="length" if last else None))
        deltas.append(d.text)
        if c.finished:
            break
    return deltas, c


def test_text_that_only_looks_like_a_stop_is_released(model):
    text = "the cat sat on the mat"
    deltas, c = _feed(model, text, ["the dog"])
    assert "".join(deltas) == model.decode(model.encode(text)) and c.finish_reason == "length"
    assert not c.stopped_by_string


def test_stop_string_cuts_and_never_leaks_a_prefix(model):
    text = "the cat sat on the mat and more"
    full = model.decode(model.encode(text))
    deltas, c = _feed(model, text, ["on the m"])
    assert "".join(deltas) == full[: full.index("on the m")]
    assert c.finish_reason == "stop" and c.stopped_by_string
    assert all("on the m" not in d for d in deltas)
    assert c.num_tokens < len(model.encode(text))


def test_include_stop_string(model):
    deltas, c = _feed(model, "hello there world", [" there"], include_stop=True)
    assert "".join(deltas) == "hello there"


def test_error_event(model):
    c = ChoiceOutput(0, model, [], [])
    d = c.add(TokenEvent("j", [], error="boom"))
    assert c.finished and c.error == "boom" and d.text == ""
