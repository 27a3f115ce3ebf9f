#!/bin/sh
# Build the test image 'test' from this host's binaries (cocker -a install_test).
# USAGE : cocker_install_test.sh [ (version) ] [ -f ]
set -eu
usage() { echo "USAGE : cocker_install_test.sh [ (version) ] [ -f ]" >&2; exit 7; }
version=""
force=""
for arg in "$@"; do
    case "$arg" in
        -f) force=-f ;;
        -*) usage ;;
        *) [ -z "$version" ] || usage; version=$arg ;;
    esac
done
exec cocker -a install_test ${version:+--version "$version"} $force
