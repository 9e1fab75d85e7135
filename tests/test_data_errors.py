"""Malformed LLM-Adapters files: every error names the file and the record.

Each test writes one broken file (the faults a user hits by editing or
truncating a task file) into a temporary data folder and loads it with
``load_local_task``: the error must start with ``<file>`` or
``<file>[<record>]`` and say what is wrong; a record that is only too long
is dropped with a warning that counts it, and every other record is kept.
"""

import json
import logging

import pytest

from rite_optax.data import pipeline
from rite_optax.data import tasks

ARC_FILE = tasks.LOCAL_FILES["arc_challenge", "test"]


def _arc_record(question="Which is a planet?", answer=1, output=None):
  instruction = (f"Please choose the correct answer to the question: "
                 f"{question}\n\nAnswer1: Mars Answer2: the Moon\n\n"
                 f"Answer format: answer1/answer2")
  return {"instruction": instruction, "input": "",
          "output": output or f"the correct answer is answer{answer}",
          "answer": f"answer{answer}"}


def _write(tmp_path, content, name=ARC_FILE):
  path = tmp_path / name
  if isinstance(content, bytes):
    path.write_bytes(content)
  elif isinstance(content, str):
    path.write_text(content, encoding="utf-8")
  else:
    path.write_text(json.dumps(content, indent=1), encoding="utf-8")
  return path


def _load_error(tmp_path, task="arc_challenge", split="test", **kwargs):
  with pytest.raises(ValueError) as error:
    tasks.load_local_task(task, split, tmp_path, **kwargs)
  return str(error.value)


def test_a_good_file_loads(tmp_path):
  _write(tmp_path, [_arc_record(), _arc_record(answer=2)])
  examples = tasks.load_local_task("arc_challenge", "test", tmp_path)
  assert [e["answer"] for e in examples] == [0, 1]


def test_invalid_json_names_line_column_and_record(tmp_path):
  text = json.dumps([_arc_record(), _arc_record(), _arc_record()], indent=1)
  assert " },\n {" in text
  broken = text.replace(" },\n {", " }\n {", 2)  # a comma lost after [0]
  path = _write(tmp_path, broken)
  message = _load_error(tmp_path)
  assert message.startswith(f"{path}: invalid JSON at line ")
  assert "Expecting ',' delimiter" in message and "after record [0]" in message


def test_truncated_json_names_the_record_it_stops_in(tmp_path):
  text = json.dumps([_arc_record(), _arc_record(), _arc_record()], indent=1)
  path = _write(tmp_path, text[:len(text) * 3 // 4])
  message = _load_error(tmp_path)
  assert message.startswith(f"{path}: invalid JSON")
  assert "in record [2]" in message


@pytest.mark.parametrize("field", ["answer", "output", "instruction"])
def test_missing_field_names_the_record_and_field(tmp_path, field):
  broken = _arc_record()
  del broken[field]
  path = _write(tmp_path, [_arc_record(), broken])
  message = _load_error(tmp_path)
  assert message.startswith(f"{path}[1]: no {field!r} field")


def test_empty_file(tmp_path):
  path = _write(tmp_path, "\n")
  assert _load_error(tmp_path) == (
      f"{path}: the file is empty; expected a JSON list of records")


def test_empty_list(tmp_path):
  path = _write(tmp_path, [])
  assert _load_error(tmp_path) == f"{path}: the list of records is empty"


def test_null_record(tmp_path):
  path = _write(tmp_path, [_arc_record(), _arc_record(), None])
  assert _load_error(tmp_path).startswith(f"{path}[2]: the record is null")


def test_record_that_is_not_an_object(tmp_path):
  path = _write(tmp_path, [["instruction", "output"]])
  assert _load_error(tmp_path).startswith(f"{path}[0]: the record is a JSON "
                                          f"a list")


def test_dict_instead_of_list(tmp_path):
  path = _write(tmp_path, {"data": [_arc_record()]})
  assert _load_error(tmp_path) == (
      f"{path}: the top level is an object (keys: data); expected a list of "
      f"records")


def test_non_utf8_names_the_offset_and_line(tmp_path):
  text = json.dumps([_arc_record(), _arc_record(question="Caf\u00e9?")],
                    indent=1, ensure_ascii=False)
  raw = text.encode("utf-8").replace("\u00e9".encode("utf-8"), b"\xe9")
  path = _write(tmp_path, raw)
  message = _load_error(tmp_path)
  offset = raw.index(b"\xe9")
  line = raw[:offset].count(b"\n") + 1
  assert message.startswith(f"{path}: not UTF-8: byte 0xe9 at offset {offset} "
                            f"(line {line})")


def test_field_of_the_wrong_type(tmp_path):
  path = _write(tmp_path, [_arc_record() | {"output": 3}])
  assert _load_error(tmp_path).startswith(
      f"{path}[0]: 'output' is a number 3; expected a string")


def test_output_that_contradicts_the_answer_is_an_error(tmp_path):
  path = _write(tmp_path, [_arc_record(),
                           _arc_record(answer=1,
                                       output="the correct answer is answer2")])
  message = _load_error(tmp_path)
  assert message == (f"{path}[1]: output 'the correct answer is answer2' "
                     f"contradicts answer 'answer1' (expected 'the correct "
                     f"answer is answer1')")


def test_boolq_output_that_contradicts_the_answer(tmp_path):
  record = {"instruction": "Please answer the following question with true or "
                           "false, question: is the sky blue?\n\nAnswer "
                           "format: true/false",
            "input": "", "output": "the correct answer is false",
            "answer": "true"}
  path = _write(tmp_path, [record], tasks.LOCAL_FILES["boolq", "test"])
  assert _load_error(tmp_path, "boolq").startswith(
      f"{path}[0]: output 'the correct answer is false' contradicts answer "
      f"'true'")


def test_mawps_missing_field(tmp_path):
  record = {"original_text": "2 plus 3?", "equation": "x=2+3"}
  path = _write(tmp_path, [record], tasks.LOCAL_FILES["mawps", "train"])
  assert _load_error(tmp_path, "mawps", "train").startswith(
      f"{path}[0]: no 'ans' field")


def test_absurdly_long_record_is_dropped_with_a_count(tmp_path, caplog):
  """The issue's 50 MB field, scaled down: dropped, counted, named; the
  other records are all kept."""
  huge = _arc_record(question="x" * 200_000)
  path = _write(tmp_path, [_arc_record(), huge, _arc_record(answer=2), huge])
  with caplog.at_level(logging.WARNING, logger=tasks.__name__):
    examples = tasks.load_local_task("arc_challenge", "test", tmp_path)
  assert [e["answer"] for e in examples] == [0, 1]
  assert (f"{path}: dropped 2 of 4 records longer than 100000 characters "
          f"(records 1, 3)") in caplog.text
  # All of them too long: nothing to train on is an error.
  _write(tmp_path, [huge])
  assert "no records left of 1" in _load_error(tmp_path)
  assert len(tasks.load_local_task("arc_challenge", "test", tmp_path,
                                   max_record_chars=10 ** 6)) == 1


def test_gsm8k_worked_answers_that_disagree_are_counted(tmp_path, caplog):
  """math_data.json's rationales are generated: a quarter end at another
  number than the answer. Kept (as LLM-Adapters trains on them), not silent."""
  records = [{"instruction": "2 + 2?", "input": "",
              "output": f"2 + 2 = {n}. The answer is {n}.", "answer": "4"}
             for n in (4, 5, 4)]
  path = _write(tmp_path, records, tasks.LOCAL_FILES["gsm8k", "train"])
  with caplog.at_level(logging.WARNING, logger=tasks.__name__):
    examples = tasks.load_local_task("gsm8k", "train", tmp_path)
  assert len(examples) == 3
  assert (f"{path}: 1 of 3 worked answers end at a number other than the "
          f"record's answer (records 1)") in caplog.text


def test_raw_examples_names_the_source_and_record_for_any_error():
  source = pipeline.RawExamples([{"a": 1}, None], lambda r: {"prompt": r["a"]},
                                name="hellaswag/validation")
  assert source[0] == {"prompt": 1}
  with pytest.raises(ValueError, match=r"^hellaswag/validation\[1\]: "):
    source[1]
