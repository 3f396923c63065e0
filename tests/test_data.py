import codecs
import json
import os

import pytest

from nanorlhf.data import DataError, line_numbers, read_jsonl, read_text

EX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
BOM = codecs.BOM_UTF8


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines))
    return str(path)


def test_sft_good_file(tmp_path):
    path = write(tmp_path, [json.dumps({"prompt": "hi <|endoftext|>", "response": "hello"}), "",
                            json.dumps({"prompt": "a", "response": "b"})])
    assert read_jsonl(path, "sft") == [{"prompt": "hi <|endoftext|>", "response": "hello"},
                                       {"prompt": "a", "response": "b"}]


def test_every_bad_line_reported_with_file_line_field(tmp_path):
    path = write(tmp_path, [
        json.dumps({"prompt": "ok", "response": "fine"}),
        "{not json",
        json.dumps({"prompt": "x"}),
        json.dumps({"prompt": 3, "response": "y"}),
        json.dumps({"prompt": "  ", "response": "y"}),
        b'{"prompt": "\xff", "response": "y"}',
        json.dumps(["a list"]),
    ])
    with pytest.raises(DataError) as e:
        read_jsonl(path, "sft")
    msg = str(e.value)
    assert "6 bad line(s)" in msg
    assert f"{path}:2: line: invalid JSON" in msg
    assert f"{path}:3: response: missing" in msg
    assert f"{path}:4: prompt: expected a string, got int" in msg
    assert f"{path}:5: prompt: empty string" in msg
    assert f"{path}:6: line: not valid UTF-8" in msg
    assert f"{path}:7: line: expected a JSON object" in msg


def test_rm_rankings_with_ties_and_errors(tmp_path):
    good = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 0, 1]}
    path = write(tmp_path, [json.dumps(good)])
    assert read_jsonl(path, "rm") == [good]
    bad = [
        {"prompt": "p", "responses": ["a"], "ranking": [0]},                 # K < 2
        {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]},         # gap: not a ranking
        {"prompt": "p", "responses": ["a", "b"], "ranking": [0]},            # wrong length
        {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]},         # all tied
        {"prompt": "p", "responses": ["a", "b"], "ranking": ["0", "1"]},     # not ints
    ]
    path = write(tmp_path, [json.dumps(b) for b in bad], "bad.jsonl")
    with pytest.raises(DataError) as e:
        read_jsonl(path, "rm")
    msg = str(e.value)
    assert f"{path}:1: responses: K = 1 < 2" in msg
    assert f"{path}:2: ranking: [0, 2] is not a ranking" in msg
    assert f"{path}:3: ranking: has 1 entries for 2 responses" in msg
    assert f"{path}:4: ranking: all responses tied" in msg
    assert f"{path}:5: ranking: expected a list of integers" in msg


def test_rm_pairs_and_hh_rlhf_dialogues(tmp_path):
    path = write(tmp_path, [
        json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}),
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}),
    ])
    a, b = read_jsonl(path, "rm")
    assert a == {"prompt": "p", "responses": ["good", "bad"], "ranking": [0, 1]}
    assert b == {"prompt": "\n\nHuman: hi\n\nAssistant:", "responses": ["hello there", "go away"], "ranking": [0, 1]}
    path = write(tmp_path, [json.dumps({"chosen": "same", "rejected": "same"})], "same.jsonl")
    with pytest.raises(DataError, match="1: chosen/rejected"):
        read_jsonl(path, "rm")


def test_rm_identical_responses_are_errors(tmp_path):
    """A pair of one text carries no signal; a ranking that repeats only some of its responses is kept."""
    some_equal = {"prompt": "p", "responses": ["a", "a", "b"], "ranking": [0, 1, 1]}
    assert read_jsonl(write(tmp_path, [json.dumps(some_equal)]), "rm") == [some_equal]
    bad = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
           {"prompt": "p", "chosen": "x", "rejected": "x"},
           {"prompt": "p", "responses": ["x", "x", "x"], "ranking": [0, 1, 2]},
           {"prompt": "p", "responses": ["x", "x"], "ranking": [0, 1]}]
    path = write(tmp_path, [json.dumps(b) for b in bad], "same.jsonl")
    with pytest.raises(DataError) as e:
        read_jsonl(path, "rm")
    msg = str(e.value)
    assert "3 bad line(s)" in msg and f"{path}:1:" not in msg
    assert f"{path}:2: chosen/rejected: the same text, nothing to compare" in msg
    assert f"{path}:3: responses: all 3 are the same text, nothing to compare" in msg
    assert f"{path}:4: responses: all 2 are the same text, nothing to compare" in msg


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(EX) if n.endswith(".jsonl")))
def test_a_byte_order_mark_is_skipped_at_the_start_of_a_file_only(tmp_path, name):
    """Every format (the example files) reads the same with a BOM first, line numbers included; a BOM starting a
    later line is an error naming that line."""
    example, kind = os.path.join(EX, name), name.split("_")[0].split(".")[0]
    raw = open(example, "rb").read()
    want, want_lines = read_jsonl(example, kind), line_numbers(example)
    path = str(tmp_path / "bom.jsonl")
    open(path, "wb").write(BOM + raw)
    assert read_jsonl(path, kind) == want and line_numbers(path) == want_lines
    open(path, "wb").write(BOM + b"\n" + raw)  # the BOM on a line of its own: a blank line
    assert read_jsonl(path, kind) == want and line_numbers(path) == [n + 1 for n in want_lines]
    first, rest = raw.split(b"\n", 1)
    open(path, "wb").write(first + b"\n" + BOM + rest)
    with pytest.raises(DataError) as e:
        read_jsonl(path, kind)
    assert str(e.value).startswith(f"1 bad line(s) in {path}:\n{path}:2: line: invalid JSON")


def test_missing_file_and_empty(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(str(tmp_path / "nope.jsonl"), "ppo")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(write(tmp_path, ["", "  "]), "ppo")


def test_read_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("doc one\nline two\n\n\ndoc two\n")
    assert read_text(str(p)) == ["doc one\nline two", "doc two"]
    p.write_bytes(b"fine\nbad \xff byte")
    with pytest.raises(DataError, match=r"t.txt:2: text: not valid UTF-8"):
        read_text(str(p))
    p.write_bytes(BOM + "doc one\n\ndoc \ufeff two".encode())  # skipped at the start only
    assert read_text(str(p)) == ["doc one", "doc \ufeff two"]
    p.write_bytes(BOM + b"fine\nbad \xff byte")
    with pytest.raises(DataError, match=r"t.txt:2: text: not valid UTF-8"):
        read_text(str(p))
