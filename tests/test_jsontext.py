"""milora_vlm.jsontext: every hostile JSON text becomes a JSONDecodeError / InputFileError naming the place, and what
the standard parser accepts as a normal document parses to the same object."""

import io
import json

import pytest

from milora_vlm import jsontext

DEEP = "[" * 100_000 + "]" * 100_000


def test_ordinary_documents_parse_as_the_standard_library_does():
    texts = ['{"id": "a", "conversations": [{"from": "human", "value": "caf\\u00e9 \\ud83d\\ude00"}]}',
             '[1, 2.5, -3e2, true, null, "x"]', '  {"a": {"b": []}}\n', '"\\\\ud800 is text, not an escape"']
    for text in texts:
        assert jsontext.parse(text) == json.loads(text)
    assert jsontext.raw_decode('xx{"a": 1} tail', 2) == ({"a": 1}, 10)


@pytest.mark.parametrize("text, message", [
    (DEEP, "nested too deeply"),
    ('{"value": "\\ud800"}', "lone surrogate"),
    ('{"value": "ok", "more": ["\\udc80x"]}', "lone surrogate"),
    ('{"question_id": 1, "question_id": 2}', "duplicate key 'question_id'"),
    ('[{"a": 1, "b": {"c": 1, "c": 2}}]', "duplicate key 'c'"),
    ('{"a": 1} {"b": 2}', "Extra data"),
])
def test_hostile_texts_are_decode_errors(text, message):
    with pytest.raises(json.JSONDecodeError, match=message):
        jsontext.parse(text)


def test_error_places_are_named_without_json_s_dangling_at():
    with pytest.raises(json.JSONDecodeError) as info:
        jsontext.parse('{"a": "x\ty"}')  # a raw tab: json says "Invalid control character at"
    assert jsontext.decode_error(info.value) == "Invalid control character at line 1 column 9"
    assert jsontext.decode_error(info.value, line=False) == "Invalid control character at column 9"


def test_read_file_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": [1, 2]}')
    assert jsontext.read_object(path) == {"a": [1, 2]}  # a byte-order mark is fine
    cases = [
        ('{"a": 1,\n "b": }'.encode(), "malformed JSON file: Expecting value at line 2 column 7"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8: byte 0xff on line 1 .*UTF-16"),
        (b'{"a": "\xe9"}', "not UTF-8: byte 0xe9 on line 1"),
        (DEEP.encode(), "nested too deeply"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(jsontext.InputFileError, match=f"x.json: .*{message}"):
            jsontext.read_file(path)
    path.write_text("[1]")
    with pytest.raises(jsontext.InputFileError, match="must hold a JSON object, not a list"):
        jsontext.read_object(path, "manifest")
    path.write_text(" " * 100 + "{}")
    with pytest.raises(jsontext.InputFileError, match="larger than"):
        jsontext.read_file(path, max_bytes=50)
    with pytest.raises(jsontext.InputFileError, match="cannot read"):
        jsontext.read_file(tmp_path / "missing.json")


def test_iter_lines_reads_past_an_over_long_line_in_bounded_pieces():
    data = b"short\n" + b"x" * 100 + b"\n" + b"y" * 10 + b"\nlast"
    got = list(jsontext.iter_lines(io.BytesIO(data), max_bytes=20))
    assert got == [(1, b"short\n"), (2, None), (3, b"y" * 10 + b"\n"), (4, b"last")]
    exact = b"z" * 20 + b"\n" + b"w" * 21
    assert list(jsontext.iter_lines(io.BytesIO(exact), max_bytes=20)) == [(1, b"z" * 20 + b"\n"), (2, None)]
