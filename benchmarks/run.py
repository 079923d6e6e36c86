"""raysim's benchmarks: raysim against the ideal single-process loop and against Flower.

    .venv/bin/python benchmarks/run.py            # everything (~15-25 min on 2 quiet cores)
    .venv/bin/python benchmarks/run.py --quick    # tiny setting, raysim + ideal, ~30 s (the test)
    .venv/bin/python benchmarks/run.py --only a,b # some workloads (a b c c2 d e, assignment)

Every number comes from a fresh process per run (imports, Ray start, pre-trained base
read from the cache, nothing else cached). The sides of a comparison run alternately,
A B A B, so machine load hits both; the medians over the pairs are reported. Flower
needs its own venv: `bash benchmarks/setup_flower.sh` (without it Flower is skipped).

Writes benchmarks/results.json and the tables in docs/benchmarks.md (a full run only;
--quick writes its JSON to benchmarks/.runs/results-quick.json unless --json is given).

Workloads (configs/quickstart.yaml plus overrides; c2: configs/fedlarge.yaml):
  a  raysim vs ideal: 100 clients, 10 per round, 20 rounds
  b  raysim vs Flower: 10 per round, 5 rounds, at 100 and at 1,000 clients
  c  raysim vs Flower (and the ideal) on a larger tiny CLIP (hidden 256, 4 layers, ~6.5M parameters)
  c2 the same three on configs/fedlarge.yaml: the MiniLM dual encoder (~23M parameters),
     quality filtering and contribution scores off (plain FedAvg of LoRA adapters)
  d  population independence: raysim's round time at 1,000 vs 100 clients (from b)
  e  1,000 clients each with its own state (1,000 per round, 2 rounds), peak memory
  assignment  raysim sticky vs balanced on workload a (picks the one used elsewhere)
Both sides evaluate at round 0 and the last round only (eval.every=1000); raysim
checkpoints only at the end (checkpoint.every=1000), the others never.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
PY = ROOT / ".venv" / "bin" / "python"
if not PY.exists():
    PY = Path(sys.executable)
FLOWER_PY = HERE / ".flower-venv" / "bin" / "python"
CONFIG = "configs/quickstart.yaml"
COMMON = ["eval.every=1000"]  # evaluate at round 0 and at the end, on every side
RAYSIM_ONLY = ["checkpoint.every=1000", "runtime.num_workers=2", "runtime.torch_threads=1"]
LARGE = [
    "model.hidden_size=256",
    "model.intermediate_size=1024",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.projection_dim=128",
    # A speed benchmark: the base only has to exist, so its central pre-training is short.
    "pretrain.epochs=2",
]
FEDLARGE = "configs/fedlarge.yaml"
C2 = [
    "clients.total=100",
    "clients.per_round=10",
    "rounds=5",
    # What Flower's FedAvg does too: no data-quality scoring, no contribution scores.
    "algorithm.options.quality=none",
    "algorithm.options.caption_noise.clients=[]",
    "algorithm.options.contribution=none",
]

GOALS = {
    "a_round_ratio": "raysim steady round <= 1.10 x ideal",
    "a_wall": "raysim whole-process wall <= ideal + 10 s",
    "b100_round": "Flower / raysim steady round >= 1.6 (100 clients)",
    "b1000_round": "Flower / raysim steady round >= 4 (1,000 clients)",
    "b100_wall": "raysim wall after imports <= 0.5 x Flower's (100 clients)",
    "b1000_wall": "raysim wall after imports <= 0.5 x Flower's (1,000 clients)",
    "b100_memory": "raysim peak memory < Flower's (100 clients)",
    "b1000_memory": "raysim peak memory < Flower's (1,000 clients)",
    "c_round": "Flower / raysim steady round >= 3 (larger model: (c) tiny CLIP, 6.6M)",
    "c2_round": "Flower / raysim steady round >= 3 (larger model: (c2) MiniLM dual encoder, 23M)",
    "d_population": "raysim mean round at 1,000 clients <= 1.10 x at 100",
    "e_memory": "1,000 clients, 2 workers: peak memory of the run <= 3 GiB",
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def steady(rounds: list[dict], first: int = 3) -> float:
    walls = [r["wall_s"] for r in rounds if r["round"] >= first] or [r["wall_s"] for r in rounds]
    return statistics.fmean(walls)


def mean_round(rounds: list[dict]) -> float:
    return statistics.fmean(r["wall_s"] for r in rounds)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("RAYSIM_CACHE", str(ROOT / ".cache" / "raysim"))
    env["PYTHONWARNINGS"] = "ignore"
    env["RAY_DEDUP_LOGS"] = "1"
    return env


def _run(cmd: list[str], logfile: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env() | (env or {}), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = logfile.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}; log {logfile}:\n{tail}")
    return wall


def run_raysim(overrides: list[str], scratch: Path, tag: str, preimport: bool = True, config: str = CONFIG) -> dict:
    from raysim.run.checkpoint import load_latest
    from raysim.lora.adapters import l2_norm

    out = scratch / f"raysim-{tag}"
    js = scratch / f"raysim-{tag}.json"
    cmd = [str(PY), str(HERE / "raysim_run.py"), "--json", str(js), "--", "run", config, "--out", str(out), "--quiet"]
    env = {"RAYSIM_BENCH_PREIMPORT": "1" if preimport else "0"}
    wall = _run(cmd + COMMON + RAYSIM_ONLY + overrides, scratch / f"raysim-{tag}.log", env)
    timing = json.loads(js.read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    _, tensors, _ = load_latest(out)
    rounds = [
        {k: r[k] for k in ("round", "wall_s", "compute_s", "transfer_s", "aggregate_s", "eval_s", "checkpoint_s")}
        | {"clients": r["clients"], "workers": r.get("workers")}  # workers 0: served in the driver (warm start)
        for r in records
        if r["round"] >= 1
    ]
    res = {
        "side": "raysim",
        "process_wall_s": wall,
        "imports_s": timing["imports_s"],
        "after_imports_s": timing["after_imports_s"],
        "engine_wall_s": summary["wall_s"],
        "setup_s": summary.get("setup_s"),
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_rss_mb_sum": summary["peak_rss_mb"],
        "final": summary["final"],
        "adapter_norm": l2_norm(tensors),
        "rounds": rounds,
    }
    shutil.rmtree(out, ignore_errors=True)  # client states and checkpoints: not needed any more
    return _finish(res)


IDEAL_THREADS = [2]


def run_ideal(overrides: list[str], scratch: Path, tag: str, threads: int | None = None, config: str = CONFIG) -> dict:
    threads = threads or IDEAL_THREADS[0]
    js = scratch / f"ideal-{tag}.json"
    cmd = [str(PY), str(HERE / "ideal.py"), config, *COMMON, *overrides, "--threads", str(threads), "--json", str(js)]
    wall = _run(cmd, scratch / f"ideal-{tag}.log")
    res = json.loads(js.read_text())
    res["process_wall_s"] = wall
    return _finish(res)


def run_flower(overrides: list[str], scratch: Path, tag: str, config: str = CONFIG) -> dict:
    js = scratch / f"flower-{tag}.json"
    cmd = [str(FLOWER_PY), str(HERE / "flower_app.py"), config, *COMMON, *overrides, "--json", str(js)]
    wall = _run(cmd, scratch / f"flower-{tag}.log")
    res = json.loads(js.read_text())
    res["process_wall_s"] = wall
    return _finish(res)


def _finish(res: dict) -> dict:
    res["steady_round_s"] = steady(res["rounds"])
    res["mean_round_s"] = mean_round(res["rounds"])
    res["first_round_s"] = res["rounds"][0]["wall_s"]
    res["load_avg_1m"] = os.getloadavg()[0]
    log(
        f"    {res['side']:>7}: steady round {res['steady_round_s']:.3f} s, first {res['first_round_s']:.2f} s, "
        f"after imports {res['after_imports_s']:.1f} s, process {res['process_wall_s']:.1f} s, "
        f"peak {res['peak_memory_mb']:.0f} MB, adapter norm {res['adapter_norm']:.6f} (load {res['load_avg_1m']:.1f})"
    )
    return res


SIDES = {"raysim": run_raysim, "ideal": run_ideal, "flower": run_flower}
METRICS = ("steady_round_s", "mean_round_s", "first_round_s", "after_imports_s", "process_wall_s", "peak_memory_mb")


def compare(name: str, overrides: list[str], sides: list[str], pairs: int, scratch: Path, extra=None, side_kwargs=None,
            config: str = CONFIG) -> dict:
    """Runs the sides alternately (A B A B ...) and takes medians per side."""
    extra = extra or {}
    log(f"== {name}: {' vs '.join(sides)}, {pairs} pair(s): {config} {' '.join(overrides)}")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(pairs):
        for s in sides:
            kw = {"config": config, **(side_kwargs or {}).get(s, {})}
            runs[s].append(SIDES[s](overrides + extra.get(s, []), scratch, f"{name}-{i}", **kw))
    med = {s: {m: statistics.median(r[m] for r in runs[s]) for m in METRICS} for s in sides}
    norms = {s: runs[s][-1]["adapter_norm"] for s in sides}
    ref = norms[sides[0]]
    out = {
        "config": config,
        "overrides": overrides,
        "extra_overrides": extra,
        "pairs": pairs,
        "median": med,
        "adapter_norm": norms,
        "adapter_norm_max_rel_diff": max(abs(n - ref) / ref for n in norms.values()),
        "runs": {s: [_brief(r) for r in rs] for s, rs in runs.items()},
    }
    for s in sides[1:]:
        a, b = med[sides[0]], med[s]
        log(
            f"   median {sides[0]} / {s}: steady round {a['steady_round_s']:.3f} / {b['steady_round_s']:.3f} s "
            f"({b['steady_round_s'] / a['steady_round_s']:.2f}x), after imports {a['after_imports_s']:.1f} / "
            f"{b['after_imports_s']:.1f} s, process {a['process_wall_s']:.1f} / {b['process_wall_s']:.1f} s, "
            f"peak {a['peak_memory_mb']:.0f} / {b['peak_memory_mb']:.0f} MB; adapter norms {norms}"
        )
    return out


def _brief(r: dict) -> dict:
    keep = [*METRICS, "imports_s", "adapter_norm", "load_avg_1m", "final"]
    out = {k: r[k] for k in keep if k in r} | {"round_wall_s": [round(x["wall_s"], 4) for x in r["rounds"]]}
    if r.get("side") == "raysim":  # which rounds the Ray workers served (the others: the driver, warm start)
        out["rounds_served_by_workers"] = [x["round"] for x in r["rounds"] if x.get("workers")]
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="raysim vs the ideal loop vs Flower (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="tiny setting: 12 clients, 3 per round, 2 rounds, 1 pair")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--only", default="assignment,a,b,c,c2,e", help="comma list of: assignment a b c c2 e (d comes from b)")
    ap.add_argument("--assignment", choices=["sticky", "balanced"], help="skip the A/B and use this one")
    ap.add_argument(
        "--ideal-threads", default="auto",
        help="torch threads of the ideal loop: 1, 2, or auto (time both on a short run, keep the faster)",
    )
    ap.add_argument("--flower", action="store_true", help="with --quick: add Flower (needs benchmarks/.flower-venv)")
    ap.add_argument("--sides", help="with --quick: comma list of raysim, ideal, flower (default raysim,ideal)")
    ap.add_argument("--json", help="where to write the results (default benchmarks/results.json)")
    ap.add_argument("--docs", help="markdown to write (default docs/benchmarks.md; --quick writes none)")
    args = ap.parse_args(argv)
    have_flower = FLOWER_PY.exists()
    scratch = Path(tempfile.mkdtemp(prefix="raysim-bench-"))
    t_start = time.perf_counter()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg_at_start": os.getloadavg(),
        "flower_available": have_flower,
        "quick": args.quick,
        "goals": {},
    }
    try:
        subprocess.run([str(PY), "-m", "raysim.cli", "pretrain", CONFIG], cwd=ROOT, env=_env(), check=True,
                       stdout=subprocess.DEVNULL)
        if args.quick:
            q = ["clients.total=12", "clients.per_round=3", "rounds=2", "runtime.assignment=sticky"]
            IDEAL_THREADS[0] = 1 if args.ideal_threads == "auto" else int(args.ideal_threads)
            sides = args.sides.split(",") if args.sides else ["raysim", "ideal"] + (["flower"] if args.flower else [])
            want_flower = "flower" in sides
            if not have_flower:
                sides = [s for s in sides if s != "flower"]
            results["quick_run"] = compare("quick", q, sides, 1, scratch)
            if want_flower and not have_flower:
                results["flower_skipped"] = "benchmarks/.flower-venv is absent (bash benchmarks/setup_flower.sh)"
            path = Path(args.json) if args.json else HERE / ".runs" / "results-quick.json"
        else:
            path = Path(args.json) if args.json else HERE / "results.json"

            def save(partial: dict) -> None:  # after every workload, so an interrupted run keeps what it measured
                snapshot = {**results, **partial, "goals": dict(partial["goals"]), "partial": True}
                snapshot["load_avg_at_end"] = os.getloadavg()
                snapshot["total_s"] = time.perf_counter() - t_start
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(snapshot, indent=1))
                docs = Path(args.docs) if args.docs else ROOT / "docs" / "benchmarks.md"
                docs.write_text(markdown(snapshot))

            results.update(full(args, have_flower, scratch, save))
        results["total_s"] = time.perf_counter() - t_start
        results["load_avg_at_end"] = os.getloadavg()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        log(f"wrote {path}")
        if not args.quick or args.docs:
            docs = Path(args.docs) if args.docs else ROOT / "docs" / "benchmarks.md"
            docs.write_text(markdown(results))
            log(f"wrote {docs}")
        for key, g in results["goals"].items():
            print(f"{verdict(g['met']):>8}  {key}: {g['goal']}  ({g['value']})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def full(args, have_flower: bool, scratch: Path, save=lambda r: None) -> dict:
    only = set(args.only.split(","))
    pairs = args.pairs
    res: dict = {"goals": {}}
    goals = res["goals"]

    def goal(key: str, ok: bool, value: str) -> None:
        goals[key] = {"goal": GOALS[key], "met": bool(ok), "value": value}

    def larger_model_goal(run: dict, key: str) -> None:
        """Flower / raysim per steady round >= 3, and Flower / ideal: the most any runtime doing
        the same work could gain on that model."""
        m = run["median"]
        sp = m["flower"]["steady_round_s"] / m["raysim"]["steady_round_s"]
        bound = m["flower"]["steady_round_s"] / m["ideal"]["steady_round_s"]
        run["speedup"], run["ideal_speedup"] = sp, bound
        goal(key, sp >= 3.0, f"{sp:.2f}x (the ideal loop: {bound:.2f}x)")

    subprocess.run([str(PY), "-m", "raysim.cli", "pretrain", CONFIG, *LARGE], cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL)
    if args.ideal_threads == "auto":
        probe = ["clients.total=100", "clients.per_round=10", "rounds=6"]
        runs = {1: [], 2: []}
        log("== ideal threads: 1 vs 2 (2 short runs each, alternated)")
        for i in range(2):
            for t in runs:
                runs[t].append(run_ideal(probe, scratch, f"threads{t}-{i}", threads=t))
        med = {t: statistics.median(x["steady_round_s"] for x in rs) for t, rs in runs.items()}
        IDEAL_THREADS[0] = min(med, key=med.get)
        res["ideal_threads_probe"] = {"steady_round_s_median": med, "chosen": IDEAL_THREADS[0]}
        log(f"   1 thread {med[1]:.3f} s, 2 threads {med[2]:.3f} s per steady round: the ideal uses {IDEAL_THREADS[0]}")
    else:
        IDEAL_THREADS[0] = int(args.ideal_threads)
    res["ideal_threads"] = IDEAL_THREADS[0]
    assignment = args.assignment or "sticky"
    if "assignment" in only and not args.assignment:
        base = ["clients.total=100", "clients.per_round=10", "rounds=20"]
        runs = {"sticky": [], "balanced": []}
        log(f"== assignment: sticky vs balanced, {max(2, pairs - 1)} pairs")
        for i in range(max(2, pairs - 1)):
            for a in runs:
                runs[a].append(run_raysim(base + [f"runtime.assignment={a}"], scratch, f"assign-{a}-{i}"))
        med = {a: statistics.median(r["steady_round_s"] for r in rs) for a, rs in runs.items()}
        assignment = min(med, key=med.get)
        res["assignment"] = {
            "steady_round_s_median": med,
            "chosen": assignment,
            "runs": {a: [_brief(r) for r in rs] for a, rs in runs.items()},
        }
        log(f"   sticky {med['sticky']:.3f} s, balanced {med['balanced']:.3f} s per steady round: using {assignment}")
    res["assignment_used"] = assignment
    ra = {"raysim": [f"runtime.assignment={assignment}"]}

    save(res)
    if "a" in only:
        # the real `raysim run` process: it imports torch while Ray starts (no pre-import)
        a = compare(
            "a", ["clients.total=100", "clients.per_round=10", "rounds=20"], ["raysim", "ideal"], pairs, scratch, ra,
            side_kwargs={"raysim": {"preimport": False}},
        )
        res["a"] = a
        m = a["median"]
        ratio = m["raysim"]["steady_round_s"] / m["ideal"]["steady_round_s"]
        a["steady_ratio"] = ratio
        goal("a_round_ratio", ratio <= 1.10, f"{ratio:.2f}x")
        extra = m["raysim"]["process_wall_s"] - m["ideal"]["process_wall_s"]
        a["process_wall_extra_s"] = extra
        goal("a_wall", extra <= 10.0, f"{m['raysim']['process_wall_s']:.1f} s vs {m['ideal']['process_wall_s']:.1f} s (+{extra:.1f} s)")

    save(res)
    if "b" in only:
        if not have_flower:
            res["b_skipped"] = "Flower's venv is absent: bash benchmarks/setup_flower.sh"
        for n in (100, 1000):
            ov = [f"clients.total={n}", "clients.per_round=10", "rounds=5"]
            if have_flower:
                b = compare(f"b{n}", ov, ["raysim", "flower"], pairs, scratch, ra)
            else:
                b = compare(f"b{n}", ov, ["raysim"], pairs, scratch, ra)
            res[f"b{n}"] = b
            m = b["median"]
            if have_flower:
                sp = m["flower"]["steady_round_s"] / m["raysim"]["steady_round_s"]
                b["speedup"] = sp
                goal(f"b{n}_round", sp >= (1.6 if n == 100 else 4.0), f"{sp:.2f}x")
                w = m["raysim"]["after_imports_s"] / m["flower"]["after_imports_s"]
                goal(f"b{n}_wall", w <= 0.5, f"{m['raysim']['after_imports_s']:.1f} s vs {m['flower']['after_imports_s']:.1f} s ({w:.2f})")
                goal(
                    f"b{n}_memory",
                    m["raysim"]["peak_memory_mb"] < m["flower"]["peak_memory_mb"],
                    f"{m['raysim']['peak_memory_mb']:.0f} MB vs {m['flower']['peak_memory_mb']:.0f} MB",
                )
        m100, m1000 = res["b100"]["median"]["raysim"], res["b1000"]["median"]["raysim"]
        d = m1000["mean_round_s"] / m100["mean_round_s"]
        ds = m1000["steady_round_s"] / m100["steady_round_s"]
        res["d"] = {"mean_round_ratio_1000_over_100": d, "steady_round_ratio_1000_over_100": ds}
        goal("d_population", d <= 1.10, f"{m1000['mean_round_s']:.3f} s vs {m100['mean_round_s']:.3f} s ({d:.2f}x; steady {ds:.2f}x)")

    save(res)
    if "c" in only:
        ov = ["clients.total=100", "clients.per_round=10", "rounds=5", *LARGE]
        # The ideal runs here too: Flower / ideal is the most any runtime doing the same work can
        # gain over Flower on this model, which says whether the goal is reachable at all.
        sides = ["raysim", "flower", "ideal"] if have_flower else ["raysim", "ideal"]
        c = compare("c", ov, sides, pairs, scratch, ra)
        res["c"] = c
        if have_flower:
            larger_model_goal(c, "c_round")
        c["params"] = count_params(ov)

    save(res)
    if "c2" in only:
        # Builds the resident once first: this also aligns the MiniLM base (cached) if it is
        # not in $RAYSIM_CACHE yet, which must not land in a timed run.
        params = count_params(C2, FEDLARGE)
        sides = ["raysim", "flower", "ideal"] if have_flower else ["raysim", "ideal"]
        c2 = compare("c2", C2, sides, pairs, scratch, ra, config=FEDLARGE)
        res["c2"] = c2
        c2["params"] = params
        if have_flower:
            larger_model_goal(c2, "c2_round")

    save(res)
    if "e" in only:
        ov = ["clients.total=1000", "clients.per_round=1000", "rounds=2", f"runtime.assignment={assignment}"]
        log("== e: 1,000 clients, all of them every round, 2 rounds (one run)")
        e = run_raysim(ov, scratch, "e")
        res["e"] = {"overrides": ov, **_brief(e)}
        goal("e_memory", e["peak_memory_mb"] <= 3072, f"{e['peak_memory_mb']:.0f} MB")
    res["partial"] = False
    return res


def count_params(overrides: list[str], config: str = CONFIG) -> dict:
    code = (
        "import sys,json;from raysim.config import load_config;from raysim import algorithms;"
        "c=load_config(sys.argv[1],sys.argv[2:]);m=algorithms.load(c.algorithm.name)(c).build_resident().model\n"
        "print(json.dumps({'total':sum(p.numel() for p in m.parameters()),"
        "'trainable':sum(p.numel() for p in m.parameters() if p.requires_grad)}))"
    )
    out = subprocess.run([str(PY), "-c", code, config, *overrides], cwd=ROOT, env=_env(), capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}


# ------------------------------------------------------------------------------ markdown

def markdown(r: dict) -> str:
    from bench_report import render  # benchmarks/bench_report.py: the tables and the prose

    return render(r)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
