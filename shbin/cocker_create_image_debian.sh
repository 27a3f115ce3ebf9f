#!/bin/sh
# Make a minimal Debian image archive with debootstrap: NAME:VERSION.cockerimage (and its
# .sha256) in the current directory, ready for `cocker -a import`.
# USAGE : cocker_create_image_debian.sh [ -s suite ] [ -m mirror ] [ -c cache_dir ] (name[:version])
#   suite   default bookworm; mirror default http://deb.debian.org/debian
#   cache   keep the debootstrap tree in cache_dir/SUITE and reuse it next time (no download)
set -eu
usage() {
    echo "USAGE : cocker_create_image_debian.sh [ -s suite ] [ -m mirror ] [ -c cache_dir ] (name[:version])" >&2
    exit 7
}
suite=bookworm
mirror=http://deb.debian.org/debian
cache=""
while getopts :s:m:c: opt; do
    case "$opt" in
        s) suite=$OPTARG ;;
        m) mirror=$OPTARG ;;
        c) cache=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
image=$1
case "$image" in
    ''|.*|-*|*/*|*,*|*:*:*) echo "cocker_create_image_debian.sh: image name '$image' is invalid" >&2; exit 7 ;;
esac
[ "$(id -u)" = 0 ] || { echo "cocker_create_image_debian.sh: run it as root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "cocker_create_image_debian.sh: debootstrap is not installed" >&2; exit 1; }
file="$image.cockerimage"

work=$(mktemp -d /var/tmp/cocker-debian.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ -n "$cache" ] && [ -f "$cache/$suite/etc/debian_version" ]; then
    tree=$cache/$suite
    echo "using the debootstrap tree in $tree" >&2
else
    tree=$work/rootfs
    debootstrap --variant=minbase "$suite" "$tree" "$mirror" >&2
    if [ -n "$cache" ]; then            # keep it, complete, for the next time
        mkdir -p "$cache"
        rm -rf "$cache/$suite.new"
        cp -a "$tree" "$cache/$suite.new"
        rm -rf "$cache/$suite"
        mv "$cache/$suite.new" "$cache/$suite"
    fi
fi
# member names as the C cocker writes them (bin/bash, no ./), numeric owners, no device
# nodes (cocker gives each container its own /dev), no apt caches
tmp=".$file.tmp$$"
( cd "$tree" && tar --numeric-owner --exclude='dev/*' --exclude='proc/*' --exclude='sys/*' \
      --exclude='var/cache/apt/archives/*.deb' --exclude='var/lib/apt/lists/*' \
      -cf - -- $(ls -A) ) > "$work/image.tar"
# the C cocker's profiles (welcome banner, aliases) where they are beside this script
here=$(dirname "$0")
if [ -f "$here/cocker_etc_profile_template.sh" ] && [ -f "$here/cocker_profile_template.sh" ]; then
    mkdir -p "$work/add/etc" "$work/add/root"
    cp "$here/cocker_etc_profile_template.sh" "$work/add/etc/profile"
    cp "$here/cocker_profile_template.sh" "$work/add/root/.profile"
    ( cd "$work/add" && tar --numeric-owner --owner=0 --group=0 -rf "$work/image.tar" \
          etc/profile root/.profile )
fi
gzip -c "$work/image.tar" > "$tmp"
mv "$tmp" "$file"
sha256sum "$file" > "$file.sha256"
ls -l "$file"
