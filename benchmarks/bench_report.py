"""Renders benchmarks/results.json as docs/benchmarks.md (called by benchmarks/run.py)."""
from __future__ import annotations


def _f(x, nd=2, unit=""):
    return "-" if x is None else f"{x:.{nd}f}{unit}"


def _side_rows(name: str, comp: dict, sides: list[str]) -> list[str]:
    rows = []
    for s in sides:
        m = comp["median"].get(s)
        if not m:
            continue
        rows.append(
            f"| {name} | {s} | {_f(m['steady_round_s'], 3)} | {_f(m['mean_round_s'], 3)} | {_f(m['first_round_s'], 2)} | "
            f"{_f(m['after_imports_s'], 1)} | {_f(m['process_wall_s'], 1)} | {_f(m['peak_memory_mb'], 0)} | "
            f"{comp['adapter_norm'][s]:.6f} |"
        )
    return rows


def render(r: dict) -> str:
    out = [
        "# Benchmarks",
        "",
        "Produced by `.venv/bin/python benchmarks/run.py` (one command; `--quick` for the tiny setting the test "
        "suite runs). Flower runs in its own venv: `bash benchmarks/setup_flower.sh` first. Each number is the "
        f"median over {r.get('a', r.get('b100', {})).get('pairs', '?')} runs per side, the sides run alternately "
        "(A B A B ...), each run a fresh process: imports, Ray start, the pre-trained base read from the cache "
        "(`raysim pretrain`), nothing else cached. "
        f"Machine: {r['machine']['cpus']} cores, no GPU; started {r['started']}, load average at start "
        f"{r['load_avg_at_start'][0]:.1f} (1 min), at end {r.get('load_avg_at_end', [0])[0]:.1f}; the whole run took "
        f"{r.get('total_s', 0) / 60:.1f} min. Raw numbers, every run: `benchmarks/results.json`.",
        "",
        "## Goals",
        "",
        "| goal | measured | |",
        "|---|---|---|",
    ]
    for key, g in r["goals"].items():
        out.append(f"| {g['goal']} | {g['value']} | {'met' if g['met'] else '**not met**'} |")
    out += [
        "",
        "## Times and memory (medians)",
        "",
        "steady round: mean wall time of rounds 3..R of a run (R = last round, which includes the final "
        "evaluation on every side); mean round: rounds 1..R; first round: round 1 (Flower pays its actors' "
        "start-up there); after imports: from the end of the process's imports to the end of the work "
        "(Ray start and shutdown included); process: the whole command, measured from outside; peak memory: PSS "
        "of the whole process tree (driver, Ray's processes, workers), sampled every 0.5 s (raysim: "
        "`summary.json` `peak_memory_mb`; the ideal and Flower: the same sampler, `raysim.run.memory`).",
        "",
        "| workload | side | steady round (s) | mean round (s) | first round (s) | after imports (s) | process (s) | peak memory (MB) | final adapter L2 norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "a": "(a) quickstart, 100 clients, 10/round, 20 rounds",
        "b100": "(b) 100 clients, 10/round, 5 rounds",
        "b1000": "(b) 1,000 clients, 10/round, 5 rounds",
        "c": "(c) larger tiny CLIP, 100 clients, 10/round, 5 rounds",
        "c2": "(c2) MiniLM dual encoder (fedlarge), 100 clients, 10/round, 5 rounds",
        "quick_run": "quick: 12 clients, 3/round, 2 rounds",
    }
    for key, label in labels.items():
        if key in r:
            out += _side_rows(label, r[key], list(r[key]["median"]))
    if "e" in r:
        e = r["e"]
        out.append(
            f"| (e) 1,000 clients, all 1,000 per round, 2 rounds | raysim | {_f(e['steady_round_s'], 3)} | "
            f"{_f(e['mean_round_s'], 3)} | {_f(e['first_round_s'], 2)} | {_f(e['after_imports_s'], 1)} | "
            f"{_f(e['process_wall_s'], 1)} | {_f(e['peak_memory_mb'], 0)} | {e['adapter_norm']:.6f} |"
        )
    out.append("")
    served = []
    for key in ("a", "b100", "b1000", "c", "c2"):
        runs = r.get(key, {}).get("runs", {}).get("raysim", [])
        firsts = [min(x["rounds_served_by_workers"], default=None) for x in runs if "rounds_served_by_workers" in x]
        if firsts:
            served.append(f"({key}) " + ", ".join("never" if f is None else f"round {f}" for f in firsts))
    if served:
        out += [
            "raysim's Ray workers served from (per run; earlier rounds ran in the driver while the workers "
            "started, `runtime.warm_start`): " + "; ".join(served) + ".",
            "",
        ]
    if "assignment" in r:
        a = r["assignment"]
        med = a["steady_round_s_median"]
        out += [
            f"raysim's `runtime.assignment`: sticky {med['sticky']:.3f} s vs balanced {med['balanced']:.3f} s per "
            f"steady round on workload (a) (medians of {len(a['runs']['sticky'])} runs each, alternated); the "
            f"benchmarks use **{a['chosen']}**.",
            "",
        ]
    elif "assignment_used" in r:
        out += [f"raysim's `runtime.assignment`: {r['assignment_used']} (given on the command line).", ""]
    if "ideal_threads" in r:
        probe = r.get("ideal_threads_probe")
        line = f"The ideal loop runs with {r['ideal_threads']} torch thread(s)"
        if probe:
            med = probe["steady_round_s_median"]
            line += (
                f", the faster of 1 ({med.get('1', med.get(1, 0)):.3f} s) and 2 ({med.get('2', med.get(2, 0)):.3f} s) "
                "threads per steady round on a short 100-client run timed first (the faster baseline is the harder one)"
            )
        out += [line + ".", ""]
    if "c" in r and r["c"].get("params"):
        p = r["c"]["params"]
        out += [
            f"The larger model (c): tiny CLIP with hidden size 256, intermediate 1024, 4 layers per tower, "
            f"{p.get('total', 0) / 1e6:.1f}M parameters ({p.get('trainable', 0) / 1e3:.0f}k trainable: LoRA r=8 on "
            "q/v plus the two projections).",
            "",
        ]
    if "c2" in r and r["c2"].get("params"):
        p = r["c2"]["params"]
        out += [
            f"The MiniLM dual encoder (c2, configs/fedlarge.yaml): the pretrained all-MiniLM-L6-v2 text tower "
            f"(frozen) and a 2-layer ViT of width 64 aligned to it centrally, {p.get('total', 0) / 1e6:.1f}M "
            f"parameters ({p.get('trainable', 0) / 1e3:.0f}k trainable: LoRA r=8 on the ViT's q/v plus the two "
            "projections).",
            "",
        ]
    out += _extra_rows()
    out += [
        "Same work on every side: the adapters' L2 norms agree to "
        + ", ".join(
            f"{r[k]['adapter_norm_max_rel_diff']:.1e} ({k})" for k in ("a", "b100", "b1000", "c", "c2", "quick_run") if k in r
        )
        + " relative. raysim and the ideal use the same fixed-point fold (bit-identical up to the final "
        "float conversion); Flower's FedAvg sums float32 products in reply order.",
        "",
        PROSE,
    ]
    return "\n".join(out)


def _extra_rows() -> list[str]:
    """Measurements made by their own commands (they store into benchmarks/extra_results.json)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent / "extra_results.json"
    extra = json.loads(path.read_text()) if path.is_file() else {}
    rows = []
    if "driver_memory" in extra:
        d = extra["driver_memory"]
        rows += [
            "## Driver memory while aggregating",
            "",
            f"`{d['command']}` ({d['measured']}, load {d['load_avg_1m']:.1f}): {d['clients_folded']:,} updates of "
            f"{d['params'] / 1e6:.0f}M parameters ({d['update_mb']:.0f} MB, {d['tensors']} tensors) folded by "
            f"{d['workers']} workers in {d['round_s']:.0f} s. The driver's own memory (USS) grew by "
            f"**{d['uss_growth_in_updates']:.2f} updates** at its peak (goal: at most 3); its RSS grew by "
            f"{d['rss_growth_in_updates']:.2f} updates, which also counts the object-store pages of the workers' "
            "partials that the driver maps zero-copy while merging them (shared memory owned by Ray's store, "
            "released when the round's references go).",
            "",
        ]
    if "warm_start" in extra:
        w = extra["warm_start"]
        rows += [
            "## Warm start",
            "",
            f"`.venv/bin/python {w['command']}` ({w['measured']}, load {w['load_avg_at_start']:.1f} at start): "
            "raysim with `runtime.warm_start` on and off against the ideal loop, 2 workers of 1 CPU each on the "
            "2 cores, medians; first worker round: the first round the Ray workers served, per run.",
            "",
            "| workload | side | steady round (s) | after imports (s) | process (s) | first worker round |",
            "|---|---|---|---|---|---|",
        ]
        for name, wl in w["workloads"].items():
            for side in ("warm", "cold", "ideal"):
                m = wl[side]
                first = ", ".join("never" if f is None else str(f) for f in m.get("first_worker_round", [])) or "-"
                rows.append(
                    f"| ({name}) {' '.join(wl['overrides'])} | {side} | {m['steady_round_s']:.3f} | "
                    f"{m['after_imports_s']:.1f} | {m['process_wall_s']:.1f} | {first} |"
                )
        rows += [
            "",
            "With warm start the driver's inline rounds and the two workers' start-up share the 2 cores, so "
            "both slow down; off, the first round waits for the workers and every round runs on both. "
            "Hence the default `auto`: warm start only when the driver has a core the workers do not take.",
            "",
        ]
    if "soak" in extra:
        k = extra["soak"]
        rows += ["## Soak", "", k["text"], ""]
    return rows


PROSE = """## How each side is built

- **raysim**: `raysim run configs/quickstart.yaml` with the overrides of each workload plus
  `eval.every=1000 checkpoint.every=1000` (evaluate at round 0 and at the end; one checkpoint, at the
  end), 2 pooled workers with 1 torch thread each, defaults otherwise (the round loop in the `raysim run`
  process, warm start: the driver serves clients until a worker is ready), through
  `benchmarks/raysim_run.py` (the real CLI). For (a) nothing is imported before the CLI, which imports
  torch in a thread while Ray starts, as `raysim run` does; for (b), (c) and (c2) the wrapper imports ray,
  torch, transformers, peft and the engine first, as Flower's script imports torch and flwr first, so
  "after imports" means the same on both sides.
- **ideal** (`benchmarks/ideal.py`): one process, no Ray. The base model is built once with raysim's
  own `build_resident`; the loop samples with `sample_clients`, seeds each client with `derive_seed`,
  trains with the algorithm's own `client_step` on the LoRA path (each client's optimizer moments kept in a dict across rounds),
  folds with raysim's weighted-sum fold, evaluates at round 0 and the end. torch gets both cores
  (`--threads`, 2 unless the run says otherwise).
- **Flower** (`benchmarks/flower_app.py`, flwr 1.41 with ray 2.55.1 in `benchmarks/.flower-venv`):
  a ClientApp written as Flower's examples write it (the model, base plus LoRA, built inside the train
  function on every call; the data set object cached per process as the examples cache theirs;
  the client's optimizer moments in `context.state`), a ServerApp running Flower's `FedAvg` through
  `strategy.start` with central evaluation (`evaluate_fn`) at round 0 and the end, federated evaluation
  off, and a small `configure_train` override that sends round r's messages to the nodes whose partition
  ids are raysim's `sample_clients(seed, r, ...)`. `run_simulation` with 2 CPUs, 1 CPU per ClientApp.
- **(c2)**: the same three sides on `configs/fedlarge.yaml` (`algorithm.options.quality=none`,
  `caption_noise.clients=[]`, `contribution=none`: what is left is FedAvg of LoRA adapters, the work
  Flower's FedAvg does), 100 clients, 10 per round, 5 rounds. raysim: `raysim run configs/fedlarge.yaml`.
  The ideal builds the resident once with `FedLarge.build_resident` (also used for evaluation), then
  runs `FedLarge.client_step` per client and the fold `zero`/`accumulate`/`finalize`. Flower's ClientApp
  calls `FedLarge.build_resident` on every call (the dual encoder, MiniLM and the aligned ViT, loaded
  with `from_pretrained` from its local directory in `$RAYSIM_CACHE`, plus LoRA), then
  `FedLarge.client_step`; its FedLarge object (tokenizer, tokenized data) is cached per process like the
  data set. The aligned base is built before the timed runs. Clients hold ~10 pairs each (2 local steps
  of batch 16), so a round is mostly per-client overhead: the model build, for Flower.

Caveat on the populations: the digits pool has 1,007 examples, so at 1,000 clients nearly every client
holds one example, and a contrastive batch needs two: those clients take no optimizer step (every side
alike). The 1,000-client rounds therefore measure the per-client overhead of each runtime (model
building for Flower, state handling and dispatch for raysim), and the population check (d) compares a
round with less compute against one with more.

## On a GPU cluster (on paper)

N GPU workers (Ray actors, `runtime.num_gpus_per_worker`), each holding one resident copy of the frozen
base model and serving K = clients / N virtual clients by swapping their adapters in. Per GPU:

    memory(GPU) = B                      (base weights, bf16/fp16: 2 bytes x parameters)
                + A_train                (one client training at a time: activations for one batch,
                                          grads + Adam moments of the adapter only: 3 x a)
                + C                      (CUDA context and allocator slack, ~0.5-1 GB)
    memory(host RAM of the worker) = K x s,   s = a x (1 + 2)  (each client's adapter + Adam moments,
                                          fp32: 12 bytes per adapter parameter), spilling to disk
                                          past runtime.state_memory_mb
    driver = one global adapter + one partial per worker  (a fold; independent of K and N)

Example: a 7B-parameter VLM in bf16 is B = 14 GB; LoRA r=16 on the attention projections of 32
layers is about a = 17M parameters, so s = 0.2 GB per client. On N = 8 GPUs of 80 GB, each holds
14 GB + activations (a few GB at batch 8) + 1 GB: about 20 GB, whatever K is; 1,000 clients are
K = 125 per worker, 25 GB of client state per worker in host RAM (or spilled). Flower's
examples, by contrast, build the model in each ClientApp call: with 2 ClientApps per GPU, 2 x 14 GB
of base weights per GPU and a model load (seconds from local disk, far more from a hub) per client
per round.

What would be measured there: per-round time against the single-GPU ideal loop (one process, base
built once), scaling with N at fixed clients per round (rounds should shrink ~1/N until the
per-round dispatch floor), GPU memory per worker with `torch.cuda.max_memory_allocated` (flat in K),
host memory per worker against K x s (and the spill rate once the budget is hit), driver memory
(flat in K and N), and bytes moved per round (clients per round x 2 x adapter size, independent of
the base model size).
"""
