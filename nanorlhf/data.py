"""Your own data: JSONL readers that validate every line before training starts.

Formats (one JSON object per line, UTF-8); a chat is a list of {"role": "system"|"user"|"assistant", "content": str}:
  SFT      {"prompt": str, "response": str}
           {"messages": chat}                                               ends with an assistant turn; the loss
                                                                           is on every assistant turn
  RM       {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}   ranking[i] = rank of responses[i],
                                                                           0 = best, ties allowed
           {"prompt": str, "chosen": str, "rejected": str}                 HH-RLHF style pair (K = 2)
           {"chosen": str, "rejected": str}                                HH-RLHF original: whole dialogues;
                                                                           the shared prefix becomes the prompt
           {"chosen": chat, "rejected": chat}                              the same turns up to two different
                                                                           final assistant turns
           A pair's two responses must differ and a ranking's must not all be the same text (such a pair's loss is
           log 2 whatever the model). A ranking where only some repeat is kept, as K samples of a policy often
           repeat one: the pairs of a repeated text add a constant log 2, the others carry the signal.
  PPO      {"prompt": str}
           {"messages": chat}                                               ends with a user turn
  ptx      plain UTF-8 text; documents separated by blank lines
A UTF-8 byte-order mark at the start of a file is skipped (one starting a later line is invalid JSON).
Every bad line is reported as `file:line: field: problem` in one DataError, and nothing is trained or written.
Examples longer than the model's context are errors too, in every stage (`check_lengths`): nothing is truncated.
"""
import codecs
import json
import os


class DataError(ValueError):
    pass


def _read_bytes(path):
    """The file's bytes, less a UTF-8 byte-order mark at its start (some editors write one; anywhere else it stays
    in the text)."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    return raw.removeprefix(codecs.BOM_UTF8)


def _read_lines(path):
    return enumerate(_read_bytes(path).split(b"\n"), start=1)


def _string(obj, key, where, errors, allow_empty=False):
    v = obj.get(key)
    if key not in obj:
        errors.append(f"{where}: {key}: missing")
    elif not isinstance(v, str):
        errors.append(f"{where}: {key}: expected a string, got {type(v).__name__}")
    elif not v.strip() and not allow_empty:
        errors.append(f"{where}: {key}: empty string")
    else:
        return v
    return None


def _check_ranking(ranking, k, where, errors):
    """A ranking with ties: ints >= 0 whose distinct values are exactly 0..m-1 (dense ranks), at least 2 of them."""
    if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
        errors.append(f"{where}: ranking: expected a list of integers")
    elif len(ranking) != k:
        errors.append(f"{where}: ranking: has {len(ranking)} entries for {k} responses")
    elif sorted(set(ranking)) != list(range(len(set(ranking)))):
        errors.append(f"{where}: ranking: {ranking} is not a ranking (ranks must be 0, 1, 2, ... with ties allowed)")
    elif len(set(ranking)) < 2:
        errors.append(f"{where}: ranking: all responses tied, nothing to learn")
    else:
        return True
    return False


def _chat(obj, key, last, where, errors):
    """obj[key] as a chat (a list of {"role", "content"}; other keys of a message are dropped): an optional system
    turn first, then user and assistant turns alternating from user, ending with role `last`. The first problem
    is reported as `where: key[i].field: problem`; returns the messages or None."""
    msgs = obj.get(key)
    if not isinstance(msgs, list) or not msgs:
        errors.append(f"{where}: {key}: " + ("missing" if key not in obj else "expected a non-empty list of messages"))
        return None
    start = int(isinstance(msgs[0], dict) and msgs[0].get("role") == "system")  # turns alternate after it
    for i, m in enumerate(msgs):
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if not isinstance(m, dict):
            problem = f"{key}[{i}]: expected an object with role and content, got {type(m).__name__}"
        elif m.get("role") != expected:
            problem = (f"{key}[{i}].role: expected {expected!r}, got {m.get('role')!r} (an optional system turn, "
                       "then user and assistant alternate)")
        elif not isinstance(m.get("content"), str):
            problem = f"{key}[{i}].content: expected a string, got {type(m.get('content')).__name__}"
        elif not m["content"].strip():
            problem = f"{key}[{i}].content: empty string"
        else:
            continue
        errors.append(f"{where}: {problem}")
        return None
    if msgs[-1]["role"] != last:
        errors.append(f"{where}: {key}: the last turn is {msgs[-1]['role']!r}, expected {last!r}")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _chat_pair(obj, where, errors):
    """A chat preference pair: two chats with the same turns up to different final assistant turns. The shared
    turns become the prompt (a chat ending with a user turn), the two final turns the responses."""
    c, r = _chat(obj, "chosen", "assistant", where, errors), _chat(obj, "rejected", "assistant", where, errors)
    if c is None or r is None:
        return None
    if c[:-1] != r[:-1]:
        errors.append(f"{where}: chosen/rejected: the turns before the last assistant turn differ")
    elif c[-1] == r[-1]:
        errors.append(f"{where}: chosen/rejected: the same final reply, nothing to compare")
    else:
        return {"prompt": c[:-1], "responses": [c[-1]["content"], r[-1]["content"]], "ranking": [0, 1]}
    return None


def _split_dialogues(chosen, rejected):
    """HH-RLHF original form: two whole dialogues sharing a prefix. The prompt is the shared prefix up to its
    last "Assistant:" (or its last space); the rest of each is the reply."""
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind("Assistant:", 0, n)
    cut = cut + len("Assistant:") if cut >= 0 else chosen.rfind(" ", 0, n) + 1
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def _parse_line(kind, obj, where, errors):
    if kind in ("sft", "ppo") and "messages" in obj:  # a chat; for PPO the prompt is the chat so far
        msgs = _chat(obj, "messages", "assistant" if kind == "sft" else "user", where, errors)
        return None if msgs is None else {"messages": msgs} if kind == "sft" else {"prompt": msgs}
    if kind == "sft":
        p, y = _string(obj, "prompt", where, errors), _string(obj, "response", where, errors)
        return None if p is None or y is None else {"prompt": p, "response": y}
    if kind == "ppo":
        p = _string(obj, "prompt", where, errors)
        return None if p is None else {"prompt": p}
    if kind != "rm":
        raise ValueError(kind)
    if "responses" in obj:
        p = _string(obj, "prompt", where, errors)
        ys = obj["responses"]
        if not isinstance(ys, list) or not all(isinstance(y, str) and y.strip() for y in ys):
            errors.append(f"{where}: responses: expected a list of non-empty strings")
            return None
        if len(ys) < 2:
            errors.append(f"{where}: responses: K = {len(ys)} < 2, nothing to compare")
            return None
        if len(set(ys)) == 1:
            errors.append(f"{where}: responses: all {len(ys)} are the same text, nothing to compare")
            return None
        ok = _check_ranking(obj.get("ranking"), len(ys), where, errors)
        return {"prompt": p, "responses": ys, "ranking": obj["ranking"]} if ok and p is not None else None
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        return _chat_pair(obj, where, errors)
    c, r = _string(obj, "chosen", where, errors), _string(obj, "rejected", where, errors)
    if c is None or r is None:
        return None
    if "prompt" in obj:
        p = _string(obj, "prompt", where, errors)
        if c == r:
            errors.append(f"{where}: chosen/rejected: the same text, nothing to compare")
            return None
        return None if p is None else {"prompt": p, "responses": [c, r], "ranking": [0, 1]}
    p, c, r = _split_dialogues(c, r)
    if not p.strip() or not c or not r or c == r:
        errors.append(f"{where}: chosen/rejected: no shared prompt followed by two different replies")
        return None
    return {"prompt": p, "responses": [c, r], "ranking": [0, 1]}


def read_jsonl(path, kind):
    """Read and validate a whole JSONL file of `kind` in {"sft", "rm", "ppo"}; raise one DataError listing
    every bad line, or return the parsed records."""
    records, errors = [], []
    for n, line in _read_lines(path):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(f"{where}: line: not valid UTF-8 (byte {e.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: line: invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: line: expected a JSON object, got {type(obj).__name__}")
            continue
        rec = _parse_line(kind, obj, where, errors)
        if rec is not None:
            records.append(rec)
    if errors:
        shown = "\n".join(errors[:50]) + (f"\n... and {len(errors) - 50} more" if len(errors) > 50 else "")
        raise DataError(f"{len(errors)} bad line(s) in {path}:\n{shown}")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def line_numbers(path):
    """The line number of each record read_jsonl returns (it keeps every non-blank line, in order)."""
    return [n for n, line in _read_lines(path) if line.strip()]


def check_lengths(lengths, limit, what, limit_name="block_size"):
    """Raise one DataError naming every example, given as (where, n_tokens), longer than `limit` tokens."""
    too_long = [f"{where}: {what}: {n} tokens > {limit_name} {limit}" for where, n in lengths if n > limit]
    if too_long:
        shown = "\n".join(too_long[:50]) + (f"\n... and {len(too_long) - 50} more" if len(too_long) > 50 else "")
        raise DataError(f"{len(too_long)} example(s) longer than the model's context:\n{shown}")


def read_text(path):
    """Pretraining text for ptx: documents separated by blank lines."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: text: not valid UTF-8") from None
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"{path}: no text")
    return docs
