#!/bin/sh
# The sshd layer for the RHEL 7.4 base image (manual 3.2.3): AUTHOR=sshd:VERSION.cockerimage.
# USAGE : cocker_create_image_rhel-7.4-sshd-x86_64.sh [ (author) (version) ]
exec "$(dirname "$0")/cocker_create_image_rhel-7.4-x86_64.sh" \
    --packages "openssh-server openssh-clients" --suffix sshd "$@"
