#!/usr/bin/env bash
# The whole test suite on CPU: installs system packages if missing (idempotent), then runs every test of
# the workspace, including the reference-vector conformance suite and the mpirun-based multi-rank tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenMPI refuses to run as root without these, and CI runs as root. Oversubscribe lets 2+ ranks share
# 2 cores; the vader single-copy mechanism needs ptrace rights that containers often lack.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
# Each rank of a multi-rank test is one thread: 2 cores, 2 ranks.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
# HDF5's advisory file locks: crates/data's bad-input tests create and reopen many small files from
# parallel test threads, and twice in a full run (2026-11-29) one reopen failed with "unable to lock
# file, errno = 11" although its writer had closed it (also with a strong close degree). The tests
# check error messages, not locking, so locking is off for the test run; the cause is not yet found.
export HDF5_USE_FILE_LOCKING=FALSE
cargo test --workspace --no-fail-fast "$@"
