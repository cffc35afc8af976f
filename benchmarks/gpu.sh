#!/usr/bin/env bash
# Every GPU measurement of the project, in one call on one GPU, printed as one table.
#
#   1. LLaVA-1.5-7B architecture (published config, random bf16 weights): images/s of
#      generate() in this process at several batch sizes (benchmarks/caption.py --gpu);
#   2. the same architecture saved as a checkpoint and served by `transformers serve` on the
#      same GPU, captioned by the caption stage's openai backend at several concurrencies
#      (benchmarks/caption.py --gpu-serve);
#   3. KOALA-700M / KOALA-1B vs SDXL pipeline latency, 1024 px, 25 steps
#      (benchmarks/koala.py --gpu).
#
# The machine needs torch (CUDA) and transformers; it needs no internet. Whatever else the
# benchmarks import travels as wheels in a folder: make it on a machine with internet and the
# same Python and platform with
#   bash benchmarks/gpu.sh --fetch-wheels DIR
# then on the GPU machine
#   bash benchmarks/gpu.sh --wheels DIR [--out DIR]
# The steps share a time budget (default 480 s, the 8 minutes a GPU session allows); a step
# that no longer fits is reported as skipped, never half-run. Logs and results.jsonl go to
# --out (default ./gpu-bench-results); the random checkpoint (~14 GB) goes to --workdir
# (default ${TMPDIR:-/tmp}/recaption-gpu-bench).
#
# Options:
#   --wheels DIR          install the missing packages from DIR (pip --no-index), first
#   --fetch-wheels DIR    download those packages' wheels into DIR and exit (needs internet)
#   --out DIR             results and logs (default ./gpu-bench-results)
#   --workdir DIR         checkpoints and shards (default ${TMPDIR:-/tmp}/recaption-gpu-bench)
#   --budget SECONDS      total time for the steps (default 450)
#   --batch-sizes LIST    step 1's batch sizes (default 1,8,32)
#   --concurrency LIST    step 2's requests in flight (default 1,8)
#   --only STEPS          run only these steps, e.g. --only 1,3
#   --packages "A B ..."  the packages to install or fetch (default: see PACKAGES below)
#   --dry-run             parse, check the wheels folder (pip install --dry-run), print the
#                         plan; run no benchmark (works on a CPU machine)
#   --report              print the table of --out's results.jsonl and step logs; run nothing
#   -h, --help            this text
# Exit status: 0 every step ran, 1 a step failed or was skipped, 2 usage or setup error.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# What the three steps import beyond torch and transformers: the stage's own dependencies
# (pyarrow, pydantic, PyYAML, Pillow, numpy, tqdm), the openai client and `transformers serve`
# (fastapi, uvicorn, starlette, rich, accelerate), and diffusers for the KOALA pipelines.
PACKAGES="pyarrow pydantic pyyaml pillow numpy tqdm safetensors openai fastapi uvicorn starlette rich accelerate diffusers"

die() {
    echo "gpu.sh: $*" >&2
    exit 2
}
say() { echo "gpu.sh: $*" >&2; }
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

wheels=""
fetch=""
out="$PWD/gpu-bench-results"
workdir="${TMPDIR:-/tmp}/recaption-gpu-bench"
budget=450
batch_sizes="1,8,32"
concurrency="1,8"
only="1,2,3"
dry_run=0
report_only=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --fetch-wheels) fetch="${2:?--fetch-wheels needs a folder}"; shift 2 ;;
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --workdir) workdir="${2:?--workdir needs a folder}"; shift 2 ;;
        --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
        --batch-sizes) batch_sizes="${2:?--batch-sizes needs a list}"; shift 2 ;;
        --concurrency) concurrency="${2:?--concurrency needs a list}"; shift 2 ;;
        --only) only="${2:?--only needs steps}"; shift 2 ;;
        --packages) PACKAGES="${2:?--packages needs a list}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --report) report_only=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$budget" =~ ^[0-9]+$ ]] || die "--budget must be a whole number of seconds, not '$budget'"
[[ "$batch_sizes" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--batch-sizes must look like 1,8,32"
[[ "$concurrency" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--concurrency must look like 1,8"
[[ "$only" =~ ^[123](,[123])*$ ]] || die "--only takes steps 1, 2 and 3, e.g. --only 1,3"
command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH; set PYTHON to the interpreter"
for path in "$out" "$workdir" "$wheels"; do
    [[ "$path" != *" "* ]] || die "'$path': folders with spaces are not supported"
done
read -ra packages <<<"$PACKAGES"

# --- wheels -------------------------------------------------------------------------------------
if [[ -n "$fetch" ]]; then
    mkdir -p "$fetch" || die "cannot create $fetch"
    say "downloading wheels of: ${packages[*]} (and what they need) into $fetch"
    "$PYTHON" -m pip download --only-binary=:all: -d "$fetch" "${packages[@]}" ||
        die "pip download failed (see above)"
    say "done: copy $fetch to the GPU machine and run: bash benchmarks/gpu.sh --wheels DIR"
    exit 0
fi
install_args=(-m pip install --no-index --find-links "$wheels" "${packages[@]}")
if [[ -n "$wheels" ]]; then
    [[ -d "$wheels" ]] || die "--wheels $wheels: no such folder"
    if [[ $dry_run -eq 1 ]]; then
        say "checking that $wheels and what is installed cover: ${packages[*]}"
        "$PYTHON" "${install_args[@]}" --dry-run || die "the wheels in $wheels do not cover the packages (see above)"
    else
        say "installing from $wheels what is missing of: ${packages[*]}"
        "$PYTHON" "${install_args[@]}" -q || die "installing from $wheels failed (see above)"
    fi
fi

# --- one table ----------------------------------------------------------------------------------
# report [OUTCOME ...]: the table of $out/results.jsonl and the KOALA step's log.
report() {
"$PYTHON" - "$out/results.jsonl" "$out" "$@" <<'PY'
import json
import re
import sys
from pathlib import Path

results, out, outcome = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = []
for line in results.read_text().splitlines() if results.exists() else []:
    r = json.loads(line)
    rows.append((r["measure"], r["setting"], r.get("images_per_s"), r.get("new_tokens_per_s"),
                 None, r.get("peak_gib"), r.get("note", r.get("device", ""))))
koala = out / "step3.log"
if koala.exists():
    text = koala.read_text()
    for name, sec, peak in re.findall(r"^(\S+)\s+([\d.]+) s/image\s+peak\s+([\d.]+) GiB", text, re.M):
        rows.append(("pipeline 1024px 25 steps", name, None, None, float(sec), float(peak), ""))
    for name, here, card in re.findall(r"^(\S+)/sdxl: ([\d.]+) here\s+vs ([\d.]+) card", text, re.M):
        rows.append(("pipeline latency ratio", f"{name}/sdxl", None, None, None, None,
                     f"{here} here, {card} on the model card's RTX 4090"))

def cell(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "-"

header = ("measurement", "setting", "img/s", "new tok/s", "s/image", "peak GiB", "note")
table = [header] + [
    (m, s, cell(i, ".2f"), cell(t, ".0f"), cell(p, ".3f"), cell(g, ".1f"), n)
    for m, s, i, t, p, g, n in rows
]
widths = [max(len(str(r[c])) for r in table) for c in range(len(header))]
print()
for r in table:
    print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
print()
for line in outcome:
    print(line)
PY
}

# --- the plan -----------------------------------------------------------------------------------
# plan STEP NAME MIN CAP COMMAND: the minimum seconds a step needs to be worth starting, the
# most it may take, and its command (its log is $out/stepSTEP.log).
declare -a ids names mins caps cmds
plan() { ids+=("$1"); names+=("$2"); mins+=("$3"); caps+=("$4"); cmds+=("$5"); }
results="$out/results.jsonl"
if [[ ",$only," == *",1,"* ]]; then
    plan 1 "1. LLaVA-1.5-7B in-process" 60 150 \
        "$PYTHON benchmarks/caption.py --gpu --batch-sizes $batch_sizes --gpu-new-tokens 64 --gpu-repeats 2 --json $results"
fi
if [[ ",$only," == *",2,"* ]]; then
    plan 2 "2. LLaVA-1.5-7B via transformers serve" 150 240 \
        "$PYTHON benchmarks/caption.py --gpu-serve --serve-arch llava-1.5-7b --serve-images 32 --gpu-new-tokens 64 --concurrency $concurrency --serve-startup-timeout 150 --workdir $workdir --json $results"
fi
if [[ ",$only," == *",3,"* ]]; then
    plan 3 "3. KOALA vs SDXL pipelines" 60 150 "$PYTHON benchmarks/koala.py --gpu --repeats 2"
fi

if [[ $dry_run -eq 1 ]]; then
    say "plan (budget ${budget}s; results in $results):"
    for i in "${!names[@]}"; do
        printf '  %-42s min %4ss  cap %4ss  %s\n' "${names[$i]}" "${mins[$i]}" "${caps[$i]}" "${cmds[$i]}" >&2
    done
    exit 0
fi

if [[ $report_only -eq 1 ]]; then
    report
    exit 0
fi

# --- run ----------------------------------------------------------------------------------------
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    die "torch sees no CUDA device here; run this on the GPU machine (or --dry-run)"
mkdir -p "$out" "$workdir" || die "cannot create $out or $workdir"
: >"$results"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
cd "$REPO" || die "cannot enter $REPO"
start=$SECONDS
status=0
declare -a outcome
for i in "${!names[@]}"; do
    left=$((budget - (SECONDS - start)))
    if ((left < mins[i])); then
        outcome+=("${names[$i]}: skipped (${left}s of the budget left, needs ${mins[$i]}s)")
        status=1
        continue
    fi
    limit=$((left < caps[i] ? left : caps[i]))
    log="$out/step${ids[$i]}.log"
    say "${names[$i]} (up to ${limit}s; log $log)"
    t0=$SECONDS
    # shellcheck disable=SC2086 # the command is a list of words built above
    timeout --signal=TERM --kill-after=20 "$limit" ${cmds[$i]} >"$log" 2>&1
    rc=$?
    if ((rc == 0)); then
        outcome+=("${names[$i]}: ok in $((SECONDS - t0))s")
    else
        outcome+=("${names[$i]}: failed (exit $rc after $((SECONDS - t0))s; last lines of $log below)")
        status=1
    fi
done
report "${outcome[@]}"
for i in "${!names[@]}"; do
    log="$out/step${ids[$i]}.log"
    if [[ -f "$log" ]] && [[ "${outcome[$i]:-}" == *failed* ]]; then
        echo "--- last lines of $log"
        tail -n 15 "$log"
    fi
done
exit "$status"
