"""TextStream: streamed text with stop strings, on the default model's real tokenizer."""

from gateway.text_stream import TextStream


def stream_pieces(tokenizer, pieces: list[str], stop: tuple[str, ...]) -> tuple[TextStream, list[str]]:
    """Pushes the tokens of each piece as one step; returns the stream and the delta of each step."""
    stream = TextStream(tokenizer, stop)
    return stream, [stream.push(tokenizer.encode(piece)) for piece in pieces]


def stream_tokens(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[TextStream, str]:
    stream = TextStream(tokenizer, stop)
    out = "".join(stream.push([token_id]) for token_id in tokenizer.encode(text))
    return stream, out + stream.finish()


def test_without_stop_strings_the_stream_is_the_full_decode(tokenizer):
    text = "Streaming 日本語 and emoji 😀🎉 works, naïvely."
    stream, out = stream_tokens(tokenizer, text, stop=())
    assert out == tokenizer.decode(tokenizer.encode(text)) == text
    assert not stream.stopped


def test_text_stops_before_the_stop_string(tokenizer):
    stream, out = stream_tokens(tokenizer, "The answer is 42.\nUser: next question", stop=("\nUser:",))
    assert out == "The answer is 42."
    assert stream.stopped


def test_stop_string_spanning_several_tokens_never_appears_in_the_output(tokenizer):
    stop = "lo wor"
    stream = TextStream(tokenizer, (stop,))
    deltas = [stream.push([token_id]) for token_id in tokenizer.encode("Hello world, hello again")]
    assert stream.stopped
    assert "".join(deltas) == "Hel"
    assert all(stop not in d for d in deltas)


def test_stop_string_inside_one_token_cuts_that_token(tokenizer):
    stream, out = stream_tokens(tokenizer, "Hello world", stop=("orl",))
    assert out == "Hello w"
    assert stream.stopped


def test_earliest_of_several_stop_strings_wins(tokenizer):
    stream, out = stream_tokens(tokenizer, "one two three four", stop=("four", "two"))
    assert out == "one "
    assert stream.stopped


def test_multibyte_stop_string(tokenizer):
    stream, out = stream_tokens(tokenizer, "I am 😀 happy", stop=("😀",))
    assert out == "I am "
    assert stream.stopped


def test_nothing_is_released_after_the_stop(tokenizer):
    stream, deltas = stream_pieces(tokenizer, ["Hello", " STOP", " more text"], stop=(" STOP",))
    assert deltas == ["Hello", "", ""]
    assert stream.finish() == ""


def test_possible_start_of_a_stop_string_is_held_back_then_released(tokenizer):
    stream, deltas = stream_pieces(tokenizer, ["Hello", " there", " world"], stop=("Hello there!",))
    assert deltas == ["", "", "Hello there world"]
    assert not stream.stopped


def test_partial_stop_prefix_is_held_back_but_earlier_text_is_released(tokenizer):
    stream, deltas = stream_pieces(tokenizer, ["I said EN", "D", "ING"], stop=("END!",))
    assert deltas == ["I said ", "", "ENDING"]
    assert not stream.stopped


def test_held_back_text_is_released_when_generation_ends(tokenizer):
    stream, deltas = stream_pieces(tokenizer, ["Goodbye", " wor"], stop=(" world",))
    assert deltas == ["Goodbye", ""]
    assert stream.finish() == " wor"
    assert not stream.stopped


def test_stop_completed_after_being_held_back(tokenizer):
    stream, deltas = stream_pieces(tokenizer, ["Goodbye", " wor", "ld and more"], stop=(" world",))
    assert deltas == ["Goodbye", "", ""]
    assert stream.stopped
    assert stream.finish() == ""
