#!/usr/bin/env bash
# Regenerate every benchmark on this machine and assemble bench/RESULTS.md from bench/results/*.md.
#
#   bash bench/run_all.sh                 # everything (about 15-20 minutes on 2 CPU cores)
#   bash bench/run_all.sh inference train # only some steps; RESULTS.md is re-assembled either way
#   bash bench/run_all.sh assemble        # only re-assemble RESULTS.md from the existing results
#
# Steps: inference (bench/inference_runtimes.py), train (bench/train_throughput.py, with 1 vs 2 processes),
# data (bench/data_pipeline.py), export (bench/export_ort.py; set AGREEMENT_RUN=RUN to add the int8 agreement of a
# run trained on minet7), gpu (bench/gpu_suite.py, only where torch sees a CUDA GPU).
# Each step writes its own bench/results/<topic>.md (+ .json). Run on an otherwise idle machine:
# other processes on the same cores change every number here.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results
mkdir -p "$RESULTS"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(inference train data export gpu)

failed=()
run_step() {  # name, command...: a failed step is reported, the others still run
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$(date +%s)
    if "$@"; then
        echo "=== $name: done in $(( $(date +%s) - t0 )) s"
    else
        echo "=== $name: FAILED (exit $?)"; failed+=("$name")
    fi
}

for step in "${steps[@]}"; do
    case $step in
        inference) run_step inference python bench/inference_runtimes.py ;;
        train)     run_step train python bench/train_throughput.py ;;
        data)      run_step data python bench/data_pipeline.py --md "$RESULTS/data.md" --json "$RESULTS/data.json" ;;
        export)    # prepare -> latency (batch 1, 8) -> agreement (+ a trained run if AGREEMENT_RUN is set)
                   W=$(mktemp -d -t mineralnet-bench-export.XXXX)
                   run_step export-prepare python bench/export_ort.py prepare --work "$W"
                   run_step export-latency-1 python bench/export_ort.py latency --work "$W" --batch 1
                   run_step export-latency-8 python bench/export_ort.py latency --work "$W" --batch 8
                   run_step export-agreement python bench/export_ort.py agreement --work "$W" \
                       ${AGREEMENT_RUN:+--agreement-run "$AGREEMENT_RUN"}
                   rm -rf "$W" ;;
        gpu)       if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
                       run_step gpu python3 bench/gpu_suite.py --out "$RESULTS"
                   else
                       echo "=== gpu: no CUDA GPU here; bench/results/gpu_suite.md is kept as it is"
                   fi ;;
        assemble)  ;;
        *) echo "run_all.sh: error: unknown step '$step' (inference, train, data, export, gpu, assemble)" >&2; exit 2 ;;
    esac
done

# --- assemble: a short header, then each results file (a fixed order first, then any others)
python - "$RESULTS" <<'EOF'
import datetime, platform, subprocess, sys
from pathlib import Path

from mineralnet import __version__
from mineralnet.bench import cpu_info, gpu_info

results = Path(sys.argv[1])
order = ["inference.md", "train.md", "data.md", "export.md", "gpu.md", "gpu_suite.md"]
files = [results / n for n in order if (results / n).is_file()]
files += sorted(p for p in results.glob("*.md") if p.name not in order)
cpu, gpu = cpu_info(), gpu_info()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
head = [
    "# MineralNet benchmark results", "",
    f"Assembled {datetime.date.today().isoformat()} by `bash bench/run_all.sh` (commit {commit or 'unknown'}, "
    f"MineralNet {__version__}) from {', '.join('bench/results/' + p.name for p in files)}.", "",
    f"Machine: {cpu['model']}, {cpu['physical_cores']} cores ({', '.join(cpu['simd'])}), "
    f"{'GPU ' + gpu['name'] if gpu else 'no GPU'}, {platform.platform()}. "
    "Each section states its own date, commands, settings and the machine load while it ran; "
    "timings on a shared 2-core machine vary by 30% or more between runs, so compare rows of one "
    "table (measured in one run) as ratios.", ""]
body = [p.read_text().rstrip() + "\n" for p in files]
(results.parent / "RESULTS.md").write_text("\n".join(head) + "\n" + "\n".join(body))
print(f"wrote {results.parent / 'RESULTS.md'} from {len(files)} results file(s)")
EOF

if [ ${#failed[@]} -gt 0 ]; then
    echo "run_all.sh: these steps failed: ${failed[*]} (their previous results, if any, were kept)" >&2
    exit 1
fi
