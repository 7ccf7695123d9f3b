"""Pages of KV slots with prefix reuse.

A page holds `page_size` consecutive tokens of one sequence. Full pages are content-addressed by a
hash chain over their tokens (hash of the previous page's key and this page's tokens), so a new
request whose prompt starts with the same full pages reuses them. Unreferenced cached pages stay
resident in LRU order and are evicted only when free pages run out.
"""

from __future__ import annotations

from collections import OrderedDict


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.num_pages = num_pages
        self.free: list[int] = list(range(num_pages - 1, -1, -1))
        self.ref = [0] * num_pages
        self.key_of: dict[int, int] = {}              # page -> content key (cached pages only)
        self.page_of: dict[int, int] = {}             # content key -> page
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached pages with ref 0, oldest first

    # -- prefix cache ---------------------------------------------------------------------
    def _keys(self, tokens: list[int], n_pages: int) -> list[int]:
        keys, prev = [], 0
        for p in range(n_pages):
            prev = hash((prev, tuple(tokens[p * self.page_size:(p + 1) * self.page_size])))
            keys.append(prev)
        return keys

    def match_prefix(self, tokens: list[int], limit: int) -> list[int]:
        """Take references on the cached full pages that start `tokens[:limit]`; return them."""
        pages = []
        for key in self._keys(tokens, limit // self.page_size):
            page = self.page_of.get(key)
            if page is None:
                break
            self._incref(page)
            pages.append(page)
        return pages

    def release(self, pages: list[int], tokens: list[int], num_computed: int) -> None:
        """Drop a sequence's references; its full, computed pages become reusable prefix pages."""
        full = min(len(pages), num_computed // self.page_size)
        for page, key in zip(pages[:full], self._keys(tokens, full)):
            if page not in self.key_of and key not in self.page_of:
                self.key_of[page], self.page_of[key] = key, page
        for page in pages:
            self.ref[page] -= 1
            if self.ref[page] == 0:
                if page in self.key_of:
                    self.lru[page] = None
                else:
                    self.free.append(page)

    # -- allocation -----------------------------------------------------------------------
    def _incref(self, page: int) -> None:
        if self.ref[page] == 0:
            self.lru.pop(page, None)
        self.ref[page] += 1

    def available(self) -> int:
        return len(self.free) + len(self.lru)

    def alloc(self, n: int) -> list[int] | None:
        """n fresh pages (evicting least-recently-used cached pages if needed), or None."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.lru.popitem(last=False)
                del self.page_of[self.key_of.pop(page)]
            self.ref[page] = 1
            out.append(page)
        return out

    def cached_pages(self) -> int:
        return len(self.key_of)
