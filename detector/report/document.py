"""The report as data: sections of blocks, which report.emit writes as Markdown or HTML.

A block says what it is (a paragraph, a bullet list, a table, an image, a code
block), never how a format prints it. Text may carry two inline marks, written as
in Markdown: **bold** and `code`. A style names a role that both formats show
(Markdown can only show "strong"; HTML gives each style a look).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STYLES = ("", "strong", "muted", "info", "warn", "note")  # plain, emphasised, small print, and three boxes


@dataclass(frozen=True)
class Paragraph:
    """One paragraph of text."""

    text: str
    style: str = ""


@dataclass(frozen=True)
class BulletList:
    """A list of short texts, one bullet each."""

    items: list[str]
    style: str = ""


@dataclass(frozen=True)
class Table:
    """A table: a header row and rows of cells, all text (a blank first header cell is allowed)."""

    header: list[str]
    rows: list[list[str]]
    anchor: str = ""  # an id other pages or tests can point at


@dataclass(frozen=True)
class Image:
    """A PNG file beside the report, with its caption."""

    path: Path
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Code:
    """Text shown verbatim, for example a command to copy."""

    text: str


Block = Paragraph | BulletList | Table | Image | Code


@dataclass
class Section:
    """A heading and its blocks; level 1 is the document's title, an empty title prints no heading."""

    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2
