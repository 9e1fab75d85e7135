"""Task records -> raw examples, for every task in one place.

A raw example is a dict::

  {"prompt": str, "target": str}                 # what training needs
  + {"choices": list[str], "answer": int}         # multiple choice evaluation
  + {"answer": str}                               # GSM8K (final number) and
                                                  # Super-NaturalInstructions
                                                  # (reference text)

``prompt + target`` is the text the model is trained on; only the target is
in the loss. Each choice is a continuation of the prompt in the same form as
the target (``target == choices[answer]``), so that likelihood scoring over
the choices matches what training taught.

Two sources:

* TFDS records (:func:`from_tfds`), with plain question/answer templates.
  Prompts end without a space and targets and choices start with one
  (``"...\\nAnswer:"`` + ``" Jupiter"``), so the two tokenize apart as they
  would together. Feature names are those of the builders in
  tensorflow_datasets 4.9: ``natural_instructions`` (Super-NaturalInstructions
  v2: definition / input / output), ``hellaswag`` (context / endings / label),
  ``ai2_arc/ARC-Challenge`` and ``ai2_arc/ARC-Easy`` (question /
  choices{text, label} / answerKey), ``gsm8k`` (question / answer /
  short_answer), ``openbookqa`` (question{stem, choice_A..D} / answerKey).
  TFDS's BoolQ (``super_glue/boolq``) needs TensorFlow itself, so BoolQ is
  read from the local files only.
* The local LLM-Adapters JSON files (:func:`load_local_task`): lists of
  ``{instruction, input, output, answer}`` wrapped in the Alpaca template the
  files were made for (:func:`alpaca_prompt`); the target is the file's
  ``output`` (stripped of surrounding whitespace).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

RawExample = dict[str, Any]

# Task name -> TFDS builder (name/config).
TFDS_BUILDERS: Mapping[str, str] = {
    "natural_instructions": "natural_instructions",
    "hellaswag": "hellaswag",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "arc_easy": "ai2_arc/ARC-Easy",
    "gsm8k": "gsm8k",
    "openbookqa": "openbookqa",
}

# (task, split) -> file in the LLM-Adapters folder. GSM8K has no train file
# there: its train split is math_data.json, word problems with worked answers
# that end "The answer is N." as the GSM8K test outputs do (about a fifth of
# those worked answers reach a number other than the gold "answer" field: the
# rationales are generated, not written). MAWPS (its own fields) is a second,
# equation-style math set.
LOCAL_FILES: Mapping[tuple[str, str], str] = {
    ("arc_challenge", "train"): "arc-challenge_train.json",
    ("arc_challenge", "test"): "arc-challenge_test.json",
    ("arc_easy", "train"): "arc-easy_train.json",
    ("arc_easy", "test"): "arc-easy_test.json",
    ("openbookqa", "train"): "openbookqa_train.json",
    ("openbookqa", "test"): "openbookqa_test.json",
    ("boolq", "train"): "boolq_train.json",
    ("boolq", "test"): "boolq_test.json",
    ("gsm8k", "train"): "math_data.json",
    ("gsm8k", "test"): "gsm8k_test.json",
    ("mawps", "train"): "mawps_trainset.json",
    ("mawps", "test"): "mawps_testset.json",
}

MULTIPLE_CHOICE = ("hellaswag", "arc_challenge", "arc_easy", "openbookqa",
                   "boolq")

_ENV_DATA_DIR = "RITE_OPTAX_LLM_ADAPTERS"

# Records longer than this (all their text, in characters) are dropped with a
# warning: the shipped files' longest is ~1,400, and a megabyte-long field is
# a broken file that would only be cut at max_len after tokenizing it whole.
MAX_RECORD_CHARS = 100_000

logger = logging.getLogger(__name__)


def canonical_task(name: str) -> str:
  """``"ARC-Challenge"``, ``"arc-challenge"`` -> ``"arc_challenge"``."""
  return name.strip().lower().replace("-", "_")


# --- helpers ---------------------------------------------------------------


def _text(value: Any) -> str:
  """A TFDS text value (bytes from array_record, str from mocks) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


def _texts(values: Any) -> list[str]:
  return [_text(v) for v in np.asarray(values, dtype=object).reshape(-1)]


def _int(value: Any) -> int:
  return int(np.asarray(value).item())


def normalize_number(text: Union[str, float, int]) -> str:
  """Canonical string of a final numeric answer: ``"1,000.0"`` -> ``"1000"``.

  Integers lose their ``.0``, other floats keep Python's shortest repr;
  text that is not a number (e.g. an AQuA letter) is returned stripped.
  """
  cleaned = str(text).strip().replace(",", "").rstrip(".")
  if cleaned.startswith("$"):
    cleaned = cleaned[1:]
  try:
    value = float(cleaned)
  except ValueError:
    return str(text).strip()
  if value.is_integer():
    return str(int(value))
  return repr(value)


# A number: optional minus (not after a digit, so "10-20" is 10 and 20),
# digits with thousands commas, an optional decimal part.
_NUMBER = r"(?<![\d.])-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"


def final_number(generated: str) -> Optional[str]:
  """The final answer of a math text, normalized; None if it has none.

  The first number after the last GSM8K ``####`` marker that has one, else
  the number of the last ``answer is N`` (the LLM-Adapters outputs), else the
  last number in the text: ``"#### 1,000"`` gives ``"1000"``, ``"from
  10-20"`` gives ``"20"``. This is the one implementation the data and the
  evaluation (:mod:`rite_optax.train.eval`) share.
  """
  for marked in reversed(generated.split("####")[1:]):
    found = re.search(_NUMBER, marked)
    if found:
      return normalize_number(found.group())
  for pattern in (rf"answer is\s*:?\s*\$?({_NUMBER})", rf"({_NUMBER})"):
    found = re.findall(pattern, generated)
    if found:
      return normalize_number(found[-1])
  return None


def _multiple_choice(prompt: str, choices: Sequence[str], answer: int,
                     where: str) -> RawExample:
  if not 0 <= answer < len(choices):
    raise ValueError(f"{where}: answer index {answer} is not one of the "
                     f"{len(choices)} choices")
  return {"prompt": prompt, "target": choices[answer],
          "choices": list(choices), "answer": answer}


# --- TFDS records -----------------------------------------------------------


def natural_instructions_example(record: Mapping[str, Any]) -> RawExample:
  """Super-NaturalInstructions: the task definition, then the instance.

  Template: ``"Definition: {definition}\\n\\nInput: {input}\\nOutput:"``
  + ``" {output}"``. The answer is the reference output (scored by ROUGE-L).
  """
  output = _text(record["output"])
  prompt = (f"Definition: {_text(record['definition'])}\n\n"
            f"Input: {_text(record['input'])}\nOutput:")
  return {"prompt": prompt, "target": " " + output, "answer": output}


def _hellaswag_clean(text: str) -> str:
  # WikiHow contexts carry "[title]"/"[step]" markers; drop them as the
  # lm-evaluation-harness preprocessing does.
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag_example(record: Mapping[str, Any]) -> RawExample:
  """HellaSwag: ``"{activity_label}: {context}"``, the endings as choices.

  The test split's labels are hidden (-1): evaluate on ``validation``.
  """
  label = _int(record["label"])
  if label < 0:
    raise ValueError("hellaswag: label -1 (the test split is unlabeled; use "
                     "'validation')")
  prompt = _hellaswag_clean(
      f"{_text(record['activity_label'])}: {_text(record['context'])}")
  choices = [" " + _hellaswag_clean(e) for e in _texts(record["endings"])]
  return _multiple_choice(prompt, choices, label, "hellaswag")


def arc_example(record: Mapping[str, Any]) -> RawExample:
  """ARC: ``"Question: {question}\\nAnswer:"``, the choice texts as choices.

  ``answerKey`` and the choice labels are class ids of A..E (TFDS maps the
  numeric keys "1".."5" onto them); a few questions have 3 or 5 choices.
  """
  choices = [" " + t for t in _texts(record["choices"]["text"])]
  labels = [_int(v) for v in np.asarray(record["choices"]["label"]).reshape(-1)]
  key = _int(record["answerKey"])
  if key not in labels:
    raise ValueError(f"ai2_arc: answerKey {key} is not among the choice "
                     f"labels {labels}")
  prompt = f"Question: {_text(record['question'])}\nAnswer:"
  return _multiple_choice(prompt, choices, labels.index(key), "ai2_arc")


def gsm8k_example(record: Mapping[str, Any]) -> RawExample:
  """GSM8K: ``"Question: {question}\\nAnswer:"`` + the worked answer.

  The target keeps GSM8K's closing ``#### N`` line; the calculator
  annotations ``<<48/2=24>>`` are dropped, since a model generating them would
  need the calculator too. The answer is the normalized ``short_answer``.
  """
  worked = re.sub(r"<<[^>]*>>", "", _text(record["answer"]))
  return {"prompt": f"Question: {_text(record['question'])}\nAnswer:",
          "target": " " + worked.strip(),
          "answer": normalize_number(_text(record["short_answer"]))}


def openbookqa_example(record: Mapping[str, Any]) -> RawExample:
  """OpenBookQA: ``"Question: {stem}\\nAnswer:"``, choices A..D."""
  question = record["question"]
  choices = [" " + _text(question[f"choice_{letter}"]) for letter in "ABCD"]
  prompt = f"Question: {_text(question['stem'])}\nAnswer:"
  return _multiple_choice(prompt, choices, _int(record["answerKey"]),
                          "openbookqa")


_TFDS_CONVERTERS: Mapping[str, Callable[[Mapping[str, Any]], RawExample]] = {
    "natural_instructions": natural_instructions_example,
    "hellaswag": hellaswag_example,
    "arc_challenge": arc_example,
    "arc_easy": arc_example,
    "gsm8k": gsm8k_example,
    "openbookqa": openbookqa_example,
}


def from_tfds(task: str, record: Mapping[str, Any]) -> RawExample:
  """The raw example of one TFDS ``record`` of ``task``."""
  task = canonical_task(task)
  if task not in _TFDS_CONVERTERS:
    raise ValueError(f"no TFDS conversion for task {task!r}; known: "
                     f"{sorted(_TFDS_CONVERTERS)}")
  return _TFDS_CONVERTERS[task](record)


# --- local LLM-Adapters JSON ------------------------------------------------

_ALPACA = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca template of LLM-Adapters' fine-tuning and evaluation."""
  if input_text:
    return _ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
  return _ALPACA.format(instruction=instruction)


_MC_HEADER = "Please choose the correct answer to the question: "
_BOOLQ_HEADER = ("Please answer the following question with true or false, "
                 "question: ")
_MC_OPTION = re.compile(r"(?:^|\s)Answer(\d+):\s?")


def parse_choices(instruction: str) -> tuple[str, list[str]]:
  """``(question, option texts)`` of an LLM-Adapters multiple-choice record.

  The instruction reads ``"Please choose the correct answer to the question:
  {question}\\n\\nAnswer1: ... Answer2: ...\\n\\nAnswer format:
  answer1/answer2/..."``; the options are checked to be numbered 1..n with
  n the count that the answer-format line lists.
  """
  parts = instruction.rsplit("\n\n", 2)
  if len(parts) != 3 or not parts[2].startswith("Answer format:"):
    raise ValueError(f"not a multiple-choice instruction: {instruction!r}")
  question, options, answer_format = parts
  question = question.removeprefix(_MC_HEADER)
  pieces = _MC_OPTION.split(options)
  # split gives [before, "1", text1, "2", text2, ...].
  numbers = [int(n) for n in pieces[1::2]]
  texts = [t.strip() for t in pieces[2::2]]
  expected = answer_format.removeprefix("Answer format:").strip().split("/")
  if (pieces[0].strip() or numbers != list(range(1, len(texts) + 1))
      or len(texts) != len(expected)):
    raise ValueError(f"cannot parse the options {options!r} "
                     f"(answer format {answer_format!r})")
  return question, texts


def _output_form(option: str) -> str:
  return f"the correct answer is {option}"


def local_example(task: str, record: Mapping[str, Any]) -> RawExample:
  """The raw example of one record of a local LLM-Adapters file.

  Multiple choice (ARC, OpenBookQA): the choices are the candidate outputs
  ``"the correct answer is answerK"`` (the form of the training target), and
  the parsed option texts and question are kept as ``"choice_texts"`` and
  ``"question"`` for scoring the texts themselves. BoolQ: choices are the
  outputs for ``true`` and ``false``. GSM8K and MAWPS: the answer is the
  normalized final number.
  """
  task = canonical_task(task)
  if task == "mawps":
    _check_fields(record, _MAWPS_FIELDS)
    return _mawps_example(record)
  _check_fields(record, _FIELDS)
  prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
  target = record["output"].strip()
  gold = str(record["answer"]).strip()
  if task in ("arc_challenge", "arc_easy", "openbookqa"):
    question, texts = parse_choices(record["instruction"])
    options = [f"answer{k}" for k in range(1, len(texts) + 1)]
    if gold not in options:
      raise ValueError(f"{task}: answer {gold!r} is not one of {options}")
    example = _multiple_choice(prompt, [_output_form(o) for o in options],
                               options.index(gold), task)
  elif task == "boolq":
    options = ["true", "false"]
    if gold not in options:
      raise ValueError(f"boolq: answer {gold!r} is not true/false")
    texts = options
    question = record["instruction"].removeprefix(_BOOLQ_HEADER)
    question = question.split("\n\nAnswer format:")[0]
    example = _multiple_choice(prompt, [_output_form(o) for o in options],
                               options.index(gold), task)
  elif task == "gsm8k":
    return {"prompt": prompt, "target": target,
            "answer": normalize_number(gold)}
  else:
    raise ValueError(f"no local conversion for task {task!r}")
  # Train on the file's own output, which must be the gold choice's: one
  # that names another choice would teach the wrong answer.
  if target != _output_form(gold):
    raise ValueError(f"output {target!r} contradicts answer {gold!r} "
                     f"(expected {_output_form(gold)!r})")
  example["target"] = target
  example["choice_texts"] = texts
  example["question"] = question
  return example


def question_answer_form(example: RawExample) -> RawExample:
  """A local multiple-choice example in the TFDS tasks' plain template.

  ``"Question: {question}\\nAnswer:"`` with the option texts as choices and
  the gold one as target (``" Jupiter"``), instead of LLM-Adapters'
  instruction listing the options and its ``"the correct answer is answerK"``
  outputs: the zero-shot form, in which a small pretrained model can score
  the options by their likelihood.
  """
  if "choice_texts" not in example:
    raise ValueError("question_answer_form needs a multiple-choice example "
                     "of a local file (with 'question' and 'choice_texts')")
  prompt = f"Question: {example['question']}\nAnswer:"
  out = _multiple_choice(prompt, [" " + t for t in example["choice_texts"]],
                         example["answer"], "question_answer_form")
  out["choice_texts"] = example["choice_texts"]
  out["question"] = example["question"]
  return out


# Field -> the types a record's value may have (LLM-Adapters' numeric answers
# are numbers in some files, strings in others).
_FIELDS: Mapping[str, tuple[type, ...]] = {
    "instruction": (str,), "output": (str,), "answer": (str, int, float)}
_MAWPS_FIELDS: Mapping[str, tuple[type, ...]] = {
    "original_text": (str,), "equation": (str,), "ans": (str, int, float)}


def _check_fields(record: Any, fields: Mapping[str, tuple[type, ...]]) -> None:
  """Raise a ValueError naming what is wrong with ``record``'s shape."""
  if not isinstance(record, Mapping):
    kind = "null" if record is None else f"a JSON {_json_kind(record)}"
    raise ValueError(f"the record is {kind}; expected an object with fields "
                     f"{', '.join(fields)}")
  for name, types in fields.items():
    if name not in record:
      raise ValueError(f"no {name!r} field (the record has: "
                       f"{', '.join(map(str, record)) or 'no fields'})")
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
      expected = " or ".join(dict.fromkeys(_json_kind(t()) for t in types))
      raise ValueError(f"{name!r} is {_json_kind(value)} {value!r:.80}; "
                       f"expected {expected}")
  if not isinstance(record.get("input", ""), (str, type(None))):
    raise ValueError(f"'input' is {_json_kind(record['input'])}; expected a "
                     f"string")


def _json_kind(value: Any) -> str:
  """What ``value`` is called in JSON: ``null``, ``a string``, ..."""
  if value is None:
    return "null"
  for types, name in (((bool,), "a boolean"), ((str,), "a string"),
                      ((int, float), "a number"), ((list,), "a list"),
                      ((dict,), "an object")):
    if isinstance(value, types):
      return name
  return type(value).__name__


def _mawps_example(record: Mapping[str, Any]) -> RawExample:
  """MAWPS: the problem as the instruction; target ``"{equation}\\nThe answer
  is {ans}."`` (the equation is the worked part, the last line is the form
  :func:`final_number` reads)."""
  answer = normalize_number(record["ans"])
  return {"prompt": alpaca_prompt(record["original_text"]),
          "target": f"{record['equation']}\nThe answer is {answer}.",
          "answer": answer}


def default_local_dir() -> Path:
  """``$RITE_OPTAX_LLM_ADAPTERS``, else the copy shipped with the package
  (``rite_optax/data/llm_adapters``, package data: a plain ``pip install``
  has it)."""
  if os.environ.get(_ENV_DATA_DIR):
    return Path(os.environ[_ENV_DATA_DIR])
  return Path(str(importlib.resources.files("rite_optax.data")
                  / "llm_adapters"))


def load_local_task(name: str, split: str,
                    data_dir: Union[str, os.PathLike, None] = None, *,
                    max_record_chars: int = MAX_RECORD_CHARS
                    ) -> list[RawExample]:
  """The raw examples of a local LLM-Adapters file (:data:`LOCAL_FILES`).

  Args:
    name: ``arc_challenge``, ``arc_easy``, ``openbookqa``, ``boolq``,
      ``gsm8k`` or ``mawps`` (hyphens accepted).
    split: ``"train"`` or ``"test"``; GSM8K's train is ``math_data.json``.
    data_dir: the folder of the JSON files; default :func:`default_local_dir`.
    max_record_chars: records with more text than this are dropped, with one
      warning naming the file, their count and indices.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is not a UTF-8 JSON list of records, or a record is
      malformed (not an object, a field missing or of the wrong type, an
      unparsable multiple-choice instruction, an output that contradicts the
      answer); the message starts with ``<file>`` or ``<file>[<index>]``.
  """
  task = canonical_task(name)
  if (task, split) not in LOCAL_FILES:
    raise ValueError(f"no local file for {task!r} split {split!r}; known: "
                     f"{sorted(LOCAL_FILES)}")
  path = Path(data_dir or default_local_dir()) / LOCAL_FILES[task, split]
  if not path.exists():
    raise FileNotFoundError(
        f"{path}: LLM-Adapters file not found; pass data_dir (--data-dir) or "
        f"set ${_ENV_DATA_DIR} to the folder of the JSON files")
  records = read_json_records(path)
  examples, too_long, disagree = [], [], []
  for i, record in enumerate(records):
    if isinstance(record, Mapping) and _record_chars(record) > max_record_chars:
      too_long.append(i)
      continue
    try:
      example = local_example(task, record)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{path}[{i}]: {e}") from e
    if (task == "gsm8k" and split == "train"
        and final_number(example["target"]) != example["answer"]):
      disagree.append(i)
    examples.append(example)
  if too_long:
    logger.warning("%s: dropped %d of %d records longer than %d characters "
                   "(records %s)", path, len(too_long), len(records),
                   max_record_chars, _some(too_long))
  if disagree:
    # Generated rationales (a quarter of math_data.json): kept, as
    # LLM-Adapters trains on them, but not silently.
    logger.warning("%s: %d of %d worked answers end at a number other than "
                   "the record's answer (records %s)", path, len(disagree),
                   len(records), _some(disagree))
  if not examples:
    raise ValueError(f"{path}: no records left of {len(records)} after "
                     f"dropping those longer than {max_record_chars} "
                     f"characters")
  return examples


def _some(indices: Sequence[int], shown: int = 5) -> str:
  more = f", ... ({len(indices) - shown} more)" if len(indices) > shown else ""
  return ", ".join(map(str, indices[:shown])) + more


def _record_chars(record: Mapping[str, Any]) -> int:
  return sum(len(v) if isinstance(v, str) else len(str(v))
             for v in record.values())


def read_json_records(path: Union[str, os.PathLike]) -> list[Any]:
  """The list of records of a JSON file, or a ValueError naming the place.

  Errors name the file and, where one is to blame, the record: bytes that
  are not UTF-8 (offset, line), invalid JSON (line, column, and the index of
  the record it is in), an empty file, a top level that is not a non-empty
  list.
  """
  with open(path, "rb") as f:  # the builtin: tests see which files are read
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}: not UTF-8: byte {raw[e.start]:#04x} at offset "
                     f"{e.start} (line {line}): {e.reason}") from None
  if not text.strip():
    raise ValueError(f"{path}: the file is empty; expected a JSON list of "
                     f"records")
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    record = _record_at(text, e.pos)
    where = f", {record}" if record is not None else ""
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} column "
                     f"{e.colno}{where}: {e.msg}") from None
  if not isinstance(records, list):
    keys = (f" (keys: {_some(list(records))})"
            if isinstance(records, dict) else "")
    raise ValueError(f"{path}: the top level is {_json_kind(records)}"
                     f"{keys}; expected a list of records")
  if not records:
    raise ValueError(f"{path}: the list of records is empty")
  return records


def _record_at(text: str, error_pos: int) -> Optional[str]:
  """Where ``error_pos`` is in the top-level list: ``"in record [3]"``, or
  ``"after record [3]"`` (a lost comma); None if the top is not a list."""
  decoder = json.JSONDecoder()
  whitespace = re.compile(r"\s*")
  pos = whitespace.match(text).end()
  if not text.startswith("[", pos):
    return None
  pos, index = pos + 1, 0
  while True:
    pos = whitespace.match(text, pos).end()
    try:
      _, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
      return f"in record [{index}]"
    if end > error_pos:
      return f"in record [{index}]"
    pos = whitespace.match(text, end).end()
    if pos >= error_pos or not text.startswith(",", pos):
      return f"after record [{index}]"
    pos, index = pos + 1, index + 1
