"""Registry benchmark: push and pull of a ~200 MB 4-layer image over loopback, every figure
against the others of the same run.

    clients   cocker -a push / -a pull  against  skopeo copy between the same endpoints
              (push: skopeo copy docker-archive: docker://, gzipping each layer as cocker
              does; pull: skopeo copy docker:// oci:DIR, which checks every digest but does
              not unpack, and skopeo copy docker:// containers-storage: (vfs), which unpacks
              every layer into a store, as cocker's pull does)
    servers   cocker -a repo_server  against  the distribution registry (docker-registry),
              each driven by both clients

Both registries serve plain HTTP on 127.0.0.1 without authentication (what is measured is
the transfer, not TLS); each push goes to an empty registry storage and each pull into an
empty COCKER_HOME (nothing is skipped as already there).  Rounds alternate, medians of
--repeat rounds are reported.  skopeo or docker-registry missing: their part is skipped with
a note.  Everything made here is removed at the end.

    sudo /usr/bin/python3 bench/bench_registry.py [--repeat N] [--size-mb 200]

Runs under Python 3.6 and newer.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (BenchError, bench_home, image_bench_main, median,  # noqa: E402
                   python_version, leave_home, run_checked)
from bench_images import LAYERS, fill_tree, split_tree  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Registry(object):
    """One registry process (cocker's or the distribution's) on an empty storage."""

    def __init__(self, kind, bench):
        self.kind, self.port = kind, free_port()
        self.address = '127.0.0.1:%d' % self.port
        self.storage = os.path.join(bench.home, 'storage-%s-%d' % (kind, self.port))
        os.mkdir(self.storage)
        if kind == 'cocker':
            argv = [os.path.join(bench.home, 'bin', 'cocker'), '-a', 'repo_server', '--listen',
                    self.address, '--insecure', '--repo-dir', self.storage]
        else:
            config = os.path.join(self.storage, 'config.yml')
            with open(config, 'w') as f:
                f.write('version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n'
                        '    rootdirectory: %s/data\nhttp:\n  addr: %s\n'
                        % (self.storage, self.address))
            argv = ['docker-registry', 'serve', config]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=bench.env)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchError('the %s registry did not listen on %s' % (kind, self.address))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.storage, ignore_errors=True)


class RegistryBench(object):

    def __init__(self, python, repeat, size):
        self.python, self.repeat, self.size = python, repeat, size
        self.home = self.env = None
        self.times = {}
        self.skopeo = shutil.which('skopeo')
        self.distribution = shutil.which('docker-registry')
        self.registries = []

    def cocker(self, home, *args):
        env = dict(self.env, COCKER_HOME=home)
        return run_checked([os.path.join(self.home, 'bin', 'cocker')] + list(args), env,
                           'cocker ' + ' '.join(args))[0]

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-reg-', self.python, '/var/tmp')
        source = os.path.join(self.home, 'content')
        os.mkdir(source)
        self.bytes = fill_tree(source, self.size)
        trees = []
        for n in range(LAYERS):
            name = 'part%d' % n if n < LAYERS - 1 else 'stack'
            tree = os.path.join(self.home, 'images', name, '_', 'rlayer')
            os.makedirs(tree)
            split_tree(source, tree, n, LAYERS)
            trees.append(tree)
        with open(os.path.join(os.path.dirname(trees[-1]), 'base'), 'w') as f:
            f.write(','.join('part%d:_' % n for n in range(LAYERS - 1)))
        self.work = os.path.join(self.home, 'work')
        os.mkdir(self.work)
        os.chdir(self.work)
        self.cocker(self.home, '-a', 'export', '-m', 'stack', '--format', 'docker')
        self.archive = os.path.join(self.work, 'stack.docker.tar')
        sys.stderr.write('COCKER_HOME %s, image of %d MB in %d layers\n'
                         % (self.home, self.bytes >> 20, LAYERS))

    def servers(self):
        return ['cocker'] + (['distribution'] if self.distribution else [])

    def measure(self):
        for i in range(self.repeat + 1):            # round 0 warms the page cache
            for server in self.servers():
                for key, seconds in self.round(server, i):
                    if i > 0:
                        self.times.setdefault(key, []).append(seconds)

    def round(self, server, i):
        found = []
        registry = Registry(server, self)
        self.registries.append(registry)
        try:
            push = self.cocker(self.home, '-a', 'push', '-m', 'stack', '--repo',
                               registry.address + '/bench', '--insecure')
            found.append(('push  cocker -> %s' % server, push))
            pulled = os.path.join(self.home, 'pulled')
            os.mkdir(pulled)
            pull = self.cocker(pulled, '-a', 'pull', '-m', 'bench/stack', '--repo',
                               registry.address, '--insecure')
            shutil.rmtree(pulled)
            found.append(('pull  %s -> cocker' % server, pull))
            if self.skopeo:
                ref = 'docker://%s/skopeo/stack:1' % registry.address
                found.append(('push  skopeo -> %s' % server, run_checked(
                    [self.skopeo, 'copy', '-q', '--dest-tls-verify=false',
                     'docker-archive:' + self.archive, ref], self.env, 'skopeo copy')[0]))
                target = os.path.join(self.work, 'oci-%d' % i)
                found.append(('pull  %s -> skopeo' % server, run_checked(
                    [self.skopeo, 'copy', '-q', '--src-tls-verify=false', ref, 'oci:' + target],
                    self.env, 'skopeo copy')[0]))
                shutil.rmtree(target)
                found.append(('pull  %s -> skopeo, unpacked' % server, self.skopeo_unpacked(ref)))
        finally:
            registry.stop()
            self.registries.remove(registry)
        return found

    def skopeo_unpacked(self, ref):
        """skopeo copy into a containers-storage of its own (vfs: each layer unpacked, as
        cocker's store has it) -> seconds."""
        import tempfile
        root = os.path.join(self.work, 'cs')
        runroot = tempfile.mkdtemp(prefix='cbr.')           # short: podman's limit
        try:
            return run_checked([self.skopeo, 'copy', '-q', '--src-tls-verify=false', ref,
                                'containers-storage:[vfs@%s+%s]localhost/bench:1'
                                % (root, runroot)], self.env, 'skopeo copy')[0]
        finally:
            subprocess.call(['umount', '-R', os.path.join(root, 'vfs')], stderr=subprocess.DEVNULL)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(runroot, ignore_errors=True)

    def cleanup(self):
        for registry in list(self.registries):
            registry.stop()
        return leave_home(self.home)

    def report(self):
        ms = dict((k, median(v) * 1000.0) for k, v in self.times.items())
        lines = ['python %s (%s), %d repetitions, image of %d MB in %d layers, over loopback'
                 % (self.python, python_version(self.python), self.repeat, self.bytes >> 20,
                    LAYERS), '',
                 '%-40s %9s %9s %9s' % ('measure', 'median ms', 'min ms', 'max ms')]
        for key in sorted(self.times):
            v = self.times[key]
            lines.append('%-40s %9.0f %9.0f %9.0f' % (key, ms[key], min(v) * 1000,
                                                      max(v) * 1000))
        lines.append('')
        if not self.skopeo:
            lines.append('skopeo is not installed: the client comparison is skipped')
        if not self.distribution:
            lines.append('docker-registry is not installed: the server comparison is skipped')
        pairs = []
        for server in self.servers():
            pairs += [('push  cocker -> %s' % server, 'push  skopeo -> %s' % server, True),
                      ('pull  %s -> cocker' % server, 'pull  %s -> skopeo, unpacked' % server,
                       True),
                      ('pull  %s -> cocker' % server, 'pull  %s -> skopeo' % server, False)]
        for client in ('cocker', 'skopeo'):
            pairs += [('push  %s -> cocker' % client, 'push  %s -> distribution' % client, True),
                      ('pull  cocker -> %s' % client, 'pull  distribution -> %s' % client, True)]
        for mine, peer, target in pairs:
            if mine in ms and peer in ms:
                ratio = ms[mine] / ms[peer]
                lines.append('%-68s %5.2f  %s' % (
                    'ratio %s / %s' % (mine.replace('  ', ' '), peer.replace('  ', ' ')), ratio,
                    '(information: skopeo unpacks nothing)' if not target else
                    '(target <= 1.0%s)' % ('' if ratio <= 1.0 else ', MISSED')))
        print('\n'.join(lines))


def main(argv=None):
    return image_bench_main('bench_registry.py', 'cocker push/pull and repo_server against skopeo and the distribution registry (run as root).', RegistryBench, argv)


if __name__ == '__main__':
    sys.exit(main())
