# Source me: `. cocker_container_root.sh CONTAINER` sets COCKER_CONTAINER_ROOT to the host
# path of the container's root directory (cocker -s container_root -c CONTAINER).
if [ $# -ne 1 ]; then
    echo "USAGE : . cocker_container_root.sh (container)" >&2
    return 7 2>/dev/null || exit 7
fi
COCKER_CONTAINER_ROOT=$(cocker -s container_root -c "$1") || return 255 2>/dev/null || exit 255
export COCKER_CONTAINER_ROOT
