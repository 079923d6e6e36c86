"""Byzantine clients vs aggregation rules on the quickstart workload (issue 9).

    .venv/bin/python experiments/robustness.py [--save rows.json | --load rows.json]

20% of clients send sign-flipped updates scaled by 10. Runs (same seed, data, rounds):
clean FedAvg; attacked with the plain mean; attacked with coordinate median, trimmed mean,
norm clipping, Multi-Krum (two choices of f), the geometric median and the cosine filter with
median-norm clipping. For reference: every rule without the attack (its own price on this
non-IID workload) and an oracle that drops the attackers' updates exactly (screened out as NaN;
the best any removal rule can do). Two more attacks, for the mean and a few rules: sign-flipped
but not scaled, and scaled by 10 but not flipped. Also counts the attackers in each round's
sample and the attackers Multi-Krum and the cosine filter let through. ``--save`` writes the
measured rows to a JSON file, ``--load`` renders the section from one without running.
Rewrites only its own section of docs/results.md.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
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
    ("cosine filter + median-norm clip", ["robust.rule=cosine_filter_clip"]),
]
# the other attacks, for the plain mean and the rules named here
OTHER_ATTACKS = [
    ("sign-flipped, not scaled", ["faults.byzantine_fraction=0.2", "faults.attack=sign_flip", "faults.attack_scale=1"]),
    ("scaled by 10, not flipped", ["faults.byzantine_fraction=0.2", "faults.attack=scale", "faults.attack_scale=10"]),
]
OTHER_RULES = ["norm clipping (0.5)", "geometric median", "cosine filter + median-norm clip"]
LOGGED = ("multi_krum", "cosine_filter_clip")  # rules that remove updates: record what they kept
COMMON = ["runtime.num_workers=0", "eval.every=5"]


def byzantine() -> list[int]:
    from raysim.config import load_config
    from raysim.guard import byzantine_clients

    return sorted(byzantine_clients(load_config(str(CONFIG), ATTACK)))


def run(overrides: list[str], select_log: list | None = None) -> dict:
    """One run in this process; with ``select_log``, record ({client id: claimed examples}, kept ids)
    of every round of a rule that removes updates (Multi-Krum, cosine filter)."""
    from raysim import robust
    from raysim.cli import main

    original = robust.robust_aggregate

    def recording(buf, rule, **kw):
        ids, updates, weights = robust.buffer_updates(buf)
        kept = None
        if rule == "multi_krum" and len(updates) >= 3:
            f = robust.krum_f(len(updates), kw.get("num_byzantine"), kw.get("byzantine_fraction", 0.2))
            kept = robust.multi_krum_select(updates, f)
        elif rule == "cosine_filter_clip":
            kept = robust.cosine_filter_select(updates, kw.get("cosine_threshold", 0.0))
        if kept is not None:
            select_log.append(({int(c): w for c, w in zip(ids, weights)}, [int(ids[i]) for i in kept]))
        return original(buf, rule, **kw)

    if select_log is not None:
        robust.robust_aggregate = recording  # the guard calls robust.robust_aggregate (local mode: same process)
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "run"
            if main(["run", str(CONFIG), *COMMON, *overrides, "--out", str(out), "--quiet"]):
                raise SystemExit(f"run failed: {overrides}")
            return json.loads((out / "summary.json").read_text())
    finally:
        robust.robust_aggregate = original


def measure() -> dict:
    import torch

    from raysim.config import load_config
    from raysim.seeding import sample_clients

    torch.set_num_threads(1)
    bad = byzantine()
    cfg = load_config(str(CONFIG), COMMON)
    sampled = [sample_clients(cfg.seed, r, cfg.clients.total, cfg.clients.per_round) for r in range(1, cfg.rounds + 1)]
    logs: dict[str, list] = {}  # "<run label>" -> [({client: examples}, kept ids) per round]

    def go(label, overrides, logged=False):
        t0 = time.perf_counter()
        log = logs.setdefault(label, []) if logged else None
        s = run(overrides, log)
        row = (label, s["initial"]["accuracy"], s["final"]["accuracy"])
        print(*row, f"{time.perf_counter() - t0:.0f} s", flush=True)
        return row

    removes = lambda ov: any(o.split("=")[1] in LOGGED for o in ov if o.startswith("robust.rule="))  # noqa: E731
    clean = go("clean, mean", [])
    attacked = [go("attacked, mean", ATTACK)]
    for label, ov in RULES:
        attacked.append(go(f"attacked, {label}", [*ATTACK, *ov], removes(ov)))
    oracle = go(
        "attacked, attackers' updates dropped exactly (oracle)",
        ["faults.nan_clients=[" + ",".join(map(str, bad)) + "]", "robust.quarantine_rounds=0"],
    )
    no_attack = [go(f"clean, {label}", ov, removes(ov)) for label, ov in RULES]
    rules = dict(RULES)
    other = {}
    for name, attack in OTHER_ATTACKS:
        other[name] = [go(f"{name}, mean", attack)]
        other[name] += [go(f"{name}, {label}", [*attack, *rules[label]], removes(rules[label])) for label in OTHER_RULES]
    return {
        "bad": bad,
        "per_round": [sum(c in bad for c in s) for s in sampled],
        "clean": clean,
        "attacked": attacked,
        "oracle": oracle,
        "no_attack": no_attack,
        "other": other,
        "logs": logs,
    }


def render(data: dict) -> str:
    bad, per_round, clean, attacked = set(data["bad"]), data["per_round"], data["clean"], data["attacked"]
    oracle, no_attack, other = data["oracle"], data["no_attack"], data["other"]
    logs = {k: [({int(c): w for c, w in ws.items()}, kept) for ws, kept in v] for k, v in data["logs"].items()}
    c = clean[2]
    gap = lambda row: 100 * (row[2] - c)  # noqa: E731
    table = lambda rows: [  # noqa: E731
        "| run | round 0 accuracy | final accuracy | vs clean |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {a0:.3f} | {a1:.3f} | {gap((label, a0, a1)):+.1f} pts |" for label, a0, a1 in rows],
    ]
    within = lambda row: "within" if gap(row) >= -2.0 else "NOT within"  # noqa: E731
    best = max(attacked[1:], key=lambda r: r[2])
    by_label = {r[0]: r for r in attacked + no_attack}
    cos_label = "cosine filter + median-norm clip"
    cos_row, cos_clean = by_label[f"attacked, {cos_label}"], by_label[f"clean, {cos_label}"]
    gm_row = by_label["attacked, geometric median"]

    def selection(log, bad=bad):
        leaked = sum(sum(c in bad for c in kept) for _, kept in log)
        sampled_bad = sum(sum(c in bad for c in ws) for ws, _ in log)
        dropped = [w for ws, kept in log for c, w in ws.items() if c not in bad and c not in kept]
        honest_kept = [w for ws, kept in log for c, w in ws.items() if c not in bad and c in kept]
        return leaked, sampled_bad, dropped, honest_kept

    notes = []
    for k, log in logs.items():
        leaked, sampled_bad, dropped, kept = selection(log, set() if k.startswith("clean") else bad)
        attack_part = f"{leaked} of {sampled_bad} attacker updates kept" if not k.startswith("clean") else "no attack"
        notes.append(
            f"{k}: {attack_part} over {len(log)} rounds; {len(dropped)} of {len(dropped) + len(kept)} honest updates"
            f" dropped, {sum(dropped) / max(1, len(dropped)):.1f} examples each on average vs"
            f" {sum(kept) / max(1, len(kept)):.1f} for the honest ones kept"
        )
    cols = [k for k in logs if k.startswith("attacked, ")]
    round_lines = [
        "| round | attackers sampled |" + "".join(f" kept / honest dropped, {k.removeprefix('attacked, ').split(' (')[0]} |" for k in cols),
        "|---:|---:|" + "---:|" * len(cols),
    ]
    for r, n_bad in enumerate(per_round):
        cells = ""
        for k in cols:
            ws, kept = logs[k][r]
            cells += f" {sum(c in bad for c in kept)} / {sum(c not in bad and c not in kept for c in ws)} |"
        round_lines.append(f"| {r + 1} | {n_bad} |{cells}")

    other_lines = []
    for name, rows in other.items():
        other_lines += [f"*{name}*:", "", *table(rows), ""]
    other_best = {name: max(rows[1:], key=lambda r: r[2]) for name, rows in other.items()}
    hist = {n: per_round.count(n) for n in sorted(set(per_round))}
    return "\n".join(
        [
            BEGIN,
            "## Byzantine clients (issue 9)",
            "",
            "Quickstart workload (50 clients, 10 per round, 20 rounds, seed 0, Dirichlet 0.5 non-IID), 20% of",
            f"clients (ids {sorted(bad)}) send sign-flipped updates scaled by 10.",
            "Command: `.venv/bin/python experiments/robustness.py` (every table in this section).",
            "",
            *table([clean, *attacked]),
            "",
            f"**Best rule under attack: {best[0].removeprefix('attacked, ')}, {gap(best):+.1f} pts: {within(best)} 2 points",
            f"of the clean run.** The cosine filter + median-norm clip (`robust.rule: cosine_filter_clip`) gives",
            f"{gap(cos_row):+.1f} pts under attack and {gap(cos_clean):+.1f} pts without; the geometric median {gap(gm_row):+.1f} pts;",
            f"dropping exactly the attackers' updates (oracle, below) {gap(oracle):+.1f} pts.",
            *NARRATIVE,
            "",
            "The other two attacks (same 20% of clients, same seed; clean run as above):",
            "",
            *other_lines,
            *[
                f"- {name}: best rule {r[0].removeprefix(name + ', ')}, {gap(r):+.1f} pts: {within(r)} 2 points; plain mean"
                f" {gap(other[name][0]):+.1f} pts."
                for name, r in other_best.items()
            ],
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
            "keeps only n - f = 6 updates, so every round also drops honest ones. What the rules that remove",
            "updates kept (recorded by the experiment from the rule's selection, every round):",
            "",
            *[f"- {n}" for n in notes],
            "",
            "Per round under the main attack (attackers kept / honest updates dropped):",
            "",
            *round_lines,
            "",
            END,
        ]
    )


NARRATIVE = [
    "",
    "Reading (one seed; a single test example is worth a fraction of a point, so differences under ~1",
    "point are noise). The cosine filter is the FLAME recipe (Nguyen et al., USENIX Security 2022) with",
    "its clustering replaced by a simpler test: keep an update if its cosine similarity to the",
    "coordinate-wise median of the other updates is positive, clip the kept ones to the round's median",
    "norm, weighted mean. The clip takes the scale out (a kept attacker counts like one honest client),",
    "the filter the flipped direction, while there is a direction to see: in the first ten rounds it",
    "drops every attacker but two (round 4, with 4 attackers) and few honest updates (per-round table",
    "below). As the model converges the honest updates become nearly orthogonal to one another (cosine",
    "to the median of the others near 0): the filter then drops honest updates at random and lets",
    "attackers through (rounds 11 and 14-16); without attack it drops none in rounds 1-7 and up to 7 of 10",
    "at the end. That is where the rest of the gap to the oracle is. Without attack it costs what the",
    "oracle costs under attack; Multi-Krum costs 4-11 points because it drops the data-rich honest clients (a client with",
    "more examples takes more local steps and sends a larger update, which Krum's distance score reads",
    "as an outlier). The dampening rules (median, trimmed mean, clipping, geometric median) still let",
    "the attackers pull the aggregate. Against updates scaled but not flipped the filter keeps the",
    "attackers (their direction is honest) and the clip alone makes them harmless; against a flip",
    "without scaling, the mean itself loses only a few points (a flipped update at honest scale mostly",
    "cancels one honest update) and no rule measured here recovers them.",
    "",
    "Tried while building the rule, with a throwaway script on the same workload and attack (not",
    "reproducible from this command): comparing with the median of ALL updates, the first version,",
    "kept almost every attacker (a median leans towards each of its members: the attackers' cosine was",
    "-0.03..+0.46, inside the honest range) and ended at 0.663; FLAME's own clustering (sklearn HDBSCAN on",
    "pairwise cosine distances, min cluster size n/2+1, min_samples 1) kept 18 of 38 attacker updates,",
    "dropped 42 honest ones and ended at 0.643.",
]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save", help="also write the measured rows to this JSON file")
    ap.add_argument("--load", help="render the section from rows saved by --save; run nothing")
    args = ap.parse_args(argv)
    if args.load:
        data = json.loads(Path(args.load).read_text())
    else:
        data = measure()
        if args.save:
            Path(args.save).write_text(json.dumps(data))
    section = render(data)
    text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
