"""Does cross-task encoder sharing help, most for tasks with few clients? (M-Fed, issue 5)

    .venv/bin/python experiments/mfed.py [--rounds N] [--seed S] [--report-only]

Runs configs/mfed.yaml in three modes with the same seed, partitions and initial
weights -- local training only, FedAvg within each task (task_fedavg), M-Fed -- on two
task layouts of the same 12 clients:

    A: classify 6, regress 2, denoise 4
    B: classify 2, regress 6, denoise 4

Swapping the client counts of classify and regress separates "few clients" from "which
task": if sharing helps most where clients are few, the M-Fed gain over task_fedavg of
a task should be larger in the layout where that task has 2 clients. Each run is the
engine in local mode (one process, no Ray), through experiments/common.py; two runs go
at a time on the 2 cores.

Writes a per-task table into its own section of docs/results.md (between the
`<!-- BEGIN mfed -->` / `<!-- END mfed -->` markers) and run directories under runs/mfed_experiment/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import ROOT, Job, finished, load, run_all, tail_mean, write_section  # noqa: E402

CONFIG = ROOT / "configs" / "mfed.yaml"
RUNS = ROOT / "runs" / "mfed_experiment"
AT_ONCE = 2  # runs at a time, one torch thread each

LAYOUTS = {
    "A": {"classify": 6, "regress": 2, "denoise": 4},
    "B": {"classify": 2, "regress": 6, "denoise": 4},
}
MODES = ["local", "task_fedavg", "mfed"]
METRICS = {"classify": ("classify_accuracy", "accuracy"), "regress": ("regress_r2", "R²"), "denoise": ("denoise_psnr", "PSNR dB")}
LAST = 3  # report the mean of the last LAST evaluated rounds: one round is noisy with 2 clients


def job(layout: str, mode: str, rounds: int, seed: int) -> Job:
    tasks = "{" + ", ".join(f"{t}: {n}" for t, n in LAYOUTS[layout].items()) + "}"
    overrides = (f"rounds={rounds}", f"seed={seed}", f"algorithm.options.mode={mode}", f"algorithm.options.tasks={tasks}")
    return Job(CONFIG, overrides, RUNS / f"{layout}-{mode}")


def final(history: list[dict], key: str) -> float:
    return tail_mean(history, key, LAST)


def fmt(value: float, key: str) -> str:
    return f"{value:.2f}" if key.endswith("psnr") else f"{value:.3f}"


def table(layout: str, results: dict) -> list[str]:
    lines = [
        f"**Layout {layout}** ({', '.join(f'{t} {n}' for t, n in LAYOUTS[layout].items())} clients)",
        "",
        "| task (clients) | metric | local | task_fedavg | M-Fed | M-Fed − task_fedavg | M-Fed, clients' own models |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, (key, label) in METRICS.items():
        v = {m: final(results[layout, m], key) for m in MODES}
        own = final(results[layout, "mfed"], key + "_clients")
        gain = v["mfed"] - v["task_fedavg"]
        cells = [fmt(v[m], key) for m in MODES] + [f"{gain:+.3f}" if label != "PSNR dB" else f"{gain:+.2f}", fmt(own, key)]
        lines.append(f"| {task} ({LAYOUTS[layout][task]}) | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def claim_check(results: dict) -> list[str]:
    """Per task: the M-Fed gain over task_fedavg with few vs many clients."""
    lines = ["Gain of M-Fed over task_fedavg for the same task with few vs many clients:", ""]
    verdicts = []
    for task, (key, label) in METRICS.items():
        gains = {lay: final(results[lay, "mfed"], key) - final(results[lay, "task_fedavg"], key) for lay in LAYOUTS}
        counts = {lay: LAYOUTS[lay][task] for lay in LAYOUTS}
        if len(set(counts.values())) < 2:  # same count in every layout (denoise): nothing to compare
            shown = ", ".join(f"{gains[lay]:+.3f} in {lay}" for lay in LAYOUTS)
            lines.append(f"- {task} ({label}): {counts[next(iter(LAYOUTS))]} clients in every layout; gain {shown}")
            continue
        few, many = min(LAYOUTS, key=counts.get), max(LAYOUTS, key=counts.get)
        bigger = gains[few] > gains[many]
        verdicts.append(bigger)
        lines.append(
            f"- {task} ({label}): {gains[few]:+.3f} with {counts[few]} clients, {gains[many]:+.3f} with "
            f"{counts[many]} clients -> {'larger' if bigger else 'not larger'} with few clients"
        )
    helped = sum(gains > 0 for gains in (
        final(results[lay, "mfed"], key) - final(results[lay, "task_fedavg"], key)
        for lay in LAYOUTS
        for key, _ in METRICS.values()
    ))
    lines += [
        "",
        f"M-Fed beats task_fedavg in {helped} of {len(LAYOUTS) * len(METRICS)} (layout, task) cells; "
        f"the gain is larger with few clients for {sum(verdicts)} of {len(verdicts)} tasks whose count changes.",
    ]
    return lines


def section(results: dict, rounds: int, seed: int, run_seconds: list[float]) -> str:
    from raysim.algorithms import options_of
    from raysim.data import FederatedData

    cfg = load(CONFIG, [f"rounds={rounds}", f"seed={seed}"])
    o, t = options_of(cfg), cfg.train
    data = FederatedData(cfg)
    lines = [
        "## M-Fed: multi-task FL through a shared encoder",
        "",
        "Command: `.venv/bin/python experiments/mfed.py` "
        f"(configs/mfed.yaml, {rounds} rounds, seed {seed}; {len(run_seconds)} runs of "
        f"{min(run_seconds):.0f}-{max(run_seconds):.0f} s each, {AT_ONCE} at a time, on 2 shared CPU cores).",
        f"{cfg.clients.total} clients, all in every round, Dirichlet({cfg.data.alpha}) label skew over "
        f"{sum(data.client_sizes())} training images of the embedded digits; small CNN encoder "
        f"({cfg.model.hidden_size}-d features), {t.local_epochs} local epochs of AdamW (lr {t.lr}, batch {t.batch_size}); "
        f"M-Fed: {o.pull_space}-space decoder pull {o.decoder_pull}, clients "
        f"{'keep their own decoders' if o.local_decoder else 'start every round from the global decoder'}. Values are the mean of the last {LAST} rounds on the {len(data.test)}-image test split "
        f"(denoising: fixed Gaussian noise, std {o.noise_std}). `local`: mean over clients of their own model; "
        "`task_fedavg` and `M-Fed`: the global encoder with the task's global decoder; "
        "last column: mean over M-Fed clients of their own model after local training.",
        "",
    ]
    for layout in LAYOUTS:
        lines += table(layout, results)
    lines += claim_check(results)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="rebuild the table from runs/mfed_experiment")
    args = p.parse_args()
    jobs = {(lay, mode): job(lay, mode, args.rounds, args.seed) for lay in LAYOUTS for mode in MODES}
    if args.report_only:
        runs = {key: finished(j) for key, j in jobs.items()}
    else:
        runs = run_all(jobs, AT_ONCE, lambda r: {k: round(final(r.history, k), 3) for k, _ in METRICS.values()})
    results = {key: r.history for key, r in runs.items()}
    text = section(results, args.rounds, args.seed, [r.seconds for r in runs.values()])
    write_section("mfed", text)
    print(text)


if __name__ == "__main__":
    main()
