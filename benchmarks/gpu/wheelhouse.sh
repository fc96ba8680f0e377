#!/usr/bin/env bash
# Wheels for the GPU check (benchmarks/gpu/check.sh) into DIR, built on this machine with its registries.
#
#   bash benchmarks/gpu/wheelhouse.sh benchmarks/gpu/wheels                  # for the GPU machine: CPython 3.12, manylinux x86_64
#   bash benchmarks/gpu/wheelhouse.sh --this-python /tmp/wheels              # for this interpreter (the CPU rehearsal)
#
# DIR gets: ds_grace (built from this checkout), deepspeed 0.19.8 (built from its sdist as a pure-Python
# wheel, DS_BUILD_OPS=0) and what carry.py finds that ds_grace needs and the GPU machine lacks (pydantic,
# pydantic-core, annotated-types, typing-inspection, typing-extensions, hjson), each at the version
# installed here; and MANIFEST.txt (the target Python, one wheel per line). Never torch. The GPU machine's
# working tree travels with the wheels and may hold 64 MiB in all: both sizes are checked.
# A failed step prints "error: step '<name>' failed: ..." and exits 2.
set -uo pipefail

LIMIT_BYTES=$((64 * 1024 * 1024))
TARGET_PYTHON=3.12
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

fail() { echo "error: step '$1' failed: $2" >&2; exit 2; }

this_python=0
if [[ "${1:-}" == "--this-python" ]]; then this_python=1; shift; fi
[[ $# -eq 1 ]] || fail args "usage: wheelhouse.sh [--this-python] DIR"
DIR="$1"
if [[ $this_python -eq 1 ]]; then
    TARGET_PYTHON="$($PYTHON -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || fail args "$PYTHON does not run"
fi
mkdir -p "$DIR" || fail args "cannot create $DIR"
DIR="$(cd "$DIR" && pwd)"
rm -f "$DIR"/*.whl "$DIR"/MANIFEST.txt
PIP=("$PYTHON" -m pip --disable-pip-version-check --retries 3 --timeout 60)

# ds_grace from the checkout's files (tracked and new, not ignored), so no stale build output gets in
build_dir="$(mktemp -d)" || fail ds_grace "no temporary folder"
trap 'rm -rf "$build_dir"' EXIT
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' file; do [[ -f "$file" ]] && printf '%s\0' "$file"; done \
        | xargs -0 cp --parents -t "$build_dir") || fail ds_grace "copying the checkout to $build_dir"
else
    cp -r "$REPO"/. "$build_dir" || fail ds_grace "copying $REPO to $build_dir"
fi
"${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$DIR" "$build_dir" >&2 || fail ds_grace "pip wheel of $REPO"
grace_wheel="$(ls "$DIR"/ds_grace-*.whl 2>/dev/null | head -n 1)"
[[ -n "$grace_wheel" ]] || fail ds_grace "no ds_grace wheel in $DIR"

requirements="$("$PYTHON" "$HERE/carry.py" requirements "$grace_wheel" --python-version "$TARGET_PYTHON")" \
    || fail carry "carry.py could not list what the GPU machine lacks"
echo "carrying: ds_grace $(echo $requirements)" >&2
binary=()
deepspeed=""
for requirement in $requirements; do
    case "$requirement" in
        deepspeed==*) deepspeed="$requirement" ;;
        *) binary+=("$requirement") ;;
    esac
done
[[ -n "$deepspeed" ]] || fail carry "carry.py did not list deepspeed"

if [[ $this_python -eq 1 ]]; then
    target=()
else
    target=(--python-version "$TARGET_PYTHON" --implementation cp --abi "cp${TARGET_PYTHON/./}")
    for platform_tag in "${PLATFORMS[@]}"; do target+=(--platform "$platform_tag"); done
fi
"${PIP[@]}" download -q --no-deps --only-binary=:all: "${target[@]}" -d "$DIR" "${binary[@]}" >&2 \
    || fail download "pip download ${binary[*]}"

# deepspeed's sdist as a pure-Python wheel (no compiled ops; pip reuses its own cached build when it has one)
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-binary deepspeed -w "$DIR" "$deepspeed" >&2 \
    || fail deepspeed "pip wheel $deepspeed"
ls "$DIR"/deepspeed-*-py3-none-any.whl >/dev/null 2>&1 || fail deepspeed "the deepspeed wheel is not pure Python"

ls "$DIR"/torch-*.whl "$DIR"/nvidia_*.whl >/dev/null 2>&1 && fail size "a torch or CUDA wheel got into $DIR"
{
    echo "python $TARGET_PYTHON"
    (cd "$DIR" && ls -1 ./*.whl | sed 's|^\./||')
} > "$DIR/MANIFEST.txt"
wheel_bytes=$(cat "$DIR"/*.whl | wc -c)
tree_bytes=0
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    tree_bytes=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' file; do [[ -f "$file" ]] && printf '%s\0' "$file"; done \
        | xargs -0 cat | wc -c)
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "wheels: $(mib "$wheel_bytes") in $(($(wc -l < "$DIR/MANIFEST.txt") - 1)) files; working tree: $(mib "$tree_bytes"); together $(mib $((wheel_bytes + tree_bytes))) of $(mib $LIMIT_BYTES)" >&2
((wheel_bytes + tree_bytes <= LIMIT_BYTES)) || fail size "wheels and working tree exceed 64 MiB"
echo "$DIR"
