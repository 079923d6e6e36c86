"""Byzantine clients vs aggregation rules on the quickstart workload (issue 9).

    .venv/bin/python experiments/robustness.py

20% of clients send sign-flipped updates scaled by 10. Runs (same seed, data, rounds):
clean FedAvg; attacked with the plain mean; attacked with coordinate median, trimmed mean
and norm clipping. Rewrites only its own section of docs/results.md.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- BEGIN robustness -->", "<!-- END robustness -->"
ATTACK = ["faults.byzantine_fraction=0.2", "faults.attack=sign_flip", "faults.attack_scale=10"]
RUNS = [
    ("clean, mean", []),
    ("attacked, mean", ATTACK),
    ("attacked, coordinate median", [*ATTACK, "robust.rule=median"]),
    ("attacked, trimmed mean (0.2)", [*ATTACK, "robust.rule=trimmed_mean", "robust.trim_fraction=0.2"]),
    ("attacked, norm clipping (0.5)", [*ATTACK, "robust.rule=norm_clip", "robust.clip_norm=0.5"]),
]
COMMON = ["runtime.num_workers=0", "eval.every=5"]


def run(overrides: list[str]) -> dict:
    from raysim.cli import main

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        if main(["run", str(ROOT / "configs/quickstart.yaml"), *COMMON, *overrides, "--out", str(out), "--quiet"]):
            raise SystemExit(f"run failed: {overrides}")
        return json.loads((out / "summary.json").read_text())


def main() -> None:
    import torch

    torch.set_num_threads(1)
    rows = []
    for label, overrides in RUNS:
        s = run(overrides)
        rows.append((label, s["initial"]["accuracy"], s["final"]["accuracy"]))
        print(label, rows[-1][1:], flush=True)
    clean = rows[0][2]
    lines = [
        "| run | round 0 accuracy | final accuracy | vs clean |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {a0:.3f} | {a1:.3f} | {100 * (a1 - clean):+.1f} pts |" for label, a0, a1 in rows],
    ]
    section = "\n".join(
        [
            BEGIN,
            "## Byzantine clients (issue 9)",
            "",
            "Quickstart workload (50 clients, 10 per round, 20 rounds, seed 0), 20% of clients send",
            "sign-flipped updates scaled by 10. Command: `.venv/bin/python experiments/robustness.py`.",
            "",
            *lines,
            "",
            END,
        ]
    )
    text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
