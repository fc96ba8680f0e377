#!/usr/bin/env bash
# The GPU check in one shot, on a machine without network: install the wheels that wheelhouse.sh built
# beside the machine's own torch, then run layer_check.py; gpu_check.json, gpu_check.md and
# gpu_check.log land in OUT.
#
#   bash benchmarks/gpu/check.sh --wheels benchmarks/gpu/wheels --out OUT [--device cuda|cpu]
#        [--site DIR] [--timeout-s 450] [-- LAYER_CHECK_ARGS...]
#
# The wheels go with `pip install --no-index --no-deps --target SITE` (default: a fresh folder under
# TMPDIR) and SITE goes first on PYTHONPATH: nothing installed on the machine changes, torch included.
# PYTHON (default python3) runs every step. Steps: args, wheels, install, import, check.
# Exit status: 0 every check passed; 1 a check failed (parity or CUDA graph, see gpu_check.md);
# 2 a step failed ("error: step '<name>' failed: ..." names it).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a PY <<< "${PYTHON:-python3}"
fail() { echo "error: step '$1' failed: $2" >&2; exit 2; }

wheels="" out="" device="cuda" site="" timeout_s=450
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) wheels="${2:-}"; shift 2 || fail args "--wheels needs a folder" ;;
        --out) out="${2:-}"; shift 2 || fail args "--out needs a folder" ;;
        --device) device="${2:-}"; shift 2 || fail args "--device needs cpu or cuda" ;;
        --site) site="${2:-}"; shift 2 || fail args "--site needs a folder" ;;
        --timeout-s) timeout_s="${2:-}"; shift 2 || fail args "--timeout-s needs seconds" ;;
        --) shift; break ;;
        *) fail args "unknown argument '$1' (see the header of $0)" ;;
    esac
done
[[ -n "$wheels" && -n "$out" ]] || fail args "--wheels DIR and --out DIR are required"
[[ "$device" == cpu || "$device" == cuda ]] || fail args "--device ($device) must be cpu or cuda"
[[ "$timeout_s" =~ ^[0-9]+$ ]] || fail args "--timeout-s ($timeout_s) must be a whole number of seconds"
mkdir -p "$out" || fail args "cannot create --out $out"
site="${site:-$(mktemp -d "${TMPDIR:-/tmp}/ds_grace_site.XXXXXX")}"

# wheels: everything MANIFEST.txt lists is there, built for this Python, and no torch among them
[[ -f "$wheels/MANIFEST.txt" ]] || fail wheels "$wheels/MANIFEST.txt is missing (run benchmarks/gpu/wheelhouse.sh $wheels)"
python_here="$("${PY[@]}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || fail wheels "${PY[*]} does not run"
read -r _ python_built < <(head -n 1 "$wheels/MANIFEST.txt")
[[ "$python_built" == "$python_here" ]] || fail wheels "the wheels are for Python $python_built but ${PY[*]} is $python_here"
files=()
while read -r name; do
    [[ -f "$wheels/$name" ]] || fail wheels "$wheels/$name (listed in MANIFEST.txt) is missing"
    case "$name" in torch-*|nvidia_*|triton-*) fail wheels "$name would replace the machine's own build" ;; esac
    files+=("$wheels/$name")
done < <(tail -n +2 "$wheels/MANIFEST.txt")

rm -rf "$site" && mkdir -p "$site" || fail install "cannot create --site $site"
"${PY[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site" "${files[@]}" || fail install "pip install --no-index --no-deps --target $site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# import: the carried packages come from SITE, torch from the machine
"${PY[@]}" - "$site" <<'EOF' || fail import "see the lines above"
import sys
from pathlib import Path

import torch

import deepspeed, hjson, pydantic, ds_grace, ds_grace.moe.layer, ds_grace.inference  # noqa: E401,F401

site = Path(sys.argv[1]).resolve()
inside = {m.__name__: Path(m.__file__).resolve().is_relative_to(site) for m in (deepspeed, pydantic, hjson, ds_grace, torch)}
wrong = [name for name, there in inside.items() if there != (name != "torch")]
if wrong:
    sys.exit(f"error: {wrong} imported from the wrong place (carried packages from {site}, torch from the machine)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}, ds_grace {ds_grace.__version__}")
EOF

# check: layer_check.py writes OUT/gpu_check.json and OUT/gpu_check.md; its output also goes to gpu_check.log
timeout "$timeout_s" "${PY[@]}" "$HERE/layer_check.py" --device "$device" --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
case "$status" in
    0) echo "GPU check passed: $out/gpu_check.md" ;;
    1) echo "GPU check: a check failed, see $out/gpu_check.md" >&2; exit 1 ;;
    124) fail check "layer_check.py ran past --timeout-s $timeout_s" ;;
    *) fail check "layer_check.py exited with $status (its error line is above)" ;;
esac
