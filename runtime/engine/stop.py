"""Stop conditions and detokenization: EOS, stop token ids, stop strings, max_new_tokens."""

from __future__ import annotations

from quantrt.engine.request import Request


class StopChecker:
    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids

    def decode(self, req: Request) -> str:
        return self.tokenizer.decode(req.output_ids, skip_special_tokens=req.params.skip_special_tokens)

    def check(self, req: Request) -> dict | None:
        """The finish reason after the newest token, or None to go on."""
        p, tok = req.params, req.output_ids[-1]
        if tok in p.stop_token_ids:
            return {"type": "stop", "matched": tok}
        if not p.ignore_eos and tok in self.eos_ids:
            return {"type": "stop", "matched": tok}
        if p.stop:
            text = self.decode(req)
            tail = max(len(s) for s in p.stop) + 16
            window_start = max(0, len(req.text) - tail)
            for s in p.stop:
                at = text.find(s, window_start)
                if at >= 0:
                    req.text = text if p.no_stop_trim else text[:at]
                    req.stop_trimmed = True
                    return {"type": "stop", "matched": s}
            req.text = text
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def update_text(self, req: Request) -> None:
        """Streaming text: hold back a trailing partial UTF-8 character so text only ever grows."""
        if not req.stop_trimmed:
            text = self.decode(req)
            if text.endswith("\ufffd"):
                return
            hold = _stop_prefix_len(text, req.params.stop)
            req.text = text[: len(text) - hold] if hold else text

    def finalize_text(self, req: Request) -> None:
        if not req.stop_trimmed:
            req.text = self.decode(req)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
