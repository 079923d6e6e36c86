"""Does reconstructing missing modalities help the downstream model? (FedRecon, issue 6)

    .venv/bin/python experiments/fedrecon.py [--rounds N] [--seed S] [--rates 0.3 ...] [--variants full ...]

(--rates / --variants run a subset and print it without touching docs/results.md.)

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
EVAL_EVERY = 3  # evaluation is a visible share of a run this small
LAST = 3  # downstream values: mean of the last 3 evaluations (the last 7 rounds of phase C)


# Sanity check of the model itself: one client holding every training sample (IID, all
# "both", the same per-sample missing rate), short phases. Not a federated result.
CENTRAL = ("central", "full")
CENTRAL_A, CENTRAL_B, CENTRAL_ROUNDS, CENTRAL_RATE = 10, 3, 15, 0.3
CENTRAL_OVERRIDES = ["clients.total=1", "clients.per_round=1", "data.partition=iid",
                     f"algorithm.options.phase_a={CENTRAL_A}", f"algorithm.options.phase_b={CENTRAL_B}"]  # fmt: skip


def run_one(rate, variant: str, rounds: int, seed: int) -> tuple:
    """One engine run in this (worker) process; returns its metric records and, per digit,
    the final generator's image->caption accuracy (and the federation's paired samples)."""
    import torch

    torch.set_num_threads(1)  # two runs share two cores
    from raysim.config import load_config
    from raysim.run.engine import Engine

    central = rate == CENTRAL[0]
    overrides = [
        f"rounds={CENTRAL_ROUNDS if central else rounds}",
        f"seed={seed}",
        "runtime.num_workers=0",
        f"eval.every={EVAL_EVERY}",
        f"checkpoint.every={CENTRAL_ROUNDS if central else rounds}",
        f"algorithm.options.missing_rate={CENTRAL_RATE if central else rate}",
        f"algorithm.options.variant={variant}",
        *(CENTRAL_OVERRIDES if central else []),
    ]
    cfg = load_config(CONFIG, overrides)
    out = RUNS / f"p{rate}-{variant}"
    shutil.rmtree(out, ignore_errors=True)  # our own output from an earlier run
    t0 = time.perf_counter()
    engine = Engine(cfg, str(out), resume=False)
    engine.start()
    while not engine.done():
        engine.run_round()
    engine.finish()
    alg = engine.algorithm
    per_digit = {"translation": alg.translation_per_digit(engine.state), "pairs": alg.pairs_per_digit()}
    return rate, variant, engine.history, per_digit, time.perf_counter() - t0


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


def per_digit_table(per_digit: dict) -> list[str]:
    digits = range(10)
    lines = [
        "**Image→caption, per digit** (final generator: share of test images whose reconstructed caption names the "
        "digit; `pairs`: training samples holding both modalities, over all clients, the only data the "
        "cross-modal terms see)",
        "",
        "| run | " + " | ".join(str(d) for d in digits) + " |",
        "|---|" + "---:|" * 10,
    ]
    for p in RATES:
        lines.append(f"| p={p} pairs | " + " | ".join(str(n) for n in per_digit[p, "full"]["pairs"]) + " |")
        for m in GENERATOR_VARIANTS:
            lines.append(f"| p={p} {m} | " + " | ".join(f"{a:.2f}" for a in per_digit[p, m]["translation"]) + " |")
    central = per_digit[CENTRAL]
    lines.append("| central pairs | " + " | ".join(str(n) for n in central["pairs"]) + " |")
    lines.append("| central full | " + " | ".join(f"{a:.2f}" for a in central["translation"]) + " |")
    return lines + [""]


def claim_check(results: dict, per_digit: dict) -> list[str]:
    f1 = {(p, m): tail_mean(results[p, m], "f1") for p in RATES for m in VARIANTS}
    lines = ["Checks (macro-F1):", ""]
    for other in ("zero_fill", "no_mapping", "no_frozen_generator"):
        wins = [p for p in RATES if f1[p, "full"] > f1[p, other]]
        gaps = ", ".join(f"{f1[p, 'full'] - f1[p, other]:+.3f}" for p in RATES)
        lines.append(f"- full > {other} at {len(wins)} of {len(RATES)} missing rates (gaps at p = 0.1/0.3/0.5: {gaps})")
    gains = [f1[p, "full"] - f1[p, "zero_fill"] for p in RATES]
    grows = all(b > a for a, b in zip(gains, gains[1:]))
    lines.append(f"- the gain of full over zero_fill {'grows' if grows else 'does not grow'} monotonically with p")
    central = final(results[CENTRAL], "xrec_digit_acc")
    fed = [final(results[p, "full"], "xrec_digit_acc") for p in RATES]
    lines.append(
        f"- the generator translates image→caption digit well above chance (0.1): centrally {central:.3f}, "
        f"federated (full) {', '.join(f'{a:.3f}' for a in fed)} at p = 0.1/0.3/0.5"
    )
    best = [p for p in RATES if all(final(results[p, "full"], "xrec_digit_acc") > final(results[p, m], "xrec_digit_acc")
                                    for m in ("no_mapping", "no_frozen_generator"))]  # fmt: skip
    lines.append(f"- full's generator translates best of the three at {len(best)} of {len(RATES)} missing rates")
    rich, poor = [], []
    for p in RATES:
        pd = per_digit[p, "full"]
        for n, a in zip(pd["pairs"], pd["translation"]):
            (rich if n >= 50 else poor).append(a)
    if rich and poor:
        lines.append(
            f"- federated translation by paired data per digit (full, all p): digits with >= 50 pairs "
            f"{sum(rich) / len(rich):.2f} mean accuracy, digits with < 50 pairs {sum(poor) / len(poor):.2f}"
        )
    return lines


def section(results: dict, per_digit: dict, rounds: int, seed: int, seconds: float) -> str:
    from raysim.config import load_config
    from raysim.data import FederatedData

    cfg = load_config(CONFIG, [f"rounds={rounds}", f"seed={seed}"])
    o, t = cfg.algorithm.options, cfg.train
    data = FederatedData(cfg)
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
        f"{t.local_epochs} local epochs of AdamW (lr {t.lr}, batch {t.batch_size}) per round, restricted softmax "
        f"(penalty {o['restrict_penalty']}) on caption tokens and classes a client holds none of; T residual "
        "(identity at the start); the classifier also sees which modality was observed. "
        f"Test: {len(data.test)} samples missing modalities the same way (holder type from the mix, then p), "
        "filled as the variant fills them. `f1_filled`: the test samples with a filled modality only. "
        "i2t retrieval cannot exceed about 0.2 (the caption's template, one of 5, cannot be read from an image); "
        "t2i is lower still (a caption names only the digit).",
        "",
    ]
    lines += downstream_table(results, "f1", "Downstream macro-F1")
    lines += downstream_table(results, "f1_filled", "Macro-F1 on test samples with a filled modality")
    lines += downstream_table(results, "accuracy", "Downstream accuracy")
    lines += generator_table(results)
    lines += per_digit_table(per_digit)
    c = results[CENTRAL]
    lines += [
        f"Central sanity run (same model and code, one client holding all {sum(data.client_sizes())} training pairs, "
        f"IID, missing rate {CENTRAL_RATE}, phases A {CENTRAL_A} / B {CENTRAL_B} / C {CENTRAL_ROUNDS - CENTRAL_A - CENTRAL_B} "
        "rounds): image→caption digit accuracy "
        f"{final(c, 'xrec_digit_acc'):.3f}, i2t top-1 {final(c, 'i2t_top1'):.3f}, t2i top-5 {final(c, 't2i_top5'):.3f}, "
        f"downstream macro-F1 {final(c, 'f1'):.3f}.",
        "",
    ]
    lines += claim_check(results, per_digit)
    lines += [
        "",
        "Why the first version never translated (img→caption digit accuracy 0.000 for `full`): not the model -- "
        "centrally it translated -- but local training under Dirichlet 0.1. A client holds one to four digits; "
        "with 3 local epochs of 16 and a fresh AdamW, each client's decoders learned to name their own digits "
        "from biases (0.25 test accuracy per client after a round) and pushed every other digit word down at "
        "full Adam step size, so the averaged decoder named no digit at all; beta 0.1 let the image posterior "
        "drown in noise (variance ~0.5). Fixes: many short rounds (phase A 12 -> 35 rounds, ~5 local steps), "
        "the restricted softmax, beta 0.01, a residual T. What remains is data: translation is good for digits "
        "with many paired samples and near zero for those with few (table above), since only paired samples "
        "teach the cross-modal terms.",
        "",
        "Reading the downstream tables: a better generator does not buy a better classifier here. The filled "
        "modality is a function of the present one, so it adds no information the classifier could not extract "
        "itself; it helps only where translation is more reliable than the classifier's own reading of the "
        "image, and translation is wrong for the digits with few pairs. `no_mapping` has no T to train in "
        "phase B and keeps training the whole VAE there (45 rounds of encoders against 35 for the others, the "
        "same round budget by design), which gives every downstream feature -- present or filled -- longer-"
        "trained encoders; its generator translates worse than full's, so its downstream lead most likely "
        "comes from the encoders rather than from filling (not separated here: that would need a zero-filled "
        "run on no_mapping's encoders). Everything here is one seed; the full / zero_fill / "
        "no_frozen_generator gaps (0.02 or less) are not shown to exceed seed-to-seed variation.",
    ]
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
    p.add_argument("--rounds", type=int, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rates", type=float, nargs="+", default=RATES)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = p.parse_args()
    if args.rounds is None:
        from raysim.config import load_config

        args.rounds = load_config(CONFIG, []).rounds
    t0 = time.perf_counter()
    results, per_digit = {}, {}
    full_run = (args.rates, args.variants) == (RATES, VARIANTS)
    runs = [(rate, v) for rate in args.rates for v in args.variants] + ([CENTRAL] if full_run else [])
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, rate, v, args.rounds, args.seed) for rate, v in runs]
        for f in futures:
            rate, variant, history, digits, seconds = f.result()
            results[rate, variant], per_digit[rate, variant] = history, digits
            shown = {k: round(tail_mean(history, k), 3) for k in ("f1", "f1_filled", "accuracy")}
            shown |= {k: round(final(history, k), 3) for k in ("xrec_digit_acc", "i2t_top1", "t2i_top5")}
            print(f"p={rate} {variant}: {seconds:.0f}s", shown, flush=True)
            print("   translation per digit", [round(a, 2) for a in digits["translation"]], "pairs", digits["pairs"], flush=True)
    if not full_run:
        return  # a partial run: the tables need every rate and variant
    text = section(results, per_digit, args.rounds, args.seed, time.perf_counter() - t0)
    write_section(text)
    print(text)


if __name__ == "__main__":
    main()
