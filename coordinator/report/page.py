"""The report as one self-contained HTML page: inline SVG figures, tables, no scripts and no
network references, readable at a laptop's width and in print."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CSS = """
:root { color-scheme: light; --ink: #1d1d1f; --muted: #5f6368; --rule: #d9d9de; --bg-soft: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0 auto; padding: 1.5rem 1.25rem 3rem; max-width: 62rem; color: var(--ink);
       font: 15px/1.5 "DejaVu Sans", system-ui, sans-serif; background: #fff; }
h1 { font-size: 1.55rem; margin: 0 0 .25rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 .6rem; border-bottom: 1px solid var(--rule); padding-bottom: .2rem; }
h3 { font-size: 1rem; margin: 1.4rem 0 .4rem; }
p.lede { color: var(--muted); margin-top: 0; }
nav ol { columns: 2; margin: .4rem 0 1rem; padding-left: 1.3rem; }
figure { margin: 1rem 0 1.6rem; break-inside: avoid; page-break-inside: avoid; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { font-size: .88rem; color: var(--muted); margin-top: .35rem; }
figcaption b { color: var(--ink); }
.table-wrap { overflow-x: auto; margin: .6rem 0 1.2rem; }
table { border-collapse: collapse; font-size: .85rem; min-width: 50%; }
caption { text-align: left; font-size: .88rem; color: var(--muted); padding-bottom: .3rem; }
th, td { border-bottom: 1px solid var(--rule); padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: .85em; }
.verdict { border-left: 4px solid #009E73; background: #eef8f4; padding: .6rem .9rem; margin: 1rem 0; }
.verdict.bad { border-left-color: #D55E00; background: #fdf0e9; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; font-size: .9rem; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; }
footer { margin-top: 2.5rem; font-size: .8rem; color: var(--muted); }
@media (max-width: 40rem) { nav ol { columns: 1; } body { font-size: 14px; } }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  nav { display: none; }
  h2 { break-after: avoid; page-break-after: avoid; }
  .table-wrap { overflow: visible; }
  a { color: inherit; text-decoration: none; }
}
"""


def esc(value: Any) -> str:
    return html.escape("–" if value is None else str(value), quote=True)


@dataclass
class Page:
    title: str
    lede: str = ""
    parts: list[str] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (anchor, heading) for the contents
    figures: int = 0
    tables: int = 0

    def section(self, anchor: str, heading: str) -> None:
        self.sections.append((anchor, heading))
        self.parts.append(f'<h2 id="{esc(anchor)}">{esc(heading)}</h2>')

    def subheading(self, text: str) -> None:
        self.parts.append(f"<h3>{esc(text)}</h3>")

    def paragraph(self, text: str, *, raw: bool = False) -> None:
        self.parts.append(f"<p>{text if raw else esc(text)}</p>")

    def verdict(self, text: str, *, good: bool) -> None:
        self.parts.append(f'<div class="verdict{"" if good else " bad"}">{esc(text)}</div>')

    def facts(self, items: Sequence[tuple[str, Any]]) -> None:
        rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
        self.parts.append(f'<dl class="facts">{rows}</dl>')

    def figure(self, name: str, svg: str, caption: str) -> None:
        """`caption` says what the figure shows; it is numbered here."""
        self.figures += 1
        self.parts.append(
            f'<figure id="fig-{esc(name)}" data-figure="{esc(name)}">{svg}'
            f"<figcaption><b>Figure {self.figures}.</b> {esc(caption)}</figcaption></figure>"
        )

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str = "", numeric: Sequence[int] = ()
    ) -> None:
        self.tables += 1
        num = set(numeric)

        def cls(i: int) -> str:
            return ' class="num"' if i in num else ""

        head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
        body = "".join(
            "<tr>" + "".join(f"<td{cls(i)}>{esc(v)}</td>" for i, v in enumerate(row)) + "</tr>" for row in rows
        )
        cap = f"<caption><b>Table {self.tables}.</b> {esc(caption)}</caption>" if caption else ""
        self.parts.append(
            f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
        )

    def render(self, footer: str = "") -> str:
        contents = "".join(f'<li><a href="#{esc(a)}">{esc(h)}</a></li>' for a, h in self.sections)
        nav = f"<nav><b>Contents</b><ol>{contents}</ol></nav>" if len(self.sections) > 1 else ""
        lede = f'<p class="lede">{esc(self.lede)}</p>' if self.lede else ""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head>"
            f"<body><header><h1>{esc(self.title)}</h1>{lede}</header>{nav}<main>"
            + "\n".join(self.parts)
            + f"</main><footer>{esc(footer)}</footer></body></html>\n"
        )
