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
            if not text.endswith("\ufffd"):
                req.text = text

    def finalize_text(self, req: Request) -> None:
        if not req.stop_trimmed:
            req.text = self.decode(req)
