"""The two writers of a report.document: Markdown and one self-contained HTML page.

Each is a loop over sections and blocks; neither knows what a section says. The
HTML embeds its images as base64 and loads nothing from anywhere, so it can be
mailed or opened offline; the Markdown links the PNG files beside it.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

from detector.report.document import Block, BulletList, Code, Image, Paragraph, Section, Table


# ---- Markdown -------------------------------------------------------------------------------------------------

def _md_row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _md_block(block: Block, base: Path) -> list[str]:
    if isinstance(block, Paragraph):
        return [f"**{block.text}**" if block.style == "strong" else block.text]
    if isinstance(block, BulletList):
        return [f"- {item}" for item in block.items]
    if isinstance(block, Table):
        return [_md_row(block.header), "|---" * len(block.header) + "|", *(_md_row(r) for r in block.rows)]
    if isinstance(block, Image):
        link = f"![{block.alt}]({block.path.relative_to(base).as_posix()})"
        return [link, "", block.caption] if block.caption else [link]
    if isinstance(block, Code):
        return ["```", block.text, "```"]
    raise TypeError(f"not a report block: {block!r}")


def markdown(sections: list[Section], base: Path) -> str:
    """The sections as Markdown; images are linked relative to base, the folder the .md is written to."""
    lines: list[str] = []
    for s in sections:
        if s.title:
            lines += ["#" * s.level + " " + s.title, ""]
        for block in s.blocks:
            lines += _md_block(block, base) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---- HTML -----------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2rem auto;max-width:1180px;
color:#1d232a;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
.muted{color:#667}.info{background:#eef5ff;border-left:4px solid #3a7bd5;padding:.6rem 1rem}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.6rem 1rem}
.note{background:#f4f4f6;border-left:4px solid #99a;padding:.6rem 1rem}
.strong{font-weight:600}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}th,td{border:1px solid #ccd;padding:.25rem .55rem;
text-align:right}th{background:#f0f2f5}td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}td:first-child{white-space:nowrap}.scroll{overflow-x:auto}
figure{margin:1.2rem 0}figure img{max-width:100%;border:1px solid #e3e5e8}figcaption{color:#445;font-size:.9rem}
code{font-size:.85rem}
"""

_CODE, _BOLD = re.compile(r"`([^`]+)`"), re.compile(r"\*\*(.+?)\*\*")


def inline(text: str) -> str:
    """Escaped HTML for text with the inline marks **bold** and `code` (as Markdown shows them)."""
    return _BOLD.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", escape(text)))


def _attr(name: str, value: str) -> str:
    return f' {name}="{escape(value)}"' if value else ""


def _cells(tag: str, cells: list[str]) -> str:
    return "<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>"


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p{_attr('class', block.style)}>{inline(block.text)}</p>"
    if isinstance(block, BulletList):
        ul = "<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block.items) + "</ul>"
        return f'<div class="{block.style}">{ul}</div>' if block.style else ul
    if isinstance(block, Table):
        body = "".join(_cells("td", r) for r in block.rows)
        return (f'<div class="scroll"><table{_attr("id", block.anchor)}><thead>{_cells("th", block.header)}</thead>'
                f"<tbody>{body}</tbody></table></div>")
    if isinstance(block, Image):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        caption = f"<figcaption>{inline(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img alt="{escape(block.alt)}" src="data:image/png;base64,{data}">{caption}</figure>'
    if isinstance(block, Code):
        return f"<pre><code>{escape(block.text)}</code></pre>"
    raise TypeError(f"not a report block: {block!r}")


def html(sections: list[Section]) -> str:
    """The sections as one HTML page: inline CSS, images embedded, no external resources."""
    title = next((s.title for s in sections if s.level == 1), "Report")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{escape(title)}</title>",
             f"<style>{CSS}</style></head><body>"]
    for s in sections:
        if s.title:
            parts.append(f"<h{s.level}{_attr('id', s.anchor)}>{escape(s.title)}</h{s.level}>")
        parts += [_html_block(block) for block in s.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
