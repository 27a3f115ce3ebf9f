#!/bin/sh
# Copy programs and every shared library they need (ldd) into a root directory, each at
# its own path: what a minimal image needs to run them.
# USAGE : cocker_ldd_and_cp_lib64.sh (root_dir) (program) [ (program) ... ]
set -eu
if [ $# -lt 2 ]; then
    echo "USAGE : cocker_ldd_and_cp_lib64.sh (root_dir) (program) [ (program) ... ]" >&2
    exit 7
fi
root=$1
shift
[ -d "$root" ] || { echo "cocker_ldd_and_cp_lib64.sh: '$root' is not a directory" >&2; exit 1; }
copy() {    # copy a file to the same path under the root, its symlink chain resolved
    mkdir -p "$root$(dirname "$1")"
    cp -pL "$1" "$root$1"
}
for program in "$@"; do
    case "$program" in
        /*) path=$program ;;
        *) path=$(command -v "$program") || { echo "cocker_ldd_and_cp_lib64.sh: $program not found" >&2; exit 1; } ;;
    esac
    [ -f "$path" ] || { echo "cocker_ldd_and_cp_lib64.sh: $path not found" >&2; exit 1; }
    copy "$path"
    ldd "$path" 2>/dev/null | while read -r first second third rest; do
        for lib in "$first" "$third"; do
            case "$lib" in /*) [ -f "$lib" ] && copy "$lib" ;; esac
        done
    done
done
