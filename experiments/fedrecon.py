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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import ROOT, Job, final, load, run_all, tail_mean as mean_of, write_section  # noqa: E402

CONFIG = ROOT / "configs" / "fedrecon.yaml"
RUNS = ROOT / "runs" / "fedrecon_experiment"
AT_ONCE = 2  # runs at a time, one torch thread each

RATES = [0.1, 0.3, 0.5]
VARIANTS = ["zero_fill", "no_mapping", "no_frozen_generator", "full"]
GENERATOR_VARIANTS = ["no_mapping", "no_frozen_generator", "full"]  # zero_fill shares full's generator
EVAL_EVERY = 3  # evaluation is a visible share of a run this small
RICH = 50  # paired samples of a digit that count as many (per-digit check)
LAST = 3  # downstream values: mean of the last 3 evaluations (the last 7 rounds of phase C)


# Sanity check of the model itself: one client holding every training sample (IID, all
# "both", the same per-sample missing rate), short phases. Not a federated result.
CENTRAL = ("central", "full")
CENTRAL_A, CENTRAL_B, CENTRAL_ROUNDS, CENTRAL_RATE = 10, 3, 15, 0.3
CENTRAL_OVERRIDES = ["clients.total=1", "clients.per_round=1", "data.partition=iid",
                     f"algorithm.options.phase_a={CENTRAL_A}", f"algorithm.options.phase_b={CENTRAL_B}"]  # fmt: skip


def per_digit(engine) -> dict:
    """Per digit, the final generator's image->caption accuracy, and the federation's paired samples."""
    alg = engine.algorithm
    return {"translation": alg.translation_per_digit(engine.state), "pairs": alg.pairs_per_digit()}


def job(rate, variant: str, rounds: int, seed: int) -> Job:
    central = rate == CENTRAL[0]
    rounds = CENTRAL_ROUNDS if central else rounds
    overrides = (
        f"rounds={rounds}",
        f"seed={seed}",
        f"eval.every={EVAL_EVERY}",
        f"checkpoint.every={rounds}",
        f"algorithm.options.missing_rate={CENTRAL_RATE if central else rate}",
        f"algorithm.options.variant={variant}",
        *(CENTRAL_OVERRIDES if central else []),
    )
    return Job(CONFIG, overrides, RUNS / f"p{rate}-{variant}", per_digit)


def tail_mean(history: list[dict], key: str) -> float:
    return mean_of(history, key, LAST)


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


def f1_means(results: dict) -> dict:
    return {(p, m): tail_mean(results[p, m], "f1") for p in RATES for m in VARIANTS}


RATE_LIST = "/".join(map(str, RATES))


def at_rates(values) -> str:
    return f"{', '.join(values)} at p = {RATE_LIST}"


def translates_best(results: dict) -> list[float]:
    """The missing rates at which full's generator translates image->caption best of the three."""
    acc = {(p, m): final(results[p, m], "xrec_digit_acc") for p in RATES for m in GENERATOR_VARIANTS}
    return [p for p in RATES if all(acc[p, "full"] > acc[p, m] for m in ("no_mapping", "no_frozen_generator"))]


def by_pairs(per_digit: dict) -> tuple[list[float], list[float]]:
    """full's per-digit translation accuracies (all p), for digits with >= RICH pairs and the rest."""
    rich, poor = [], []
    for p in RATES:
        pd = per_digit[p, "full"]
        for n, a in zip(pd["pairs"], pd["translation"]):
            (rich if n >= RICH else poor).append(a)
    return rich, poor


def claim_check(results: dict, per_digit: dict) -> list[str]:
    from raysim.data import DIGIT_WORDS

    f1 = f1_means(results)
    lines = ["Checks (macro-F1):", ""]
    for other in ("zero_fill", "no_mapping", "no_frozen_generator"):
        wins = [p for p in RATES if f1[p, "full"] > f1[p, other]]
        gaps = ", ".join(f"{f1[p, 'full'] - f1[p, other]:+.3f}" for p in RATES)
        lines.append(f"- full > {other} at {len(wins)} of {len(RATES)} missing rates (gaps at p = {RATE_LIST}: {gaps})")
    gains = [f1[p, "full"] - f1[p, "zero_fill"] for p in RATES]
    grows = all(b > a for a, b in zip(gains, gains[1:]))
    lines.append(f"- the gain of full over zero_fill {'grows' if grows else 'does not grow'} monotonically with p")
    central = final(results[CENTRAL], "xrec_digit_acc")
    fed = [final(results[p, "full"], "xrec_digit_acc") for p in RATES]
    chance = 1 / len(DIGIT_WORDS)
    above = "well above" if min(central, *fed) > 2 * chance else "above" if min(central, *fed) > chance else "not above"
    lines.append(
        f"- the generator translates image→caption digit {above} chance ({chance:g}): centrally {central:.3f}, "
        f"federated (full) {at_rates(f'{a:.3f}' for a in fed)}"
    )
    lines.append(f"- full's generator translates best of the three at {len(translates_best(results))} of {len(RATES)} missing rates")
    rich, poor = by_pairs(per_digit)
    if rich and poor:
        lines.append(
            f"- federated translation by paired data per digit (full, all p): digits with >= {RICH} pairs "
            f"{sum(rich) / len(rich):.2f} mean accuracy, digits with < {RICH} pairs {sum(poor) / len(poor):.2f}"
        )
    return lines


def reading(results: dict, per_digit: dict, o) -> list[str]:
    """What the numbers say, computed from them so a re-run cannot contradict the text."""
    f1 = f1_means(results)
    xrec = {(p, m): final(results[p, m], "xrec_digit_acc") for p in RATES for m in GENERATOR_VARIANTS}
    best = translates_best(results)
    buys = all(f1[p, "full"] - f1[p, "zero_fill"] > 0.01 for p in RATES)
    rich, poor = by_pairs(per_digit)
    lines = []
    if rich and poor and sum(rich) / len(rich) > sum(poor) / len(poor):
        lines += ["Translation is better for digits with many paired samples than for those with few (table above): "
                  "only paired samples teach the cross-modal terms.", ""]
    if len(best) == len(RATES) and not buys:
        text = ("Reading the downstream tables: a better generator does not buy a better classifier here. The filled "
                "modality is a function of the present one, so it adds no information the classifier could not "
                "extract itself; it helps only where translation is more reliable than the classifier's own reading "
                "of the image, and translation is wrong for the digits with few pairs.")
    else:
        text = (f"Reading the downstream tables: full's generator translates best at {len(best)} of {len(RATES)} "
                f"missing rates, and full leads zero_fill by more than a point at "
                f"{sum(f1[p, 'full'] - f1[p, 'zero_fill'] > 0.01 for p in RATES)} of {len(RATES)}.")
    text += (f" `no_mapping` has no T to train in phase B and keeps training the whole VAE there "
             f"({o.phase_a + o.phase_b} rounds of encoders against {o.phase_a} for the others, the same round budget "
             "by design), which gives every downstream feature -- present or filled -- longer-trained encoders")
    if all(f1[p, "no_mapping"] > f1[p, "full"] for p in RATES):
        text += ("; its generator translates worse than full's at every rate, so its downstream lead most likely "
                 "comes from the encoders rather than from filling" if all(xrec[p, "no_mapping"] < xrec[p, "full"]
                                                                       for p in RATES) else
                 "; it leads full downstream at every rate, from the encoders or from filling")
        text += " (not separated here: that would need a zero-filled run on no_mapping's encoders)."
    else:
        text += "; it does not lead full downstream at every rate."
    close = ("full", "zero_fill", "no_frozen_generator")
    widest = max(abs(f1[p, a] - f1[p, b]) for p in RATES for a in close for b in close)
    text += (f" Everything here is one seed; the {' / '.join(close)} gaps ({widest:.3f} or less) are not shown to "
             "exceed seed-to-seed variation.")
    return lines + [text]


def section(results: dict, per_digit: dict, rounds: int, seed: int, seconds: float) -> str:
    from raysim.algorithms import options_of
    from raysim.data import CAPTION_TEMPLATES, FederatedData

    cfg = load(CONFIG, [f"rounds={rounds}", f"seed={seed}"])
    o, t = options_of(cfg), cfg.train
    data = FederatedData(cfg)
    phase_c = rounds - o.phase_a - o.phase_b
    templates = len(CAPTION_TEMPLATES)
    lines = [
        "## FedRecon: reconstructing missing modalities with a federated MVAE",
        "",
        "Command: `.venv/bin/python experiments/fedrecon.py` "
        f"(configs/fedrecon.yaml, {rounds} rounds, seed {seed}, {seconds / 60:.1f} min on 2 shared CPU cores).",
        f"{cfg.clients.total} clients, {cfg.clients.per_round} per round, Dirichlet({cfg.data.alpha}) label skew over "
        f"{sum(data.client_sizes())} training pairs of the embedded digits; client holder types "
        f"{o.modality_mix}; a sample of a 'both' client misses one modality with probability p. "
        f"Phases: A {o.phase_a} rounds (joint VAE), B {o.phase_b} (mapping networks), C {phase_c} (classifier). "
        f"MVAE on the 8x8 grey digit and the caption's token ids, latent {o.latent_dim}, beta {o.beta}; "
        f"{t.local_epochs} local epochs of AdamW (lr {t.lr}, batch {t.batch_size}) per round, restricted softmax "
        f"(penalty {o.restrict_penalty}) on caption tokens and classes a client holds none of; T residual "
        "(identity at the start); the classifier also sees which modality was observed. "
        f"Test: {len(data.test)} samples missing modalities the same way (holder type from the mix, then p), "
        "filled as the variant fills them. `f1_filled`: the test samples with a filled modality only. "
        f"i2t retrieval cannot exceed about {1 / templates:.1f} (the caption's template, one of {templates}, cannot "
        "be read from an image); t2i is lower still (a caption names only the digit).",
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
    lines += ["", *reading(results, per_digit, o)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="default: the config's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rates", type=float, nargs="+", default=RATES)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = p.parse_args()
    if args.rounds is None:
        args.rounds = load(CONFIG, []).rounds
    t0 = time.perf_counter()
    full_run = (args.rates, args.variants) == (RATES, VARIANTS)
    keys = [(rate, v) for rate in args.rates for v in args.variants] + ([CENTRAL] if full_run else [])
    runs = run_all({key: job(*key, args.rounds, args.seed) for key in keys}, AT_ONCE, progress)
    if not full_run:
        return  # a partial run: the tables need every rate and variant
    results, per_digit = {k: r.history for k, r in runs.items()}, {k: r.probed for k, r in runs.items()}
    text = section(results, per_digit, args.rounds, args.seed, time.perf_counter() - t0)
    write_section("fedrecon", text)
    print(text)


def progress(run) -> str:
    shown = {k: round(tail_mean(run.history, k), 3) for k in ("f1", "f1_filled", "accuracy")}
    shown |= {k: round(final(run.history, k), 3) for k in ("xrec_digit_acc", "i2t_top1", "t2i_top5")}
    digits = run.probed
    return f"{shown}\n   translation per digit {[round(a, 2) for a in digits['translation']]} pairs {digits['pairs']}"

if __name__ == "__main__":
    main()
