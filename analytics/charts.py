"""Server-rendered SVG charts for the admin's fleet dashboard and device pages.

No JavaScript charting library and nothing from a CDN: the server draws the figures, so the page
shows them with scripts off and a test reads them straight from the HTML. Colours are CSS classes
(`analytics/static/analytics/fleet.css`) built on the admin's own variables, so the charts follow
the admin's light/dark theme. Every mark carries its figure in `data-value` (and a `<title>` the
browser shows on hover and screen readers read), e.g. a column chart of 60 minutes has exactly 60
`<rect class="fleet-bar ...">`, a line chart exactly one `<circle class="fleet-point">` per bucket.

Drawn in a fixed `viewBox` and scaled to the card's width by the browser.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe


@dataclass(frozen=True)
class Bar:
    value: float
    label: str  # the tooltip's subject, e.g. "14:05"
    css_class: str = ""
    tick: str = ""  # a label under the bar (most bars have none)


@dataclass(frozen=True)
class Segment:
    key: str
    value: int
    label: str
    css_class: str


@dataclass(frozen=True)
class Row:
    label: str
    value: int
    css_class: str = ""
    href: str = ""


@dataclass(frozen=True)
class SeriesPoint:
    at: datetime  # the bucket's start
    value: float
    count: int  # points in the bucket


def number(value: float) -> str:
    """A figure as people read it: thousands separated, at most 3 significant digits after the point."""
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (an axis' top); 1 for nothing."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value * (1 - 1e-9):
            return candidate
    return 10 ** (exponent + 1)


def _fmt(value: float) -> str:
    """A coordinate: two decimals are finer than any screen."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _raw(value: float) -> str:
    """A figure for `data-value`: exact, no separators."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _svg(*, name: str, width: int, height: int, body: SafeString, label: str) -> SafeString:
    return format_html(
        '<svg class="fleet-chart" data-chart="{}" viewBox="0 0 {} {}" role="img" aria-label="{}">{}</svg>',
        name,
        width,
        height,
        label,
        body,
    )


def column_chart(
    *, name: str, bars: Sequence[Bar], label: str, unit: str, width: int = 720, height: int = 170
) -> SafeString:
    """One column per bar (e.g. a minute's received points), with a y axis of three gridlines."""
    left, right, top, bottom = 46, 6, 8, 20
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = nice_ceiling(max((bar.value for bar in bars), default=0))
    grid = format_html_join(
        "",
        '<line class="fleet-gridline" x1="{}" x2="{}" y1="{}" y2="{}"/>'
        '<text class="fleet-axis" x="{}" y="{}" text-anchor="end" dominant-baseline="middle">{}</text>',
        (
            (left, width - right, _fmt(y), _fmt(y), left - 6, _fmt(y), number(value))
            for value, y in ((top_value * f, top + plot_h * (1 - f)) for f in (0, 0.5, 1))
        ),
    )
    slot = plot_w / max(len(bars), 1)
    bar_w = max(slot * 0.78, 1.0)
    marks, ticks = [], []
    for index, bar in enumerate(bars):
        x = left + index * slot + (slot - bar_w) / 2
        h = plot_h * bar.value / top_value
        if bar.value > 0:
            h = max(h, 1.0)  # a minute with any traffic is never drawn as none
        marks.append(
            format_html(
                '<rect class="fleet-bar {}" x="{}" y="{}" width="{}" height="{}" data-value="{}" data-label="{}">'
                "<title>{}: {} {}</title></rect>",
                bar.css_class,
                _fmt(x),
                _fmt(top + plot_h - h),
                _fmt(bar_w),
                _fmt(h),
                _raw(bar.value),
                bar.label,
                bar.label,
                number(bar.value),
                unit,
            )
        )
        if bar.tick:
            ticks.append(
                format_html(
                    '<text class="fleet-axis" x="{}" y="{}" text-anchor="middle">{}</text>',
                    _fmt(x + bar_w / 2),
                    height - 5,
                    bar.tick,
                )
            )
    body = mark_safe(grid + "".join(marks) + "".join(ticks))  # every part escaped above
    return _svg(name=name, width=width, height=height, body=body, label=label)


def stacked_bar(
    *, name: str, segments: Sequence[Segment], label: str, width: int = 400, height: int = 22
) -> SafeString:
    """The whole as one bar, a segment per part (e.g. the fleet by status); zero parts are left out."""
    total = sum(segment.value for segment in segments)
    marks, x = [], 0.0
    if total == 0:
        marks.append(
            format_html('<rect class="fleet-empty" x="0" y="0" width="{}" height="{}" rx="3"/>', width, height)
        )
    for segment in segments:
        if segment.value <= 0:
            continue
        w = width * segment.value / total
        marks.append(
            format_html(
                '<rect class="fleet-segment {}" x="{}" y="0" width="{}" height="{}" data-key="{}" data-value="{}">'
                "<title>{}: {} ({}%)</title></rect>",
                segment.css_class,
                _fmt(x),
                _fmt(w),
                height,
                segment.key,
                segment.value,
                segment.label,
                number(segment.value),
                number(round(100 * segment.value / total, 1)),
            )
        )
        x += w
    return _svg(name=name, width=width, height=height, body=mark_safe("".join(marks)), label=label)


def hbar_chart(*, name: str, rows: Sequence[Row], label: str, width: int = 640, row_height: int = 26) -> SafeString:
    """A labelled horizontal bar per row (e.g. devices per firmware version), longest scaled to the width."""
    label_w, value_w = 140, 70
    bar_space = width - label_w - value_w
    top_value = max((row.value for row in rows), default=0) or 1
    marks = []
    for index, row in enumerate(rows):
        y = index * row_height
        w = max(bar_space * row.value / top_value, 1.0 if row.value else 0.0)
        mark = format_html(
            '<g class="fleet-hrow" data-label="{}" data-value="{}">'
            '<text class="fleet-label" x="{}" y="{}" text-anchor="end" dominant-baseline="middle">{}</text>'
            '<rect class="fleet-hbar {}" x="{}" y="{}" width="{}" height="{}" rx="2"><title>{}: {}</title></rect>'
            '<text class="fleet-value" x="{}" y="{}" dominant-baseline="middle">{}</text></g>',
            row.label,
            row.value,
            label_w - 8,
            _fmt(y + row_height / 2),
            row.label if len(row.label) <= 16 else row.label[:15] + "…",
            row.css_class,
            label_w,
            _fmt(y + 4),
            _fmt(w),
            row_height - 8,
            row.label,
            number(row.value),
            _fmt(label_w + w + 6),
            _fmt(y + row_height / 2),
            number(row.value),
        )
        if row.href:
            mark = format_html('<a href="{}">{}</a>', row.href, mark)
        marks.append(mark)
    height = max(len(rows), 1) * row_height
    return _svg(name=name, width=width, height=height, body=mark_safe("".join(marks)), label=label)


def _time_tick(at: datetime, span_seconds: float) -> str:
    local = timezone.localtime(at)
    if span_seconds > 2 * 86400:
        return local.strftime("%a %d %H:%M")
    return local.strftime("%H:%M")


def line_chart(
    *,
    name: str,
    points: Sequence[SeriesPoint],
    start: datetime,
    end: datetime,
    bucket_seconds: float,
    label: str,
    width: int = 560,
    height: int = 190,
) -> SafeString:
    """A series over [start, end]: the value line and a dot per bucket (its tooltip gives the bucket's
    number of points). The line breaks where buckets are missing: no data is not drawn as a ramp."""
    left, right, top, bottom = 54, 10, 10, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max((end - start).total_seconds(), 1.0)
    values = [point.value for point in points]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high == low:
        low, high = low - 1, high + 1
    pad = (high - low) * 0.08
    low, high = low - pad, high + pad

    def x_of(at: datetime) -> float:
        return left + plot_w * min(max((at - start).total_seconds() / span, 0.0), 1.0)

    def y_of(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    parts = []
    for f in (0, 0.5, 1):
        value, y = low + (high - low) * f, top + plot_h * (1 - f)
        parts.append(
            format_html(
                '<line class="fleet-gridline" x1="{}" x2="{}" y1="{}" y2="{}"/>'
                '<text class="fleet-axis" x="{}" y="{}" text-anchor="end" dominant-baseline="middle">{}</text>',
                left,
                width - right,
                _fmt(y),
                _fmt(y),
                left - 6,
                _fmt(y),
                number(float(f"{value:.3g}")),
            )
        )
    for f in (0, 0.25, 0.5, 0.75, 1):
        at = start + (end - start) * f
        anchor = "start" if f == 0 else "end" if f == 1 else "middle"
        parts.append(
            format_html(
                '<text class="fleet-axis" x="{}" y="{}" text-anchor="{}">{}</text>',
                _fmt(x_of(at)),
                height - 5,
                anchor,
                _time_tick(at, span),
            )
        )
    # Runs of consecutive buckets; a gap of more than one bucket starts a new run.
    runs: list[list[SeriesPoint]] = []
    for point in points:
        if runs and (point.at - runs[-1][-1].at).total_seconds() <= bucket_seconds * 1.5:
            runs[-1].append(point)
        else:
            runs.append([point])
    for run in runs:
        if len(run) > 1:
            line = " ".join(f"{_fmt(x_of(p.at))},{_fmt(y_of(p.value))}" for p in run)
            parts.append(format_html('<polyline class="fleet-line" points="{}"/>', line))
    for point in points:
        parts.append(
            format_html(
                '<circle class="fleet-point" cx="{}" cy="{}" r="2.2" data-at="{}" data-value="{}">'
                "<title>{}: {} ({} points)</title></circle>",
                _fmt(x_of(point.at)),
                _fmt(y_of(point.value)),
                point.at.isoformat(),
                _raw(point.value),
                timezone.localtime(point.at).strftime("%Y-%m-%d %H:%M"),
                number(point.value),
                number(point.count),
            )
        )
    return _svg(name=name, width=width, height=height, body=mark_safe("".join(parts)), label=label)
