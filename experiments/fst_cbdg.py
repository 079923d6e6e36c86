"""FST-CBDG comparison: zero-shot vs federated self-training without / with class-balanced
generation vs supervised FedAvg of the same linear head, under Dirichlet alpha 0.1 and 1.0,
same seed. Rewrites only its own section of docs/results.md.

    .venv/bin/python experiments/fst_cbdg.py

Runs in local mode (runtime.num_workers=0): results do not depend on the worker count.
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysim.config import load_config  # noqa: E402
from raysim.run.engine import Engine  # noqa: E402

CONFIG = ROOT / "configs" / "fst_cbdg.yaml"
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- BEGIN fst_cbdg -->", "<!-- END fst_cbdg -->"
ROUNDS = 20  # every client is sampled ~4 times, so its pseudo-labels are refreshed ~4 times
SHOWN_ROUNDS = (1, 5, 10, 20)
ALPHAS = (0.1, 1.0)
# The supervised reference keeps the head learning rate at which it does best (0.05; the
# self-training lr 0.01 of configs/fst_cbdg.yaml is slower with true labels).
SUPERVISED = ["algorithm.options.labels=truth", "algorithm.options.generation=false", "train.lr=0.05"]
# The head settings configs/fst_cbdg.yaml had before (lr 0.05, label momentum 0.9): shown so
# neither the method nor its ablation is judged only at settings chosen here.
PREVIOUS = ["train.lr=0.05", "algorithm.options.label_momentum=0.9"]
NOGEN = ["algorithm.options.generation=false"]
VARIANTS = {
    "FST (no generation)": NOGEN,
    "FST-CBDG": [],
    "supervised FedAvg, same head (upper ref.)": SUPERVISED,
    "FST (no generation), lr 0.05, momentum 0.9": [*NOGEN, *PREVIOUS],
    "FST-CBDG, lr 0.05, momentum 0.9": PREVIOUS,
    # The base the config used before (20 epochs instead of 60): features that cluster
    # worse by digit, so self-training has less to find.
    "FST-CBDG, 20-epoch base": ["pretrain.epochs=20"],
}
# What the frozen features allow at all: every client's images on one client (no
# federation, no label skew), same head training.
ONE_CLIENT = ["clients.total=1", "clients.per_round=1", "data.partition=iid"]
CENTRAL = {
    "FST-CBDG, all client images on one client": ONE_CLIENT,
    "supervised, all client images on one client": [*ONE_CLIENT, *SUPERVISED],
}


def run(overrides: list[str]) -> list[dict]:
    cfg = load_config(CONFIG, ["runtime.num_workers=0", f"rounds={ROUNDS}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(cfg, tmp, resume=False)
        engine.start()
        while not engine.done():
            engine.run_round()
        engine.finish()
        return engine.history


def row(label: str, alpha: float, history: list[dict]) -> str:
    by_round = {h["round"]: h for h in history}
    accs = " | ".join(f"{by_round[r]['accuracy']:.3f}" for r in SHOWN_ROUNDS)
    return f"| {alpha} | {label} | {history[0]['zero_shot_accuracy']:.3f} | {accs} |"


def last(history: list[dict], k: int = 5) -> float:
    """Mean accuracy over the last k rounds: single rounds move by ~1 point."""
    return sum(h["accuracy"] for h in history[-k:]) / k


def timed(label: str, alpha, overrides: list[str], lines: list[str]) -> list[dict]:
    t0 = time.perf_counter()
    history = run(overrides)
    lines.append(row(label, alpha, history))
    print(lines[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return history


def comparison() -> tuple[str, str, int]:
    head = "| alpha | method | zero-shot | " + " | ".join(f"round {r}" for r in SHOWN_ROUNDS) + " |"
    lines = [head, "|" + "---|" * (3 + len(SHOWN_ROUNDS))]
    runs = {}
    for alpha in ALPHAS:
        for label, extra in VARIANTS.items():
            runs[alpha, label] = timed(label, alpha, [f"data.alpha={alpha}", *extra], lines)
    for label, extra in CENTRAL.items():
        runs[label] = timed(label, "-", extra, lines)
    checks = []
    for alpha in ALPHAS:
        fst, nogen = runs[alpha, "FST-CBDG"], runs[alpha, "FST (no generation)"]
        nogen_prev = runs[alpha, "FST (no generation), lr 0.05, momentum 0.9"]
        sup = runs[alpha, "supervised FedAvg, same head (upper ref.)"]
        zs = fst[0]["zero_shot_accuracy"]
        checks.append(
            f"- alpha {alpha}: FST-CBDG - zero-shot = {fst[-1]['accuracy'] - zs:+.3f} at round {ROUNDS}, "
            f"{last(fst) - zs:+.3f} averaged over rounds {ROUNDS - 4}-{ROUNDS} (zero-shot {zs:.3f}, chance 0.1); "
            f"FST-CBDG - FST without generation = {last(fst) - last(nogen):+.3f} "
            f"({last(fst) - last(nogen_prev):+.3f} against the ablation at lr 0.05, momentum 0.9); "
            f"supervised reference - FST-CBDG = {last(sup) - last(fst):+.3f} (same averages)"
        )
    one, one_sup = runs["FST-CBDG, all client images on one client"], runs["supervised, all client images on one client"]
    checks.append(
        f"- ceiling of the frozen features: with every client's images on one client the same "
        f"self-training reaches {last(one):.3f} (mean of rounds {ROUNDS - 4}-{ROUNDS}), the same head "
        f"with true labels {last(one_sup):.3f}"
    )
    fed = runs[ALPHAS[0], "FST-CBDG"]
    bytes_per_client = fed[1]["bytes_up"] // len(fed[1]["clients"])
    return "\n".join(lines), "\n".join(checks), bytes_per_client


def section(body: str, checks: str, bytes_per_client: int) -> str:
    return f"""{BEGIN}
## FST-CBDG: federated self-training of a linear head on a frozen VLM

`.venv/bin/python experiments/fst_cbdg.py` (configs/fst_cbdg.yaml: 50 clients, 10 per
round, {ROUNDS} rounds, seed 0, tiny CLIP pre-trained centrally for 60 epochs on a held-out
split with 55% of digits 0-4 and 15% of digits 5-9; clients' images unlabelled; head:
AdamW lr 0.01, 5 local epochs, label momentum 0.5, synthetic noise sigma 0.3, synthetic
loss weight 2). Accuracy of the federated head on the labelled test split; zero-shot is
the frozen model with the class prompts (round 0 of every run). Each round moves
{bytes_per_client} bytes per sampled client each way: the 10 x 64 head and 10 biases.

{body}

{checks}

Reading: FST-CBDG beats zero-shot clearly, by 6.5 (alpha 0.1) and 6.9 (alpha 1.0) points
averaged over rounds 16-20 (about 24 of the 359 test images), and class-balanced generation
is what makes it work under skew: without it the skewed local pseudo-labels drag the head
(and, through it, the labels) towards each client's majority classes and accuracy falls
below zero-shot (0.493 / 0.524 at round 20); the ablation at lr 0.05 and momentum 0.9 falls
less, and FST-CBDG still leads it by 6.9 points at alpha 0.1 but only 1.7 at alpha 1.0,
so generation helps most under strong skew, as the paper says. The gain depends on the
base: on the base pre-trained for 20 epochs instead of 60 (same zero-shot, 0.643) the same
settings gain only ~2 points: self-training can only pull the head towards where the frozen
image features cluster, and that base's features cluster less by digit (a check outside
this command: the nearest true class mean of the client images classifies the test split
at 0.75 with the 20-epoch base, 0.79 with the 60-epoch one). The
supervised reference is itself unstable under alpha 0.1 (clients with one or two digits
drift: 0.724 at round 10, 0.635 at round 20); at alpha 1.0 it shows what the frozen
features allow with labels (0.80), 9 points above FST-CBDG. With all client images on one
client the same self-training reaches 0.682, a little below the federated runs; we did not
look into why (one seed, ~1 point per 4 test images).
{END}"""


def write_section(text: str) -> None:
    # Read-modify-write at once: other sections of the file belong to other experiments.
    old = RESULTS.read_text() if RESULTS.is_file() else "# Results\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(new)


if __name__ == "__main__":
    write_section(section(*comparison()))
    print(f"wrote {RESULTS}")
