#!/usr/bin/env bash
# Create the peer virtual environments for `make bench` (idempotent).
#   bench/.venv-trl116: TRL 1.16 (sft, reward, dpo, grpo, rloo)
#   bench/.venv-trl112: TRL 1.12 (ppo; later TRL releases removed PPOTrainer)
# Both install under alignkit's constraints (../constraints.txt): the same torch (the CPU wheel, installed
# first so pip never swaps it for a CUDA build), transformers, accelerate and datasets as alignkit's
# venv, so the two sides differ only in the library. TRL itself is pinned by the spec below.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$HERE/../constraints.txt"
PINS="$(sha256sum "$CONSTRAINTS" | cut -c1-12)"  # a new constraints file rebuilds the venvs
export TORCH_PIN="$(sed -n 's/^torch==//p' "$CONSTRAINTS")"

make_venv() {
    local name="$1" trl_spec="$2"
    local venv="$HERE/$name"
    local stamp="$venv/.installed-$trl_spec-$PINS"
    if [[ -f "$stamp" ]]; then
        echo "setup_peers: $name up to date ($trl_spec)"
        return
    fi
    echo "setup_peers: creating $name with $trl_spec"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    local pip=("$venv/bin/pip" install --quiet --disable-pip-version-check -c "$CONSTRAINTS")
    "${pip[@]}" torch
    "${pip[@]}" "$trl_spec" accelerate datasets tokenizers psutil
    "$venv/bin/python" - <<'PY'
import os, torch, transformers, trl
assert torch.__version__.split("+")[0] == os.environ["TORCH_PIN"], (torch.__version__, os.environ["TORCH_PIN"])
print(f"setup_peers: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
    rm -f "$venv"/.installed-*
    touch "$stamp"
}

make_venv .venv-trl116 "trl==1.16.0"
make_venv .venv-trl112 "trl==1.12.0"
