#!/usr/bin/env bash
# One GPU session's runs, in steps, each under its own time limit, results packed into one archive.
#   bash benchmarks/gpu_session.sh RESULTS_DIR STEP [STEP ...]
# Steps: info, check, kernel, e2e13, e2e14, kernelcheck, cp1, compile13, families,
# custom:<command>. Each step's output goes to
# RESULTS_DIR/<step>.log (and its files under RESULTS_DIR/<step>/); at exit the folder is packed into
# RESULTS_DIR.tgz, so a step that runs out of time still leaves what the others wrote.
# Expects PYTHONPATH to hold the packages the GPU image lacks (diffusers; FA4 for the peers).
set -u
out=${1:?results dir}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pack() { tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"; }
trap pack EXIT
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "=== $name rc=$? ($(date +%T))"; tail -n 40 "$out/$name.log"
}
for s in "$@"; do
  case $s in
    info) step info 120 python3 -m fastdit info ;;
    check) step check 240 env OUT="$out" python3 -m benchmarks.gpu_check \
             --sections flash4,compile,cudnn,helpers,window,vmoba,reference --dtypes bf16 --head-dims 128 ;;
    kernel) step kernel 300 python3 -m benchmarks.kernel_bench --out "$out/kernel" ;;
    e2e13) step e2e13 240 python3 -m benchmarks.e2e_bench --models wan13b-480p \
             --methods stock-cudnn,stock-flash,dense,radial,adaspa --out "$out/e2e13" ;;
    e2e14) step e2e14 560 python3 -m benchmarks.e2e_bench --models wan14b-720p \
             --methods stock-cudnn,dense,radial,adaspa --out "$out/e2e14" ;;
    kernelcheck) step kernelcheck 120 env OUT="$out" python3 -m benchmarks.gpu_check \
             --sections window,int8,helpers --head-dims 64,128 ;;
    cp1) step cp1 150 torchrun --nproc-per-node 1 -m benchmarks.cp_bench --layers 4 --out "$out/cp1" ;;
    compile13) step compile13 150 python3 -m benchmarks.compose_bench --models wan13b-480p \
             --methods stock-cudnn,radial --budget-s 110 --out "$out/compile13" ;;
    families) step families 150 python3 -m benchmarks.families_bench --layers 1 --repeat 1 \
             --families "${FAMILIES:-hunyuanvideo15-480p,ltx-video-704p,cogvideox-5b,flux-1mp}" \
             --out "$out/families" ;;
    custom:*) step custom 560 bash -c "${s#custom:}" ;;
    *) echo "unknown step $s" ;;
  esac
done
