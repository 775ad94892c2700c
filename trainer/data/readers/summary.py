"""The dataset summary as a small table: what users check before they spend hours training."""

from __future__ import annotations


def format_summary(summary: dict) -> str:
    """Render :meth:`DetectionData.summary` (images per subset, objects per label, labels that are
    no class and why, skips)."""
    lines = [
        f"images: {summary['images']} ({summary['images_with_objects']} with objects), "
        f"objects: {summary['objects']}, labels: {len(summary['labels'])}"
    ]
    lines += _table("subset", "images", summary.get("subsets", {}))
    lines += _table("label", "objects", summary.get("objects_per_label", {}))
    if summary.get("not_classes"):
        rows = summary["not_classes"]
        width = max(len("not a class"), *(len(str(k)) for k in rows))
        lines += ["", f"  {'not a class':<{width}}  why"]
        lines += [f"  {k!s:<{width}}  {why}" for k, why in rows.items()]
    for title in ("skipped", "notes"):
        if summary.get(title):
            lines += _table(title, "count", summary[title])
    return "\n".join(lines)


def _table(key_title: str, value_title: str, rows: dict) -> list[str]:
    width = max([len(key_title), *(len(str(k)) for k in rows)])
    out = ["", f"  {key_title:<{width}}  {value_title:>7}"]
    out += [f"  {k!s:<{width}}  {v:>7}" for k, v in rows.items()]
    return out
