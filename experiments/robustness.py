"""Byzantine clients vs aggregation rules on the quickstart workload (issue 9).

    .venv/bin/python experiments/robustness.py

20% of clients send sign-flipped updates scaled by 10. Runs (same seed, data, rounds):
clean FedAvg; attacked with the plain mean; attacked with coordinate median, trimmed mean,
norm clipping, Multi-Krum (two choices of f) and the geometric median. For reference: every
rule without the attack (its own price on this non-IID workload) and an oracle that drops the
attackers' updates exactly (screened out as NaN; the best any removal rule can do). Also counts
the attackers in each round's sample and the attackers Multi-Krum let through.
Rewrites only its own section of docs/results.md.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
CONFIG = ROOT / "configs/quickstart.yaml"
BEGIN, END = "<!-- BEGIN robustness -->", "<!-- END robustness -->"
ATTACK = ["faults.byzantine_fraction=0.2", "faults.attack=sign_flip", "faults.attack_scale=10"]
RULES = [
    ("coordinate median", ["robust.rule=median"]),
    ("trimmed mean (0.2)", ["robust.rule=trimmed_mean", "robust.trim_fraction=0.2"]),
    ("norm clipping (0.5)", ["robust.rule=norm_clip", "robust.clip_norm=0.5"]),
    ("Multi-Krum, f from 20% (95th pct: f=4, keeps 6)", ["robust.rule=multi_krum", "robust.byzantine_fraction=0.2"]),
    ("Multi-Krum, f=2 (20% of 10, keeps 8)", ["robust.rule=multi_krum", "robust.num_byzantine=2"]),
    ("geometric median", ["robust.rule=geometric_median"]),
]
COMMON = ["runtime.num_workers=0", "eval.every=5"]


def byzantine() -> list[int]:
    from raysim.config import load_config
    from raysim.guard import byzantine_clients

    return sorted(byzantine_clients(load_config(str(CONFIG), ATTACK)))


def run(overrides: list[str], krum_log: list | None = None) -> dict:
    """One run in this process; with ``krum_log``, record ({client id: claimed examples}, kept ids) of every Multi-Krum round."""
    from raysim import robust
    from raysim.cli import main

    original = robust.robust_aggregate

    def recording(buf, rule, **kw):
        ids, updates, weights = robust.buffer_updates(buf)
        if rule == "multi_krum" and len(updates) >= 3:
            f = robust.krum_f(len(updates), kw.get("num_byzantine"), kw.get("byzantine_fraction", 0.2))
            kept = [int(ids[i]) for i in robust.multi_krum_select(updates, f)]
            krum_log.append(({int(c): w for c, w in zip(ids, weights)}, kept))
        return original(buf, rule, **kw)

    if krum_log is not None:
        robust.robust_aggregate = recording  # the guard calls robust.robust_aggregate (local mode: same process)
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "run"
            if main(["run", str(CONFIG), *COMMON, *overrides, "--out", str(out), "--quiet"]):
                raise SystemExit(f"run failed: {overrides}")
            return json.loads((out / "summary.json").read_text())
    finally:
        robust.robust_aggregate = original


def main() -> None:
    import torch

    from raysim.config import load_config
    from raysim.seeding import sample_clients

    torch.set_num_threads(1)
    bad = byzantine()
    cfg = load_config(str(CONFIG), COMMON)
    sampled = [sample_clients(cfg.seed, r, cfg.clients.total, cfg.clients.per_round) for r in range(1, cfg.rounds + 1)]
    per_round = [sum(c in bad for c in s) for s in sampled]

    def go(label, overrides, log=None):
        s = run(overrides, log)
        row = (label, s["initial"]["accuracy"], s["final"]["accuracy"])
        print(*row, flush=True)
        return row

    clean = go("clean, mean", [])
    attacked = [go("attacked, mean", ATTACK)]
    logs = {}
    for label, ov in RULES:
        logs[label] = []
        attacked.append(go(f"attacked, {label}", [*ATTACK, *ov], logs[label] if "Krum" in label else None))
    oracle = go(
        "attacked, attackers' updates dropped exactly (oracle)",
        ["faults.nan_clients=[" + ",".join(map(str, bad)) + "]", "robust.quarantine_rounds=0"],
    )
    no_attack = [go(f"clean, {label}", ov) for label, ov in RULES]

    c = clean[2]
    table = lambda rows: [  # noqa: E731
        "| run | round 0 accuracy | final accuracy | vs clean |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {a0:.3f} | {a1:.3f} | {100 * (a1 - c):+.1f} pts |" for label, a0, a1 in rows],
    ]
    best = max(attacked[1:], key=lambda r: r[2])
    gap = 100 * (best[2] - c)
    verdict = "within" if gap >= -2.0 else "NOT within"

    krum_lines = ["| round | attackers sampled |" + "".join(f" attackers kept, {k.split(' (')[0]} |" for k in logs if logs[k]), "|---:|---:|" + "---:|" * sum(1 for k in logs if logs[k])]
    for r, n_bad in enumerate(per_round):
        cells = "".join(f" {sum(c in bad for c in logs[k][r][1])} |" for k in logs if logs[k])
        krum_lines.append(f"| {r + 1} | {n_bad} |{cells}")
    krum_notes = []
    for k, log in logs.items():
        if not log:
            continue
        dropped = [w for ws, kept in log for c, w in ws.items() if c not in bad and c not in kept]
        honest_kept = [w for ws, kept in log for c, w in ws.items() if c not in bad and c in kept]
        leaked = sum(sum(c in bad for c in kept) for _, kept in log)
        krum_notes.append(
            f"{k}: {leaked} attacker updates kept over {len(log)} rounds; {len(dropped)} honest updates dropped,"
            f" {sum(dropped) / max(1, len(dropped)):.1f} examples each on average vs"
            f" {sum(honest_kept) / max(1, len(honest_kept)):.1f} for the honest ones kept"
        )

    hist = {n: per_round.count(n) for n in sorted(set(per_round))}
    section = "\n".join(
        [
            BEGIN,
            "## Byzantine clients (issue 9)",
            "",
            "Quickstart workload (50 clients, 10 per round, 20 rounds, seed 0, Dirichlet 0.5 non-IID), 20% of",
            f"clients (ids {bad}) send sign-flipped updates scaled by 10.",
            "Command: `.venv/bin/python experiments/robustness.py`.",
            "",
            *table([clean, *attacked]),
            "",
            f"**Best rule under attack: {best[0].removeprefix('attacked, ')}, {gap:+.1f} pts: {verdict} 2 points of the",
            f"clean run.** Dropping exactly the attackers' updates (oracle, below) gives {100 * (oracle[2] - c):+.1f} pts, so",
            "the goal is reachable by a rule that removes the attackers and nothing else. Under this non-IID split",
            "the distance-based rules do not: the dampening ones (median, trimmed mean, clipping, geometric",
            "median) still let the attackers pull the aggregate, and Multi-Krum removes data-rich honest clients",
            "along with the attackers (a client with more examples takes more local steps and sends a larger",
            "update, which Krum's distance score reads as an outlier). One seed; a single test example is worth",
            "a fraction of a point, so differences under ~1 point are noise.",
            "",
            "Reference runs: the oracle drops exactly the attackers' updates (they are screened out as NaN), the",
            "best any removal rule could do; the others run each rule with no attack, i.e. the rule's own price.",
            "",
            *table([oracle, *no_attack]),
            "",
            "Attackers per sampled round (10 of 50 clients, 10 attackers: hypergeometric, mean 2): "
            + ", ".join(f"{v} round(s) with {n}" for n, v in hist.items())
            + ". Multi-Krum's f must cover such rounds: with f=2 the rounds with 3-4 attackers let some",
            "through; f=4 (the 95th percentile of Binomial(10, 0.2), the default from `robust.byzantine_fraction`)",
            "keeps only n - f = 6 updates, so every round also drops honest ones.",
            "",
            *[f"- {n}" for n in krum_notes],
            "",
            *krum_lines,
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
