#!/usr/bin/env bash
# Checks, with the pinned toolchain's cuobjdump, that every ddpm-kernels fatbin built under TARGET_DIR
# (default target-cuda) holds machine code for sm_80, sm_86, sm_89 and sm_90 and compute_90 PTX: the images
# that let the kernels load on A100, A10/3090, L4/4090, H100/H200 and (PTX, JIT) anything newer.
# Runs in scripts/ci-cuda-build.sh after the CUDA build; needs no GPU. Exit status 1 names what is missing.
#   EXPECT_SM / EXPECT_PTX override the expectation (for a build with DDPM_CUDA_SM / DDPM_CUDA_PTX set).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-target-cuda}
EXPECT_SM=${EXPECT_SM:-"sm_80 sm_86 sm_89 sm_90"}
EXPECT_PTX=${EXPECT_PTX:-"sm_90"}  # cuobjdump names PTX for compute_90 "....sm_90.ptx"
command -v cuobjdump >/dev/null || { echo "check-fatbin: cuobjdump not found (source .gpu/env.sh)" >&2; exit 2; }

mapfile -t fatbins < <(find "$TARGET" -path '*/build/ddpm-kernels-*/out/ddpm_kernels.fatbin' 2>/dev/null | sort)
if [ "${#fatbins[@]}" -eq 0 ]; then
  echo "check-fatbin: no ddpm_kernels.fatbin under $TARGET (build ddpm-kernels with --features cuda first)" >&2
  exit 1
fi
fail=0
for f in "${fatbins[@]}"; do
  elf=$(cuobjdump --list-elf "$f" | grep -o 'sm_[0-9]*[a-z]*\.cubin' | sed 's/\.cubin//' | sort -u | tr '\n' ' ')
  ptx=$(cuobjdump --list-ptx "$f" | grep -o 'sm_[0-9]*[a-z]*\.ptx' | sed 's/\.ptx//' | sort -u | tr '\n' ' ')
  missing=""
  for a in $EXPECT_SM; do grep -qw "$a" <<< "$elf" || missing+=" cubin:$a"; done
  for a in $EXPECT_PTX; do grep -qw "$a" <<< "$ptx" || missing+=" ptx:${a/sm_/compute_}"; done
  if [ -n "$missing" ]; then
    echo "check-fatbin: FAIL $f: missing$missing (cubins: ${elf:-none}; PTX: ${ptx:-none})" >&2
    fail=1
  else
    echo "check-fatbin: ok $f: cubins ${elf}PTX ${ptx}"
  fi
done
exit $fail
