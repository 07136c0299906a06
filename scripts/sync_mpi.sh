#!/usr/bin/env bash
# Runs the synchronized batch-norm example over MPI with RANKS ranks (default 3):
#
#   scripts/sync_mpi.sh [RANKS] [--release] [--all-features] [-- EXAMPLE ARGS...]
#
# (`--all-features` builds the library with every feature, not only `mpi`: CI, whose other
# stages built it so already, so that it is not built again.)
#
# Installs what it needs where it can (Debian's Open MPI and libclang, for rsmpi's bindings),
# builds `examples/sync_mpi.rs` with the `mpi` feature and runs it under mpirun (as root with
# --allow-run-as-root; --oversubscribe, since the ranks may outnumber the cores). Where MPI
# cannot be installed it says so and exits 0 without running anything; a failed check exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-3}
shift || true
profile=debug
build=()
if [ "${1:-}" = --release ]; then
    profile=release
    build=(--release)
    shift
fi
features=(--features mpi)
if [ "${1:-}" = --all-features ]; then
    features=(--all-features)
    shift
fi
[ "${1:-}" = -- ] && shift
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1 ||
    ! ldconfig -p 2>/dev/null | grep -q libclang; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
    else
        echo "sync_mpi: MPI or libclang missing and not installable here (needs root and apt-get): NOT RUN"
        exit 0
    fi
fi
cargo build "${build[@]}" "${features[@]}" --example sync_mpi
flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
mpirun "${flags[@]}" -n "$ranks" "target/$profile/examples/sync_mpi" "$@"
