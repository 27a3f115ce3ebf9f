#!/bin/sh
# Make a RHEL/CentOS 7.4 base image archive with supermin5 and yum (manual 3.2.2):
# AUTHOR=rhel-7.4-x86_64:VERSION.cockerimage and its .sha256 in the current directory.
# Without arguments it asks for the author and the version, as the C cocker's script did.
# The sshd and gcc scripts call this one with --packages and --suffix: their images are
# layers to stack on the base (-m "AUTHOR=rhel-7.4-x86_64,AUTHOR=sshd").
# USAGE : cocker_create_image_rhel-7.4-x86_64.sh [ --packages "pkg ..." --suffix name ] [ (author) (version) ]
set -eu
usage() {
    echo "USAGE : cocker_create_image_rhel-7.4-x86_64.sh [ --packages \"pkg ...\" --suffix name ] [ (author) (version) ]" >&2
    exit 7
}
# to add or remove software, change this list (the manual: "the list after supermin5 --prepare")
packages="bash coreutils filesystem glibc-common setup shadow-utils util-linux procps-ng
    iproute iputils net-tools findutils grep sed gawk tar gzip less vim-minimal which
    hostname passwd yum rpm ncurses"
suffix=rhel-7.4-x86_64
while [ $# -gt 0 ]; do
    case "$1" in
        --packages) [ $# -ge 2 ] || usage; packages=$2; shift 2 ;;
        --suffix) [ $# -ge 2 ] || usage; suffix=$2; shift 2 ;;
        -*) usage ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ] && [ -t 0 ]; then
    printf 'author (e.g. calvin): '; read -r author
    printf 'version (e.g. 1.0.0): '; read -r version
elif [ $# -eq 2 ]; then
    author=$1; version=$2
else
    usage
fi
for word in "$author" "$version"; do
    case "$word" in ''|.*|-*|*/*|*,*|*:*|*\ *) echo "cocker_create_image: '$word' is invalid" >&2; exit 7 ;; esac
done
[ "$(id -u)" = 0 ] || { echo "cocker_create_image: run it as root" >&2; exit 1; }
command -v supermin5 >/dev/null || { echo "cocker_create_image: supermin5 is not installed (yum install supermin5)" >&2; exit 1; }
command -v yum >/dev/null || { echo "cocker_create_image: yum must work on this host" >&2; exit 1; }
file="$author=$suffix:$version.cockerimage"
work=$(mktemp -d /var/tmp/cocker-rhel.XXXXXX)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086  (the package list is words)
supermin5 -v --prepare $packages -o "$work/supermin.d"
supermin5 -v --build --format chroot "$work/supermin.d" -o "$work/rootfs"
here=$(dirname "$0")
if [ "$suffix" = rhel-7.4-x86_64 ]; then
    mkdir -p "$work/rootfs/root"
    cp "$here/cocker_etc_profile_template.sh" "$work/rootfs/etc/profile"
    cp "$here/cocker_profile_template.sh" "$work/rootfs/root/.profile"
fi
tmp=".$file.tmp$$"
( cd "$work/rootfs" && tar --numeric-owner --exclude='dev/*' --exclude='proc/*' \
      --exclude='sys/*' -czf - -- $(ls -A) ) > "$tmp"
mv "$tmp" "$file"
sha256sum "$file" > "$file.sha256"
ls -l "$file"
