"""Training data for `scaleserve train`: JSONL in, token ids with loss masks out.

One JSON object per line, all lines of one file in the same format (blank lines are skipped):
  {"text": str}                                 language modelling: loss on every token
  {"prompt": str, "completion": str}            loss on the completion (and the EOS after it) only
  {"messages": [{"role": str, "content": str}]} the tokenizer's chat template; loss on the
                                                assistant turns only (their content and end marker)
Extra keys are ignored. A bad line raises DataError naming the file, the line number and the field.

An Example is ids [S] with a parallel mask [S] of bools: mask[t] says token t is a target, i.e. the
loss includes -log p(ids[t] | ids[:t]). Token 0 is never a target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
_FORMAT_KEYS = " | ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in FORMATS.values())


class DataError(ValueError):
    """A bad data file or line; the message names the file, the line and the field."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.line = line
        self.field = field


@dataclass
class Record:
    line: int  # 1-based line number in its file
    data: dict


@dataclass
class Dataset:
    path: Path
    format: str  # text | completion | chat
    records: list[Record]
    sha256: str


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[t]: ids[t] is a target
    line: int

    @property
    def num_targets(self) -> int:
        return sum(self.mask)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(obj: dict) -> str | None:
    """The format a JSON object is in, or None. Ambiguous objects (two formats' keys) are None too."""
    found = [name for name, keys in FORMATS.items() if all(k in obj for k in keys)]
    return found[0] if len(found) == 1 else None


def load_jsonl(path: str | Path) -> Dataset:
    """Read and check every line. Raises DataError on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records: list[Record] = []
    fmt = first_line = None
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})", lineno) from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", lineno)
            line_fmt = detect_format(obj)
            if line_fmt is None:
                keys = ", ".join(sorted(obj)) or "none"
                raise DataError(f"{where}: unknown format (keys: {keys}); each line must be one of {_FORMAT_KEYS}",
                                lineno)
            if fmt is None:
                fmt, first_line = line_fmt, lineno
            elif line_fmt != fmt:
                raise DataError(f"{where}: a {_keys(line_fmt)} line in a {_keys(fmt)} file (line {first_line} set "
                                f"the format; one file holds one format)", lineno)
            _check_fields(obj, line_fmt, where, lineno)
            records.append(Record(lineno, obj))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return Dataset(path, fmt, records, file_sha256(path))


def _keys(fmt: str) -> str:
    return "{" + ", ".join(FORMATS[fmt]) + "}"


def _check_fields(obj: dict, fmt: str, where: str, lineno: int) -> None:
    if fmt == "text":
        _need_str(obj, "text", where, lineno)
        if not obj["text"]:
            raise DataError(f"{where}: field 'text' is empty", lineno, "text")
    elif fmt == "completion":
        _need_str(obj, "prompt", where, lineno)
        _need_str(obj, "completion", where, lineno)
        if not obj["completion"]:
            raise DataError(f"{where}: field 'completion' is empty (nothing to learn)", lineno, "completion")
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list", lineno, "messages")
        for i, m in enumerate(msgs):
            field = f"messages[{i}]"
            if not isinstance(m, dict):
                raise DataError(f"{where}: {field} must be an object with 'role' and 'content'", lineno, field)
            for key in ("role", "content"):
                if not isinstance(m.get(key), str):
                    raise DataError(f"{where}: {field}.{key} must be a string", lineno, f"{field}.{key}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant turn (nothing to learn)", lineno, "messages")


def _need_str(obj, key, where, lineno):
    if not isinstance(obj[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(obj[key]).__name__}", lineno, key)


# --- tokenization ---------------------------------------------------------------------------


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id


def tokenize_record(tokenizer, fmt: str, rec: Record, path: Path | None = None) -> Example:
    """One record -> Example (not yet truncated)."""
    d = rec.data
    if fmt == "text":
        ids = list(tokenizer.encode(d["text"]))
        return Example(ids, [t > 0 for t in range(len(ids))], rec.line)
    if fmt == "completion":
        # Encoded apart, as the server sees them: it encodes the prompt and then generates.
        prompt = list(tokenizer.encode(d["prompt"]))
        completion = list(tokenizer.encode(d["completion"], add_special_tokens=False))
        eos = eos_id(tokenizer)
        if eos is not None:
            completion.append(eos)
        ids = prompt + completion
        mask = [False] * len(prompt) + [True] * len(completion)
        mask[0] = False
        return Example(ids, mask, rec.line)
    # chat: the assistant turns' tokens are what the template adds after each prefix's generation prompt
    msgs = d["messages"]
    ids = _chat_ids(tokenizer, msgs)
    mask = [False] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, msgs[:i], add_generation_prompt=True) if i else []
        upto = _chat_ids(tokenizer, msgs[: i + 1])
        if ids[: len(upto)] != upto or upto[: len(before)] != before:
            where = f"{path}, line {rec.line}" if path else f"line {rec.line}"
            raise DataError(f"{where}: the tokenizer's chat template does not render a conversation's turns as "
                            f"prefixes of it, so assistant turns cannot be masked; use {{prompt, completion}}",
                            rec.line, "messages")
        for t in range(len(before), len(upto)):
            mask[t] = True
    mask[0] = False
    return Example(ids, mask, rec.line)


def tokenize_dataset(tokenizer, ds: Dataset, max_seq_len: int) -> tuple[list[Example], int]:
    """Tokenize and truncate (keep the first max_seq_len tokens). Returns (examples, number dropped):
    examples left with no target token after truncation are dropped."""
    out, dropped = [], 0
    for rec in ds.records:
        ex = tokenize_record(tokenizer, ds.format, rec, ds.path)
        ex = Example(ex.ids[:max_seq_len], ex.mask[:max_seq_len], ex.line)
        if ex.num_targets == 0:
            dropped += 1
            continue
        out.append(ex)
    return out, dropped
