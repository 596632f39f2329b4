"""DAS-vs-naive results: the comparison at matched domain loss and the markdown report."""

from __future__ import annotations

from typing import Any


def mean_domain_loss(stage: dict[str, Any], domains: list[str]) -> float:
    """Mean of a stage's eval MLM losses over the domains (the x of the matched comparison)."""
    return sum(stage["loss"][d] for d in domains) / len(domains)


def at_domain_loss(points: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """y at x = target on the line through two (x, y) points; and whether target lies outside.

    The comparison "at comparable domain loss": x is a run's final mean domain loss, y its
    general loss (or probe cosine). None when the two x coincide.
    """
    (x0, y0), (x1, y1) = points
    if x0 == x1:
        return None
    t = (target - x0) / (x1 - x0)
    return y0 + t * (y1 - y0), not 0.0 <= t <= 1.0


def matched_comparison(result: dict[str, Any]) -> dict[str, Any] | None:
    """Naive's final general loss and probe cosine interpolated to DAS's final mean domain loss."""
    runs = result["methods"]
    naive = [k for k in runs if k.startswith("naive")]
    if len(naive) != 2 or "das" not in runs:
        return None
    domains = result["domains"]
    das = runs["das"][-1]
    target = mean_domain_loss(das, domains)
    out: dict[str, Any] = {"mean_domain_loss": target}
    for metric, get in (
        ("general", lambda st: st["loss"]["general"]),
        ("probe_cosine", lambda st: st["probe_cosine"]),
    ):
        pts = [(mean_domain_loss(runs[k][-1], domains), get(runs[k][-1])) for k in naive]
        hit = at_domain_loss(pts, target)
        if hit is None:
            return None
        out[metric] = {"das": get(das), "naive": hit[0]}
        out["extrapolated"] = hit[1]
    return out


def format_report(result: dict[str, Any]) -> str:
    """Markdown: per run, the eval MLM loss after each stage (rows) per set (columns); summary."""
    domains = result["domains"]
    sets = [*domains, "general"]
    lines = []
    header = "| after | " + " | ".join(sets) + " | probe cos |"
    rule = "|" + "---|" * (len(sets) + 2)
    base = result["base"]
    for method, stages in result["methods"].items():
        lines += [f"### {method}", "", header, rule]
        rows = [("base", base)] + [(st["domain"], st) for st in stages]
        for name, st in rows:
            cells = " | ".join(f"{st['loss'][k]:.3f}" for k in sets)
            lines.append(f"| {name} | {cells} | {st['probe_cosine']:.4f} |")
        lines.append("")
    g0 = base["loss"]["general"]
    lines += [
        "### final",
        "",
        "| run | mean domain loss | general loss | general Δ vs base | probe cos |",
        "|---|---|---|---|---|",
        f"| base | {mean_domain_loss(base, domains):.3f} | {g0:.3f} | 0 | 1.0000 |",
    ]
    for method, stages in result["methods"].items():
        st = stages[-1]
        g = st["loss"]["general"]
        lines.append(
            f"| {method} | {mean_domain_loss(st, domains):.3f} | {g:.3f} | {g - g0:+.3f} "
            f"| {st['probe_cosine']:.4f} |"
        )
    m = result.get("matched")
    if m:
        note = " (extrapolated)" if m["extrapolated"] else ""
        g = m["general"]["naive"]
        lines.append(
            f"| naive at DAS's domain loss{note} | {m['mean_domain_loss']:.3f} | {g:.3f} "
            f"| {g - g0:+.3f} | {m['probe_cosine']['naive']:.4f} |"
        )
    return "\n".join(lines)
