"""Page tokens of list calls, shared by `Pager` and `AsyncPager`. No I/O."""

from __future__ import annotations

from lmforge.types import Page


class PageCursor:
    """Where a listing is: the token of the next page, and whether there is one."""

    def __init__(self) -> None:
        self.token = ""
        self.done = False

    def advance(self, page: Page) -> None:
        self.token = page.next_page_token
        self.done = not self.token
