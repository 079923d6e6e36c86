"""Does quality filtering by the frozen VLM help when some clients' captions are wrong,
and does the contribution score single those clients out? (FedLarge, issue 10)

    .venv/bin/python experiments/fedlarge.py [--rounds N] [--seeds S ...] [--report-only]

Runs configs/fedlarge.yaml (MiniLM text tower + small ViT aligned centrally, LoRA on the
ViT's attention + both projections, 10 clients, 5 per round) five ways per seed, with the
same partitions and initial adapter:

- clean: no caption noise (what a filter could at best recover);
- none: 30% of the pairs of the client group {0..4} carry another pair's caption;
- filter: the same noise, and each time a client trains the current global model scores
  its pairs and drops those scoring below 0 (caption no better than an average other
  local caption);
- weight: the same noise and scoring, but every pair kept with weight sigmoid(score / 0.05);
- quantile: the same noise, the earlier filter: drop each client's lowest-scoring 30%,
  scored before its first training and every 5 rounds.

Then reads the filter runs' client state (the scores of every scoring) to count what the
filters dropped. Each run is the engine in local mode, two at once on the 2 cores.

`--report-only` rewrites the section from the run directories of a previous run.
Writes its own section of docs/results.md (between `<!-- BEGIN fedlarge -->` and
`<!-- END fedlarge -->`) and run directories under runs/fedlarge_experiment/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from statistics import fmean as mean
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fedlarge.yaml"
RESULTS = ROOT / "docs" / "results.md"
RUNS = ROOT / "runs" / "fedlarge_experiment"
BEGIN, END = "<!-- BEGIN fedlarge -->", "<!-- END fedlarge -->"
# Half of the clients: chosen from the clean-vs-noisy gap alone (see the section's text).
NOISY = [0, 1, 2, 3, 4]
NOISE = [f"algorithm.options.caption_noise.clients={NOISY}", "algorithm.options.caption_noise.fraction=0.3"]
VARIANTS = {
    "clean": ["algorithm.options.quality=none", "algorithm.options.caption_noise.clients=[]"],
    "none": ["algorithm.options.quality=none", *NOISE],
    "filter": ["algorithm.options.quality=filter", "algorithm.options.filter_threshold=0",
               "algorithm.options.quality_every=1", *NOISE],
    "weight": ["algorithm.options.quality=weight", "algorithm.options.filter_threshold=0",
               "algorithm.options.quality_every=1", *NOISE],
    "quantile": ["algorithm.options.quality=filter", "algorithm.options.filter_threshold=null",
                 "algorithm.options.filter_fraction=0.3", "algorithm.options.quality_every=5", *NOISE],
}
LABELS = {
    "clean": "clean (no noisy captions)",
    "none": "noisy, quality=none",
    "filter": "noisy, filter: score < 0, re-scored each round",
    "weight": "noisy, weight: sigmoid(score / 0.05), re-scored each round",
    "quantile": "noisy, filter: lowest 30% per client, every 5 rounds",
}


def overrides(variant: str, rounds: int, seed: int) -> list[str]:
    return [f"rounds={rounds}", f"seed={seed}", "runtime.num_workers=0", f"checkpoint.every={rounds}",
            *VARIANTS[variant]]


def run_dir(variant: str, seed: int) -> Path:
    return RUNS / f"seed{seed}" / variant


def run_one(variant: str, rounds: int, seed: int) -> float:
    import torch

    torch.set_num_threads(1)  # two runs share two cores
    from raysim.config import load_config
    from raysim.run.engine import Engine

    cfg = load_config(CONFIG, overrides(variant, rounds, seed))
    out = run_dir(variant, seed)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    engine = Engine(cfg, str(out), resume=False)
    engine.start()
    while not engine.done():
        engine.run_round()
    engine.finish()
    return time.perf_counter() - t0


def drops(variant: str, rounds: int, seed: int) -> dict:
    """What the filter dropped, from every scoring the run kept in its client state (a
    client's scores are saved with the state of each round it trained in)."""
    import torch
    from safetensors.torch import load_file

    from raysim.algorithms.fedlarge import FedLarge
    from raysim.lora.quality import quality_weights
    from raysim.config import load_config

    algo = FedLarge(load_config(CONFIG, overrides(variant, rounds, seed)))
    out = {"scored": 0, "mismatched": 0, "dropped": 0, "dropped_mismatched": 0, "clean_clients_scored": 0,
           "clean_clients_dropped": 0, "weight_mismatched": 0.0, "weight_clean": 0.0}
    for c in range(algo.cfg.clients.total):
        bad = torch.from_numpy(algo.data.mismatched[algo.data.client_partition[c]])
        seen = set()
        for f in sorted((run_dir(variant, seed) / "client_state" / f"{c:06d}").glob("r*.safetensors")):
            state = load_file(str(f))
            if "quality/scores" not in state or int(state["quality/round"]) in seen:
                continue
            seen.add(int(state["quality/round"]))
            w = quality_weights(state["quality/scores"], algo.lora.quality)
            out["weight_mismatched"] += float(w[bad].sum())
            out["weight_clean"] += float(w[~bad].sum())
            drop = w == 0
            out["scored"] += len(drop)
            out["mismatched"] += int(bad.sum())
            out["dropped"] += int(drop.sum())
            out["dropped_mismatched"] += int((drop & bad).sum())
            if c not in NOISY:
                out["clean_clients_scored"] += len(drop)
                out["clean_clients_dropped"] += int(drop.sum())
    return out


def load_run(variant: str, seed: int) -> tuple[list[dict], dict]:
    run = run_dir(variant, seed)
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [h for h in hist if "accuracy" in h], json.loads((run / "contribution.json").read_text())


def totals(stats: dict, seeds: list[int]) -> dict:
    """Each filter variant's counts summed over the seeds."""
    return {v: {k: sum(stats[v, s][k] for s in seeds) for k in stats[v, seeds[0]]} for v in {v for v, _ in stats}}


def section(runs: dict, total: dict, rounds: int, seeds: list[int], wall: float) -> str:
    seed_args = " ".join(map(str, seeds))
    lines = [
        BEGIN,
        "## FedLarge: quality filtering and contribution scores (issue 10)",
        "",
        f"`.venv/bin/python experiments/fedlarge.py --rounds {rounds} --seeds {seed_args}` ({wall / 60:.0f} min on 2 "
        "shared cores).",
        "configs/fedlarge.yaml: text tower all-MiniLM-L6-v2 (pretrained, frozen), ViT image tower aligned to it",
        "centrally on the held-out split (one base per seed), LoRA r=8 on the ViT's q/v + both projections;",
        f"10 clients (Dirichlet 0.5), 5 per round, {rounds} rounds. Noisy runs: 30% of the pairs of clients 0-4 carry",
        "another pair's caption. Per seed all runs share partitions, base and initial adapter. Final-round",
        "zero-shot accuracy on the test split:",
        "",
        "| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | mean i2t R@1 | mean t2i R@1 |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for v in VARIANTS:
        final = [runs[v, s][0][-1] for s in seeds]
        lines.append(f"| {LABELS[v]} | " + " | ".join(f"{f['accuracy']:.3f}" for f in final)
                     + f" | **{mean([f['accuracy'] for f in final]):.3f}** | {mean([f['i2t_r1'] for f in final]):.3f}"
                     f" | {mean([f['t2i_r1'] for f in final]):.3f} |")
    lines += [
        "",
        "What the filters dropped, summed over the seeds and over every scoring in the run (a client is",
        "scored by the global model of the round it trains in; precision = share of dropped pairs whose",
        "caption names another digit, recall = share of such pairs scored that were dropped):",
        "",
        "| filter | pairs scored | mismatched | dropped | precision | recall | share of clean clients' pairs dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in ("filter", "quantile"):
        t = total[v]
        name = LABELS[v].removeprefix("noisy, filter: ")
        lines.append(f"| {name} | {t['scored']} | {t['mismatched']} | {t['dropped']} | "
                     f"{t['dropped_mismatched'] / max(1, t['dropped']):.2f} | "
                     f"{t['dropped_mismatched'] / max(1, t['mismatched']):.2f} | "
                     f"{t['clean_clients_dropped'] / max(1, t['clean_clients_scored']):.0%} |")
    t = total["weight"]
    w_bad, w_good = t["weight_mismatched"] / t["mismatched"], t["weight_clean"] / (t["scored"] - t["mismatched"])
    lines += ["", f"The `weight` run keeps every pair; its mean weight is {w_bad:.2f} for mismatched pairs and "
              f"{w_good:.2f} for the others."]
    lines += [
        "",
        "Contribution (mean cosine of a client's update with the round's aggregate over the rounds it took part",
        "in), run `none`; clients 0-4 are the noisy ones:",
        "",
        "| seed | ranking (best first) |",
        "|---|---|",
    ]
    for s in seeds:
        lines.append(f"| {s} | {runs['none', s][1]['ranking']} |")
    lines += ["", reading(runs, total, seeds), "", HISTORY, END]
    return "\n".join(lines)


HISTORY = (
    "How the setting was chosen. The first version of this experiment (one seed, noise on clients 0-2, "
    "filter = each client's lowest 30% scored every 5 rounds) found no gain from filtering (0.468 vs 0.487 "
    "without; a threshold of 0 gave 0.499), but it had no clean reference. With noise on clients 0-2 only 86 "
    "of 1007 training pairs (9%) are mismatched. Before any filter run on the new setting, the noise group was "
    "widened to half of the clients (0-4, 13% of the pairs mismatched) and its cost measured against a clean "
    "run on seeds 0 and 1 (the `clean` and `none` rows above); the 0-2 group was not re-measured against a "
    "clean run of the current base. The new filter rule was chosen before any federated run from what the "
    "scores drop on seed 0 (base model: below 0 drops 12% of the clean clients' pairs at precision 0.29, the "
    "lowest 30% drops 30% at 0.21; the global model trained 8 rounds on the noisy data: 4% at precision 0.48, "
    "hence re-scoring with the global model each time a client trains). The `weight` row (same scores, "
    "sigmoid weights instead of dropping) was added after the three-seed filter runs had shown no gain, as the "
    "other mode the issue names, and is reported whatever its result. On seeds 0-2 it gave +0.011 (2 of 3 "
    "seeds better), too close to call, so seeds 3 and 4 were added to every row; the rule for making it the "
    "default of configs/fedlarge.yaml (a mean gain above one point over all seeds, the `verdict` of the "
    "script) was fixed before they ran. Then, on 2026-12-02, the text tower became locked by default "
    "(algorithm.options.lock_text_tower: inference mode, no dropout, its caption features computed once per "
    "worker), a change made to speed up training (benchmark workload c2) and committed before this table "
    "was re-run; the central alignment of the image tower is unchanged. Every row was re-run with it. "
    "Before, with dropout in the frozen tower, the means were clean 0.544, none 0.534, filter 0.535, "
    "weight 0.538, lowest 30% 0.532: the noise cost 1.0 point and no option helped (the current code with "
    "lock_text_tower=false gives the same numbers: seed 0 none 0.482, filter 0.468, checked). With the locked tower "
    "the noise costs more and the re-scored options recover most of it, on every seed. Our reading, not "
    "tested further: deterministic text targets let the image tower fit the wrong captions more closely, "
    "which makes removing them worth more. By the rule above configs/fedlarge.yaml now uses `weight` "
    "(re-scored every round, cut at a score of 0)."
)


def verdict(gain: float, wins: int, n: int) -> str:
    """A mean gain within a point is not told apart from seed-to-seed variation."""
    if gain > 0.01:
        return "an improvement" if wins == n else "an improvement on the mean, not on every seed"
    return "no improvement (within a point)" if gain > -0.01 else "worse"


def reading(runs: dict, total: dict, seeds: list[int]) -> str:
    """What the numbers say, computed from them so a re-run cannot contradict the text."""
    acc = {v: [runs[v, s][0][-1]["accuracy"] for s in seeds] for v in VARIANTS}
    gap = mean(acc["none"]) - mean(acc["clean"])
    gain = mean(acc["filter"]) - mean(acc["none"])
    gain_q = mean(acc["quantile"]) - mean(acc["none"])
    gain_w = mean(acc["weight"]) - mean(acc["none"])
    wins_w = sum(w > n for w, n in zip(acc["weight"], acc["none"]))
    t = total["filter"]
    wins = sum(f > n for f, n in zip(acc["filter"], acc["none"]))
    recovered = gain / -gap if gap < 0 else float("nan")
    ranks = {s: sorted(r.index(c) + 1 for c in NOISY if c in r) for s in seeds for r in [runs["none", s][1]["ranking"]]}
    text = (
        f"Reading: the noise costs {gap:+.3f} on the mean over {len(seeds)} seeds (clean vs none; per seed "
        + ", ".join(f"{n - c:+.3f}" for n, c in zip(acc["none"], acc["clean"]))
        + "). The filter "
        f"(score < 0, re-scored each round): {gain:+.3f} on the mean vs none, better on {wins} of {len(seeds)} "
        f"seeds -- {verdict(gain, wins, len(seeds))}"
        + (f", {recovered:.0%} of the noise's cost recovered" if gap < -0.01 and gain > 0.01 else "")
        + f". Weighting instead of dropping (same scores): {gain_w:+.3f}, better on {wins_w} of {len(seeds)} "
        f"seeds -- {verdict(gain_w, wins_w, len(seeds))}"
        + (f", {gain_w / -gap:.0%} of the noise's cost recovered" if gap < -0.01 and gain_w > 0.01 else "")
        + f". The earlier filter (lowest 30% per client) gives {gain_q:+.3f}: it drops 30% of every clean "
        "client's data too. "
        f"The filter finds {t['dropped_mismatched'] / max(1, t['mismatched']):.0%} of the mismatched pairs and "
        f"drops {t['dropped'] - t['dropped_mismatched']} clean pairs along with {t['dropped_mismatched']} "
        f"mismatched ones"
    )
    if gain <= 0.01:
        low = min(runs["none", s][0][0]["accuracy"] for s in seeds)
        high = max(runs["none", s][0][-1]["accuracy"] for s in seeds)
        text += (f": the scoring model (zero-shot accuracy {low:.2f}-{high:.2f} over the runs) often cannot tell "
                 "a wrong caption from an image it reads badly; and with the noise itself costing "
                 f"{gap:+.3f} on the mean (seed-to-seed spread larger than that) there is little for any filter to "
                 "recover at this scale")
    best = max(("filter", gain), ("weight", gain_w), key=lambda kv: kv[1])
    if best[1] > 0.01:
        text += f". The `{best[0]}` option is the one to use (configs/fedlarge.yaml)"
    else:
        text += (". No quality option beats `none` by more than a point over these seeds, so none is claimed to "
                 "help here and configs/fedlarge.yaml keeps its demo filter only to exercise the mechanism")
    mean_rank = mean([x for r in ranks.values() for x in r])
    singled = ("does not single the noisy clients out" if abs(mean_rank - 5.5) < 1.5 else
               "ranks the noisy clients lower" if mean_rank > 5.5 else "ranks the noisy clients higher")
    text += (
        ". Contribution ranks of the noisy clients in `none` (of 10): "
        + "; ".join(f"seed {s}: {r}" for s, r in ranks.items())
        + f" (mean {mean_rank:.1f}; 5.5 if the score ignored the noise): at 30% noise the score {singled}; "
        "tests/test_fedlarge.py shows a client with all captions shuffled ranking last."
    )
    return text


def write_section(text: str) -> None:
    """Replace only our section; others own the rest of the file (read-modify-write at once)."""
    current = RESULTS.read_text() if RESULTS.is_file() else ""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        RESULTS.write_text(head + text + tail)
    else:
        RESULTS.write_text(current.rstrip("\n") + "\n\n" + text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from saved runs")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.report_only:
        wall = json.loads((RUNS / "wall.json").read_text())["wall_s"]
    else:
        jobs = [(v, args.rounds, s) for s in args.seeds for v in VARIANTS]
        with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
            for job, f in [(j, pool.submit(run_one, *j)) for j in jobs]:
                print(job, f"{f.result():.0f}s", flush=True)
        wall = time.perf_counter() - t0
        (RUNS / "wall.json").write_text(json.dumps({"wall_s": wall}))
    runs = {(v, s): load_run(v, s) for s in args.seeds for v in VARIANTS}
    stats = {(v, s): drops(v, args.rounds, s) for s in args.seeds for v in ("filter", "weight", "quantile")}
    for (v, s), (evals, contrib) in runs.items():
        print(v, s, "final accuracy", round(evals[-1]["accuracy"], 4), "ranking", contrib.get("ranking"))
    print(stats)
    write_section(section(runs, totals(stats, args.seeds), args.rounds, args.seeds, wall))


if __name__ == "__main__":
    main()
