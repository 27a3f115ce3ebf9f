"""Image archive benchmark: cocker -a export / -a import of a 200 MB image against
`tar czf` / `tar xzf` of the same tree, measured in the same run (target: within 1.2x).

The image is real content: files copied from this host's /usr (binaries, libraries, text)
until the size is reached, installed as images/big/_/rlayer of a temporary COCKER_HOME.
Rounds alternate tar and cocker, so a drift of the machine touches both alike; medians of
--repeat rounds are reported.  Everything made here is removed at the end.

    sudo /usr/bin/python3 bench/bench_images.py [--repeat N] [--size-mb 200]

Runs under Python 3.6 and newer.
"""

import argparse
import os
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (bench_home, median, on_sigterm, python_version,  # noqa: E402
                   remove_home, run_benchmark, run_checked)


def fill_tree(target, size):
    """Copy regular files of /usr into target until `size` bytes (links and devices skipped)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk('/usr'):
        dirnames.sort()
        for name in sorted(filenames):
            source = os.path.join(dirpath, name)
            if not os.path.isfile(source) or os.path.islink(source):
                continue
            dest = os.path.join(target, os.path.relpath(source, '/usr'))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                shutil.copy2(source, dest)
            except OSError:
                continue
            total += os.path.getsize(dest)
            if total >= size:
                return total
    return total


class ImageBench(object):

    def __init__(self, python, repeat, size):
        self.python, self.repeat, self.size = python, repeat, size
        self.home = self.env = None
        self.times = {}

    def cocker(self, *args):
        argv = [os.path.join(self.home, 'bin', 'cocker')] + list(args)
        return run_checked(argv, self.env, 'cocker ' + ' '.join(args))[0]

    def shell(self, argv, what):
        return run_checked(argv, self.env, what)[0]

    def setup(self):
        self.home, self.env = bench_home('cocker-bench-img-', self.python, '/var/tmp')
        self.rlayer = os.path.join(self.home, 'images', 'big', '_', 'rlayer')
        os.makedirs(self.rlayer)
        self.bytes = fill_tree(self.rlayer, self.size)
        self.files = sum(len(f) for _, _, f in os.walk(self.rlayer))
        self.work = os.path.join(self.home, 'work')
        os.mkdir(self.work)
        os.chdir(self.work)
        sys.stderr.write('COCKER_HOME %s, image of %d MB\n' % (self.home, self.bytes >> 20))

    def measure(self):
        archive = os.path.join(self.work, 'big.cockerimage')
        tarball = os.path.join(self.work, 'big.tar.gz')
        unpacked = os.path.join(self.work, 'unpacked')
        for i in range(self.repeat + 1):            # round 0 warms the page cache
            record = i > 0
            t = self.shell(['tar', 'czf', tarball, '-C', self.rlayer, '.'], 'tar czf')
            e = self.cocker('-a', 'export', '-m', 'big')        # into the cwd: self.work
            os.mkdir(unpacked)
            x = self.shell(['tar', 'xzf', tarball, '-C', unpacked], 'tar xzf')
            shutil.rmtree(unpacked)
            m = self.cocker('-a', 'import', '--image-file', archive, '-m', 'copy:%d' % i)
            self.cocker('-a', 'del_image', '-m', 'copy:%d' % i)
            if record:
                for key, seconds in (('tar czf', t), ('export', e), ('tar xzf', x),
                                     ('import', m)):
                    self.times.setdefault(key, []).append(seconds)
        self.sizes = (os.path.getsize(tarball), os.path.getsize(archive))

    def cleanup(self):
        os.chdir('/')
        if self.home and os.path.isdir(self.home):
            return remove_home(self.home)
        return []

    def report(self):
        ms = dict((k, median(v) * 1000.0) for k, v in self.times.items())
        lines = ['python %s (%s), %d repetitions, image of %d MB (%d files of /usr)' % (
            self.python, python_version(self.python), self.repeat, self.bytes >> 20,
            self.files), '',
            '%-36s %9s %9s %9s' % ('measure', 'median ms', 'min ms', 'max ms')]
        for key in ('tar czf', 'export', 'tar xzf', 'import'):
            v = self.times[key]
            lines.append('%-36s %9.0f %9.0f %9.0f' % (
                key if key.startswith('tar') else 'cocker -a ' + key, ms[key],
                min(v) * 1000, max(v) * 1000))
        lines += ['', 'archive sizes: tar czf %d MB, .cockerimage %d MB' % (
            self.sizes[0] >> 20, self.sizes[1] >> 20)]
        for mine, floor in (('export', 'tar czf'), ('import', 'tar xzf')):
            ratio = ms[mine] / ms[floor]
            lines.append('%-36s %6.2f  (target <= 1.2%s)' % (
                'ratio %s / %s' % (mine, floor), ratio, '' if ratio <= 1.2 else ', MISSED'))
        print('\n'.join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description='cocker export/import against tar czf/xzf '
                                     '(run as root).')
    parser.add_argument('--repeat', type=int, default=3, metavar='N')
    parser.add_argument('--size-mb', type=int, default=200, metavar='MB')
    parser.add_argument('--python', metavar='PATH')
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb < 1:
        parser.error('--repeat and --size-mb must be at least 1')
    if os.geteuid() != 0:
        sys.stderr.write('bench_images.py: cocker needs root\n')
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    return run_benchmark('bench_images.py', lambda python: ImageBench(
        python, args.repeat, args.size_mb << 20), args.python)


if __name__ == '__main__':
    sys.exit(main())
