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
    return _mawps_example(record)
  prompt = alpaca_prompt(record["instruction"], record.get("input", ""))
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
  # Train on the file's own output; it equals the gold choice here.
  example["target"] = target
  example["choice_texts"] = texts
  example["question"] = question
  return example


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
                    data_dir: Union[str, os.PathLike, None] = None
                    ) -> list[RawExample]:
  """The raw examples of a local LLM-Adapters file (:data:`LOCAL_FILES`).

  Args:
    name: ``arc_challenge``, ``arc_easy``, ``openbookqa``, ``boolq``,
      ``gsm8k`` or ``mawps`` (hyphens accepted).
    split: ``"train"`` or ``"test"``; GSM8K's train is ``math_data.json``.
    data_dir: the folder of the JSON files; default :func:`default_local_dir`.
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
  with open(path, encoding="utf-8") as f:
    records = json.load(f)
  examples = []
  for i, record in enumerate(records):
    try:
      examples.append(local_example(task, record))
    except ValueError as e:
      raise ValueError(f"{path}[{i}]: {e}") from e
  return examples
