#!/bin/sh
# The gcc layer for the RHEL 7.4 base image (manual 3.2.4): AUTHOR=gcc:VERSION.cockerimage.
# USAGE : cocker_create_image_rhel-7.4-gcc-x86_64.sh [ (author) (version) ]
exec "$(dirname "$0")/cocker_create_image_rhel-7.4-x86_64.sh" \
    --packages "gcc gcc-c++ make glibc-devel" --suffix gcc "$@"
