"""Does CreamFL's representation ensemble help the server? (CreamFL, issue 3)

    .venv/bin/python experiments/creamfl.py [--rounds N] [--seed S]

Runs configs/creamfl.yaml four ways with the same seed, data, public set, client
partitions, initial weights and number of rounds:

    creamfl      the full method (weighted ensemble, intra/inter regulariser)
    public_only  the server trains on the public set only (`server_only: true`)
    mean_ens     CreamFL with a plain mean instead of the per-sample weighting
    no_reg       CreamFL without the intra/inter regulariser

and checks the paper's claim at our scale: CreamFL beats public-only and each
ablation on the server's image<->text retrieval. Each run is the engine in local mode
(one process, no Ray; the same algorithm code and the same numbers as with Ray), through
experiments/common.py; two runs go at a time on the 2 cores.

Writes a table into its own section of docs/results.md (between the
`<!-- BEGIN creamfl -->` / `<!-- END creamfl -->` markers) and run directories under
runs/creamfl_experiment/. `--table-only` rebuilds the table from those run directories;
`--variants` re-runs only some of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import ROOT, Job, finished, load, run_all, tail_mean as mean_of, write_section  # noqa: E402

CONFIG = ROOT / "configs" / "creamfl.yaml"
RUNS = ROOT / "runs" / "creamfl_experiment"
AT_ONCE = 2  # runs at a time, one torch thread each

VARIANTS = {
    "creamfl": [],
    "public_only": ["algorithm.options.server_only=true"],
    "mean_ens": ["algorithm.options.ensemble=mean"],
    "no_reg": ["algorithm.options.regularizer=false"],
}
LABELS = {
    "creamfl": "CreamFL",
    "public_only": "server on public data only",
    "mean_ens": "CreamFL, plain-mean ensemble",
    "no_reg": "CreamFL, no intra/inter regulariser",
}
RECALLS = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]
LAST = 5  # one round's recall on 359 test pairs is noisy: report the mean of the last LAST rounds


def job(variant: str, rounds: int, seed: int) -> Job:
    return Job(CONFIG, (f"rounds={rounds}", f"seed={seed}", *VARIANTS[variant]), RUNS / variant)


def tail_mean(history: list[dict], key: str) -> float:
    return mean_of(history, key, LAST)


def mean_recall(history: list[dict]) -> float:
    return sum(tail_mean(history, k) for k in RECALLS) / len(RECALLS)


def table(results: dict, seconds: dict) -> list[str]:
    lines = [
        "| variant | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 | mean R | zero-shot acc | KB up / round | KB down / round | run s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, hist in results.items():
        cells = [f"{tail_mean(hist, k):.3f}" for k in RECALLS]
        cells += [f"**{mean_recall(hist):.3f}**", f"{tail_mean(hist, 'accuracy'):.3f}"]
        rounds = [h for h in hist if h["round"] > 0]
        cells += [f"{sum(h[k] for h in rounds) / len(rounds) / 1024:.0f}" for k in ("bytes_up", "bytes_down")]
        cells.append(f"{seconds[v]:.0f}")
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return lines


def claim_check(results: dict) -> list[str]:
    ours = mean_recall(results["creamfl"])
    lines = []
    for v in ("public_only", "mean_ens", "no_reg"):
        diff = ours - mean_recall(results[v])
        verdict = "beats" if diff > 0 else "does NOT beat"
        lines.append(f"- CreamFL {verdict} {LABELS[v]}: mean recall {diff:+.3f}")
    return lines


def section(results: dict, seconds: dict, rounds: int, seed: int, wall: float) -> str:
    from raysim.algorithms.creamfl import CreamFL
    from models.hetero import num_parameters

    cfg = load(CONFIG, [f"rounds={rounds}", f"seed={seed}"])
    alg = CreamFL(cfg)
    o, t = alg.opts, cfg.train
    kinds = {k: alg.kind_of_client.count(k) for k in ("image", "text", "image_text")}
    client_params = sorted({num_parameters(alg.client_model(c)) for c in range(cfg.clients.total)})
    lines = [
        "## CreamFL: contrastive representation ensemble into a larger server",
        "",
        f"Command: `.venv/bin/python experiments/creamfl.py` (configs/creamfl.yaml, {rounds} rounds, seed {seed}, "
        f"{wall / 60:.1f} min of run time in total, {AT_ONCE} runs at a time on 2 shared CPU cores).",
        f"{cfg.clients.total} clients ({kinds['image']} image-only, {kinds['text']} text-only, "
        f"{kinds['image_text']} image-text; CNN/ViT image and GRU/transformer text towers, "
        f"{client_params[0] / 1e3:.0f}-{client_params[-1] / 1e3:.0f}k parameters), {cfg.clients.per_round} per round, "
        f"Dirichlet({cfg.data.alpha}) label skew over {sum(alg.data.client_sizes())} private pairs; server: ViT + "
        f"transformer text dual encoder ({num_parameters(alg._server) / 1e3:.0f}k parameters), d = {cfg.model.projection_dim}; "
        f"public set N = {o.public_size} pairs from the held-out pretrain split. tau {o.tau}, regulariser weight "
        f"{o.reg_weight}, distillation weight {o.distill_weight}, {o.server_epochs} public pass + {o.distill_epochs} "
        f"distillation pass per round (AdamW lr {o.server_lr}); clients {t.local_epochs} local epochs, lr {t.lr}. "
        f"Values: server on the {len(alg.data.test)}-pair test split, mean of the last {LAST} rounds; a retrieved "
        "caption counts if its text equals the query's own (captions repeat); image->text ranks distinct captions. "
        "Mean R = mean of the four recalls. Traffic is N x d float32 per modality per client.",
        "",
        *table(results, seconds),
        "",
        "Claim (CreamFL beats public-only and each ablation), on mean recall, one seed:",
        "",
        *claim_check(results),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the runs already in runs/")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="run only these (the table needs all four)")
    args = p.parse_args()
    jobs = {v: job(v, args.rounds, args.seed) for v in VARIANTS}
    if not args.table_only:
        run_all({v: jobs[v] for v in args.variants}, AT_ONCE)
    runs = {v: finished(j) for v, j in jobs.items()}  # every variant: --variants re-ran only some
    results, seconds = {v: r.history for v, r in runs.items()}, {v: r.seconds for v, r in runs.items()}
    # Total compute of the four runs (they run two at a time; --table-only has no wall time of its own).
    text = section(results, seconds, args.rounds, args.seed, sum(seconds.values()))
    write_section("creamfl", text)
    print(text)


if __name__ == "__main__":
    main()
