"""The GPU check's report: DIR/gpu_check.json (everything) and DIR/gpu_check.md (the tables), printed too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ds_grace.files import write_text_atomic


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _parity_cell(report: dict[str, Any], row: dict[str, Any]) -> str:
    for parity in report["parity"]:
        same = all(parity[key] == row[key] for key in ("model", "tokens", "variant"))
        if same and parity["against"] == "reference":
            return f"{parity['max_abs_diff']:.2e} / {parity['tolerance']:.2e} {parity['status']}"
    return "(the reference)"


def markdown(report: dict[str, Any]) -> str:
    versions = report.get("versions", {})
    lines = [
        f"GPU check on {report['device']} ({report.get('gpu', '?')}), world {report.get('world_size', '?')} "
        f"({report.get('topology', '?')}), sizes {report['sizes']}, torch {versions.get('torch', '?')}, "
        f"deepspeed {versions.get('deepspeed', '?')}: **{report['status']}**",
        "",
        "| model | tokens | variant | path taken | grouped slots | ms | reference/variant | max abs diff vs reference / "
        "tolerance | host syncs | kernels | GPU idle | aten ops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["timing"]:
        lines.append(
            f"| {row['model']} | {row['tokens']} | {row['variant']} | {row['path']} | "
            f"{_number(row.get('grouped_slots'), '')} | {row['median_ms']:.3f} | "
            f"{row['reference_over_variant']:.2f} | {_parity_cell(report, row)} | {row.get('host_syncs')} | "
            f"{row.get('kernels')} | {_number(row.get('gpu_idle_share'), '.2f')} | {row.get('aten_ops')} |"
        )
    vs_deepspeed = [r for r in report["parity"] if r["against"] == "deepspeed"]
    if vs_deepspeed:
        worst = max(vs_deepspeed, key=lambda r: r["max_abs_diff"] / r["tolerance"])
        lines += ["", f"GraceMoE vs DeepSpeed, worst: {worst['max_abs_diff']:.2e} ({worst['model']} "
                  f"{worst['tokens']} {worst['variant']}, tolerance {worst['tolerance']:.2e})"]  # fmt: skip
    lines += [
        "",
        "| model | tokens | CUDA graph of | status | replay ms | eager ms | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["cuda_graph"]:
        detail = row.get("error") or ", ".join(f"{r['max_abs_diff']:.2e}" for r in row.get("replays", []))
        lines.append(
            f"| {row['model']} | {row['tokens']} | {row['variant']} | {row['status']} | "
            f"{_number(row.get('replay_ms', '-'), '.3f')} | {_number(row.get('eager_ms', '-'), '.3f')} | {detail} |"
        )
    for title, items in (("not measured", report["not_measured"]), ("errors", report["errors"]),
                         ("failed", report.get("failed", []))):  # fmt: skip
        if items:
            lines += ["", f"{title}:"] + [f"- {item}" for item in items]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    write_text_atomic(out / "gpu_check.json", json.dumps(report, indent=1))
    write_text_atomic(out / "gpu_check.md", table)
    print(table, flush=True)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
