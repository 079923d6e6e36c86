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
from raysim.engine import Engine  # noqa: E402

CONFIG = ROOT / "configs" / "fst_cbdg.yaml"
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- BEGIN fst_cbdg -->", "<!-- END fst_cbdg -->"
ROUNDS = 10  # the gains are in by then; the paper also needs only a few rounds
SHOWN_ROUNDS = (1, 3, 5, 10)
VARIANTS = {
    "FST (no generation)": ["algorithm.options.generation=false"],
    "FST-CBDG": [],
    "supervised FedAvg, same head (upper ref.)": ["algorithm.options.labels=truth", "algorithm.options.generation=false"],
}
# The quickstart's held-out split (5% of digits 5-9) gives a base whose zero-shot labels are
# wrong for most 5s, 7s and 9s; shown once to say why configs/fst_cbdg.yaml uses 15%.
QUICKSTART_SHARE = "data.pretrain_class_share=[0.55,0.55,0.55,0.55,0.55,0.05,0.05,0.05,0.05,0.05]"


def run(overrides: list[str]) -> list[dict]:
    cfg = load_config(CONFIG, ["runtime.num_workers=0", f"rounds={ROUNDS}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(cfg.to_dict(), tmp, resume=False)
        engine.start()
        while not engine.done():
            engine.run_round()
        engine.finish()
        return engine.history


def row(label: str, alpha: float, history: list[dict]) -> str:
    by_round = {h["round"]: h for h in history}
    accs = " | ".join(f"{by_round[r]['accuracy']:.3f}" for r in SHOWN_ROUNDS)
    return f"| {alpha} | {label} | {history[0]['zero_shot_accuracy']:.3f} | {accs} |"


def comparison() -> tuple[str, int]:
    head = "| alpha | method | zero-shot | " + " | ".join(f"round {r}" for r in SHOWN_ROUNDS) + " |"
    lines = [head, "|" + "---|" * (3 + len(SHOWN_ROUNDS))]
    for alpha in (0.1, 1.0):
        for label, extra in VARIANTS.items():
            t0 = time.perf_counter()
            history = run([f"data.alpha={alpha}", *extra])
            lines.append(row(label, alpha, history))
            print(lines[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    history = run(["data.alpha=1.0", QUICKSTART_SHARE])
    lines.append(row("FST-CBDG, quickstart base (5% of 5-9 held out)", 1.0, history))
    print(lines[-1], flush=True)
    bytes_per_client = history[1]["bytes_up"] // len(history[1]["clients"])
    return "\n".join(lines), bytes_per_client


def section(body: str, bytes_per_client: int) -> str:
    return f"""{BEGIN}
## FST-CBDG: federated self-training of a linear head on a frozen VLM

`.venv/bin/python experiments/fst_cbdg.py` (configs/fst_cbdg.yaml: 50 clients, 10 per
round, {ROUNDS} rounds, seed 0, tiny CLIP pre-trained centrally on a held-out split with 55% of
digits 0-4 and 15% of digits 5-9; clients' images unlabelled). Accuracy of the federated
head on the labelled test split; zero-shot is the frozen model with the class prompts
(round 0 of every run). Each round moves {bytes_per_client} bytes per sampled client each
way: the 10 x 64 head and 10 biases.

{body}
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
