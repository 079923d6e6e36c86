"""Does reconstructing missing modalities help the downstream model? (FedRecon, issue 6)

    .venv/bin/python experiments/fedrecon.py [--rounds N] [--seed S]

Runs configs/fedrecon.yaml (Dirichlet alpha 0.1, 20 clients: 20% image-only, 20%
caption-only, 60% both) at per-sample missing rates 0.1 / 0.3 / 0.5, each in four
variants with the same seed, partitions, masks and initial weights:

    zero_fill            downstream model on present modalities only (missing features = 0)
    no_mapping           filled by the VAE without mapping networks: decoder(encoder(x))
    no_frozen_generator  T trained jointly with the local generators in phase B
    full                 FedRecon: T against the frozen global generator, filled by decoder(T(encoder(x)))

Each run is the engine in local mode (one process, no Ray), two runs at a time on the
2 cores. Downstream values are the mean of the last LAST evaluations (all in phase C,
where only the classifier moves); generator metrics are final (frozen in phase C).

Writes tables into its own section of docs/results.md (between the
`<!-- BEGIN fedrecon -->` / `<!-- END fedrecon -->` markers) and run directories under
runs/fedrecon_experiment/.
"""
from __future__ import annotations

import argparse
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fedrecon.yaml"
RESULTS = ROOT / "docs" / "results.md"
RUNS = ROOT / "runs" / "fedrecon_experiment"
BEGIN, END = "<!-- BEGIN fedrecon -->", "<!-- END fedrecon -->"

RATES = [0.1, 0.3, 0.5]
VARIANTS = ["zero_fill", "no_mapping", "no_frozen_generator", "full"]
GENERATOR_VARIANTS = ["no_mapping", "no_frozen_generator", "full"]  # zero_fill shares full's generator
EVAL_EVERY = 2  # evaluation is a visible share of a run this small; every other round suffices
LAST = 3


def run_one(rate: float, variant: str, rounds: int, seed: int) -> tuple[float, str, list[dict], float]:
    """One engine run in this (worker) process; returns its metric records."""
    import torch

    torch.set_num_threads(1)  # two runs share two cores
    from raysim.config import load_config
    from raysim.engine import Engine

    overrides = [
        f"rounds={rounds}",
        f"seed={seed}",
        "runtime.num_workers=0",
        f"eval.every={EVAL_EVERY}",
        f"checkpoint.every={rounds}",
        f"algorithm.options.missing_rate={rate}",
        f"algorithm.options.variant={variant}",
    ]
    cfg = load_config(CONFIG, overrides)
    out = RUNS / f"p{rate}-{variant}"
    shutil.rmtree(out, ignore_errors=True)  # our own output from an earlier run
    t0 = time.perf_counter()
    engine = Engine(cfg.to_dict(), str(out), resume=False)
    engine.start()
    while not engine.done():
        engine.run_round()
    engine.finish()
    return rate, variant, engine.history, time.perf_counter() - t0


def tail_mean(history: list[dict], key: str) -> float:
    evaluated = [h[key] for h in history if key in h and h["round"] > 0]
    return sum(evaluated[-LAST:]) / len(evaluated[-LAST:])


def final(history: list[dict], key: str) -> float:
    return [h[key] for h in history if key in h][-1]


def downstream_table(results: dict, key: str, label: str) -> list[str]:
    lines = [
        f"**{label}** (mean of the last {LAST} evaluations)",
        "",
        "| missing rate p | " + " | ".join(VARIANTS) + " | full − zero_fill |",
        "|---|" + "---:|" * (len(VARIANTS) + 1),
    ]
    for p in RATES:
        v = {m: tail_mean(results[p, m], key) for m in VARIANTS}
        cells = [f"{v[m]:.3f}" for m in VARIANTS] + [f"{v['full'] - v['zero_fill']:+.3f}"]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines + [""]


GEN_KEYS = [
    ("i2t_top1", "i2t top-1"), ("i2t_top5", "i2t top-5"), ("t2i_top1", "t2i top-1"), ("t2i_top5", "t2i top-5"),
    ("xrec_digit_acc", "img→caption digit acc"), ("xrec_txt_err", "img→caption token err"),
    ("xrec_img_mse", "caption→img MSE"), ("rec_img_mse", "img→img MSE"),
]  # fmt: skip


def generator_table(results: dict) -> list[str]:
    lines = [
        "**Generator** (final round): retrieval of reconstructed vs true latents, reconstruction errors",
        "",
        "| p | variant | " + " | ".join(label for _, label in GEN_KEYS) + " |",
        "|---|---|" + "---:|" * len(GEN_KEYS),
    ]
    for p in RATES:
        for m in GENERATOR_VARIANTS:
            lines.append(f"| {p} | {m} | " + " | ".join(f"{final(results[p, m], k):.3f}" for k, _ in GEN_KEYS) + " |")
    return lines + [""]


def claim_check(results: dict) -> list[str]:
    f1 = {(p, m): tail_mean(results[p, m], "f1") for p in RATES for m in VARIANTS}
    lines = ["Checks (macro-F1):", ""]
    for other in ("zero_fill", "no_mapping", "no_frozen_generator"):
        wins = [p for p in RATES if f1[p, "full"] > f1[p, other]]
        gaps = ", ".join(f"{f1[p, 'full'] - f1[p, other]:+.3f}" for p in RATES)
        lines.append(f"- full > {other} at {len(wins)} of {len(RATES)} missing rates (gaps at p = 0.1/0.3/0.5: {gaps})")
    gains = [f1[p, "full"] - f1[p, "zero_fill"] for p in RATES]
    grows = all(b > a for a, b in zip(gains, gains[1:]))
    lines.append(f"- the gain of full over zero_fill {'grows' if grows else 'does not grow'} monotonically with p")
    return lines


def section(results: dict, rounds: int, seed: int, seconds: float) -> str:
    from raysim.config import load_config
    from raysim.data import FederatedData

    cfg = load_config(CONFIG, [f"rounds={rounds}", f"seed={seed}"])
    o, t = cfg.algorithm.options, cfg.train
    data = FederatedData(cfg.data, cfg.clients.total, cfg.model.max_text_len, cfg.seed)
    phase_c = rounds - o["phase_a"] - o["phase_b"]
    lines = [
        BEGIN,
        "## FedRecon: reconstructing missing modalities with a federated MVAE",
        "",
        "Command: `.venv/bin/python experiments/fedrecon.py` "
        f"(configs/fedrecon.yaml, {rounds} rounds, seed {seed}, {seconds / 60:.1f} min on 2 shared CPU cores).",
        f"{cfg.clients.total} clients, {cfg.clients.per_round} per round, Dirichlet({cfg.data.alpha}) label skew over "
        f"{sum(data.client_sizes())} training pairs of the embedded digits; client holder types "
        f"{o['modality_mix']}; a sample of a 'both' client misses one modality with probability p. "
        f"Phases: A {o['phase_a']} rounds (joint VAE), B {o['phase_b']} (mapping networks), C {phase_c} (classifier). "
        f"MVAE on the 8x8 grey digit and the caption's token ids, latent {o['latent_dim']}, beta {o['beta']}; "
        f"{t.local_epochs} local epochs of AdamW (lr {t.lr}, batch {t.batch_size}). "
        f"Test: {len(data.test)} samples missing modalities the same way (holder type from the mix, then p), "
        "filled as the variant fills them. `f1_filled`: the test samples with a filled modality only.",
        "",
    ]
    lines += downstream_table(results, "f1", "Downstream macro-F1")
    lines += downstream_table(results, "f1_filled", "Macro-F1 on test samples with a filled modality")
    lines += downstream_table(results, "accuracy", "Downstream accuracy")
    lines += generator_table(results)
    lines += claim_check(results)
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace only our section; everything else in the file belongs to others."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = RESULTS.read_text() if RESULTS.is_file() else "# Results\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    results = {}
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, rate, v, args.rounds, args.seed) for rate in RATES for v in VARIANTS]
        for f in futures:
            rate, variant, history, seconds = f.result()
            results[rate, variant] = history
            shown = {k: round(tail_mean(history, k), 3) for k in ("f1", "f1_filled", "accuracy")}
            print(f"p={rate} {variant}: {seconds:.0f}s", shown, flush=True)
    text = section(results, args.rounds, args.seed, time.perf_counter() - t0)
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
