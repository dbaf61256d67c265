"""The HTML a tab shows a message in: the text escaped (it may hold file names and user input), one of the app's
message classes (styled in blocks.py's CSS), and an id where tests and users look for it."""

from __future__ import annotations

import html


def message_html(text: object, css: str, elem_id: str = "", tag: str = "p") -> str:
    """`text` as one element of class `css` ('gen-error', 'gen-note', 'train-done')."""
    ident = f" id='{elem_id}'" if elem_id else ""
    return f"<{tag} class='{css}'{ident}>{html.escape(str(text))}</{tag}>"


def error_html(text: object, elem_id: str = "", tag: str = "p") -> str:
    """An error message: what went wrong, in words (a UserError's text)."""
    return message_html(text, "gen-error", elem_id, tag)
