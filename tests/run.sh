#!/bin/sh
# The test command (README.md, .ci/run): install what the tests need, then run them.
# Unit and end-to-end tests run with this machine's Python; the end-to-end tests run a second
# time with cocker under Python 3.6 (RHEL 8's platform python) where pyenv has it.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: the tests create namespaces and mounts: run them as root" >&2
    exit 1
fi

# System packages: ldd, ps, ip, stty/tput and ping go into the test image; unshare is used by
# bench/; iptables for BRIDGE networks; a static busybox serves (nc) inside test containers;
# sshd (and useradd) for the image repository tests; gcc and the C library's static archive
# and kernel headers build the attack tests' probe and planted NSS module; losetup and
# nsenter (util-linux) for the attack tests; buildah (and skopeo, umoci, podman) build and
# read the OCI and Docker archives of the image tests (podman runs them with runc: crun
# refuses hybrid cgroups), zstd compresses one of their layers; the distribution registry
# (docker-registry), htpasswd (apache2-utils) and openssl for the registry tests.
if command -v apt-get >/dev/null 2>&1; then
    missing=""
    for p in libc-bin procps iproute2 util-linux ncurses-bin coreutils iptables busybox-static \
             openssh-server openssh-client passwd tar gzip debootstrap groff-base bash \
             gcc libc6-dev linux-libc-dev iputils-ping buildah skopeo umoci podman runc zstd \
             docker-registry apache2-utils openssl; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi
elif command -v dnf >/dev/null 2>&1; then
    dnf install -y -q glibc-common procps-ng iproute util-linux ncurses coreutils iptables busybox \
        openssh-server openssh-clients shadow-utils tar gzip debootstrap groff bash \
        gcc glibc-static kernel-headers iputils buildah skopeo umoci podman runc zstd \
        docker-distribution httpd-tools openssl
fi

# The Debian tree the debootstrap image test packs, downloaded here, once, and kept between
# runs: the tests themselves send nothing beyond loopback and their own namespaces.
CACHE=${COCKER_TEST_DEBOOTSTRAP_CACHE:-/var/cache/cocker-test}
if [ ! -f "$CACHE/bookworm/etc/debian_version" ]; then
    warm=$(mktemp -d)
    (cd "$warm" && sh "$OLDPWD/shbin/cocker_create_image_debian.sh" -c "$CACHE" warmup >/dev/null)
    rm -rf "$warm"
fi

# A real interpreter, never a pyenv shim (it adds ~100 ms to every cocker command).
PY=${PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
"$PY" -m pytest --version >/dev/null 2>&1 || "$PY" -m pip install -q pytest
# ansible-core for the Ansible collection's test (a test-only dependency, as pytest is)
# (-I: the collection's own ansible/ directory here would pass for the package)
"$PY" -I -c "import ansible.release" 2>/dev/null || "$PY" -m pip install -q ansible-core
# setuptools and wheel: the pip install test builds offline (--no-build-isolation --no-index)
"$PY" -c "import setuptools, wheel" 2>/dev/null || "$PY" -m pip install -q setuptools wheel

"$PY" -m pytest -q tests "$@"

PY36=$(ls /root/.pyenv/versions/3.6*/bin/python3.6 2>/dev/null | head -n 1 || true)
if [ -n "$PY36" ]; then
    echo "--- end-to-end tests again with cocker under $PY36"
    COCKER_PYTHON="$PY36" "$PY" -m pytest -q tests/test_e2e_*.py "$@"
fi
