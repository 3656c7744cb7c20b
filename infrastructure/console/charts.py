"""The overview's figures as SVG drawn on the server (they need no script): the CONSORT
flow diagram, enrolment by site over time, mean pain by arm and visit, deviations by
code. Each is an image with a title and description; the page prints its numbers as a
table beside it. Colours are never the only signal: series carry labels and dash
patterns."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

LINE = 18  # px between lines of text in a box
PAD = 8


def _svg(width: int, height: int, ident: str, title: str, desc: str, body: list[str]
         ) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{ident}-title {ident}-desc" '
        f'xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{ident}-title">{escape(title)}</title>'
        f'<desc id="{ident}-desc">{escape(desc)}</desc>{"".join(body)}</svg>')


# --- the CONSORT flow diagram --------------------------------------------------------------

Line = tuple[str, str | None]  # text, and the data key of the count it shows


def _box(x: float, y: float, width: float, lines: list[Line]) -> tuple[str, float]:
    """A box of lines (the first in bold) at (x, y); its SVG and height."""
    height = PAD * 2 + LINE * len(lines) - 4
    parts = [f'<rect class="box" x="{x}" y="{y}" width="{width}" height="{height}" rx="3"/>']
    for i, (text, key) in enumerate(lines):
        css = "head" if i == 0 else "item"
        attribute = f' data-key="{escape(key)}"' if key else ""
        indent = (len(text) - len(text.lstrip(" "))) * 6  # leading spaces: a sub-item
        parts.append(f'<text class="{css}" x="{x + PAD + indent}" '
                     f'y="{y + PAD + 12 + LINE * i}"{attribute}>{escape(text.strip())}</text>')
    return "".join(parts), height


def _arrow(x1: float, y1: float, x2: float, y2: float) -> str:
    return f'<line class="arrow" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" ' \
           f'marker-end="url(#consort-head)"/>'


def _reasons(label: str, key: str, flow: dict[str, Any], indent: str = "  ") -> list[Line]:
    lines: list[Line] = [(f"{label} (n={flow['total']})", f"{key}.total")]
    lines += [(f"{indent}{reason.replace('_', ' ')} (n={n})", f"{key}.reasons.{reason}")
              for reason, n in flow["reasons"].items()]
    return lines


def consort_svg(counts: dict[str, Any], criteria_shown: int = 8) -> Markup:
    """The flow diagram of ``consort()``'s counts: enrolment, allocation, follow-up and
    analysis, one column per arm."""
    arms = counts["arms"]
    width = max(760, 380 * len(arms))
    column = width / len(arms)
    body = [('<defs><marker id="consort-head" viewBox="0 0 10 10" refX="9" refY="5" '
            'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
            '<path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>')]
    excluded = counts["excluded"]
    criteria = list(excluded["failed_criteria"].items())
    exclusion: list[Line] = [
        (f"Excluded (n={excluded['total']})", "excluded.total"),
        (f"  Not meeting inclusion criteria (n={excluded['not_eligible']})",
         "excluded.not_eligible")]
    exclusion += [(f"    {name.replace('_', ' ')} (n={n})", f"excluded.failed_criteria.{name}")
                  for name, n in criteria[:criteria_shown]]
    if len(criteria) > criteria_shown:
        exclusion.append((f"    {len(criteria) - criteria_shown} other criteria", None))
    exclusion += _reasons("  Withdrew before randomization", "excluded.withdrew_before_"
                          "randomization", excluded["withdrew_before_randomization"], "    ")
    centre, box_width = width / 2, 300
    y = 10.0
    svg, h = _box(centre - box_width / 2, y, box_width,
                  [(f"Assessed for eligibility (n={counts['assessed']})", "assessed")])
    body.append(svg)
    side_y = y + h + 20
    side, side_h = _box(centre + 40, side_y, width - centre - 50, exclusion)
    aside: list[Line] = [(f"Awaiting randomization (n={counts['awaiting_randomization']})",
                          "awaiting_randomization")]
    unreadable = counts["unreadable"]["total"]
    if unreadable:  # assessed, in no other box: so the boxes add up
        aside.append((f"Record can't be read (n={unreadable})", "unreadable.total"))
    waiting, _ = _box(10, side_y, centre - 60, aside)
    body += [side, waiting,
             _arrow(centre, side_y + 14, centre + 38, side_y + 14),
             _arrow(centre, side_y + 14, centre - 48, side_y + 14)]
    randomized_y = side_y + side_h + 24
    body.append(_arrow(centre, y + h, centre, randomized_y))
    svg, h = _box(centre - box_width / 2, randomized_y, box_width,
                  [(f"Randomized (n={counts['randomized']})", "randomized")])
    body.append(svg)
    top = randomized_y + h
    stages = [("Allocation", lambda code, a: [
                  (f"Allocated to {a['name']} (n={a['allocated']})", f"arms.{code}.allocated"),
                  (f"  Received allocated intervention (n={a['received']})",
                   f"arms.{code}.received"),
                  (f"  Did not receive it (n={a['not_received']})",
                   f"arms.{code}.not_received")]),
              ("Follow-up", lambda code, a: [
                  *_reasons("Discontinued intervention", f"arms.{code}.discontinued",
                            a["discontinued"]),
                  *_reasons("Left the study", f"arms.{code}.left_study", a["left_study"])]),
              ("Analysis", lambda code, a: [
                  (f"Analysed (n={a['analysed']})", f"arms.{code}.analysed"),
                  (f"  Primary endpoint not recorded (n={a['not_analysed']})",
                   f"arms.{code}.not_analysed")])]
    previous: list[float] = []
    for stage, lines_of in stages:
        y = top + 34
        body.append(f'<text class="stage" x="{centre}" y="{y - 10}" '
                    f'text-anchor="middle">{stage}</text>')
        heights = []
        for i, (code, arm) in enumerate(arms.items()):
            x = column * i + 10
            svg, h = _box(x, y, column - 20, lines_of(code, arm))
            body.append(svg)
            heights.append(h)
            middle = x + (column - 20) / 2
            body.append(_arrow(middle, previous[i], middle, y) if previous
                        else _arrow(centre, top, middle, y))
        previous = [y + h for h in heights]
        top = y + max(heights)
    title = "CONSORT flow diagram" + (f" as recorded at {counts['as_of']}"
                                      if counts.get("as_of") else "")
    desc = (f"{counts['assessed']} assessed for eligibility, {excluded['total']} excluded, "
            + (f"{unreadable} whose record can't be read, " if unreadable else "")
            + f"{counts['randomized']} randomized: " + "; ".join(
                f"{a['name']}: {a['allocated']} allocated, {a['analysed']} analysed"
                for a in arms.values()))
    return _svg(int(width), int(top + 10), "consort", title, desc, body)


# --- charts --------------------------------------------------------------------------------

DASHES = ("", "6 4", "2 3", "10 3 2 3")


def _nice_max(value: float) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if value <= step * 5:
            return step * 5 if value > 0 else 5
    return int(value) + 1


def enrolment_svg(series: dict[str, list[tuple[str, int]]]) -> Markup:
    """Cumulative participants randomized per site, by month."""
    width, height, left, bottom, top, right = 640, 260, 44, 40, 14, 80
    months = [m for m, _ in next(iter(series.values()))] if series else []
    highest = _nice_max(max((n for points in series.values() for _, n in points), default=0))
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / max(1, len(months) - 1)

    def xy(i: int, n: int) -> tuple[float, float]:
        return left + i * step, top + plot_h - plot_h * n / highest

    body = [(f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
            f'y2="{top + plot_h}"/>'),
            f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>']
    for k in range(6):
        value = highest * k // 5
        _, y = xy(0, value)
        body.append(f'<text class="tick" x="{left - 6}" y="{y + 4}" '
                    f'text-anchor="end">{value}</text>')
    every = max(1, len(months) // 8)
    for i, month in enumerate(months):
        if i % every == 0 or i == len(months) - 1:
            x, _ = xy(i, 0)
            body.append(f'<text class="tick" x="{x}" y="{top + plot_h + 18}" '
                        f'text-anchor="middle">{escape(month)}</text>')
    for k, (site, points) in enumerate(series.items()):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in
                          (xy(i, n) for i, (_, n) in enumerate(points)))
        dash = DASHES[k % len(DASHES)]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(f'<polyline class="series s{k % 4}" points="{coords}"{dashed}/>')
        body += [f'<circle class="dot s{k % 4}" cx="{x:.1f}" cy="{y:.1f}" r="3"/>'
                 for x, y in (xy(i, n) for i, (_, n) in enumerate(points))]
        x, y = xy(len(points) - 1, points[-1][1])
        body.append(f'<text class="label" x="{x + 6}" y="{y + 4}">{escape(site)} '
                    f'{points[-1][1]}</text>')
    desc = "; ".join(f"{site}: {points[-1][1]} randomized by {points[-1][0]}"
                     for site, points in series.items()) or "no participant randomized"
    return _svg(width, height, "enrolment", "Participants randomized by site over time",
                desc, body)


def pain_svg(pain: dict[str, dict[str, dict[str, Any]]], visits: list[str],
             arm_names: dict[str, str]) -> Markup:
    """Mean BPI average pain (0-10) by visit, a bar per arm with its n."""
    arms = list(arm_names)
    width, height, left, bottom, top = 640, 260, 36, 52, 28
    plot_w, plot_h = width - left - 10, height - top - bottom
    group = plot_w / max(1, len(visits))
    bar = (group - 24) / max(1, len(arms))
    body = [(f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
            f'y2="{top + plot_h}"/>')]
    for value in range(0, 11, 2):
        y = top + plot_h - plot_h * value / 10
        body.append(f'<text class="tick" x="{left - 6}" y="{y + 4}" '
                    f'text-anchor="end">{value}</text>')
    for i, visit in enumerate(visits):
        x0 = left + group * i + 12
        body.append(f'<text class="tick" x="{x0 + (group - 24) / 2}" '
                    f'y="{top + plot_h + 18}" text-anchor="middle">{escape(visit)}</text>')
        for k, arm in enumerate(arms):
            cell = pain.get(arm, {}).get(visit)
            if not cell:
                continue
            h = plot_h * cell["mean"] / 10
            x, y = x0 + bar * k, top + plot_h - h
            body.append(f'<rect class="bar s{k % 4}" x="{x:.1f}" y="{y:.1f}" '
                        f'width="{bar - 4:.1f}" height="{h:.1f}"/>')
            # The mean over its n, each as narrow as its bar: side by side, two arms'
            # labels at nearly the same height no longer run into each other.
            middle = x + (bar - 4) / 2
            body.append(f'<text class="label" x="{middle:.1f}" y="{y - 17:.1f}" '
                        f'text-anchor="middle">{cell["mean"]:.1f}<tspan x="{middle:.1f}" '
                        f'dy="13">n={cell["n"]}</tspan></text>')
    for k, arm in enumerate(arms):
        x = left + 260 * k
        body.append(f'<rect class="bar s{k % 4}" x="{x}" y="{height - 16}" width="12" '
                    f'height="12"/><text class="label" x="{x + 16}" y="{height - 6}">'
                    f'{escape(arm_names[arm])}</text>')
    desc = "; ".join(f"{arm_names.get(arm, arm)} at {visit}: mean {cell['mean']:.1f} "
                     f"(n={cell['n']})" for arm, by_visit in pain.items()
                     for visit, cell in by_visit.items()) or "no pain score recorded"
    return _svg(width, height, "pain", "Mean BPI average pain by arm and visit", desc, body)


def deviations_svg(by_code: dict[str, int]) -> Markup:
    """Deviations flagged, a bar per code."""
    rows = sorted(by_code.items(), key=lambda item: (-item[1], item[0]))
    width, left, row_h = 640, 210, 24
    height = max(40, row_h * len(rows) + 10)
    highest = max((n for _, n in rows), default=1)
    body = []
    for i, (code, n) in enumerate(rows):
        y = 6 + row_h * i
        length = (width - left - 60) * n / highest
        body.append(f'<text class="tick" x="{left - 8}" y="{y + 14}" '
                    f'text-anchor="end">{escape(code)}</text>')
        body.append(f'<rect class="bar s0" x="{left}" y="{y}" width="{length:.1f}" '
                    f'height="{row_h - 6}"/>')
        body.append(f'<text class="label" x="{left + length + 6:.1f}" y="{y + 14}">{n}</text>')
    desc = "; ".join(f"{code}: {n}" for code, n in rows) or "no deviation flagged"
    return _svg(width, height, "deviations", "Deviations by code", desc, body)
