"""Data coercion for every accepted format, and response-only label masks."""

from __future__ import annotations

import json

import pytest

from rlhf_magic.data import read_prompts, sft_chats
from rlhf_magic.engine.text import IGNORE, encode, encode_chat, format_prompt
from rlhf_magic.engine.tiny import tiny_tokenizer
from rlhf_magic.errors import DataError

EXPECTED = [[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]]


def test_list_of_dicts_in_three_field_styles():
    assert sft_chats([{"prompt": "Q1", "response": "A1"}]) == EXPECTED
    assert sft_chats([{"prompt": "Q1", "completion": "A1"}]) == EXPECTED
    assert sft_chats([{"instruction": "Q1", "input": "", "output": "A1"}]) == EXPECTED
    assert sft_chats([{"instruction": "Do", "input": "x", "output": "A1"}])[0][0]["content"] == "Do\n\nx"
    msgs = [{"role": "system", "content": "S"}, *EXPECTED[0]]
    assert sft_chats([{"messages": msgs}]) == [msgs]


def test_dataframe_dataset_and_files(tmp_path):
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    rec = [{"prompt": "Q1", "response": "A1"}]
    assert sft_chats(pd.DataFrame(rec)) == EXPECTED
    assert sft_chats(datasets.Dataset.from_list(rec)) == EXPECTED
    (tmp_path / "d.jsonl").write_text(json.dumps(rec[0]) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rec))
    (tmp_path / "d.csv").write_text("prompt,response\nQ1,A1\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert sft_chats(str(tmp_path / name)) == EXPECTED


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "data is empty"),
        ([{"question": "x"}], "record 0 has fields ['question']; expected prompt/response"),
        ({"prompt": "x"}, "single dict"),
        (["just text"], "data[0] is a str, not a dict"),
        ([{"prompt": "Q", "response": ""}], "record 0: the answer is empty"),
        ([{"messages": [{"role": "user", "content": "Q"}]}], "no assistant turn"),
        (42, "data of type int is not supported"),
        ("missing.jsonl", "no such file"),
        ("notes.docx", "no such file"),
    ],
)
def test_bad_data_errors(data, message):
    with pytest.raises(DataError) as e:
        sft_chats(data)
    assert message in str(e.value)


def test_bad_jsonl_line_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{oops\n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        sft_chats(str(p))


def test_label_mask_covers_exactly_the_answer_and_its_eos():
    tok = tiny_tokenizer()
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]
    ex = encode_chat(tok, chat, max_length=512)
    prompt_ids = encode(tok, format_prompt(tok, "Hi?"))
    answer_ids = [*encode(tok, "Yo."), tok.eos_token_id]
    assert ex.input_ids == prompt_ids + answer_ids
    assert ex.labels == [IGNORE] * len(prompt_ids) + answer_ids
    assert ex.labels[-1] == tok.eos_token_id != tok.pad_token_id


def test_multi_turn_trains_every_assistant_turn_only():
    tok = tiny_tokenizer()
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "D"},
    ]
    ex = encode_chat(tok, chat, 512)
    text = tok.decode(ex.input_ids)
    assert text == tok.apply_chat_template(chat, tokenize=False).rstrip("\n")
    trained = tok.decode([t for t in ex.labels if t != IGNORE])
    assert trained == "B<|im_end|>D<|im_end|>"


def test_prompts_from_lists_records_and_text_files(tmp_path):
    assert read_prompts(["a", "b"]) == ["a", "b"]
    assert read_prompts([{"prompt": "a"}]) == ["a"]
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    with pytest.raises(DataError, match="prompts is empty"):
        read_prompts([])
    with pytest.raises(DataError, match="prompt 1 is empty"):
        read_prompts(["a", "  "])
