"""Engine snapshots -> OpenAI response pieces (logprobs, choices, chunks)."""

from __future__ import annotations

from typing import Any

from quantrt.server.state import finish_reason


class TokenText:
    """Token id -> text, cached (the tokenizer's decode of one id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def chat_logprobs(meta: dict, tok: TokenText, start: int = 0, end: int | None = None) -> dict | None:
    """Chat's {"content": [{"token", "logprob", "bytes", "top_logprobs"}]} for output positions."""
    chosen = meta.get("output_token_logprobs")
    if chosen is None:
        return None
    tops = meta.get("output_top_logprobs") or []
    content = []
    for i in range(start, len(chosen) if end is None else end):
        lp, tid, _ = chosen[i]
        text = tok(tid)
        alts = [{"token": tok(t), "logprob": a, "bytes": list(tok(t).encode())} for a, t, _ in (tops[i] or [])] \
            if i < len(tops) else []
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": alts})
    return {"content": content}


def completion_logprobs(meta: dict, tok: TokenText, echo: bool, text_base: int = 0,
                        start: int = 0) -> dict | None:
    """Completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (prompt first if echo)."""
    out = meta.get("output_token_logprobs")
    if out is None:
        return None
    entries = list(zip(out, meta.get("output_top_logprobs") or [None] * len(out)))[start:]
    if echo:
        ins = meta.get("input_token_logprobs") or []
        entries = list(zip(ins, meta.get("input_top_logprobs") or [None] * len(ins))) + entries
    res: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_base
    for (lp, tid, _), tops in entries:
        text = tok(tid)
        res["tokens"].append(text)
        res["token_logprobs"].append(lp)
        res["top_logprobs"].append({tok(t): a for a, t, _ in tops} if tops else None)
        res["text_offset"].append(offset)
        offset += len(text)
    return res


class StreamTracker:
    """Per choice: how much text and how many logprobs a stream has already sent."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.logprobs: dict[int, int] = {}
        self.tokens: dict[int, int] = {}

    def delta(self, snap: dict) -> str:
        """The new text of this snapshot; the stream only ever appends."""
        i, text = snap["index"], snap["text"]
        sent = self.text.get(i, "")
        if not text.startswith(sent):  # cannot happen (text only grows); never resend
            return ""
        self.text[i] = text
        return text[len(sent):]

    def new_logprobs(self, snap: dict) -> tuple[int, int]:
        """The range of output-logprob positions not sent yet."""
        i = snap["index"]
        done = len(snap["meta_info"].get("output_token_logprobs") or [])
        start = self.logprobs.get(i, 0)
        self.logprobs[i] = done
        return start, done


def finish(snap: dict) -> str | None:
    return finish_reason(snap["meta_info"]) if snap["finished"] else None
