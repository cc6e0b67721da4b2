"""Print a large rich Table fast, character for character as rich prints it.

rich lays out every cell through its text machinery, about a millisecond per row: ``sculpt inspect``
on a 50,000-node model spent a minute printing its table. In the plain case the CLI is in when its
output goes to a file or a pipe (no colours, the default box, cells of plain ASCII text that fit the
console) the layout is simple: each column as wide as its widest cell plus a space on either side.
:func:`print_table` writes that directly and leaves every other case to rich.
"""

from __future__ import annotations

import string

from rich import box as rich_box

# printable ASCII without the characters rich interprets in a str: markup ([, ]), escapes (\),
# emoji codes (:); no tabs or newlines
_PLAIN = frozenset(string.ascii_letters + string.digits + " !\"#$%&'()*+,-./;<=>?@^_`{|}~")


def _plain(text) -> bool:
    return isinstance(text, str) and text == text.strip() and _PLAIN.issuperset(text)


def render_plain(console, table) -> str | None:
    """The text rich would print for ``table`` on ``console``, or None when this is not the plain case."""
    if (console.color_system is not None or console.record or console.is_jupyter or console.legacy_windows
            or not (console.encoding or "").lower().startswith("utf")):
        return None
    if (table.box is not rich_box.HEAVY_HEAD or not table.show_header or table.show_footer or not table.show_edge
            or table.show_lines or table.padding != (0, 1, 0, 1) or not table.pad_edge or table.collapse_padding
            or table.expand or table.width is not None or table.min_width is not None or table.leading
            or table.row_styles or table.caption or table.style not in (None, "", "none") or table.border_style
            or table.title_style
            or table.header_style != "table.header" or table.title_justify != "center" or not table.rows
            or not table.columns):
        return None
    for row in table.rows:
        if row.style or row.end_section:
            return None
    columns = table.columns
    cells = []
    for c in columns:
        if (c.width is not None or c.min_width is not None or c.max_width is not None or c.ratio is not None
                or c.no_wrap or c.style or c.header_style or c.footer or c.highlight or c.vertical != "top"
                or c.justify not in ("left", "right") or len(c._cells) != len(table.rows)):
            return None
        col = [c.header] + list(c._cells)
        if not all(_plain(x) for x in col):
            return None
        cells.append(col)
    widths = [max(len(x) for x in col) + 2 for col in cells]
    table_width = sum(widths) + len(columns) + 1
    if table_width > console.width:
        return None
    title = table.title
    if title is not None and not (_plain(title) and title and len(title) <= table_width):
        return None
    b = table.box.substitute(console.options, safe=table.safe_box if table.safe_box is not None else console.safe_box)
    if b is not table.box:
        return None

    lines = []
    if title:
        left = (table_width - len(title)) // 2
        lines.append(" " * left + title + " " * (table_width - len(title) - left))
    lines.append(b.get_top(widths))
    pads = [(w - 2, c.justify == "right") for w, c in zip(widths, columns)]

    def row(values, edge, divider):
        parts = [" " + (v.rjust(w) if right else v.ljust(w)) + " " for v, (w, right) in zip(values, pads)]
        return edge[0] + divider.join(parts) + edge[1]

    lines.append(row([col[0] for col in cells], (b.head_left, b.head_right), b.head_vertical))
    lines.append(b.get_row(widths, "head", edge=True))
    n = len(table.rows)
    for k, values in enumerate(zip(*(col[1:] for col in cells))):
        if k == n - 1:
            lines.append(row(values, (b.foot_left, b.foot_right), b.foot_vertical))
        else:
            lines.append(row(values, (b.mid_left, b.mid_right), b.mid_vertical))
    lines.append(b.get_bottom(widths))
    return "\n".join(lines) + "\n"


def print_table(console, table) -> None:
    """``console.print(table)``, without rich's per-cell layout when the plain case allows."""
    text = render_plain(console, table)
    if text is None:
        console.print(table)
        return
    console.file.write(text)
    console.file.flush()
