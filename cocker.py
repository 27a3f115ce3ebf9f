#!/bin/sh
# Run as a program, sh executes the next line: Python loads this file's compiled form kept
# in __pycache__ (compiling all of it at every start would cost more than Python's own
# start-up; see the chapter Loading), isolated and without site packages (-I -S: no module
# planted in the caller's directory or named by PYTHON* variables is ever loaded by root,
# and the site scan's 5 ms are saved), the cyclic garbage collector off until main() (what
# loading makes is never garbage).  Read by Python, the line is only a string.
"exec" "${COCKER_PYTHON:-python3}" "-I" "-S" "-c" "import sys,os,marshal as M,gc;gc.disable();p=sys.argv[1];t=os.stat(p);c=os.path.join(os.path.dirname(p),'__pycache__','cocker.'+sys.implementation.cache_tag+'.chapters');f=os.path.exists(c) and open(c,'rb');x=f and M.load(f);m=sys.modules['cocker']=type(sys)('cocker');m.__file__=p;g=m.__dict__;x and x[0]==[t.st_mtime_ns,t.st_size,sys.version] and f.tell()+x[1]+x[2]==os.fstat(f.fileno()).st_size and [g.update(LAZY=(f,M.load(f))),exec(M.loads(f.read(x[1])),g)] or exec(compile(open(p,'rb').read().split(b'\n# ---- end of loading ----\n')[0],p,'exec'),g) or m.load_cocker(p);del x,f;m.exit_quickly(m.main(sys.argv[2:]))" "$0" "$@"
"""cocker: a container engine for Linux servers that manages containers like virtual hosts.

A successor of the C cocker, written for the Python standard library only (3.6 and newer),
run as root. One command per invocation:

    cocker -a ACTION [options]      create, boot, attach, run, shutdown, kill, destroy, ...
    cocker -s WHAT [options]        images, containers, container_root

Every container has a real PID 1, cockerinit.py, run by the host's interpreter; cocker
reaches it through a Unix socket next to the container's directory (attach and run), so no
sshd is needed inside.  Images are overlayfs layers kept in many versions side by side under
COCKER_HOME (default /var/cocker), in the layout of the C cocker.

Chapters (grep -n '^# ===' cocker.py), each using only those before it (but Loading, run
first, which calls debug and CockerError once everything is defined):
    Loading, Constants and paths, Errors and messages, libc bindings, Small utilities
    (state files, locks, the command runner, Rollback and best_effort), Image store (with
    the staging of everything new), Container store, Mounts and the container root,
    Network, Cgroups, Boot sequence (HOST_STEPS beside their undo, the monitor,
    PID1_STEPS), Container lifecycle (make, remove, start, stop), Talking to cockerinit,
    Image archives, Image repository over ssh, Files in containers, Test image, Actions
    (one short function per -a word), Listings (-s), Command line, main.
"""

VERSION = '1.0.0'
BUILD = 'Nov 28 2026'

import errno
import fcntl
import os
import stat
import struct
import sys
import time
from _signal import SIGCHLD, SIGKILL, SIGPIPE, SIGTERM, SIGXFSZ  # not signal.py (its enum)

# Heavier modules (ctypes, subprocess, socket, select, termios, shutil, hashlib) are
# imported inside the functions that need them: every command pays Python start-up, and
# `cocker -v` or a listing should not pay for namespaces and sockets it never touches.


# =============================================================================
# Loading
# =============================================================================
# Run as a program, cocker loads from __pycache__/cocker.TAG.chapters beside the file,
# made again whenever the file changes (the sh header reads it; it compiles only this
# chapter to make it).  Only the chapters every command runs are read at the start; the
# others are kept apart there and unmarshalled on their first use: the cold ones (images
# in and out, registries, files in containers, the test image: 300 KB of bytecode that a
# boot would read for nothing) as one, and each warm one (the image store, mounts,
# network, cgroups, the boot, the lifecycle, the socket to cockerinit, the listings) on
# its own, so that a run, a listing or -v reads none of the boot's code.  Until then a
# function or class of theirs that the rest calls is a stub that loads its chapter (and
# first those whose constants or classes that chapter uses).  A monitor loads every warm
# chapter when it starts: its PID 1s and the monitors it forks have them all; a file helper
# loads every chapter before it forks (in a container, a path may lead to its files).
# Imported as a module (the tests, python3 cocker.py), the file is one module as any other.
#
# The cache, each part marshalled: an index ([the file's mtime, size and the Python
# version, the length of the hot code, of the rest]), the layout (per unit a dict: its
# offset among the units 'at', its 'size', whether it is 'warm', the units it 'needs'
# first, the 'names' stubs stand for, its 'chapters'), the hot code, then each unit's
# code.  A unit's code comes from the cache the hot code came from, read by the descriptor
# the header opened (a command that makes the cache again meanwhile changes nothing for
# us), or from memory, where the hot code was just compiled: never from a path after the
# start.  A process that let go of it (a monitor, a file helper: they load what they run
# before they close the descriptors they were not given) loads no more.

COLD_CHAPTERS = ('Image archives', 'OCI and Docker archives', 'Image repository over ssh',
                 'Image registry: the server', 'Image registry: the client',
                 'Files in containers', 'Test image')
WARM_CHAPTERS = ('Image store', 'Mounts and the container root', 'Network', 'Cgroups',
                 'Boot sequence', 'Container lifecycle', 'Talking to cockerinit', 'Listings')


def load_cocker(path):
    """The module 'cocker' (made by the sh header) from the file at path, the cache made;
    where it cannot be (a read-only copy), the whole file compiled, not split (a tenth of
    the time), at each start."""
    import marshal
    module = sys.modules['cocker']
    st = os.stat(path)
    cache = os.path.join(os.path.dirname(path), '__pycache__',
                         'cocker.%s.chapters' % sys.implementation.cache_tag)
    temporary = '%s.%d' % (cache, os.getpid())
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        f = open(temporary, 'wb')
    except OSError:
        with open(path, 'rb') as source:
            exec(compile(source.read(), path, 'exec', dont_inherit=True), module.__dict__)
        return module
    hot, units = compile_chapters(path)
    codes = [unit.pop('code') for unit in units]
    parts = [marshal.dumps(code) for code in codes]
    offset = 0
    for part, unit in zip(parts, units):
        unit.update(at=offset, size=len(part))
        offset += len(part)
    hot_part, layout_part = marshal.dumps(hot), marshal.dumps(units)
    index = [[st.st_mtime_ns, st.st_size, sys.version], len(hot_part),
             len(layout_part) + offset]
    try:
        with f:
            f.write(marshal.dumps(index) + layout_part + hot_part + b''.join(parts))
            os.fsync(f.fileno())        # (a power cut must not leave it empty)
        os.replace(temporary, cache)
    except OSError:                     # (a full disk: made again by the next command)
        try:
            os.unlink(temporary)        # (only this chapter is defined yet: no remove_file)
        except OSError:
            pass
    module.LAZY = (codes, units)
    exec(hot, module.__dict__)
    return module


def set_up_stubs(source, units):
    """Where the units load from, and a stub for each name of theirs that the rest uses
    (before the rest is defined).  source: their code (a list), or the cache, open, where
    its units begin (the header has just read the hot code)."""
    import _thread
    namespace = globals()
    namespace['LAZY_UNITS'], namespace['LOADED_UNITS'] = units, set()
    namespace['LOADING'] = _thread.RLock()      # (threads: one loads, the others wait)
    namespace['UNIT_CODE'] = source if isinstance(source, list) else None
    # (a descriptor of ours, above 2 should the command have started without its streams)
    namespace['CACHE'] = None if isinstance(source, list) else (
        fcntl.fcntl(source.fileno(), fcntl.F_DUPFD_CLOEXEC, 3), source.tell())
    for unit, entry in enumerate(units):
        for name in entry['names']:
            namespace[name] = stub_for(namespace, name, unit)


def stub_for(namespace, name, unit):
    """What stands for the function or class `name` until its unit loads."""
    def stub(*args, **kwargs):
        load_chapter(namespace, unit)
        if namespace[name] is stub:
            raise RuntimeError('%s is not defined by its chapter' % name)
        return namespace[name](*args, **kwargs)
    stub.__name__ = name
    return stub


def load_chapter(namespace, unit):
    """Define a unit's names beside the others, once (the units it needs first); counted
    as loaded only once all are (an interrupted load is done again)."""
    entry = namespace['LAZY_UNITS'][unit]
    with namespace['LOADING']:
        if unit in namespace['LOADED_UNITS']:
            return
        for other in entry['needs']:
            load_chapter(namespace, other)
        import gc
        collecting = gc.isenabled()
        gc.disable()    # (what it makes all lives on: a collection would scan it for nothing)
        try:
            exec(unit_code(namespace, unit), namespace)
        finally:
            if collecting:
                gc.enable()
        namespace['LOADED_UNITS'].add(unit)
    debug('loaded the chapter %s', ', '.join(entry['chapters']))


def unit_code(namespace, unit):
    """A unit's code, from memory or by the cache's descriptor."""
    import marshal
    entry, cache = namespace['LAZY_UNITS'][unit], namespace['CACHE']
    if namespace['UNIT_CODE'] is not None:
        return namespace['UNIT_CODE'][unit]
    try:
        data = cache and os.pread(cache[0], entry['size'], cache[1] + entry['at'])
        if data and len(data) == entry['size']:
            return marshal.loads(data)
    except (OSError, ValueError, EOFError):
        pass
    raise CockerError('the chapter %s of cocker is not loaded in this process (pid %d)'
                      % (', '.join(entry['chapters']), os.getpid()))


def load_every_chapter(warm_only=False):
    """Every unit (warm_only: those a monitor and PID 1 run) loaded now."""
    for unit, entry in enumerate(globals().get('LAZY_UNITS') or ()):
        if entry['warm'] or not warm_only:
            load_chapter(globals(), unit)


def load_warm_chapters():
    """A monitor: the chapters it and its PID 1s run loaded now; the code of the others, if
    held in memory, let go (it never needs them)."""
    load_every_chapter(warm_only=True)
    globals()['UNIT_CODE'] = None


def let_go_of_the_cache():
    """The cache's descriptor closed, before a process closes every descriptor it was not
    given (a monitor, a helper)."""
    cache = globals().get('CACHE')
    if cache is not None:
        globals()['CACHE'] = None
        os.close(cache[0])


def compile_chapters(path):
    """[hot code, units]: each unit [code, warm, the units it needs first, the names stubs
    stand for, its chapters], every code compiled from the whole file with the other lines
    left blank (tracebacks give the file's own line numbers).  The cold chapters are one
    unit, each warm chapter one; a chapter whose constants or classes the hot code uses
    otherwise than by a call (a stub cannot stand for them), which does more than define
    names, or which defines a name defined elsewhere too, is hot; units that need each
    other are one."""
    import ast
    with open(path, 'rb') as f:
        lines = f.read().decode('utf-8').split('\n')
    titles, title = [], ''
    for i, line in enumerate(lines):
        if line.startswith('# ====') and lines[i + 2:i + 3] and \
                lines[i + 2].startswith('# ====') and not lines[i + 1].startswith('# ===='):
            title = lines[i + 1][2:].strip()
        titles.append(title)
    units = [[t for t in COLD_CHAPTERS if t in titles]] + \
        [[t] for t in WARM_CHAPTERS if t in titles]
    units = [u for u in units if u]
    while True:
        parts = [set(u) for u in units]
        parts.append(set(titles) - set().union(*parts))     # (the hot code, last)
        sources = ['\n'.join(line if t in part else '' for t, line in zip(titles, lines))
                   for part in parts]
        plan = plan_units(path, sources, ast)
        if not isinstance(plan, list):
            units = merge_units(units, plan)
            if not units:
                break
            continue
        return [compile(sources[-1], path, 'exec', dont_inherit=True), [
            {'code': compile(sources[k], path, 'exec', dont_inherit=True),
             'warm': any(t in WARM_CHAPTERS for t in units[k]), 'needs': needs,
             'names': names, 'chapters': units[k]} for k, (needs, names) in enumerate(plan)]]
    return [compile('\n'.join(lines), path, 'exec', dont_inherit=True), []]


def plan_units(path, sources, ast):
    """For the units' sources (the hot code's last): per unit (the units it needs first,
    the names the others call), or the units to merge: (k,) into the hot code, (k, j)
    into one."""
    import symtable
    trees = [ast.parse(source, path) for source in sources]
    tables = [symtable.symtable(source, path, 'exec') for source in sources]
    hot = len(sources) - 1
    bound = [module_names(tree, ast) for tree in trees]
    for k, (names, pure) in enumerate(bound[:-1]):
        if not pure or any(names & bound[j][0] for j in range(len(trees)) if j != k):
            return (k,)     # (it does more than define names, or one is defined elsewhere)
    plan = [([], set()) for _ in trees[:-1]]
    looked_up = [global_references(table) for table in tables]
    as_values = [names_not_called(tree, ast) for tree in trees]
    for k, tree in enumerate(trees[:-1]):
        names = bound[k][0]
        defined = dict((node.name, isinstance(node, ast.ClassDef)) for node in tree.body
                       if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
        for j in range(len(trees)):
            if j == k:
                continue
            used = looked_up[j] & names
            values = [n for n in used if n not in defined or defined[n] and n in as_values[j]]
            if values and j == hot:
                return (k,)             # (no stub can stand for a constant or a class there)
            if values:
                if j in needed_by(plan, k):
                    return (k, j)       # (each needs the other)
                plan[j][0].append(k)
            plan[k][1].update(n for n in used if n in defined)
    return [(sorted(set(needs)), sorted(names)) for needs, names in plan]


def module_names(tree, ast):
    """(the names a unit's module-level code binds, whether it does nothing else: defs,
    classes, imports, assignments to names, its docstring)."""
    names, pure = set(), True
    docstring = ast.Constant if sys.version_info >= (3, 8) else ast.Str     # (3.6, 3.7)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        names.update(n.id for n in ast.walk(node)
                     if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split('.')[0] for a in node.names)
        elif not (isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) or isinstance(t, ast.Tuple) and
                all(isinstance(e, ast.Name) for e in t.elts) for t in node.targets) or
                isinstance(node, ast.Expr) and isinstance(node.value, docstring)):
            pure = False
    return names, pure


def names_not_called(tree, ast):
    """The names a tree uses otherwise than as the function of a call."""
    calls = set(id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call))
    return set(node.id for node in ast.walk(tree)
               if isinstance(node, ast.Name) and id(node) not in calls)


def needed_by(plan, unit):
    """unit and the units it needs, directly or not (plan's needs so far)."""
    seen, todo = set(), [unit]
    while todo:
        other = todo.pop()
        if other not in seen:
            seen.add(other)
            todo.extend(plan[other][0])
    return seen


def merge_units(units, merge):
    """units after plan_units' answer: (k,) put into the hot code, (k, j) made one."""
    if len(merge) == 1:
        return [u for i, u in enumerate(units) if i != merge[0]]
    k, j = merge
    return [u for i, u in enumerate(units) if i not in (k, j)] + [units[k] + units[j]]


def global_references(table):
    """The names a symbol table (and every table in it) looks up as globals."""
    names = set(symbol.get_name() for symbol in table.get_symbols() if symbol.is_referenced()
                and (table.get_type() == 'module' or symbol.is_global()))
    for child in table.get_children():
        names |= global_references(child)
    return names


try:
    __file__ = os.path.abspath(__file__)    # (the header's is $0: a monitor works from /)
except (NameError, OSError):                # (compiled from no file, or no working directory)
    pass
if 'LAZY' in globals():     # (set by the sh header, or load_cocker, before this code runs: the
    set_up_stubs(*LAZY)     # hot code may hold a stub from its start, as SHOWS does)
    del LAZY

# ---- end of loading ----


# =============================================================================
# Constants and paths
# =============================================================================
# Exit statuses of the C cocker (runbooks test them), the store layout, and the tables that
# describe the container's /dev.

EXIT_OK = 0
EXIT_ENV = 1
EXIT_USAGE = 7
EXIT_FAILED = 255

DEFAULT_HOME = '/var/cocker'
HOME = None                     #: COCKER_HOME, set once by main() (tests may set it directly)

NAME_MAX = 64                   #: longest image, version or container name
#: characters of names: ASCII only, so a name is the same bytes under every locale and
#: never carries a path separator, a list separator (',' ':'), a quote or a control code
NAME_CHARS = ('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'
              '_.-=+@%')
NO_VERSION = '_'                #: directory name of an image without a version
NETS = ('HOST', 'CUSTOM', 'BRIDGE')
SECCOMP_MODES = ('default', 'unconfined')       #: --seccomp: the filter, or none
EXPORT_FORMATS = ('cockerimage', 'docker', 'oci')  #: export --format
BRIDGE_NAME = 'cocker0'

BOOT_TIMEOUT = 60               #: seconds boot waits for cockerinit to report ready
SIBLING_TIMEOUT = 1.0           #: seconds a boot waits for a running monitor to fork its own
STOP_TIMEOUT = 10               #: seconds shutdown waits before it kills
INIT_OOM_SCORE_ADJ = -999       #: PID 1 is the last the OOM killer picks in its container
READY = b'READY'                #: what cockerinit writes on the ready channel once it serves
GO = b'G'                       #: what it waits for there before the container's first process
LOG_ROTATE_BYTES = 8 << 20      #: cocker.log and cockerinit.log are rotated beyond this

#: the container's /dev: (name, major, minor, mode); everything else is a fresh tmpfs
DEVICES = [
    ('null', 1, 3, 0o666),
    ('zero', 1, 5, 0o666),
    ('full', 1, 7, 0o666),
    ('random', 1, 8, 0o666),
    ('urandom', 1, 9, 0o666),
    ('tty', 5, 0, 0o666),
]
#: device cgroup allow list: (type, major, minor or None for all) of what the container
#: may open: the nodes above, /dev/ptmx (its devpts's) and the ptys (pts/*, console)
ALLOWED_DEVICES = [('c', major, minor) for _, major, minor, _ in DEVICES] + [
    ('c', 5, 2), ('c', 136, None)]

#: /proc entries bound read-only onto themselves in every container
PROC_READONLY = ('sys', 'sysrq-trigger', 'irq', 'bus', 'fs')
#: what Docker and Podman hide: files behind /dev/null, directories behind an empty
#: read-only tmpfs (key, timer and interrupt state of the host, firmware, sensors)
PROC_MASKED_FILES = ('interrupts', 'kcore', 'keys', 'latency_stats', 'sched_debug',
                     'timer_list', 'timer_stats')
PROC_MASKED_DIRS = ('acpi', 'asound', 'scsi')
SYS_MASKED_DIRS = ('firmware', 'fs/selinux', 'devices/virtual/powercap',
                   'devices/system/cpu/cpu*/thermal_throttle')
DEFAULT_PIDS_LIMIT = 4096       #: without --pids-limit: a fork bomb stays in its container
#: (option attribute, cp/KEY it is recorded in) of each limit (see Cgroups); the C cocker
#: stored none of them
LIMITS = (('cpus', 'cpus'), ('cpu_quota', 'cpu_quota'), ('mem_limit', 'mem_limit'),
          ('pids_limit', 'pids_limit'))
RPLFILE_MAX = 64 << 20          #: the largest template rplfile reads

#: (link, target) symlinks in the container's /dev
DEV_LINKS = [
    ('ptmx', 'pts/ptmx'),
    ('fd', '/proc/self/fd'),
    ('stdin', '/proc/self/fd/0'),
    ('stdout', '/proc/self/fd/1'),
    ('stderr', '/proc/self/fd/2'),
]


def file_identity(path):
    """Which file path is, as it is now: a monitor forks another only for a command that
    loaded the same cocker.py and cockerinit.py (an upgrade meanwhile: their own fork)."""
    st = os.stat(path)
    return '%s:%d:%d:%d:%d' % (os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns,
                               st.st_size)


#: this code, as loaded (taken at once, before a replaced file could differ from it)
try:
    LOADED_FROM = file_identity(__file__)
except NameError:                       # (compiled from no file: no monitor forks for it)
    LOADED_FROM = ''


STAGING = '.staging'            #: STORE/.staging: what is built or removed (see Image store)


def images_dir():
    return os.path.join(HOME, 'images')


def image_dir(name, version):
    return os.path.join(HOME, 'images', name, version)


def containers_dir():
    return os.path.join(HOME, 'containers')


def layers_dir():
    return os.path.join(HOME, 'layers')


def one_shot_dir():
    return os.path.join(HOME, 'oneshot')


def container_dir(name):
    return os.path.join(HOME, 'containers', name)


def locks_dir():
    return os.path.join(HOME, 'locks')


LOG_FILE = None                         #: another path to cocker.log (PID 1's, see leave_home)


def log_path():
    return LOG_FILE or os.path.join(HOME, 'cocker.log')


# =============================================================================
# Errors and messages
# =============================================================================
# One error type; main() is the only place that prints it.  say() is the user's stdout,
# debug() the -d trace on stderr, log() the record in COCKER_HOME/cocker.log.

DEBUG = False
#: when this command started (-d prints each step's time since then: where a boot spends it)
STARTED = time.time()


class CockerError(Exception):
    """A failure the user should see as one line, ending cocker with `status`."""

    def __init__(self, message, status=EXIT_FAILED):
        Exception.__init__(self, message)
        self.message = message
        self.status = status


class Interrupted(CockerError):
    """A file action that shutdown, kill or destroy stopped (SIGTERM)."""


def usage_error(message):
    return CockerError(message, EXIT_USAGE)


class ReaderGone(Exception):
    """Whoever reads our standard output closed it (cocker -s containers | head)."""


def say(text=''):
    try:
        sys.stdout.write(printable(text, keep='\n') + '\n')
        sys.stdout.flush()
    except BrokenPipeError:
        raise ReaderGone()


def ok():
    """What an action that succeeded prints (runbooks wait for it)."""
    say('OK')
    return EXIT_OK


def debug(fmt, *args):
    """Trace one step on stderr under -d, and in the log."""
    if DEBUG:
        text = fmt % args if args else fmt
        sys.stderr.write('cocker: %6.1f ms %s\n' % ((time.time() - STARTED) * 1000,
                                                     printable(text)))
        sys.stderr.flush()
        log('DEBUG', text, depth=2)


def log(level, text, depth=1):
    """Append one record to cocker.log in the C cocker's format; never fails the command."""
    if HOME is None and LOG_FILE is None:
        return
    try:
        frame = sys._getframe(depth)
        now = time.time()
        record = '%s.%06d | %-5s | %d:cocker.py:%d | %s\n' % (
            time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now)), int(now % 1 * 1e6),
            level, os.getpid(), frame.f_lineno, printable(text.rstrip('\n')))
        append_log(log_path(), record.encode('utf-8', 'replace'),
                   float('inf') if LOG_FILE else LOG_ROTATE_BYTES)
    except (OSError, ValueError):
        pass


def append_log(path, data, limit=LOG_ROTATE_BYTES, keep=1):
    """Append to a log file; one that would grow past limit first becomes PATH.1 (PATH.1
    becoming PATH.2, up to keep of them; older ones go).  Writers that rotate at once take
    turns (a flock on the file), so no record is lost."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        if os.fstat(fd).st_size and os.fstat(fd).st_size + len(data) > limit:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                ours = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                ours = False                # rotated meanwhile: the new file takes it
            if ours:
                rotate_log(path, keep)
            os.close(fd)
            fd = os.open(path, flags, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def rotate_log(path, keep):
    """PATH.N-1 -> PATH.N ... PATH -> PATH.1; what is beyond keep (a count lowered) goes."""
    n = keep + 1
    while os.path.exists('%s.%d' % (path, n)):
        os.unlink('%s.%d' % (path, n))
        n += 1
    for n in range(keep, 1, -1):
        if os.path.exists('%s.%d' % (path, n - 1)):
            os.rename('%s.%d' % (path, n - 1), '%s.%d' % (path, n))
    os.rename(path, path + '.1')


def error_text(e):
    """One line for any exception: ours, an OSError, or something unexpected."""
    if isinstance(e, CockerError):
        return e.message
    if isinstance(e, OSError):
        return describe_oserror(e)
    return '%s: %s' % (type(e).__name__, e)


def describe_oserror(e):
    """'mount /x: Device or resource busy' from an OSError raised anywhere."""
    where = str(e.filename) if e.filename is not None else ''
    return '%s%s' % (where + ': ' if where else '', e.strerror or e)


# =============================================================================
# libc bindings
# =============================================================================
# ctypes is loaded on first use.  Each wrapper is named after its system call and raises
# OSError(errno, strerror, path) so that a message names the call's object.

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME, MS_NODIRATIME = 1024, 2048
#: flags a bind remount must repeat (statvfs's ST_* bits are the same numbers)
MS_KEPT_BY_REMOUNT = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20

MNT_DETACH = 2

CLD_STOPPED = 5                 #: waitid's si_code of a stopped child (os has it from 3.9)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15

TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431

_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        _libc = lib                     # (set up before another thread may use it)
    return _libc


def _check(result, what, path=None):
    if result == -1:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, '%s: %s' % (what, os.strerror(err)), path)
    return result


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype=None, flags=0, data=None):
    _check(libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data)), 'mount', target)


def umount2(target, flags=0):
    _check(libc().umount2(_b(target), flags), 'umount', target)


def unshare(flags):
    _check(libc().unshare(flags), 'unshare')


def setns(fd, nstype):
    _check(libc().setns(fd, nstype), 'setns')


def sethostname(name):
    data = name.encode('utf-8')
    _check(libc().sethostname(data, len(data)), 'sethostname')


SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429        #: (every architecture, Linux 5.2)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40


def open_tree(path, recursive=False):
    """A detached copy of the mount at path (and, recursive, of those below it), as a bind
    mount would make, that no namespace holds yet -> its descriptor (close-on-exec)."""
    import ctypes
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(libc().syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD),
                                 _b(path), ctypes.c_uint(flags)), 'open_tree', path)


def move_mount(tree, target):
    """Attach the detached tree (open_tree's descriptor) onto the directory that the
    descriptor target names."""
    import ctypes
    _check(libc().syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(tree), b'',
                          ctypes.c_int(target), b'',
                          ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)),
           'move_mount')


SYS_BPF = {'x86_64': 321, 'aarch64': 280, 'ppc64le': 361, 's390x': 351, 'riscv64': 280}


def bpf(command, attr):
    """The bpf system call with `attr` (bytes of union bpf_attr); returns its result."""
    import ctypes
    number = SYS_BPF.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, 'bpf: not known on %s' % os.uname().machine)
    buf = ctypes.create_string_buffer(attr, len(attr))
    return _check(libc().syscall(ctypes.c_long(number), ctypes.c_int(command), buf,
                                 ctypes.c_uint(len(attr))), 'bpf')


SYS_IOPRIO_GET = {'x86_64': 252, 'aarch64': 31, 'riscv64': 31, 'ppc64le': 274, 's390x': 283,
                  'i686': 290}
IOPRIO_WHO_PROCESS = 1


def ioprio_get(pid):
    """The I/O scheduling class and level of process pid (ionice), as one number; None
    where it cannot be told."""
    import ctypes
    number = SYS_IOPRIO_GET.get(os.uname().machine)
    if number is None:
        return None
    value = libc().syscall(ctypes.c_long(number), ctypes.c_int(IOPRIO_WHO_PROCESS),
                           ctypes.c_int(pid))
    return None if value < 0 else value


SYS_CLONE3 = 435                        #: (every architecture)
CLONE_PARENT = 0x00008000
CLONE_INTO_CGROUP = 1 << 33
CLONE_ARGS = '=11Q'                     #: struct clone_args up to .cgroup (Linux 5.7)


def clone3(flags, cgroup_fd=None):
    """fork() as clone3 does it: the child is born with `flags` (CLONE_NEWPID: in a new pid
    namespace; CLONE_PARENT: a child of our parent) and, given cgroup_fd, in that cgroup2
    directory, so no migration (and its RCU grace period) is needed -> the pid, 0 in the
    child; None where it cannot be done: a Python before 3.7 (no fork hooks to call), a
    kernel before 5.3 (5.7 for a cgroup), a glibc before 2.25, a seccomp filter that
    refuses it, or more than one thread.  Python's fork hooks run around the system call
    as they run around os.fork, and it holds the GIL as os.fork's does."""
    if glibc_caches_pid():
        return None
    import ctypes
    api = ctypes.pythonapi
    if not hasattr(api, 'PyOS_BeforeFork') or len(os.listdir('/proc/self/task')) > 1:
        return None                     # (glibc's fork takes malloc's locks: clone3 cannot)
    if cgroup_fd is not None:
        flags |= CLONE_INTO_CGROUP
    # (a child of our parent ends with the signal we would end with: clone3 wants 0 here)
    exit_signal = 0 if flags & CLONE_PARENT else SIGCHLD
    args = struct.pack(CLONE_ARGS, flags, 0, 0, 0, exit_signal, 0, 0, 0, 0, 0,
                       0 if cgroup_fd is None else cgroup_fd)
    buf = ctypes.create_string_buffer(args, len(args))
    api.PyOS_BeforeFork()
    pid = ctypes.PyDLL(None, use_errno=True).syscall(ctypes.c_long(SYS_CLONE3), buf,
                                                    ctypes.c_size_t(len(args)))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        debug('clone3: %s; forking instead', os.strerror(err))
        return None
    return pid


def glibc_caches_pid():
    """glibc before 2.25 keeps the pid it read once, which the child of a raw clone3 would
    not see change: its getpid() would answer its parent's pid."""
    try:
        words = (os.confstr('CS_GNU_LIBC_VERSION') or '').split()
        return words[0] == 'glibc' and tuple(map(int, words[1].split('.')[:2])) < (2, 25)
    except (ValueError, OSError, IndexError):
        return False                    # (not glibc: musl caches nothing)


def prctl(option, arg2=0):
    """prctl with an integer or a bytes (pointer) second argument."""
    import ctypes
    arg = ctypes.c_char_p(arg2) if isinstance(arg2, bytes) else ctypes.c_ulong(arg2)
    zero = ctypes.c_ulong(0)
    _check(libc().prctl(option, arg, zero, zero, zero), 'prctl')


# =============================================================================
# Small utilities
# =============================================================================
# State files, locks, names, external commands.

def read_small(path, default=None):
    """Read a one-value state file (or a kernel's: 64 KiB at most); C cocker files have no
    newline, ours may.  By descriptor, without a file object: half the time, and a listing
    of a thousand containers reads five thousand of these."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return default
    try:                                # (a /proc or /sys file may come in pieces)
        data = read_exactly(lambda n: os.read(fd, n), 65536)
    finally:
        os.close(fd)
    return data.decode('utf-8', 'replace').rstrip('\r\n')


def read_whole(path):
    """A file of any size (a kernel's table), by descriptor, in large pieces."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return b''.join(iter(lambda: os.read(fd, 1 << 18), b''))
    finally:
        os.close(fd)


def read_exactly(read, n):
    """n bytes of read(n), fewer only at the end (a socket may hand over less at a time)."""
    parts, got = [], 0
    while got < n:
        part = read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b''.join(parts)


def write_small(path, text, durable=True):
    """Write a state file atomically: a crash leaves the old value or the new, never half
    (durable: a power cut too).  The temporary file is new (O_EXCL, a name no one can
    guess), so a link planted beside a user's file (the export's .sha256) is never written
    through."""
    tmp = '%s.tmp%d.%s' % (path, os.getpid(), os.urandom(4).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, text.encode('utf-8'))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


#: path -> descriptor of each lock this process holds (a boot hands its container's over)
HELD_LOCKS = {}


class locked(object):
    """Hold an exclusive flock on HOME/locks/KIND=NAME: commands on one object never
    interleave (shared=True: many holders at once, none while someone holds it exclusively)."""

    def __init__(self, kind, name, wait=True, shared=False):
        self.path = os.path.join(locks_dir(), '%s=%s' % (kind, name))
        self.wait = wait
        self.mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        self.fd = None

    def __enter__(self):
        os.makedirs(locks_dir(), 0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, self.mode | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return None
        HELD_LOCKS[self.path] = self.fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            HELD_LOCKS.pop(self.path, None)
            os.close(self.fd)
            self.fd = None

    close = __exit__


def held_lock(kind, name):
    """The descriptor of that lock if this process holds it, else None.  A copy of it (a
    fork's, or one sent over a socket) holds the same lock: flock locks belong to the open
    file, not to the process."""
    return HELD_LOCKS.get(os.path.join(locks_dir(), '%s=%s' % (kind, name)))


class locked_images(object):
    """The locks of several images, taken in name order (no deadlock between commands);
    shared: many boots at once, but no delete, rename or replace meanwhile."""

    def __init__(self, *names, **kw):
        self.locks = [locked('image', n, shared=kw.get('shared', False))
                      for n in sorted(set(names))]

    def __enter__(self):
        for lock in self.locks:
            lock.__enter__()
        return self

    def __exit__(self, *exc):
        for lock in reversed(self.locks):
            lock.__exit__(*exc)


def split_list(text):
    return [item for item in text.split(',') if item]


def is_decimal(text):
    return bool(text) and all(ch in '0123456789' for ch in text)


def check_name(kind, name):
    """Refuse names that could escape their directory or break a listing or a command line."""
    if not name:
        raise usage_error('%s name is empty' % kind)
    if len(name) > NAME_MAX:
        raise usage_error("%s name '%s...' is longer than %d characters"
                          % (kind, name[:20].encode('unicode_escape').decode('ascii'), NAME_MAX))
    bad = [ch for ch in name if ch not in NAME_CHARS]
    if bad or name.startswith('.') or name.startswith('-'):
        raise usage_error("%s name '%s' is invalid (letters, digits and '%s' only, not "
                          "starting with '.' or '-')"
                          % (kind, name.encode('unicode_escape').decode('ascii'),
                             NAME_CHARS[62:]))
    return name


def is_good_name(name):
    """Would check_name take it (a name read from a file or a socket, not typed)?"""
    try:
        check_name('container', name)
        return True
    except CockerError:
        return False


PIPE = -1                       #: subprocess.PIPE, without importing subprocess


def command_failed(argv, status, cause):
    return CockerError('%s failed: %s' % (' '.join(argv[:3]), cause))


F_SETPIPE_SZ = 1031


def widen_pipe(fd, size=1 << 20):
    """Let a pipe hold a megabyte (64 KiB by default): an archive streamed through it
    switches between writer and reader a sixteenth as often (import: a third faster)."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass                            # above /proc/sys/fs/pipe-max-size: as it is


class Spawned(object):
    """A child process started with os.posix_spawnp (Python 3.8 and newer): what Command
    needs of subprocess.Popen (stdin, stdout, stderr, wait, poll, kill, communicate),
    without importing subprocess, 12 ms of locale, re, enum, threading and selectors that
    a BRIDGE boot or a teardown would load for one `ip` command.  stdin, stdout, stderr:
    None for /dev/null, PIPE, or a file (object or descriptor); as Popen does, the child
    gets no other descriptor of ours (but lends, as its 3) and SIGPIPE and SIGXFSZ back to
    their defaults."""

    def __init__(self, argv, stdin=None, stdout=None, stderr=None, lends=None):
        actions, ours, theirs = [], {}, []
        try:
            for fd, given in ((0, stdin), (1, stdout), (2, stderr)):
                if given == PIPE:
                    r, w = os.pipe()
                    ours[fd], end = (w, r) if fd == 0 else (r, w)
                    theirs.append(end)
                elif given is None:
                    end = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                    theirs.append(end)
                else:
                    end = given if isinstance(given, int) else given.fileno()
                if end < 3:     # (cocker started with 0, 1 or 2 closed): an earlier dup2
                    end = fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 3)    # would overwrite it
                    theirs.append(end)
                actions.append((os.POSIX_SPAWN_DUP2, end, fd))
            if lends is not None:       # (a copy above 3: dup2 onto itself would keep
                end = fcntl.fcntl(lends, fcntl.F_DUPFD_CLOEXEC, 4)    # close-on-exec)
                theirs.append(end)
                actions.append((os.POSIX_SPAWN_DUP2, end, 3))
            keep_descriptors_from_children()
            self.pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions,
                                       setsigdef=(SIGPIPE, SIGXFSZ))
        except BaseException:
            for fd in ours.values():
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        self.returncode = None
        self.stdin = os.fdopen(ours[0], 'wb') if 0 in ours else None
        self.stdout = os.fdopen(ours[1], 'rb') if 1 in ours else None
        self.stderr = os.fdopen(ours[2], 'rb') if 2 in ours else None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = popen_returncode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = popen_returncode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, SIGKILL)

    def communicate(self, input=None):
        """input written, stdout and stderr read to their ends side by side (neither pipe
        may fill while we wait on the other), then the wait -> (out, err)."""
        import select
        got = dict((f.fileno(), []) for f in (self.stdout, self.stderr) if f is not None)
        poller, left = select.poll(), memoryview(input or b'')
        for fd in got:
            poller.register(fd, select.POLLIN)
        writer = self.stdin.fileno() if self.stdin is not None and left else None
        if writer is not None:
            poller.register(writer, select.POLLOUT)
        elif self.stdin is not None:
            self.stdin.close()
        waiting = len(got) + (writer is not None)
        while waiting:
            for fd, _ in poller.poll():
                if fd == writer:
                    try:        # PIPE_BUF bytes at most: a pipe poll calls writable takes
                        left = left[os.write(fd, left[:4096]):]     # them whole at once
                    except BrokenPipeError:
                        left = b''              # it stopped reading: its status says why
                    if left:
                        continue
                    self.stdin.close()
                else:
                    data = os.read(fd, 65536)
                    got[fd].append(data)
                    if data:
                        continue
                poller.unregister(fd)
                waiting -= 1
        out, err = [b''.join(got[f.fileno()]) if f is not None else None
                    for f in (self.stdout, self.stderr)]
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()
        return out, err


def popen_returncode(wait_status):
    """As Popen gives it: the exit code, or minus the signal that ended the process."""
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def keep_descriptors_from_children():
    """Descriptors are made close-on-exec (PEP 446), but those cocker was started with
    are not: mark them too, so that a command cocker runs gets none (Popen's close_fds)."""
    try:
        entries = os.listdir('/proc/self/fd')
    except OSError:
        entries = []                    # no /proc: only what PEP 446 did
    for entry in entries:
        fd = int(entry)
        try:
            if fd > 2 and os.get_inheritable(fd):
                os.set_inheritable(fd, False)
        except OSError:
            pass                        # (the descriptor listdir itself had open)


def start_process(argv, stdin, stdout, stderr, lends=None):
    """Spawned where os.posix_spawnp is (3.8+), else subprocess.Popen.  lends: a descriptor
    the child gets too (the lock it holds for us while it lives)."""
    if hasattr(os, 'posix_spawnp'):
        return Spawned(argv, stdin, stdout, stderr, lends)
    import subprocess
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
                            stdout=subprocess.DEVNULL if stdout is None else stdout,
                            stderr=subprocess.DEVNULL if stderr is None else stderr,
                            pass_fds=() if lends is None else (lends,))


#: commands left to end by themselves (Command.leave), reaped at the next iptables_restore
LEFT_TO_END = []


class Command(object):
    """One external command (an argv list, never a shell), traced under -d; whatever fails
    becomes one error line, failure(argv, status, last line of its stderr).  stdin and stdout
    are /dev/null, or PIPE to stream through command.stdin and command.stdout.  In a with
    block: killed if the block fails, waited for and its pipes closed in any case."""

    def __init__(self, argv, stdin=None, stdout=None, stderr=None, failure=command_failed,
                 input_name='its input', lends=None):
        if DEBUG:                       # (quoting loads shlex and re: only when traced)
            debug('run %s', ' '.join(shell_quote(a) for a in argv))
        self.argv, self.failure, self.input_name = argv, failure, input_name
        self.errors = None
        if stderr is None:              # a streaming command's stderr goes to a file: a
            import tempfile             # full pipe would stall it
            self.errors = tempfile.TemporaryFile()
        try:
            self.proc = start_process(argv, stdin, stdout, self.errors or stderr, lends)
        except OSError as e:
            self.close_errors()
            raise CockerError('cannot run %s: %s' % (argv[0], e.strerror))
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        for pipe in (self.stdin, self.stdout):
            if pipe is not None:
                widen_pipe(pipe.fileno())

    def write(self, data):
        """Write to its stdin; if it has ended, its own failure is the error."""
        try:
            self.stdin.write(data)
        except BrokenPipeError:
            self.check()
            raise CockerError('%s stopped reading %s early' % (self.argv[0], self.input_name))

    def give_input(self, data):
        """All of its input at once (a short one, that the pipe holds), for a command
        finished later."""
        try:
            self.stdin.write(data)
            self.stdin.close()
        except BrokenPipeError:
            pass                        # it ended before reading all: its status says why
        self.stdin = self.proc.stdin = None

    def finish(self, input=None, ok=(0,)):
        """For a command started with stdout and stderr PIPE: input given, its end waited
        for -> (exit status, stdout bytes); a status not in ok raises."""
        out, err = self.proc.communicate(input)
        return self.check(ok, err), out

    def close(self, kill=False):
        """Waited for (killed first, if kill and still running), its pipes closed."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
        self.close_pipes()
        self.proc.wait()
        self.close_errors()

    def leave(self):
        """Let it end by itself: our ends of its pipes closed, reaped later (LEFT_TO_END),
        or by init once we are gone."""
        self.close_pipes()
        self.close_errors()
        LEFT_TO_END.append(self)

    def close_pipes(self):
        if self.stdin:
            self.end_input()
        for pipe in (self.stdout, self.proc.stderr):
            if pipe:
                pipe.close()

    def end_input(self):
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass                        # it ended before reading all: its status says why

    def check(self, ok=(0,), err=None):
        """Wait for it to end; its exit status, or its failure if that is not in ok."""
        status = self.proc.wait()
        if ok is not None and status not in ok:
            if err is None:
                err = read_all(self.errors) if self.errors else b''
            lines = err.decode('utf-8', 'replace').strip().splitlines()
            raise self.failure(self.argv, status, lines[-1] if lines else
                               'exit status %d' % status)
        return status

    def close_errors(self):
        if self.errors:
            self.errors.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close(kill=kind is not None)


def run_command(argv, input=None, ok=(0,), failure=command_failed):
    """Run a command to its end: (exit status, stdout bytes); a status not in ok raises
    (ok=None: any status will do)."""
    with Command(argv, stdin=PIPE if input is not None else None, stdout=PIPE, stderr=PIPE,
                 failure=failure) as command:
        return command.finish(input, ok)


def run(argv, check=True, input=None):
    """Run a command to its end; its stdout as text (input: text for its stdin)."""
    _, out = run_command(argv, None if input is None else input.encode('utf-8'),
                         (0,) if check else None)
    return out.decode('utf-8', 'replace')


def shell_quote(s):
    import shlex
    return shlex.quote(s)


def shell_command(template, *words):
    """A command line for a remote shell: each word quoted into the template's {} fields."""
    return template.format(*[shell_quote(word) for word in words])


def exit_status(wait_status):
    """A process's exit code, or 128+signal when a signal ended it (as shells report it)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def read_all(f):
    """Everything written so far to a temporary file (a child's stderr)."""
    f.seek(0)
    return f.read()


def close_fds_except(keep):
    """Close every descriptor but those in `keep`: nothing of the CLI reaches a container."""
    let_go_of_the_cache()
    for name in os.listdir('/proc/self/fd'):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def connect_unix(directory, filename, kind, timeout=None):
    """A Unix socket of `kind` connected to DIRECTORY/FILENAME (_socket: socket.py's enums
    cost a command 8 ms), by way of /proc/self/fd, so that a long COCKER_HOME never hits the
    108-byte limit of a socket path."""
    import _socket
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = _socket.socket(_socket.AF_UNIX, kind | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect('/proc/self/fd/%d/%s' % (dfd, filename))
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dfd)
    return sock


#: a directory, opened without following a link (from its parent's descriptor, usually)
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def tree_size(path):
    """Bytes of the regular files under path.  Walked by descriptors, each directory opened
    O_NOFOLLOW from its parent's: a directory that a running container swaps for a symlink
    is never followed (to the host's / or anywhere else)."""
    try:
        top = os.open(path, DIRECTORY_FLAGS)
    except OSError:
        return 0
    total = 0
    stack = [(top, directory_entries(top))]        # (descriptor, entries left), depth-first
    while stack:
        fd, entries = stack[-1]
        if not entries:
            os.close(fd)
            stack.pop()
            continue
        name = entries.pop()
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
            elif stat.S_ISDIR(st.st_mode):
                child = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
                stack.append((child, directory_entries(child)))
        except OSError:
            pass                    # gone meanwhile, or swapped for a link: not counted
    return total


def directory_entries(fd):
    try:
        return os.listdir(fd)
    except OSError:
        return []


def printable(text, keep=''):
    """text with control characters (C0, DEL, C1, undecodable bytes) written as \\xNN, so
    that names from archives, repositories and containers never drive the terminal."""
    if text.isprintable():
        return text                     # the usual case, at C speed
    return text.translate(escapes_but(keep))    # (a JSON listing, a log: C speed too)


#: keep -> the str.translate table of printable(): each control character but those kept
ESCAPES = {}


def escapes_but(keep):
    table = ESCAPES.get(keep)
    if table is None:
        codes = list(range(32)) + list(range(127, 160)) + list(range(0xdc80, 0xdd00))
        table = ESCAPES[keep] = dict(
            (code, '\\x%02x' % (code - 0xdc00 if code >= 0xdc80 else code))
            for code in codes if chr(code) not in keep)
    return table


def warn(text):
    """A warning on stderr (escaped) and in the log."""
    log('WARN', text)
    sys.stderr.write('cocker: warning: %s\n' % printable(text))


def process_stat(path, dir_fd=None):
    """The fields of a /proc/PID/stat after the command name (state, ppid, ...), or None
    when the process is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid):
    """The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat),
    or None when there is no such process: a pid with its start time names one process."""
    fields = process_stat('/proc/%d/stat' % pid)
    return int(fields[19]) if fields else None


def cpus():
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) or 1


def light_hash(name):
    """hashlib's md5 or sha256, taken from the interpreter's own module (_md5, _sha256, or
    _sha2 from 3.12 on) where there is one: hashlib loads OpenSSL, 4 ms of a boot."""
    for module in ('_' + name, '_sha2'):
        try:
            return getattr(__import__(module), name)
        except (ImportError, AttributeError):
            pass
    import hashlib
    return getattr(hashlib, name)


def size_text(n):
    """The C cocker's size text: integer units, strict 'greater than' thresholds."""
    if n is None or n < 0:
        return '(unknow)'
    for unit, scale in (('GB', 1 << 30), ('MB', 1 << 20), ('KB', 1 << 10)):
        if n > scale:
            return '%d %s' % (n // scale, unit)
    return '%d B' % n


class Rollback(object):
    """Undo the steps of a block, newest first, if it fails (an error, Ctrl-C, a signal):
    push(undo, *args) as each step succeeds.  Every undo is tried, a failing one logged, and
    the block's own exception goes on; a block that ends well keeps everything."""

    def __init__(self, undo=None, *args):
        self.undos = []
        if undo is not None:
            self.push(undo, *args)

    def push(self, undo, *args):
        self.undos.append(lambda: undo(*args))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            try:
                best_effort(reversed(self.undos), 'undoing a failed step')
            except (OSError, CockerError):
                pass            # logged: the user sees why the block failed, not this
        return False


class Pending(object):
    """The rest of a host step, left to go on while PID 1 sets up: boot_container calls
    finish() before anything of the container may run, or close() if the boot fails first
    (an error, Ctrl-C).  The step's commands are killed if still running, then waited for
    (so the teardown that follows finds all they made); its locks are let go."""

    def __init__(self, rest, commands, locks=()):
        self.rest, self.commands, self.locks = rest, commands, locks

    def finish(self):
        try:
            self.rest()
        finally:
            self.close()

    def close(self):
        best_effort([lambda command=command: command.close(kill=True)
                     for command in self.commands] + [lock.close for lock in self.locks],
                    'closing a boot step')


def best_effort(steps, what):
    """Run every step even after one failed (a teardown must release all it can); each
    failure is logged, and the first raised once all were tried."""
    first = None
    for step in steps:
        try:
            step()
        except (OSError, CockerError) as e:
            log('ERROR', '%s: %s' % (what, error_text(e)))
            first = first or e
    if first is not None:
        raise first


def refuse_mounts_below(path):
    if mounts_under(path):
        raise CockerError("'%s' still has mounts below it, not removing it" % path)


def remove_tree(path, looked=False):
    """Delete a directory tree, refusing if anything below it is still mounted (looked:
    the caller has just seen that nothing is; the table costs 3 ms at 2500 mounts).
    Walked by descriptors as tree_size walks: each directory opened O_NOFOLLOW |
    O_DIRECTORY from its parent's, so a link a container planted (or swaps in meanwhile)
    is removed, never followed or opened: no host FIFO or device is ever touched.
    (shutil would cost a destroy 4 ms of imports.)"""
    if not looked:
        refuse_mounts_below(path)
    top = os.open(path, DIRECTORY_FLAGS)
    stack = [(top, directory_entries(top), None)]   # (descriptor, entries left, its name)
    try:
        while stack:
            fd, entries, own = stack[-1]
            if not entries:
                stack.pop()
                os.close(fd)
                if stack:
                    os.rmdir(own, dir_fd=stack[-1][0])
                continue
            name = entries.pop()
            try:
                child = os.open(name, DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                os.unlink(name, dir_fd=fd)      # a file, a link, a node: never opened
                continue
            stack.append((child, directory_entries(child), name))
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    os.rmdir(path)


# =============================================================================
# Image store
# =============================================================================
# HOME/images/NAME/VERSION/rlayer, VERSION '_' meaning "no version".  References are
# NAME[:VERSION]; the highest version is chosen by numeric comparison, part by part.

def parse_image_ref(ref):
    """'name[:version]' -> (name, version or None), both checked."""
    name, sep, version = ref.partition(':')
    check_name('image', name)
    if sep:
        check_name('version', version)
        return name, version
    return name, None


def version_key(version):
    """Sort key: numeric parts compared as numbers; None for unversioned names like '_'."""
    parts = []
    for part in version.split('.'):
        digits = ''
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        return None
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def image_versions(name):
    """Version directories of an image (temporary and hidden entries skipped)."""
    try:
        entries = os.listdir(os.path.join(images_dir(), name))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [v for v in entries if not v.startswith('.')
            and os.path.isdir(os.path.join(images_dir(), name, v))]


def highest_version(name):
    """The numerically highest version of an image, else '_', else None."""
    versions = image_versions(name)
    numbered = [(version_key(v), v) for v in versions if version_key(v) is not None]
    if numbered:
        return max(numbered)[1]
    if NO_VERSION in versions:
        return NO_VERSION
    return versions[0] if versions else None


def resolve_image(ref, latest=True):
    """'name[:ver]' -> (name, version) of an existing image with an rlayer directory."""
    name, version = parse_image_ref(ref)
    if version is None:
        version = highest_version(name) if latest else NO_VERSION
    if version is None or not os.path.isdir(os.path.join(image_dir(name, version), 'rlayer')):
        raise CockerError("image '%s' not found" % ref)
    return name, version


def image_or_unversioned(ref):
    """NAME[:VERSION] -> (name, version), '_' when none is given (as the C cocker has it)."""
    name, version = parse_image_ref(ref)
    return name, version or NO_VERSION


def require_image(ref):
    name, version = image_or_unversioned(ref)
    if not os.path.isdir(os.path.join(image_dir(name, version), 'rlayer')):
        raise CockerError("image '%s' not found" % ref)
    return name, version


def image_ref_text(name, version):
    return name if version == NO_VERSION else '%s:%s' % (name, version)


def image_users(name, version):
    """Containers whose layers include name:version (pinned, or a C cocker image list)."""
    users = []
    for c in list_containers():
        refs = split_list(read_attr(c, 'layers') or read_attr(c, 'image', '') or '')
        for ref in refs:
            n, v = ref.partition(':')[::2]
            if n == name and (v or highest_version(n)) == version:
                users.append(c)
                break
    return users


def running_users(image, version):
    """Running containers whose layers include image:version."""
    ref = '%s:%s' % (image, version)
    return [n for n in list_containers() if ref in split_list(read_attr(n, 'layers', ''))
            and container_status(n) == 'RUNNING']


def refuse_if_used(name, version, force, what):
    users = image_users(name, version)
    if users and not force:
        raise CockerError("image '%s' is used by container(s) %s; %s (add -f to do it anyway)"
                          % (image_ref_text(name, version), ', '.join(users), what))
    running = [c for c in users if container_status(c) == 'RUNNING']
    if running:
        raise CockerError("image '%s' is used by running container(s) %s"
                          % (image_ref_text(name, version), ', '.join(running)))


def copy_tree(source, target, link=False):
    """cp -a: modes, owners, times, hard links, devices (overlay whiteouts) and xattrs
    (overlay opaque markers) kept; with link, files are hard-linked, not copied (instant),
    falling back to a copy across file systems.  target may be an empty directory."""
    try:
        run(['cp', '-a', '-T'] + (['-l'] if link else []) + ['--', source, target])
    except CockerError:
        if not link:
            raise
        if os.path.lexists(target):
            remove_tree(target)
        run(['cp', '-a', '-T', '--', source, target])


def install_image(staging, name, version, replace=False):
    """Rename a complete staging directory to images/NAME/VERSION (replacing it with -f)."""
    final = image_dir(name, version)
    os.makedirs(os.path.dirname(final), 0o755, exist_ok=True)
    if os.path.exists(final):
        if not replace:
            raise CockerError("image '%s' exist (add -f to replace it)"
                              % image_ref_text(name, version))
        # the old one keeps its name and version in its own: a crash before the second
        # rename is undone by clean_staging
        old = into_staging(images_dir(), lambda path: os.rename(final, path), 'old',
                           '%s:%s' % (name, version))
        os.rename(staging, final)
        remove_tree(old)
    else:
        os.rename(staging, final)
    tidy_staging(images_dir())


class building_image(object):
    """with building_image(NAME, VERSION) as rlayer: fill rlayer; the version is installed
    when the block ends well (replacing an existing one if `replace`), and nothing of it is
    left when it fails."""

    def __init__(self, name, version, replace=False):
        self.name, self.version, self.replace = name, version, replace

    def __enter__(self):
        clean_legacy_staging(os.path.join(images_dir(), self.name), self.name)
        self.staging = new_staging(images_dir())
        rlayer = os.path.join(self.staging, 'rlayer')
        os.mkdir(rlayer, 0o755)
        return rlayer

    def __exit__(self, kind, value, traceback):
        with Rollback(remove_staged, self.staging):
            if kind is not None:
                raise value
            install_image(self.staging, self.name, self.version, self.replace)


def remove_image(name, version):
    """Delete images/NAME/VERSION (renamed away first), and images/NAME once empty."""
    discard(images_dir(), image_dir(name, version))
    try:
        os.rmdir(os.path.join(images_dir(), name))
    except OSError:
        pass
    collect_layers()


# ---- what the image actions do ------------------------------------------------------

def rename_version(image, new, force):
    """images/NAME/OLD -> images/NAME/NEW; with force, its stopped users follow."""
    name, old = image
    check_name('version', new)
    if new == old:
        raise CockerError('version equal')
    with locked('image', name), locked('layers', 'store', shared=True):
        require_image(image_ref_text(name, old))
        if os.path.exists(image_dir(name, new)):
            raise CockerError("image '%s' exist" % image_ref_text(name, new))
        users = image_users(name, old)
        refuse_if_used(name, old, force, 'it would be taken away from them')
        # no container lock here: a boot holds its container's and waits for our image lock
        # (atomic file writes; the boot reads the layers once it has the image lock)
        for c in users:                 # a C cocker container gets its versions pinned now
            pin_layers(c)
        os.rename(image_dir(name, old), image_dir(name, new))
        for c in users:                 # -f: the stopped users follow the new version
            layers = split_list(read_attr(c, 'layers') or '')
            write_attr(c, 'layers', ','.join(
                '%s:%s' % (name, new) if ref == '%s:%s' % (name, old) else ref
                for ref in layers))


def copy_image(source, target):
    name, version = target
    with locked_images(source[0], name):
        require_image(image_ref_text(*source))
        if os.path.exists(image_dir(name, version)):
            raise CockerError("image '%s' exist" % image_ref_text(name, version))
        import shutil
        with locked('layers', 'store', shared=True), building_image(name, version) as rlayer:
            copy_tree(os.path.join(image_dir(*source), 'rlayer'), rlayer)
            for extra in ('layers', 'config.json', 'origin', 'base'):   # layers by name
                if os.path.exists(os.path.join(image_dir(*source), extra)):
                    shutil.copyfile(os.path.join(image_dir(*source), extra),
                                    os.path.join(os.path.dirname(rlayer), extra))


def delete_image(image, force):
    name, version = image
    with locked('image', name):
        require_image(image_ref_text(name, version))
        refuse_if_used(name, version, force, 'destroy them first')
        remove_image(name, version)


def container_to_image(cname, name, version):
    check_name('image', name)
    check_name('version', version)
    # images before containers; a boot of this container may hold its lock and wait for ours
    with locked('image', name), locked('container', cname, wait=False) as held:
        if not held:
            raise CockerError("container '%s' is busy (booting or stopping)" % cname)
        repair_if_dead(cname)
        require_stopped(cname, 'to_image converts only')
        if os.path.exists(image_dir(name, version)):
            raise CockerError("image '%s' exist" % image_ref_text(name, version))
        with building_image(name, version) as rlayer:
            copy_tree(container_file(cname, 'rwlayer'), rlayer, link=True)
            base = pinned_layers(cname)
            if base:                        # what it was built on: export writes the stack
                write_small(os.path.join(os.path.dirname(rlayer), 'base'), base)
        remove_container(cname)
    log('INFO', "container '%s' became image '%s'" % (cname, image_ref_text(name, version)))


def image_to_container(image, options, base_layers):
    """The image's rlayer becomes the rwlayer of a new container over base_layers."""
    name, version = image
    rlayer = os.path.join(image_dir(name, version), 'rlayer')
    if image_layer_ids(name, version):
        raise CockerError("image '%s' is imported, with layers of its own: create a container "
                          "from it instead" % image_ref_text(name, version))

    def take_image_layer(staging):
        os.rmdir(os.path.join(staging, 'rwlayer', 'etc'))
        copy_tree(rlayer, os.path.join(staging, 'rwlayer'), link=True)
        write_small(os.path.join(staging, 'version'), version)
    with locked('image', name):
        require_image(image_ref_text(name, version))
        refuse_if_used(name, version, options.force, 'it would be taken away from them')
        make_container(options, options.to_container, base_layers, fill=take_image_layer,
                       boot=False)
        remove_image(name, version)
    log('INFO', "image '%s' became container '%s'" % (image_ref_text(name, version),
                                                     options.to_container))


# ---- layers stored once -----------------------------------------------------------------
# An image imported from the OCI world keeps its layers in HOME/layers/HEX/rlayer, HEX the
# sha256 of the layer's uncompressed tar (its diff_id): two images sharing a base layer
# share its directory.  Its version directory holds `layers` (the diff_ids, bottom first),
# `config.json` (the image config as it came) and an empty rlayer (its own files: none).
# Each layer also has a short name, HOME/l/ID -> ../layers/HEX/rlayer, as Docker's
# overlay2 has: the overlay of a 125-layer image must fit the kernel's one page of options.
# A layer goes when no image lists it any more (collect_layers, after an image is removed).

LAYER_LINK_CHARS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567'
MAX_IMAGE_LAYERS = 250                  #: what one page of overlay options takes, with room


def is_sha256_hex(text):
    return len(text) == 64 and all(c in '0123456789abcdef' for c in text)


def layer_dir(diff_id):
    """HOME/layers/HEX of a 'sha256:HEX' diff_id (checked: it names a directory)."""
    return os.path.join(layers_dir(), digest_hex(diff_id))


def digest_hex(digest):
    algorithm, _, hex_part = digest.partition(':')
    if algorithm != 'sha256' or not is_sha256_hex(hex_part):
        raise CockerError("'%s' is not a sha256 digest" % printable(digest[:80]))
    return hex_part


def image_layer_ids(name, version):
    """The diff_ids of an image's shared layers, bottom first ([] for a cockerimage)."""
    text = read_small(os.path.join(image_dir(name, version), 'layers'), '')
    return [line for line in text.split() if line]


def image_rlayers(name, version, real=False):
    """Every rlayer of an image, bottom first: its shared layers (by their short names, or
    real paths), then its own."""
    paths = [os.path.join(layer_dir(d), 'rlayer') if real else layer_link(d)
             for d in image_layer_ids(name, version)]
    return paths + [os.path.join(image_dir(name, version), 'rlayer')]


def refuse_imported(image, advice):
    if image_layer_ids(*image):
        raise CockerError("image '%s' is imported, with layers of its own: %s"
                          % (image_ref_text(*image), advice))


def layer_link(diff_id):
    short = read_small(os.path.join(layer_dir(diff_id), 'link'))
    if not short or any(c not in LAYER_LINK_CHARS for c in short):
        raise CockerError('layer %s is missing or damaged' % diff_id)
    return os.path.join(HOME, 'l', short)


def install_layer(staging, diff_id):
    """Rename a complete layer (staging/rlayer) to HOME/layers/HEX with its short name;
    if another import put the same layer there meanwhile, ours goes."""
    final = layer_dir(diff_id)
    if os.path.isdir(final):
        remove_staged(staging)
        return
    os.makedirs(os.path.join(HOME, 'l'), 0o700, exist_ok=True)
    while True:
        short = ''.join(LAYER_LINK_CHARS[b % 32] for b in os.urandom(10))
        try:
            os.symlink(os.path.join('..', 'layers', digest_hex(diff_id), 'rlayer'),
                       os.path.join(HOME, 'l', short))
            break
        except FileExistsError:
            continue
    with Rollback(remove_file, os.path.join(HOME, 'l', short)):
        write_small(os.path.join(staging, 'link'), short)
        write_small(os.path.join(staging, 'diff_id'), diff_id)
        try:
            os.rename(staging, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            remove_file(os.path.join(HOME, 'l', short))
            remove_staged(staging)          # the same layer came meanwhile
    tidy_staging(layers_dir())


def collect_layers():
    """Remove the layers no image lists (a layer being imported is not listed yet: imports
    hold the layers lock shared, so this waits for none and skips when one runs)."""
    with locked('layers', 'store', wait=False) as held:
        if held is None:
            return
        # an 'old' version waiting in .staging to be put back still needs its layers
        staged = [os.path.join(images_dir(), STAGING, e, 'layers')
                  for e in directory_entries(os.path.join(images_dir(), STAGING))]
        used = set(digest_hex(d) for d in layer_users()) | set(
            digest_hex(d) for path in staged for d in read_small(path, '').split())
        for entry in directory_entries(layers_dir()):
            if entry.startswith('.') or entry in used:
                continue
            short = read_small(os.path.join(layers_dir(), entry, 'link'))
            if short:
                remove_file(os.path.join(HOME, 'l', short))
            discard(layers_dir(), os.path.join(layers_dir(), entry))
            debug('removed layer sha256:%s, no image lists it', entry)
        for short in directory_entries(os.path.join(HOME, 'l')):     # of a killed import
            link = os.path.join(HOME, 'l', short)
            if not os.path.exists(link):
                remove_file(link)


def image_names():
    return sorted(n for n in directory_entries(images_dir()) if not n.startswith('.'))


# ---- staging: everything new is built hidden, then renamed into place -------------------
# An image version or a container is built in STORE/.staging (images/ or containers/) and
# renamed into the store only when complete; one removed or replaced is renamed there first.
# Entries are named KIND.PID-START.REST, the owner's pid and start time (a pid alone may be
# reused): 'new' (being built), 'doomed' (being deleted), 'old' (an image version replaced
# with -f; REST is NAME:VERSION, where it goes back should its replacement never come).
# clean_staging() runs at the start of every command: what a killed command left goes, and
# the directory itself once it is empty (the C cocker would list it).

_owner = []                     #: 'PID-START' of this process, computed once


def staging_owner():
    if not _owner:
        _owner.append('%d-%d' % (os.getpid(), process_start_time(os.getpid())))
    return _owner[0]


def into_staging(store, make, kind, rest=None):
    """make(path) for a new path in STORE/.staging (a mkdir, a rename into it); again should
    a cleaner have removed the empty directory between its creation and our entry."""
    directory = os.path.join(store, STAGING)
    path = os.path.join(directory, '%s.%s.%s' % (kind, staging_owner(),
                                                 rest or os.urandom(4).hex()))
    for _ in range(100):
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
        except FileExistsError:         # (there at its mkdir, removed before its check)
            continue
        try:
            make(path)
            return path
        except FileNotFoundError as e:
            if not staging_was_missing(e, path):
                raise                   # what was missing is something else
            debug('%s was removed meanwhile, making it again', directory)
    raise CockerError('%s keeps being removed' % directory)


def staging_was_missing(e, path):
    """Did make(path) fail for want of STAGING, which another command's tidy_staging may
    remove (and a third make again) at any moment?  A rename's source is still there, a
    mkdir's error names path itself."""
    if getattr(e, 'filename2', None) is not None:
        return os.path.lexists(e.filename)
    return e.filename == path


def new_staging(store, mode=0o755):
    """A new hidden directory to build an image version or a container in."""
    return into_staging(store, lambda path: os.mkdir(path, mode), 'new')


def remove_staged(path):
    """Undo of new_staging: the half-built directory goes, unless it was installed."""
    if os.path.lexists(path):
        remove_tree(path)
    tidy_staging(os.path.dirname(os.path.dirname(path)))


def discard(store, path):
    """Rename path away into STORE/.staging and delete it there: gone from the store at
    once, and a crash half-way leaves only what clean_staging removes.  A mount below it
    refuses it first, where it is.  That one look stands for the removal too (a mount made
    after it would be missed as one made during the walk would be): the caller's lock on
    the container, image or layer keeps cocker's own mounts away."""
    refuse_mounts_below(path)
    remove_tree(into_staging(store, lambda doomed: os.rename(path, doomed), 'doomed'),
                looked=True)
    tidy_staging(store)


def tidy_staging(store):
    """STORE/.staging goes once it is empty."""
    try:
        os.rmdir(os.path.join(store, STAGING))
    except OSError:
        pass                            # not empty: in use, or left for the next command


def clean_staging(store):
    """Remove what killed commands left in STORE/.staging, then the directory if empty."""
    directory = os.path.join(store, STAGING)
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        kind, _, rest = entry.partition('.')
        owner, _, rest = rest.partition('.')
        pid, _, start = owner.partition('-')
        if owner_running(owner):
            continue                    # its command still runs
        try:
            if kind == 'old' and store == images_dir():
                restore_or_remove(os.path.join(directory, entry), rest)
            else:
                claim_and_remove(store, os.path.join(directory, entry))
        except (OSError, CockerError) as e:
            log('WARN', 'cannot clean %s: %s' % (entry, error_text(e)))
    tidy_staging(store)


def owner_running(owner):
    """Does the 'PID-START' of staging_owner() still name a running process?"""
    pid, _, start = owner.partition('-')
    return is_decimal(pid) and is_decimal(start) and process_start_time(int(pid)) == int(start)


def claim_and_remove(store, path):
    """Rename a dead entry to one of ours first: of two commands cleaning at once, one
    removes it, the other finds it gone."""
    try:
        mine = into_staging(store, lambda target: os.rename(path, target), 'doomed')
    except FileNotFoundError:
        return
    if os.path.isdir(mine) and not os.path.islink(mine):
        remove_tree(mine)
    else:
        remove_file(mine)


def restore_or_remove(path, rest):
    """An 'old' image version goes back in place if its replacement never came."""
    name, _, version = rest.partition(':')
    try:
        final = image_dir(check_name('image', name), check_name('version', version))
    except CockerError:
        claim_and_remove(images_dir(), path)        # not a name of ours: rubbish
        return
    with locked('image', name, wait=False) as held:
        if held is None:
            return                      # busy: the next command looks again
        if os.path.lexists(final):
            claim_and_remove(images_dir(), path)
            return
        os.makedirs(os.path.dirname(final), 0o755, exist_ok=True)
        os.rename(path, final)
        log('WARN', "image '%s' restored: its replacement never came"
            % image_ref_text(name, version))


def clean_legacy_staging(directory, image=None):
    """What cocker 1.0 left when killed: images/NAME/.staging.PID.HEX, .deleting.PID.HEX and
    .old.PID.VERSION (put back if its replacement never came), .VERSION.installing.PID of
    install_test, containers/.NAME.creating.PID and .NAME.destroying.PID.  Looked at where that image or container is made (under its
    lock), as cocker 1.0 did; for `image`, directory is images/NAME."""
    for entry in directory_entries(directory):
        kind, pid, rest = legacy_fields(entry)
        if kind is None or pid_alive(pid):
            continue
        path = os.path.join(directory, entry)
        try:
            if kind == 'old' and image and not os.path.lexists(image_dir(image, rest)):
                os.rename(path, image_dir(image, check_name('version', rest)))
            else:
                remove_tree(path)
        except (OSError, CockerError) as e:
            log('WARN', 'cannot clean %s: %s' % (path, error_text(e)))


def legacy_fields(entry):
    """(kind, pid, rest) of a cocker 1.0 hidden entry, or (None, 0, '')."""
    parts = entry.split('.', 3)         # '', staging|old|deleting, PID, HEX|VERSION
    if entry.startswith('.') and len(parts) == 4 and parts[1] in ('staging', 'old', 'deleting'):
        kind, pid, rest = parts[1], parts[2], parts[3]
    else:                               # .NAME.creating.PID, .VERSION.installing.PID, ...
        parts = entry.rsplit('.', 2)
        if not (entry.startswith('.') and len(parts) == 3
                and parts[1] in ('creating', 'destroying', 'installing')):
            return None, 0, ''
        kind, pid, rest = parts[1], parts[2], ''
    if not is_decimal(pid) or int(pid) == 0:
        return None, 0, ''
    return kind, int(pid), rest


# =============================================================================
# Container store
# =============================================================================
# HOME/containers/NAME holds rwlayer, workdir, merged and one-value attribute files.  A
# container is running while its monitor holds a flock on running.lock: the kernel drops it
# when the monitor dies, so a kill -9 or a reboot can never leave a false RUNNING.

def container_file(name, key):
    return os.path.join(container_dir(name), key)


def read_attr(name, key, default=None):
    return read_small(container_file(name, key), default)


#: what only a running container has: its monitor, PID 1 and cgroups die with the host, so
#: a power cut can only make these records stale, as a kill -9 does (and that is repaired)
RUNTIME_ATTRS = ('pid', 'init_pid', 'cgroups')
#: containers whose state files need no fsync: one being destroyed, and a one-shot run's,
#: removed when its command ends (after a power cut, its entry in HOME/oneshot, written
#: durably, has it removed)
EPHEMERAL = set()


def write_attr(name, key, value):
    if value is None:
        remove_file(container_file(name, key))
    else:
        write_small(container_file(name, key), value, durable=is_durable(name, key))


def is_durable(name, key):
    """Whether a container's state file is fsync'ed when written."""
    return key not in RUNTIME_ATTRS and name not in EPHEMERAL


def operator_stop(name):
    """The words of stopped_by_operator while the command that wrote them runs, else []:
    its PID-START, then 'remove' if a destroy (or a one-shot run's end) follows.  (Its
    cocker wrote itself down before any signal; one killed before it signalled stops
    nothing.)"""
    words = (read_attr(name, 'stopped_by_operator') or '').split(' ')
    return words if owner_running(words[0]) else []


def operator_stopping(name):
    """Is a shutdown, kill or destroy under way?"""
    return bool(operator_stop(name))


def operator_removing(name):
    """Is a destroy (or a one-shot run's end) under way, which removes the container?"""
    return operator_stop(name)[1:] == ['remove']


def require_container(name):
    check_name('container', name)
    if not os.path.isdir(os.path.join(container_dir(name), 'rwlayer')):
        raise CockerError("container '%s' not found" % name)
    return name


def list_containers():
    try:
        names = os.listdir(containers_dir())
    except FileNotFoundError:
        return []
    return sorted(n for n in names
                  if not n.startswith('.') and os.path.isdir(container_dir(n)))


def monitor_alive(name):
    """True while a monitor holds running.lock (or, for a C cocker container, its pid lives)."""
    path = container_file(name, 'running.lock')
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pid = read_pid(name)
        return pid is not None and pid_alive(pid) and not os.path.exists(
            container_file(name, 'layers'))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_pid(name, key='pid'):
    text = read_attr(name, key)
    try:
        pid = int(text)
    except (TypeError, ValueError):
        return None
    return pid if pid > 0 else None


def signal_process(pid, sig):
    """Send a signal to pid if there is one (None or gone: False)."""
    if not pid:
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def container_status(name):
    """'RUNNING', 'STOPED', or 'DEAD' (state left behind by a crash, to be repaired)."""
    if monitor_alive(name):
        return 'RUNNING'
    # a mount point is two stats, not a read of the whole mount table: listings stay cheap
    # with thousands of containers (a crash before the monitor wrote its pid file leaves
    # the overlay, which is_mount_point sees)
    # (and a boot killed half-way leaves its network.state or cgroups file)
    if any(os.path.exists(container_file(name, key))
           for key in ('pid', 'network.state', 'cgroups')) or is_mount_point(
            container_file(name, 'merged')):
        return 'DEAD'
    return 'STOPED'


def is_mount_point(path):
    """os.path.ismount for a directory of cocker's own, without its realpath of the parent
    (a stat of every component): something is mounted on path when its device differs from
    its parent's."""
    try:
        st, parent = os.lstat(path), os.lstat(os.path.dirname(path))
    except OSError:
        return False
    return not stat.S_ISLNK(st.st_mode) and (st.st_dev != parent.st_dev or
                                              st.st_ino == parent.st_ino)


def repair_if_dead(name):
    """Clean up after a container whose PID 1 or monitor died: called under its lock."""
    if container_status(name) == 'DEAD':
        debug('container %s died without cleaning up, repairing', name)
        log('WARN', "container '%s' found dead, cleaning up its leftovers" % name)
        teardown_container(name)


def is_running(name):
    """A question only: a dead container is repaired by repair_if_dead, under its lock."""
    return container_status(name) == 'RUNNING'


def require_stopped(name, what):
    if is_running(name):
        raise CockerError("container '%s' is running; %s only a stopped container" % (name, what))


def require_running(name):
    # no repair here: attach and run do not hold the container lock, and a boot in
    # progress looks like leftovers until its monitor holds running.lock
    if container_status(name) != 'RUNNING':
        raise CockerError("container '%s' is not running" % name)


def parse_volume(text):
    """'HOST[:CONTAINER[:ro]]' -> (host, container, readonly), both absolute."""
    parts = text.split(':')
    if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ('ro', 'rw')):
        raise usage_error("volume '%s' is invalid (expected HOST_PATH[:CONTAINER_PATH[:ro]])" % text)
    host = parts[0]
    inside = parts[1] if len(parts) > 1 and parts[1] else host
    readonly = len(parts) == 3 and parts[2] == 'ro'
    for path in (host, inside):
        if not path.startswith('/') or '\n' in path or '\0' in path:
            raise usage_error("volume '%s' is invalid (paths must be absolute)" % text)
    return os.path.normpath(host), os.path.normpath(inside), readonly


def volume_lines(volumes):
    """The cp/volume file: one 'host:container[:ro]' per line, in command-line order."""
    lines = []
    for text in volumes:
        host, inside, readonly = parse_volume(text)
        lines.append('%s:%s%s' % (host, inside, ':ro' if readonly else ''))
    return ''.join(line + '\n' for line in lines)


def container_volumes(name):
    text = read_attr(name, 'volume', '')
    return [parse_volume(line) for line in text.splitlines() if line.strip()]


def netns_name(name):
    """nns<X>: X is the first 5 bytes of MD5(name) in upper-case hex (C cocker names)."""
    md5 = light_hash('md5')
    return 'nns' + md5(name.encode('utf-8')).hexdigest()[:10].upper()


def write_container(staging, options, name, layers, vip):
    """Fill a new container directory from the create options."""
    for sub in ('rwlayer', 'workdir', 'merged'):
        os.mkdir(os.path.join(staging, sub), 0o755)
    os.mkdir(os.path.join(staging, 'rwlayer', 'etc'), 0o755)

    def put(key, value):
        if value is not None:
            write_small(os.path.join(staging, key), value, durable=is_durable(name, key))

    put('image', options.image)
    put('layers', layers)
    put('hostname', options.host or name)
    put('net', options.net)
    if options.net in ('BRIDGE', 'CUSTOM'):
        put('netns', netns_name(name))
    if options.net == 'BRIDGE':
        put('vip', vip)
        put('port_mapping', options.port_mapping)
        put('host_eth', None if options.host_eth == 'none' else options.host_eth)
    if options.volumes:
        put('volume', volume_lines(options.volumes))


def record_limits(name, options):
    """Store the limits given on this command line; later boots reuse them.  'none' drops
    a limit; for the pids limit, which has a default, it is recorded as 'none'."""
    for option, key in LIMITS:
        value = getattr(options, option)
        if value is not None:
            write_attr(name, key, None if value == 'none' and key != 'pids_limit' else value)


def record_security(name, options):
    """Store --seccomp and --no-new-privs of this command line; later boots reuse them."""
    if options.seccomp is not None:
        write_attr(name, 'seccomp', None if options.seccomp == 'default' else options.seccomp)
    if options.no_new_privs:
        write_attr(name, 'no_new_privs', '1')


def create_container(options, name, layers, vip, fill=None):
    """Make C/NAME atomically: built in a hidden staging directory, renamed when complete
    (fill(staging) adds to it first, e.g. an rwlayer taken from an image)."""
    final = container_dir(name)
    if os.path.lexists(final):
        raise CockerError("container '%s' exist" % name)
    staging = new_staging(containers_dir(), 0o700)
    with Rollback(remove_staged, staging):
        write_container(staging, options, name, layers, vip)
        if fill is not None:
            fill(staging)
        os.rename(staging, final)
    tidy_staging(containers_dir())
    debug('created container directory %s', final)


def pinned_layers(name):
    """'NAME:VERSION,...' of the container's images, bottom first: cp/layers, pinned at
    create, so that importing a newer version never changes the layers under an existing
    container.  A C cocker container has only cp/image: resolved here, recorded by
    pin_layers."""
    pinned = read_attr(name, 'layers')
    if pinned is None:
        pinned = layers_text([resolve_image(ref) for ref in
                              split_list(read_attr(name, 'image', ''))]) or ''
    return pinned


def pin_layers(name):
    """Record a C cocker container's resolved layers in cp/layers (under its lock)."""
    if read_attr(name, 'layers') is None and read_attr(name, 'image') is not None:
        write_attr(name, 'layers', pinned_layers(name))


def layers_text(resolved):
    """[(name, version)] -> 'NAME:VERSION,...' (None for none)."""
    return ','.join('%s:%s' % ref for ref in resolved) or None


def container_layers(name):
    """rlayer paths, bottom first."""
    paths = [path for ref in split_list(pinned_layers(name))
             for path in image_rlayers(*resolve_image(ref))]
    return topmost_once(paths)


def topmost_once(paths):
    """Layer paths, bottom first, each kept at its topmost place only: overlayfs refuses a
    lower directory twice, and the topmost copy shows the same files."""
    return [p for i, p in enumerate(paths) if p not in paths[i + 1:]]


# =============================================================================
# Mounts and the container root
# =============================================================================
# The overlay root is mounted on cp/merged in the host's namespace, so the host sees the
# container's files while it runs; everything else (volumes, /proc, /dev) is mounted only
# in the container's private mount namespace and vanishes with it.

def mounts_under(path):
    """Mount points at or below path, deepest first.  Read from /proc/self/mountstats:
    the same mounts as mountinfo, a line each without the options (overlay's long layer
    lists), so a third of the time; read whole and searched for path, so only the lines
    that name it are looked at (1.3 ms at 1500 mounts, a loop over the lines 2.1: every
    destroy pays it).  Fails closed: without the mount table nothing can be known to be
    unmounted, so callers that remove trees or unmount roots get an error, never an empty
    list."""
    path = os.path.realpath(path)
    prefix = path.rstrip('/') + '/'
    escaped = encode_mount_path(path)   # (the lines of other paths are never decoded)
    try:
        table = read_whole(MOUNT_TABLE)
    except OSError as e:
        raise CockerError('cannot read the mount table (%s: %s); not touching %s'
                          % (MOUNT_TABLE, e.strerror, path))
    found = []
    at = table.find(escaped)
    while at >= 0:
        start, end = table.rfind(b'\n', 0, at) + 1, table.find(b'\n', at) + 1 or len(table)
        point = decode_mount_path(mount_point_of(table[start:end]))
        if point == path or point.startswith(prefix):
            found.append(point)
        at = table.find(escaped, end)
    return sorted(set(found), key=len, reverse=True)


MOUNT_TABLE = '/proc/self/mountstats'


def mount_point_of(line):
    """The (escaped) mount point of a mountstats line, 'device DEV mounted on POINT with
    fstype TYPE ...' ('no device mounted on ...'): the word before the last ' with fstype '
    (a point has no space: spaces are escaped); an NFS statistics line has none -> b''."""
    before = line.rsplit(b' with fstype ', 1)[0]
    words = before.rsplit(b' ', 3)
    if len(words) == 4 and words[1:3] == [b'mounted', b'on']:
        return words[3]
    return b''


def encode_mount_path(path):
    """A path as the mount tables write it (space, tab, newline and backslash as \\ooo)."""
    raw = os.fsencode(path)
    for char in b'\\ \t\n':
        raw = raw.replace(bytes([char]), ('\\%03o' % char).encode())
    return raw


def decode_mount_path(raw):
    """The mount tables escape space, tab, newline and backslash as \\ooo."""
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b'\\' and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_root(name, layers):
    """Mount the container's root on cp/merged: overlay of the layers, or the rwlayer alone."""
    cp = container_dir(name)
    merged = os.path.join(cp, 'merged')
    os.makedirs(merged, exist_ok=True)
    if layers:
        for layer in layers:
            if ':' in layer or ',' in layer:
                raise CockerError("layer path '%s' contains ':' or ','" % layer)
        # the layers relative to HOME, where the mount is made: 125 of them fit in a page
        home = os.path.abspath(HOME)
        data = 'lowerdir=%s,upperdir=%s,workdir=%s' % (
            ':'.join(os.path.relpath(os.path.abspath(p), home) for p in reversed(layers)),
            os.path.abspath(os.path.join(cp, 'rwlayer')),
            os.path.abspath(os.path.join(cp, 'workdir')))
        if len(data) > 4000:
            raise CockerError('too many image layers for one overlay mount')
        os.makedirs(os.path.join(cp, 'workdir'), exist_ok=True)
        # nodev: a device node in an image or made by the container never opens
        with working_directory(home):
            mount('overlay', os.path.abspath(merged), 'overlay', MS_NODEV, data)
    else:
        mount(os.path.join(cp, 'rwlayer'), merged, None, MS_BIND)
        remount_bind(merged, MS_NODEV)
    # keep it out of other namespaces' propagation groups: it is this container's alone
    mount(None, merged, None, MS_PRIVATE)
    debug('mounted root on %s', merged)


class working_directory(object):
    """Run the enclosed code in another working directory, then come back."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.home = os.open('.', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with Rollback(os.close, self.home):
            os.chdir(self.path)
        return self

    def __exit__(self, *exc):
        try:
            os.fchdir(self.home)
        finally:
            os.close(self.home)


def mount_container_root(name):
    mount_root(name, container_layers(name))


def unmount_root(name):
    """Unmount everything at or below cp/merged.  Safe to run twice and after a crash.
    The root alone, the usual case, goes without reading the mount table (4 ms with 400
    containers running, 15 with 1500): umount2 refuses (EBUSY) a mount that has others
    below it or is in use, and only then is the table read."""
    merged = container_file(name, 'merged')
    while True:
        try:
            umount2(merged)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return                  # not (or no longer) a mount point
            if e.errno != errno.EBUSY:
                raise
            break
        debug('unmounted %s', merged)
    for point in mounts_under(merged):
        try:
            umount2(point)
        except OSError as e:
            if e.errno == errno.EBUSY:
                # a host process still uses it (a shell cd'd into merged): detach it now,
                # the kernel frees it when that process lets go
                log('WARN', '%s is busy, detaching it lazily' % point)
                umount2(point, MNT_DETACH)
            elif e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        debug('unmounted %s', point)


def open_in_root(root_fd, path, make_dir=True):
    """Resolve `path` as a process chrooted at root_fd would, creating what is missing;
    return an O_PATH descriptor.  A symlink in the image can therefore never point a mount
    at a host path (CVE-2021-30465)."""
    parts = [p for p in path.split('/') if p]
    fd = os.dup(root_fd)
    stack = [fd]            # descriptors of the directories walked, for '..'
    links = 0
    try:
        while parts:
            part = parts.pop(0)
            if part == '.':
                continue
            if part == '..':
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            cur = stack[-1]
            try:
                st = os.stat(part, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                if parts or make_dir:
                    os.mkdir(part, 0o755, dir_fd=cur)
                else:
                    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o644, dir_fd=cur))
                st = os.stat(part, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:
                    raise OSError(errno.ELOOP, 'too many symlinks', path)
                target = os.readlink(part, dir_fd=cur)
                if target.startswith('/'):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split('/') if p] + parts
                continue
            if parts and not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, 'not a directory', path)
            stack.append(os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur))
        result = stack.pop()
        return result
    finally:
        for d in stack:
            os.close(d)


def bind_volumes(boot):
    """Bind each volume onto its target resolved inside the container root: the host path,
    or open_tree's copy of it taken on the host (see PID 1's mount namespace)."""
    root_fd = os.open(boot.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for source, inside, readonly, is_dir in boot.volumes:
            target = open_in_root(root_fd, inside, make_dir=is_dir)
            try:
                if isinstance(source, int):
                    attach_tree(source, target)
                else:
                    mount(source, '/proc/self/fd/%d' % target, None, MS_BIND | MS_REC)
                # the descriptor names the directory under the new mount; its path was
                # resolved safely and no container process runs yet to swap it; the
                # submounts the recursive bind brought along become nodev (and read-only) too
                extra = MS_NODEV | (MS_RDONLY | MS_NOSUID if readonly else 0)
                for point in mounts_under(os.readlink('/proc/self/fd/%d' % target)):
                    remount_bind(point, extra)
            finally:
                os.close(target)
            debug('volume bound on %s', inside)
    finally:
        os.close(root_fd)


def remount_bind(point, flags):
    """Add flags to a bind mount, keeping those it has (a remount sets them all anew)."""
    kept = os.statvfs(point).f_flag & MS_KEPT_BY_REMOUNT
    mount(None, point, None, MS_BIND | MS_REMOUNT | kept | flags)


def remount_readonly(point):
    remount_bind(point, MS_RDONLY | MS_NOSUID | MS_NODEV)


def kernel_fs_target(merged, name):
    """merged/NAME for /proc or /sys: an ordinary directory of the image, never a link
    (runc CVE-2019-19921)."""
    target = os.path.join(merged, name)
    if os.path.islink(target):
        raise CockerError('/%s in the image is a symlink' % name)
    os.makedirs(target, exist_ok=True)
    return target


def mount_proc(merged, devnull):
    """A fresh /proc for the new pid namespace, its kernel knobs read-only, the host's
    state masked."""
    target = kernel_fs_target(merged, 'proc')
    mount('proc', target, 'proc', MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # the kernel's knobs stay the host's: /proc/sys/kernel/core_pattern alone would let the
    # container make the host run a program
    for entry in PROC_READONLY:
        path = os.path.join(target, entry)
        if os.path.exists(path):
            mount(path, path, None, MS_BIND)       # a fresh /proc has no mounts below
            remount_readonly(path)
    mask_paths(target, PROC_MASKED_FILES, PROC_MASKED_DIRS, devnull)


def mount_sys(merged):
    """A read-only sysfs (of the container's network namespace: it is mounted from it),
    firmware, sensors and SELinux masked."""
    target = kernel_fs_target(merged, 'sys')
    mount('sysfs', target, 'sysfs', MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mask_paths(target, (), SYS_MASKED_DIRS, None)


def open_devnull(path='/dev/null'):
    """An O_PATH descriptor of the host's /dev/null (or the template's, see PID 1's mount
    namespace), checked to be the real character device 1:3: what masks are bound from can
    never be a file of the container's choice (runc CVE-2025-31133)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(1, 3):
        os.close(fd)
        raise CockerError('%s is not the character device 1:3' % path)
    return fd


def mask_paths(base, files, directories, devnull):
    """Bind /dev/null over each file and an empty read-only tmpfs over each directory
    that exists below base, a kernel file system."""
    for pattern, is_dir in [(f, False) for f in files] + [(d, True) for d in directories]:
        for path in expand_paths(base, pattern):
            if os.path.isdir(path) != is_dir:
                continue
            if is_dir:
                mount('tmpfs', path, 'tmpfs', MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      'mode=555')
            else:
                mount('/proc/self/fd/%d' % devnull, path, None, MS_BIND)
                # read-only: the container's CAP_CHOWN and CAP_FOWNER would change the
                # node's owner and mode, the host's /dev/null's (a device opens for writing
                # on a read-only mount all the same)
                remount_bind(path, MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def expand_paths(base, pattern):
    """The existing paths base/pattern, where a component 'x*' stands for every entry
    starting with x (what the mask tables need, without glob and the re module it loads)."""
    paths = [base]
    for part in pattern.split('/'):
        if part.endswith('*'):
            paths = [os.path.join(p, e) for p in paths if os.path.isdir(p)
                     for e in sorted(os.listdir(p)) if e.startswith(part[:-1])]
        else:
            paths = [os.path.join(p, part) for p in paths]
    return [p for p in paths if os.path.lexists(p)]


def mount_dev(merged):
    """A minimal /dev on tmpfs with a private devpts; returns the console's pty master."""
    dev = os.path.join(merged, 'dev')
    if os.path.islink(dev):
        raise CockerError('/dev in the image is a symlink')
    os.makedirs(dev, exist_ok=True)
    mount('tmpfs', dev, 'tmpfs', MS_NOSUID | MS_NOEXEC, 'mode=755,size=65536k')
    for node, major, minor, mode in DEVICES:
        path = os.path.join(dev, node)
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)
    for link, target in DEV_LINKS:
        os.symlink(target, os.path.join(dev, link))
    os.mkdir(os.path.join(dev, 'pts'), 0o755)
    mount('devpts', os.path.join(dev, 'pts'), 'devpts', MS_NOSUID | MS_NOEXEC,
          'newinstance,ptmxmode=0666,mode=0620,gid=5')
    os.mkdir(os.path.join(dev, 'shm'), 0o1777)
    mount('shm', os.path.join(dev, 'shm'), 'tmpfs', MS_NOSUID | MS_NODEV | MS_NOEXEC,
          'mode=1777,size=65536k')
    os.mkdir(os.path.join(dev, 'mqueue'), 0o755)
    # /dev/console is a pty of the container's own devpts; cockerinit logs what it shows
    master = os.open(os.path.join(dev, 'pts', 'ptmx'), os.O_RDWR | os.O_NOCTTY)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack('i', 0))
    number = struct.unpack('I', fcntl.ioctl(master, TIOCGPTN, b'\0\0\0\0'))[0]
    console = os.path.join(dev, 'console')
    os.close(os.open(console, os.O_WRONLY | os.O_CREAT, 0o600))
    mount(os.path.join(dev, 'pts', str(number)), console, None, MS_BIND)
    return master


# =============================================================================
# Network
# =============================================================================
# HOST: the host's network.  CUSTOM: a named network namespace nns<X> with only loopback,
# made at create and kept until destroy, for the operator to furnish (ip netns exec).
# BRIDGE: at every boot a fresh nns<X>, a veth pair (eth<X> on the bridge, eth0 inside with
# the VIP and a default route via the bridge), NAT out and DNAT port mappings in iptables
# chains of cocker's own; all of it goes when the container stops.
#
# A boot writes what it is about to set up to cp/network.state *before* doing it, so the
# teardown removes exactly that (not what the files say today), after a crash too.  The VIPs
# and host ports of running containers are claimed as symlinks HOME/network/in-use/* ->
# container, so a conflict check costs a few stats however many containers the host has.

NETNS_DIR = '/run/netns'                #: where `ip netns` keeps its named namespaces
BRIDGE_DEFAULTS = {'bridge': BRIDGE_NAME, 'address': '166.88.0.1/16'}   # the manual's plan
IFNAME_MAX = 15                         #: IFNAMSIZ - 1


class Bridge(object):
    """The bridge of BRIDGE containers and the names of its iptables chains.  cidr: its
    'IP/PREFIX' as network_config has checked it."""

    def __init__(self, name, cidr):
        self.name, self.cidr = name, cidr
        address, _, prefix = cidr.partition('/')
        self.address = address                  # the containers' gateway
        self.network = Subnet(ipv4_number(address), int(prefix))
        base = 'COCKER' if name == BRIDGE_NAME else 'COCKER-' + name
        self.dnat_chain = base                  # nat: port mappings (from PREROUTING, OUTPUT)
        self.vip_chain = base + '-VIP'          # nat: the host to VIP:HOST_PORT (from OUTPUT)
        self.post_chain = base + '-POST'        # nat: masquerading (from POSTROUTING)
        self.forward_chain = base + '-FWD'      # filter: forwarding (from FORWARD)
        self.input_chain = base + '-IN'         # filter: guard of 127/8 (from INPUT)


# ---- IPv4 addresses as numbers (ipaddress costs a BRIDGE boot 2 ms of imports) ---------

def ipv4_number(text):
    """The 32-bit number of a dotted-decimal IPv4 address; ValueError if it is none.  A
    leading zero is refused on every Python (3.6 to 3.8's ipaddress took it, and 010
    means 8 to some tools)."""
    parts = text.split('.')
    if len(parts) != 4 or not all(is_decimal(part) and len(part) <= 3 and
                                  (part == '0' or part[0] != '0') for part in parts):
        raise ValueError(text)
    number = 0
    for part in parts:
        if int(part) > 255:
            raise ValueError(text)
        number = number << 8 | int(part)
    return number


def ipv4_text(number):
    return '%d.%d.%d.%d' % (number >> 24, number >> 16 & 255, number >> 8 & 255, number & 255)


def netmask_length(mask):
    """The prefix length of a netmask (a number: ones, then zeros), else None."""
    ones = '{:032b}'.format(mask).rstrip('0')
    return None if '0' in ones else len(ones)


class Subnet(object):
    """An IPv4 network: its first and last address (numbers) and its prefix length."""

    def __init__(self, number, prefixlen):
        mask = 0xffffffff ^ ((1 << (32 - prefixlen)) - 1)
        self.first, self.last = number & mask, number | (0xffffffff ^ mask)
        self.prefixlen = prefixlen

    def __contains__(self, number):
        return self.first <= number <= self.last

    def hosts(self):
        return range(self.first + 1, self.last)

    def __str__(self):
        return '%s/%d' % (ipv4_text(self.first), self.prefixlen)


class PortMapping(object):
    """One '[HOST_IP:]HOST_PORT:PORT[/udp]' item of --port-mapping."""

    def __init__(self, host_ip, host_port, port, proto):
        self.host_ip, self.host_port, self.port, self.proto = host_ip, host_port, port, proto

    def __str__(self):
        return '%s%d:%d%s' % (self.host_ip + ':' if self.host_ip else '', self.host_port,
                              self.port, '/udp' if self.proto == 'udp' else '')


def network_config_path():
    return os.path.join(HOME, 'network.conf')


def network_config():
    """The bridge from HOME/network.conf ('bridge = NAME', 'address = IP/PREFIX'), by
    default cocker0 166.88.0.1/16 as the manual has it (public address space: sites that
    route it should set a private range here)."""
    values = dict(BRIDGE_DEFAULTS)
    path = network_config_path()
    for number, line in enumerate(read_small(path, '').splitlines(), 1):
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition('=')
        if not sep or key.strip() not in values:
            raise CockerError("%s line %d: expected 'bridge = NAME' or 'address = IP/PREFIX'"
                              % (path, number))
        values[key.strip()] = value.strip()
    check_ifname(values['bridge'], 'bridge name in %s' % path)
    cidr = bridge_cidr(values['address'])
    if cidr is None:
        raise CockerError("%s: bridge address '%s' is invalid (expected IP/PREFIX, e.g. "
                          "172.30.0.1/16)" % (path, values['address']))
    return Bridge(values['bridge'], cidr)


def bridge_cidr(text):
    """'IP/PREFIX' (or IP/NETMASK) -> 'IP/PREFIX', if IP is a host address of a subnet
    of 4 addresses at least; else None."""
    address, _, prefix = text.partition('/')
    try:
        number = ipv4_number(address)
        if '.' in prefix:                       # a netmask (ones, then zeros), else a
            mask = ipv4_number(prefix)          # host mask (its inverse), as ipaddress
            prefix = netmask_length(mask)
            if prefix is None:
                prefix = netmask_length(mask ^ 0xffffffff)
            prefix = '' if prefix is None else str(prefix)
    except ValueError:
        return None
    if not is_decimal(prefix) or int(prefix) > 30:
        return None
    subnet = Subnet(number, int(prefix))
    if number in (subnet.first, subnet.last):
        return None
    return '%s/%d' % (address, subnet.prefixlen)


IFNAME_CHARS = NAME_CHARS[:62] + '_.-'


def check_ifname(name, what):
    if (not name or len(name) > IFNAME_MAX or name in ('.', '..')
            or any(ch not in IFNAME_CHARS for ch in name)):
        raise usage_error("%s '%s' is invalid (1 to %d letters, digits, '_', '.' or '-')"
                          % (what, name, IFNAME_MAX))
    return name


def parse_ipv4(text, what):
    """A dotted-decimal IPv4 address (see ipv4_number), or a usage error."""
    try:
        ipv4_number(text)
        return text
    except ValueError:
        raise usage_error("%s '%s' is not an IPv4 address" % (what, text))


def check_vip(vip, bridge):
    """A VIP must be a host address of the bridge subnet other than the bridge's own."""
    number = ipv4_number(parse_ipv4(vip, 'VIP'))
    network = bridge.network
    if number not in network:
        raise CockerError('VIP %s is outside the bridge subnet %s' % (vip, network))
    for reserved, what in ((network.first, 'network'), (network.last, 'broadcast'),
                           (ipv4_number(bridge.address), 'bridge')):
        if number == reserved:
            raise CockerError('VIP %s is the %s address of %s' % (vip, what, network))
    return vip


def parse_port_mappings(text):
    """'[HOST_IP:]HOST_PORT:PORT[/tcp|/udp],...' -> [PortMapping]; one host port once."""
    mappings = []
    for item in split_list(text or ''):
        spec, _, proto = item.partition('/')
        parts = spec.split(':')
        if proto not in ('', 'tcp', 'udp') or len(parts) not in (2, 3):
            raise usage_error("port mapping '%s' is invalid (expected "
                              "[HOST_IP:]HOST_PORT:PORT[/udp])" % item)
        host_ip = parse_ipv4(parts[0], "host address of port mapping '%s'" % item) \
            if len(parts) == 3 else None
        if host_ip == '0.0.0.0':
            host_ip = None                      # every address, as without one
        ports = []
        for port in parts[-2:]:
            if not is_decimal(port) or not 0 < int(port) < 65536:
                raise usage_error("port mapping '%s' is invalid (ports are 1 to 65535)" % item)
            ports.append(int(port))
        mapping = PortMapping(host_ip, ports[0], ports[1], proto or 'tcp')
        for other in mappings:
            if other.proto == mapping.proto and other.host_port == mapping.host_port and \
                    addresses_overlap(other.host_ip, mapping.host_ip):
                raise usage_error("port mapping '%s' repeats host port %d/%s"
                                  % (item, mapping.host_port, mapping.proto))
        mappings.append(mapping)
    return mappings


def addresses_overlap(a, b):
    """Two listening addresses collide if either is 'every address' or they are equal."""
    return a in (None, '0.0.0.0') or b in (None, '0.0.0.0') or a == b


def veth_name(name):
    """eth<X>: the host end of a BRIDGE container's veth pair (C cocker name)."""
    return 'eth' + netns_name(name)[3:]


def netns_path(name):
    return os.path.join(NETNS_DIR, netns_name(name))


# ---- named network namespaces (what `ip netns add/del` does, without a process) --------

class in_netns(object):
    """Run the enclosed code (and the commands it starts) in another network namespace."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.home = os.open('/proc/self/ns/net', os.O_RDONLY | os.O_CLOEXEC)
            with Rollback(os.close, self.home):
                setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        try:
            setns(self.home, CLONE_NEWNET)
        finally:
            os.close(self.home)


def add_netns(path):
    """A new network namespace kept alive by a bind mount on `path`, as `ip netns add` does
    it (NETNS_DIR a shared mount, so a later `ip netns del` reaches every copy)."""
    os.makedirs(NETNS_DIR, 0o755, exist_ok=True)
    try:
        mount('', NETNS_DIR, 'none', MS_SHARED | MS_REC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        mount(NETNS_DIR, NETNS_DIR, 'none', MS_BIND | MS_REC)
        mount('', NETNS_DIR, 'none', MS_SHARED | MS_REC)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    with Rollback(os.unlink, path), in_netns('/proc/self/ns/net'):   # come back here after
        unshare(CLONE_NEWNET)
        mount('/proc/self/ns/net', path, 'none', MS_BIND)
    debug('created network namespace %s', path)


def delete_netns(path):
    """`ip netns del`; quiet when it is already gone."""
    if not os.path.lexists(path):
        return                          # (the usual case at destroy: no ctypes to load)
    try:
        umount2(path, MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    remove_file(path)


def link_exists(ifname):
    return os.path.exists(os.path.join('/sys/class/net', ifname))


def remove_link(ifname):
    """`ip link del` of a link that is there; quiet if it went meanwhile (with its namespace)."""
    if not link_exists(ifname):
        return
    try:
        run(['ip', 'link', 'del', ifname])
    except CockerError:
        if link_exists(ifname):
            raise


def set_sysctl(path, value, directory=None):
    """Write a one-digit /proc/sys switch (IP forwarding, route_localnet, accept_ra) that
    has another value; path relative to the descriptor directory, if given."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC, dir_fd=directory)
    try:
        if os.pread(fd, 1, 0) != value.encode():
            os.pwrite(fd, value.encode(), 0)
            log('INFO', 'set %s to %s' % (path, value))
    finally:
        os.close(fd)


# ---- kernel notices: a link gone, a chain deleted ------------------------------------
# Waits that are events: the notices the kernel sends to a netlink socket that joined
# their group, read as netlink_messages.

def netlink_messages(data, header):
    """(type, sender's port id, family header, {attribute type: its bytes, a string's NUL
    cut}) of each netlink message in data; header: the length of the family header (16:
    ifinfomsg, 4: nfgenmsg).  A message is a 16-byte nlmsghdr (length, type, flags,
    sequence, port id), the family header, then attributes (2-byte length, 2-byte type,
    payload), each aligned to 4 bytes."""
    at = 0
    while at + 16 + header <= len(data):
        length, kind, _, _, sender = struct.unpack_from('=IHHII', data, at)
        if length < 16 + header or at + length > len(data):
            break
        attributes, here = {}, at + 16 + header
        while here + 4 <= at + length:
            size, number = struct.unpack_from('=HH', data, here)
            if size < 4 or here + size > at + length:
                break
            value = data[here + 4:here + size]
            attributes[number & 0x3fff] = value[:-1] if value.endswith(b'\0') else value
            here += (size + 3) & ~3
        yield kind, sender, data[at + 16:at + 16 + header], attributes
        at += (length + 3) & ~3


def netlink_socket(protocol, groups):
    """A netlink socket of that protocol, bound to any port id and to the groups (a mask)."""
    import _socket
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, protocol)
    try:
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


class link_watch(object):
    """The host's link events (an rtnetlink socket on RTMGRP_LINK), to wait for a link to go
    without polling; made before what removes it, so that no event is missed."""

    def __init__(self, ifname):
        import _socket
        self.ifname = ifname
        self.index = int(read_small('/sys/class/net/%s/ifindex' % ifname, '0'))
        self.socket = netlink_socket(0, 1)      # NETLINK_ROUTE, the group RTMGRP_LINK

    def gone_within(self, timeout):
        """Whether the link went within timeout seconds: its RTM_DELLINK came (its name is
        free by then; its /sys entry goes a moment later), or it is not there."""
        deadline = time.monotonic() + timeout
        while link_exists(self.ifname):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.socket.settimeout(left)
            try:
                if self.deleted(self.socket.recv(65536)):
                    return True
            except OSError as e:                # the time is up (or events were lost)
                if e.errno != errno.ENOBUFS:
                    return not link_exists(self.ifname)
        return True

    def deleted(self, data):
        """Is one of these messages the RTM_DELLINK of our link (an AF_UNSPEC one: the
        bridge says first, in an AF_BRIDGE one, that the port left)?  Their family header
        is an ifinfomsg (family, pad, type, index, ...)."""
        return any(kind == 17 and info[0] == 0 and struct.unpack_from('=i', info, 4)[0] ==
                   self.index for kind, _, info, _ in netlink_messages(data, 16))

    def close(self):
        self.socket.close()


def watch_link(ifname):
    """A link_watch of ifname if it is there (None if not, or if rtnetlink cannot be listened
    to here: the caller then deletes it itself)."""
    if not (ifname and link_exists(ifname)):
        return None
    try:
        return link_watch(ifname)
    except OSError as e:
        log('WARN', 'cannot listen to link events: %s' % error_text(e))
        return None


class chain_watch(object):
    """nf_tables' notices (an nfnetlink socket that joins NFNLGRP_NFTABLES while it waits),
    to see a transaction that deletes chains commit.  iptables-restore (nft) ends only an
    RCU grace period later: the kernel frees what was deleted first, and any nfnetlink
    socket closed meanwhile waits for that too, ours as well.  So ours is made once and
    never closed: it goes with the process (a monitor lets go of running.lock first, the
    stop command goes on meanwhile)."""

    def __init__(self):
        self.socket = netlink_socket(12, 0)     # NETLINK_NETFILTER, no group yet

    def join(self, yes):
        """In the group (NETLINK_ADD_MEMBERSHIP) or out (DROP): notices reach it only while
        it waits, none are kept for later."""
        self.socket.setsockopt(270, 1 if yes else 2, 7)     # SOL_NETLINK, NFNLGRP_NFTABLES

    def saw_deleted(self, chains, command):
        """Wait for the notice, sent by the command's own socket (its port id: its pid),
        that a nat chain (IPv4) of `chains` went -> True, or for its stderr to say
        something or close -> False."""
        import select
        poller = select.poll()
        poller.register(self.socket.fileno(), select.POLLIN)
        ended = command.proc.stderr.fileno()
        poller.register(ended, select.POLLIN)
        while True:
            if ended in dict(poller.poll()):
                return False
            try:
                data = self.socket.recv(65536)
            except OSError as e:                # (notices were lost: ENOBUFS)
                if e.errno != errno.ENOBUFS:
                    raise
                return False
            if any(kind == NFT_DELCHAIN and sender == command.proc.pid and info[0] == 2 and
                   attributes.get(1) == b'nat' and             # the table, the chain
                   attributes.get(3, b'').decode('ascii', 'replace') in chains
                   for kind, sender, info, attributes in netlink_messages(data, 4)):
                return True


def watch_chains(iptables):
    """The process's chain_watch, in the group, if iptables is iptables-nft and nfnetlink
    can be listened to; else None (the command's end is then waited for)."""
    if CHAIN_WATCH and CHAIN_WATCH[0] is None or not iptables_nft(iptables):
        return None
    try:
        if not CHAIN_WATCH:
            CHAIN_WATCH.append(chain_watch())
        CHAIN_WATCH[0].join(True)
        return CHAIN_WATCH[0]
    except OSError as e:
        log('WARN', 'cannot listen to nf_tables notices: %s' % error_text(e))
        del CHAIN_WATCH[:]
        CHAIN_WATCH.append(None)        # (said once)
        return None


def forget_chain_watch():
    """In a process that has closed the descriptors it was not given (a monitor): the
    watch made before is gone, its number may be another's."""
    for watch in CHAIN_WATCH:
        if watch is not None:
            watch.socket.detach()
    del CHAIN_WATCH[:]


#: nlmsg_type of nf_tables' chain deletion (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELCHAIN)
NFT_DELCHAIN = (10 << 8) | 5
#: the process's chain_watch once made (None: it could not be), never closed
CHAIN_WATCH = []


# ---- iptables --------------------------------------------------------------------------

def iptables_command():
    """iptables, or the variant COCKER_IPTABLES names (iptables-legacy, iptables-nft)."""
    return os.environ.get('COCKER_IPTABLES') or 'iptables'


def iptables_nft(iptables):
    """Is this iptables command iptables-nft (not -legacy): its name, or where the name
    found on PATH leads (xtables-nft-multi, iptables-nft)?"""
    for directory in ('' if os.sep in iptables else os.environ.get('PATH', '')).split(':'):
        path = os.path.realpath(os.path.join(directory, iptables))
        if os.access(path, os.X_OK):
            return 'legacy' not in os.path.basename(path)
    return False


def iptables_restore(iptables, lines, deleting=()):
    """Apply (table, [words]) lines as one transaction (iptables-restore --noflush); one
    that deletes nat chains (deleting: their names) is done once the kernel says so."""
    text = restore_text(lines)
    with locked('network', 'iptables'):
        try:
            restore_until_committed([iptables + '-restore', '-w', '--noflush'], text, deleting,
                                    watch_chains(iptables) if deleting else None)
        except CockerError as e:
            if 'option' not in e.message:           # iptables < 1.6.2 has no -w
                raise
            run([iptables + '-restore', '--noflush'], input=text)


def restore_until_committed(argv, text, deleting, watch):
    """Run iptables-restore to its end, or (deleting chains, watched) until nf_tables'
    notice that one of them went: the transaction has committed then, and the command only
    waits for an RCU grace period before it ends (16 ms; see chain_watch), that it is left
    to wait out alone.  No notice (iptables-legacy, a failure): its end is waited for."""
    LEFT_TO_END[:] = [c for c in LEFT_TO_END if c.proc.poll() is None]
    try:
        command = Command(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE)
        try:
            command.give_input(text.encode('utf-8'))
            if watch is not None and watch.saw_deleted(deleting, command):
                debug('the deletion of %s has committed: %s left to end by itself',
                      ' '.join(deleting), argv[0])
                command.leave()
                return
            command.finish()
        except BaseException:
            command.close(kill=True)
            raise
    finally:
        if watch is not None:
            watch.join(False)


def restore_text(lines):
    """iptables-restore's input for (table, [words]) lines."""
    tables = {}
    for table, words in lines:
        tables.setdefault(table, []).append(restore_line(words))
    return ''.join('*%s\n%sCOMMIT\n' % (table, ''.join(r + '\n' for r in rules))
                   for table, rules in sorted(tables.items()))


class PendingRules(object):
    """iptables_restore left running while the boot goes on (the rules of one container: 2
    to 4 ms of iptables, more as the table grows) -> finish() waits for it; should it
    fail, the rules are applied again as iptables_restore does, after the chains are made
    again (a firewall reload may have flushed them).  The command holds the iptables lock
    too: if cocker is killed meanwhile, the repair that removes the rules waits for it."""

    def __init__(self, iptables, bridge, lines):
        self.iptables, self.bridge, self.lines = iptables, bridge, lines
        self.lock = locked('network', 'iptables').__enter__()
        with Rollback(self.lock.close):
            self.command = Command([iptables + '-restore', '-w', '--noflush'], stdin=PIPE,
                                   stdout=PIPE, stderr=PIPE, lends=self.lock.fd)
            self.command.give_input(restore_text(lines).encode('utf-8'))

    def finish(self):
        try:
            self.command.finish()
            return
        except CockerError:
            pass                        # (no -w before iptables 1.6.2, or no chains)
        finally:
            self.lock.close()
        ensure_chains(self.bridge, self.iptables)
        iptables_restore(self.iptables, self.lines)

    def close(self, kill=False):
        try:
            self.command.close(kill)
        finally:
            self.lock.close()


def restore_line(words):
    """One line of iptables-restore input.  Its words are names and addresses cocker has
    checked: one with a blank or a quote would be split or joined there, so it is refused."""
    for word in words:
        if not word or any(ch in word for ch in ' \t\n"\'#'):
            raise CockerError('iptables rule word %r cannot be passed to iptables-restore'
                              % word)
    return ' '.join(words)


def iptables_ok(iptables, table, *args):
    try:
        run([iptables, '-w', '-t', table] + list(args))
        return True
    except CockerError:
        return False


def bridge_jumps(bridge):
    """(table, built-in chain, rule words) that lead into cocker's chains.  The address-type
    match keeps port mappings to connections addressed to this host: the host's own
    connections to the same port of another machine pass untouched."""
    local = ['-m', 'addrtype', '--dst-type', 'LOCAL', '-j', bridge.dnat_chain]
    # from other machines never to 127/8: a mapping bound to 127.0.0.1 stays the host's own
    return [('nat', 'PREROUTING', ['!', '-d', '127.0.0.0/8'] + local), ('nat', 'OUTPUT', local),
            ('nat', 'OUTPUT', ['-d', str(bridge.network), '-j', bridge.vip_chain]),
            ('nat', 'POSTROUTING', ['-j', bridge.post_chain]),
            ('filter', 'FORWARD', ['-j', bridge.forward_chain]),
            ('filter', 'INPUT', ['-j', bridge.input_chain])]


def bridge_chains(bridge):
    """(table, chain, fixed rules as word lists) of a bridge."""
    b, net = bridge.name, str(bridge.network)
    established = ['-m', 'conntrack', '--ctstate', 'RELATED,ESTABLISHED']
    return [
        ('nat', bridge.dnat_chain, []),
        ('nat', bridge.vip_chain, []),
        ('nat', bridge.post_chain, [
            # 127.0.0.1:HOSTPORT reaches the container (route_localnet lets it leave lo)
            ['-s', '127.0.0.0/8', '-o', b, '-j', 'MASQUERADE'],
            # a container reaching a mapped port of the host, so the reply comes back the same way
            ['-s', net, '-o', b, '-m', 'conntrack', '--ctstate', 'DNAT', '-j', 'MASQUERADE'],
            # containers reaching beyond the host (--host-eth ones: their rules come first;
            # the host's own packets from the bridge address stay as they are)
            ['-s', net, '!', '-o', b, '-m', 'addrtype', '!', '--src-type', 'LOCAL', '-j',
             'MASQUERADE']]),
        # routed in: only replies and published ports (a neighbour routing the subnet via
        # this host reaches nothing else); out, and container to container: everything
        ('filter', bridge.forward_chain, [
            ['-o', b] + established + ['-j', 'ACCEPT'],
            ['-o', b, '-m', 'conntrack', '--ctstate', 'DNAT', '-j', 'ACCEPT'],
            ['-i', b, '-j', 'ACCEPT'],
            ['-o', b, '-j', 'DROP']]),
        # route_localnet would let a container reach the host's 127.0.0.1 services with a
        # crafted packet (CVE-2020-8558): only replies and mapped connections get in
        ('filter', bridge.input_chain, [
            ['-i', b, '-d', '127.0.0.0/8', '-m', 'conntrack', '!', '--ctstate',
             'RELATED,ESTABLISHED,DNAT', '-j', 'DROP']]),
    ]


def ensure_chains(bridge, iptables):
    """Create whichever of the bridge's chains, rules and jumps is missing.  Under a lock:
    declaring a chain that exists (iptables-restore ':CHAIN') would empty it."""
    with locked('network', 'chains'):
        create_missing_chains(bridge, iptables)
        os.makedirs(network_path(), 0o700, exist_ok=True)
        write_small(chains_marker(bridge), chains_layout(bridge))


def create_missing_chains(bridge, iptables):
    for table, chain, rules in bridge_chains(bridge):
        if not iptables_ok(iptables, table, '-n', '-L', chain):
            iptables_restore(iptables, [(table, [':%s' % chain, '-', '[0:0]'])] +
                             [(table, ['-A', chain] + rule) for rule in rules])
            continue
        for rule in rules:          # a chain of an older cocker gets the rules it lacks
            if not iptables_ok(iptables, table, '-C', chain, *rule):
                run([iptables, '-w', '-t', table, '-A', chain] + rule)
    for table, chain, rule in bridge_jumps(bridge):
        if not iptables_ok(iptables, table, '-C', chain, *rule):
            run([iptables, '-w', '-t', table, '-I', chain, '1'] + rule)


def chains_marker(bridge):
    return network_path('chains.' + bridge.name)


def chains_layout(bridge):
    """What ensure_chains last set up: the bridge's interface index and a digest of the
    chain layout.  A boot compares it (two small reads) instead of asking iptables, and so
    notices a recreated bridge or the chains of an older cocker."""
    sha256 = light_hash('sha256')
    layout = repr((bridge_chains(bridge), bridge_jumps(bridge))).encode()
    return '%s %s' % (read_small('/sys/class/net/%s/ifindex' % bridge.name, ''),
                      sha256(layout).hexdigest()[:16])


def container_chain(name, kind):
    """A BRIDGE container's own nat chain: CKR-<X>-D for its port mappings, CKR-<X>-V for
    the host to VIP:HOST_PORT, X as in its netns name.  The bridge's chains hold only a jump
    into it: a rule deleted from a chain is compared with every rule there (iptables-nft
    parses each: a stop's -D took 16 ms with no other container, 29 ms beside 500), a jump
    among jumps costs far less."""
    return 'CKR-%s-%s' % (netns_name(name)[3:], kind)


def container_rules(name, bridge, vip, mappings, host_eth):
    """One container's rules -> (chains, jumps, first): its own chains (table, chain, [rule
    words]), made at boot, flushed and deleted at its end; the jumps into them appended to
    the bridge's chains, and with --host-eth its masquerading inserted first in the bridge's
    (before the bridge's own rule, that masquerades every other container), each (table,
    [chain, rule words]).  DNAT per port mapping; each rule tagged with the container's
    name for whoever reads iptables-save."""
    tag = ['-m', 'comment', '--comment', 'cocker:' + name]
    dnat, to_vip = [], []
    for m in mappings:
        match = ['-p', m.proto, '-m', m.proto, '--dport', str(m.host_port)] + tag + [
            '-j', 'DNAT', '--to-destination', '%s:%d' % (vip, m.port)]
        dnat.append((['-d', m.host_ip + '/32'] if m.host_ip else []) + match)
        if m.host_port != m.port:
            # the manual's `ssh root@VIP -p HOST_PORT` from the host: only to this VIP
            to_vip.append(['-d', vip + '/32'] + match)
    chains, jumps, first = [], [], []
    for kind, parent, own in (('D', bridge.dnat_chain, dnat), ('V', bridge.vip_chain, to_vip)):
        if own:
            chain = container_chain(name, kind)
            chains.append(('nat', chain, own))
            jumps.append(('nat', [parent] + tag + ['-j', chain]))
    if host_eth:
        # masqueraded out of that interface; out of any other (but the bridge) it leaves
        # the bridge's chain, routed as it is, on to the rest of POSTROUTING
        source = [bridge.post_chain, '-s', vip + '/32']
        first = [('nat', source + ['-o', host_eth] + tag + ['-j', 'MASQUERADE']),
                 ('nat', source + ['!', '-o', bridge.name] + tag + ['-j', 'RETURN'])]
    return chains, jumps, first


def rules_to_add(chains, jumps, first):
    """iptables-restore lines (table, words) of container_rules: its chains declared and
    filled, the jumps appended, the rules that come first inserted (the last one first, so
    that they keep their order)."""
    lines = [(table, [':' + chain, '-', '[0:0]']) for table, chain, _ in chains]
    lines += [(table, ['-A', chain] + words) for table, chain, own in chains for words in own]
    lines += [(table, ['-A'] + words) for table, words in jumps]
    return lines + [(table, ['-I', words[0], '1'] + words[1:]) for table, words in
                    reversed(first)]


def delete_rules(iptables, rules, chains=()):
    """Delete a container's rules from the bridge's chains, then flush and delete its own
    chains (table, chain): at once, or one by one when some are already gone (a firewall
    reload, a boot killed before they were made) or there twice (the boot of an older
    cocker that did not know of the chains: each copy carries the container's tag)."""
    if not rules and not chains:
        return
    try:
        lines = [(table, ['-D'] + words) for table, words in rules] + \
            [(table, [op, chain]) for table, chain in chains for op in ('-F', '-X')]
        # (a notice of nat says only that the nat part committed: tables commit one by one)
        iptables_restore(iptables, lines, [chain for _, chain in chains]
                         if all(table == 'nat' for table, _ in lines) else ())
        return
    except CockerError:
        pass
    for table, words in rules:
        delete_every_copy(iptables, table, words)
    for table, chain in chains:
        if not delete_chain(iptables, table, chain):
            raise CockerError('cannot delete iptables chain %s (still referenced?)' % chain)


def delete_every_copy(iptables, table, words):
    """-D of a rule (CHAIN WORD...) until none is left."""
    while iptables_ok(iptables, table, '-D', *words):
        pass


def delete_chain(iptables, table, chain):
    """Flush and delete a chain -> whether it is gone (or was not there)."""
    return not iptables_ok(iptables, table, '-F', chain) or \
        iptables_ok(iptables, table, '-X', chain)


# ---- the bridge ------------------------------------------------------------------------

def create_bridge(bridge, iptables):
    """Create the bridge and its chains on first use (under the exclusive bridge lock)."""
    with locked('network', 'bridge'):
        if not link_exists(bridge.name):
            run(['ip', '-batch', '-'], input='link add %s type bridge\n'
                'addr add %s dev %s\nlink set %s up\n'
                % (bridge.name, bridge.cidr, bridge.name, bridge.name))
            log('INFO', 'created bridge %s %s' % (bridge.name, bridge.cidr))
            ensure_chains(bridge, iptables)


def set_bridge_sysctls(bridge):
    """IPv4 forwarding and route_localnet on; router advertisements from containers never
    configure the host (IPv6 forwarding is left as it is).  From a descriptor of each
    directory: the kernel finds /proc/sys/net/ipv4 (ipv6) among those of every network
    namespace, one by one (0.5 ms at 500 BRIDGE containers), each time a path names it."""
    groups = [('/proc/sys/net/ipv4', (('ip_forward', '1'),
                                      ('conf/%s/route_localnet' % bridge.name, '1')))]
    if has_ipv6():
        groups.append(('/proc/sys/net/ipv6', (('conf/%s/accept_ra' % bridge.name, '0'),)))
    for directory, switches in groups:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path, value in switches:
                set_sysctl(path, value, fd)
        finally:
            os.close(fd)


def delete_bridge(bridge):
    """-a del_bridge: refused while a BRIDGE container runs (a dead one is repaired)."""
    with locked('network', 'bridge'):               # waits for boots setting up
        users = []
        for n in list_containers():
            if container_net(n) != 'BRIDGE':
                continue
            with locked('container', n, wait=False) as held:
                if held:
                    repair_if_dead(n)
            if container_status(n) != 'STOPED':
                users.append(n)
        if users:
            raise CockerError('bridge %s is used by running container(s) %s'
                              % (bridge.name, ', '.join(users)))
        remove_bridge(bridge, iptables_command())
        log('INFO', 'removed bridge %s and its iptables chains' % bridge.name)


def remove_bridge(bridge, iptables):
    """Remove the bridge and cocker's chains of it (nothing else's): with no container
    running, a container's chain still jumped to was lost with its record (an earlier
    cocker's teardown that could not read it)."""
    for table, chain, rule in bridge_jumps(bridge):
        delete_every_copy(iptables, table, [chain] + rule)
    lost = set()
    for chain in (bridge.dnat_chain, bridge.vip_chain):
        try:
            rules = [r.split() for r in run([iptables, '-w', '-t', 'nat', '-S', chain])
                     .splitlines()]
        except CockerError:
            continue                    # (not there)
        lost.update(r[-1] for r in rules if r[-2:-1] == ['-j'] and r[-1].startswith('CKR-'))
    for table, chain, _ in bridge_chains(bridge):
        delete_chain(iptables, table, chain)
    for chain in sorted(lost):
        delete_chain(iptables, 'nat', chain)
    remove_link(bridge.name)
    remove_file(chains_marker(bridge))


# ---- VIPs and host ports: allocation and claims ----------------------------------------

def network_path(*parts):
    return os.path.join(HOME, 'network', *parts)


def symlink_owner(path):
    try:
        return os.readlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def set_symlink(path, target):
    """Point `path` at `target` atomically (replacing what was there)."""
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    tmp = '%s.tmp%d' % (path, os.getpid())
    remove_file(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, path)


def container_busy(name):
    """Does a command hold the container's lock (creating, booting, stopping it)?"""
    with locked('container', name, wait=False) as held:
        return held is None


def holds_claim(owner, name):
    """Is `owner` (not `name`) running, booting or stopping, so its claims stand?"""
    if owner is None or owner == name:
        return False
    # busy first: a boot that ends between the two checks is running by the second
    return container_busy(owner) or monitor_alive(owner)


def address_taken(owner, name):
    """Is an address record of `owner` still good (its container exists or is being made)?"""
    if owner is None or owner == name:
        return False
    if os.path.isdir(container_dir(owner)):     # the common case, without taking a lock
        return True
    # then busy: a create that ends between the two checks has its directory by the second
    return container_busy(owner) or os.path.isdir(container_dir(owner))


def allocate_vip(name, bridge):
    """The lowest host address of the bridge subnet no container has been given."""
    with locked('network', 'claims'):
        for number in bridge.network.hosts():
            address = ipv4_text(number)
            if address == bridge.address:
                continue
            path = network_path('addresses', address)
            if not address_taken(symlink_owner(path), name):
                set_symlink(path, name)
                return address
    raise CockerError('no free address left in %s' % bridge.network)


def note_vip(name, vip):
    """Record a VIP given by hand, so that automatic choices avoid it."""
    with locked('network', 'claims'):
        path = network_path('addresses', vip)
        if not address_taken(symlink_owner(path), name):
            set_symlink(path, name)


def forget_vip(name, vip):
    if vip:
        with locked('network', 'claims'):
            path = network_path('addresses', vip)
            if symlink_owner(path) == name:
                remove_file(path)


def host_port_text(host_ip, port, proto):
    return '%s%d/%s' % (host_ip + ':' if host_ip else '', port, proto)


def port_claim_dir(mapping):
    return network_path('in-use', '%s-%d' % (mapping.proto, mapping.host_port))


def check_port_free(mapping):
    """Refuse a host port that a host process listens on (a bind test, as the kernel sees it)."""
    import _socket as socket            # (socket.py's enums cost a BRIDGE boot 5 ms)
    kind = socket.SOCK_DGRAM if mapping.proto == 'udp' else socket.SOCK_STREAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:      # TIME_WAIT leftovers are no listeners
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((mapping.host_ip or '0.0.0.0', mapping.host_port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CockerError('host port %s is in use by a process of the host' % host_port_text(
                mapping.host_ip, mapping.host_port, mapping.proto))
        if e.errno == errno.EADDRNOTAVAIL:
            raise CockerError('%s is not an address of this host (port mapping %s)'
                              % (mapping.host_ip, mapping))
        raise
    finally:
        s.close()


def repair_dead_holders(name, vip, mappings):
    """A container that died holding our VIP or ports, and that no command has repaired yet,
    still has its address and rules on the host: repair it now, so it cannot shadow us."""
    paths = [network_path('in-use', vip)]
    for m in mappings:
        try:
            paths += [os.path.join(port_claim_dir(m), a) for a in os.listdir(port_claim_dir(m))]
        except FileNotFoundError:
            pass
    for owner in set(symlink_owner(p) for p in paths) - {None, name}:
        if os.path.isdir(container_dir(owner)) and container_status(owner) == 'DEAD':
            with locked('container', owner, wait=False) as held:
                if held:
                    repair_if_dead(owner)


def claim_network(name, vip, mappings):
    """Claim the VIP and the host ports for `name`, or raise naming their holder."""
    repair_dead_holders(name, vip, mappings)
    claims = [network_path('in-use', vip)]
    with locked('network', 'claims'):
        owner = symlink_owner(claims[0])
        if holds_claim(owner, name):
            raise CockerError("VIP %s is in use by container '%s'" % (vip, owner))
        for m in mappings:
            directory = port_claim_dir(m)
            try:
                taken = os.listdir(directory)
            except FileNotFoundError:
                taken = []
            for address in taken:
                owner = symlink_owner(os.path.join(directory, address))
                if addresses_overlap(address, m.host_ip) and holds_claim(owner, name):
                    raise CockerError("host port %s is in use by container '%s'" % (
                        host_port_text(m.host_ip, m.host_port, m.proto), owner))
            check_port_free(m)
            claims.append(os.path.join(directory, m.host_ip or '0.0.0.0'))
        for path in claims:
            set_symlink(path, name)
    return claims


def release_claims(name, claims):
    with locked('network', 'claims'):
        for path in claims:
            if symlink_owner(path) == name:
                remove_file(path)
                if os.path.dirname(path) != network_path('in-use'):
                    try:
                        os.rmdir(os.path.dirname(path))
                    except OSError:
                        pass


# ---- per container ---------------------------------------------------------------------

def container_net(name):
    return read_attr(name, 'net', 'HOST') or 'HOST'


def read_network_state(name):
    text = read_attr(name, 'network.state')
    if not text:
        return None
    try:
        return parse_network_state(text)
    except ValueError:
        log('WARN', 'container %s: unreadable network.state ignored' % name)
        return None


def network_state_text(state):
    """cp/network.state: a 'veth', 'netns' and 'iptables' line, a 'claim PATH' line per
    claim, a 'rule TABLE WORD...' line per rule in the bridge's chains and a 'chain TABLE
    NAME' line per chain of the container's own (not JSON: json loads re, 8 ms of a BRIDGE
    boot)."""
    for _, words in state['rules']:
        if any(not word or word.split() != [word] for word in words):
            raise CockerError('iptables rule %s cannot be recorded (a word with a blank)'
                              % printable(' '.join(words)))
    lines = ['%s %s' % (key, state[key]) for key in ('veth', 'netns', 'iptables')] + \
        ['claim %s' % path for path in state['claims']] + \
        ['rule %s %s' % (table, ' '.join(words)) for table, words in state['rules']] + \
        ['chain %s %s' % (table, chain) for table, chain in state['chains']]
    if any('\n' in line for line in lines):
        raise CockerError('network state of %s cannot be recorded (a newline in a path)'
                          % state['veth'])
    return ''.join(line + '\n' for line in lines)


def parse_network_state(text):
    """network_state_text's dict back (a state that cocker 1.0 wrote as JSON too); raise
    ValueError if it is neither."""
    if text.startswith('{'):
        import json
        return json.loads(text)
    state = {'claims': [], 'rules': [], 'chains': []}
    for line in text.splitlines():
        key, _, value = line.partition(' ')
        if key == 'claim':
            state['claims'].append(value)
        elif key == 'rule' and ' ' in value:
            table, _, words = value.partition(' ')
            state['rules'].append([table, words.split(' ')])
        elif key == 'chain' and len(value.split(' ')) == 2:
            state['chains'].append(value.split(' '))
        elif key in ('veth', 'netns', 'iptables'):
            state[key] = value
        else:
            raise ValueError('unknown line %r' % line)
    return state


def setup_network(name):
    """Host side of the container's network before it boots -> what is left running, a
    Pending that boot_container finishes while PID 1 sets up (or None)."""
    net = container_net(name)
    if net == 'CUSTOM' and not os.path.exists(netns_path(name)):
        add_custom_netns(name)                  # gone with a reboot: /run is a tmpfs
    elif net == 'BRIDGE':
        return setup_bridge_network(name)
    return None


def add_custom_netns(name):
    path = netns_path(name)
    add_netns(path)
    with in_netns(path):
        run(['ip', 'link', 'set', 'lo', 'up'])


def start_ip_batch(text):
    """`ip -batch -` started with its whole input, to be finished later (Command.finish)."""
    command = Command(['ip', '-batch', '-'], stdin=PIPE, stdout=PIPE, stderr=PIPE)
    command.give_input(text.encode('utf-8'))
    return command


def setup_bridge_network(name):
    """Everything is checked and claimed before the first change to the host; then the
    bridge (on first use), the namespace, the veth pair and the rules -> the Pending rest."""
    iptables = iptables_command()
    bridge = network_config()
    vip = read_attr(name, 'vip')
    if not vip:
        vip = allocate_vip(name, bridge)
        write_attr(name, 'vip', vip)
    vip = check_vip(vip, bridge)
    mappings = parse_port_mappings(read_attr(name, 'port_mapping', ''))
    host_eth = read_attr(name, 'host_eth')
    if host_eth and not link_exists(host_eth):
        raise CockerError("host interface '%s' (--host-eth) does not exist" % host_eth)
    veth, path = veth_name(name), netns_path(name)
    chains, jumps, first = container_rules(name, bridge, vip, mappings, host_eth)
    if read_attr(name, 'network.state'):
        teardown_network(name)                  # a boot killed half-way left it
    claims = claim_network(name, vip, mappings)
    with Rollback(release_claims, name, claims):        # (should the state be unwritable)
        write_attr(name, 'network.state', network_state_text({
            'veth': veth, 'netns': path, 'claims': claims, 'iptables': iptables,
            'rules': jumps + first, 'chains': [(table, chain) for table, chain, _ in chains]}))
    if not link_exists(bridge.name):
        create_bridge(bridge, iptables)
    # shared: boots go on side by side, del_bridge waits for them (and they for it), also
    # for the Pending rest
    lock = locked('network', 'bridge', shared=True).__enter__()
    with Rollback(lock.close):
        if not link_exists(bridge.name):
            raise CockerError('bridge %s was removed while booting; boot again' % bridge.name)
        set_bridge_sysctls(bridge)
        if read_small(chains_marker(bridge)) != chains_layout(bridge):
            ensure_chains(bridge, iptables)
        pair, added = wire_container(name, bridge, vip, veth, path, iptables,
                                     rules_to_add(chains, jumps, first))
    debug('%s: %s on %s, eth0 %s, %d port mapping(s)', name, veth, bridge.name, vip,
          len(mappings))

    def rest():
        configure_eth0(bridge, vip, veth, path, pair)
        added.finish()
    return Pending(rest, [pair, added], [lock])


def wire_container(name, bridge, vip, veth, path, iptables, lines):
    """The namespace, the veth pair and the container's rules (iptables-restore lines),
    their commands left running -> (that Command, PendingRules)."""
    remove_link(veth)                           # left by the C cocker, which never removed it
    delete_netns(path)
    add_netns(path)
    quiet = 'link set %s addrgenmode none\n' % veth if has_ipv6() else ''
    pair = start_ip_batch('link add %s type veth peer name eth0 netns %s\n%s'
                          'link set %s master %s up\n'
                          % (veth, netns_name(name), quiet, veth, bridge.name))
    with Rollback(pair.close, True):
        return pair, PendingRules(iptables, bridge, lines)


def configure_eth0(bridge, vip, veth, path, pair):
    """Once the veth pair is there: the host end hairpinned, eth0's address and route."""
    pair.finish()
    # where br_netfilter is loaded, a container reaching its own mapped port is bridged
    # back out of the port it came in by: let it (Docker does the same)
    with open('/sys/class/net/%s/brport/hairpin_mode' % veth, 'w') as f:
        f.write('1')
    with in_netns(path):
        no_ipv6_on('eth0')
        inside = start_ip_batch('link set lo up\naddr add %s/%d dev eth0\nlink set eth0 up\n'
                                'route add default via %s dev eth0\n'
                                % (vip, bridge.network.prefixlen, bridge.address))
    with inside:
        inside.finish()


def has_ipv6():
    """False on a host booted with ipv6.disable=1 (ip refuses addrgenmode there).  Asked of
    /proc/net, not /proc/sys/net/ipv6 (see set_bridge_sysctls)."""
    return os.path.exists('/proc/net/if_inet6')


def no_ipv6_on(ifname):
    """The network is IPv4 only, as Docker has it: no IPv6 on the interface, whose address
    detection, MLD reports and router solicitations the bridge would flood to every other
    container (the host end of the pair, addrgenmode none, makes no address either).
    /proc/sys/net: the namespace of whoever opens it."""
    if has_ipv6():
        with open('/proc/sys/net/ipv6/conf/%s/disable_ipv6' % ifname, 'w') as f:
            f.write('1')


def teardown_network(name):
    """Undo setup_network from cp/network.state; safe to repeat and after a crash."""
    state = read_network_state(name)
    if state is None:
        write_attr(name, 'network.state', None)
        return
    # The veth pair goes with the namespace: the kernel removes it while iptables-restore
    # runs, where `ip link del` would wait 20 to 30 ms (RCU grace periods, longer as the
    # bridge has more ports).  We delete it ourselves only if it outlives the namespace.
    veth = state.get('veth')
    watch = watch_link(veth)

    def remove_netns():
        if state.get('netns'):
            delete_netns(state['netns'])

    def remove_rules():
        # rules as word lists; a state written by cocker 1.0 has them as one string
        delete_rules(state.get('iptables') or 'iptables',
                     [(table, words.split() if isinstance(words, str) else words)
                      for table, words in state.get('rules') or []],
                     state.get('chains') or [])

    def remove_veth():
        if not (watch and watch.gone_within(0.5)) and veth and link_exists(veth):
            log('INFO', '%s is still there after its namespace (a process holds it, or the '
                'kernel is slow): deleting it' % veth)
            remove_link(veth)

    # a failure keeps the state: the next command tries again
    try:
        best_effort((remove_netns, remove_rules, remove_veth,
                     lambda: release_claims(name, state.get('claims') or [])),
                    'network teardown of %s' % name)
    finally:
        if watch:
            watch.close()
    write_attr(name, 'network.state', None)


def change_vip(name, vip):
    """A stopped container's new VIP, recorded so that automatic choices avoid it."""
    if container_net(name) == 'BRIDGE':
        check_vip(vip, network_config())
    with locked('container', name):
        repair_if_dead(name)
        require_stopped(name, 'the VIP can be changed on')
        forget_vip(name, read_attr(name, 'vip'))
        write_attr(name, 'vip', vip)
        note_vip(name, vip)


def reserve_vip(name, vip):
    """A new BRIDGE container's VIP: the one given, recorded so that automatic choices
    avoid it, or the lowest free one."""
    if vip is None:
        return allocate_vip(name, network_config())
    note_vip(name, vip)
    return vip


def forget_network(name):
    """At destroy: the CUSTOM namespace (or one the C cocker left) and the VIP's record."""
    delete_netns(netns_path(name))
    forget_vip(name, read_attr(name, 'vip'))


def enter_network(name):
    """In the boot child: join the container's network namespace (HOST: stay), where any
    group may ping through ICMP sockets, as with Podman: the container has no CAP_NET_RAW."""
    if container_net(name) in ('BRIDGE', 'CUSTOM'):
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)
        # /proc/sys/net is the namespace of whoever opens it: ours now, not the host's
        with open('/proc/sys/net/ipv4/ping_group_range', 'w') as f:
            f.write('0 2147483647')


# =============================================================================
# Cgroups
# =============================================================================
# Each container gets a cgroup named after it under a 'cocker' parent: in each cgroup-v1
# hierarchy it uses (/sys/fs/cgroup/CONTROLLER/cocker/NAME), or once in the unified cgroup-v2
# tree (/sys/fs/cgroup/cocker/NAME), whichever the host has, looked at at every boot.  The
# CLI creates them and writes the limits before it forks; PID 1 joins them as its very first
# step, so nothing of the container ever runs outside.  Their paths go to cp/cgroups before
# they are made, and the teardown removes exactly those.  Limits given at create or boot are
# recorded (cp/cpus, cpu_quota, mem_limit, pids_limit) and apply to later boots; 'none'
# removes one.

CGROUP_ROOT = '/sys/fs/cgroup'
CGROUP_PARENT = 'cocker'
CFS_PERIOD_US = 100000              #: the CFS period a --cpu-quota percentage is a share of
MIN_MEMORY = 4 << 20                #: below this not even cockerinit starts
SIZE_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
#: cgroup-v1 controllers a container always gets (accounting, devices), and the one it gets
#: for --cpus
V1_CONTROLLERS = ('cpu', 'cpuacct', 'memory', 'pids', 'blkio', 'devices')
#: a v1 host's cgroup2 tree (systemd's hybrid layout): no controllers, but device programs
HYBRID_V2_TREE = 'unified'


class Limits(object):
    """A container's limits, parsed: None where there is none."""

    def __init__(self, cpus=None, cpu_quota=None, mem_limit=None, pids_limit=None):
        self.cpus, self.cpu_quota = cpus, cpu_quota
        self.mem_limit, self.pids_limit = mem_limit, pids_limit

    def quota_us(self):
        return int(round(self.cpu_quota * CFS_PERIOD_US / 100.0))


def parse_cpu_list(text):
    """'0,2-3' -> [0, 2, 3]; ValueError if malformed."""
    cpus = set()
    for part in text.split(','):
        first, sep, last = part.partition('-')
        if not is_decimal(first) or (sep and not is_decimal(last)):
            raise ValueError(text)
        low, high = int(first), int(last if sep else first)
        if high < low:
            raise ValueError(text)
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def online_cpus():
    return parse_cpu_list(read_small('/sys/devices/system/cpu/online', '0'))


def parse_cpus(text):
    try:
        cpus = parse_cpu_list(text)
    except ValueError:
        raise usage_error("--cpus value '%s' is invalid (e.g. 0, 0,1, 1-3, 0,2-3)" % text)
    missing = sorted(set(cpus) - set(online_cpus()))
    if missing:
        raise usage_error("--cpus value '%s': this host has no CPU %d (online: %s)" % (
            text, missing[0], read_small('/sys/devices/system/cpu/online')))
    return ','.join(map(str, cpus))


def parse_cpu_quota(text):
    """'30%' -> 30.0, a percentage of one CPU (above 100%: several CPUs)."""
    number = text[:-1] if text.endswith('%') else ''
    whole, _, fraction = number.partition('.')
    limit = 100 * len(online_cpus())
    if not is_decimal(whole) or (fraction and not is_decimal(fraction)):
        raise usage_error("--cpu-quota value '%s' is invalid (a percentage of one CPU, "
                          "e.g. 30%%)" % text)
    value = float(number)
    if not 0 < value <= limit or int(round(value * CFS_PERIOD_US / 100.0)) < 1000:
        raise usage_error("--cpu-quota value '%s' is out of range (1%% to %d%%, this host's "
                          "CPUs)" % (text, limit))
    return value


def size_bytes(text, option):
    """'100M' -> bytes: a number with K, M, G or T (powers of 1024), an optional B."""
    upper = text.upper()
    digits = upper[:-1] if upper.endswith('B') else upper
    unit = digits[-1:] if digits[-1:] in ('K', 'M', 'G', 'T') else ''
    digits = digits[:len(digits) - len(unit)]
    if not is_decimal(digits):
        raise usage_error("%s value '%s' is invalid (bytes, or a number with K, M or G, "
                          "e.g. 100M)" % (option, printable(text)))
    return int(digits) * SIZE_UNITS[unit]


def parse_size(text):
    """--mem-limit's value -> bytes."""
    size = size_bytes(text, '--mem-limit')
    if size < MIN_MEMORY:
        raise usage_error("--mem-limit value '%s' is too small (at least %dM)"
                          % (text, MIN_MEMORY >> 20))
    return size


def parse_pids_limit(text):
    if not is_decimal(text) or int(text) < 1:
        raise usage_error("--pids-limit value '%s' is invalid (a number of processes, "
                          "at least 1)" % text)
    return int(text)


LIMIT_PARSERS = {'cpus': parse_cpus, 'cpu_quota': parse_cpu_quota, 'mem_limit': parse_size,
                 'pids_limit': parse_pids_limit}


def check_limit_options(options):
    """Refuse bad limit values before anything starts ('none' drops a recorded limit)."""
    for option, _ in LIMITS:
        value = getattr(options, option)
        if value is not None and value != 'none':
            LIMIT_PARSERS[option](value)


def container_limits(name):
    """The recorded limits of a container, parsed (a bad file is refused at boot)."""
    values = {}
    for option, key in LIMITS:
        text = read_attr(name, key)
        values[option] = None if not text or text == 'none' else LIMIT_PARSERS[option](text)
    return Limits(**values)


def default_pids_limit(name, root):
    """DEFAULT_PIDS_LIMIT for a container with no pids limit recorded (not even 'none'),
    where the host has the pids controller."""
    if read_attr(name, 'pids_limit'):
        return None
    if cgroup_version(root) == 2:
        has_pids = 'pids' in read_small(os.path.join(root, 'cgroup.controllers'), '').split()
    else:
        has_pids = os.path.isdir(os.path.join(root, 'pids'))
    return DEFAULT_PIDS_LIMIT if has_pids else None


def pids_limit_text(name):
    """The pids limit as -s container_limits shows it: recorded, default, or '-' for none."""
    text = read_attr(name, 'pids_limit')
    return str(DEFAULT_PIDS_LIMIT) if not text else '-' if text == 'none' else text


def cgroup_version(root=CGROUP_ROOT):
    """2 on a unified (cgroup v2) host, 1 where controllers have v1 hierarchies."""
    return 2 if is_cgroup2(root) else 1


def is_cgroup2(directory):
    return os.path.exists(os.path.join(directory, 'cgroup.controllers'))


def v2_plan(root, name, limits):
    """(controllers to enable, [(directory, [(file, value)])]) on a cgroup-v2 host."""
    files = []
    controllers = ['memory', 'pids']            # always, for accounting
    if limits.cpus:
        controllers.append('cpuset')
        files.append(('cpuset.cpus', limits.cpus))
    if limits.cpu_quota:
        controllers.append('cpu')
        files.append(('cpu.max', '%d %d' % (limits.quota_us(), CFS_PERIOD_US)))
    if limits.mem_limit:
        # no swap beyond the limit, so that the limit really limits
        files += [('memory.max', str(limits.mem_limit)), ('memory.swap.max', '0')]
    if limits.pids_limit:
        files.append(('pids.max', str(limits.pids_limit)))
    return controllers, [(os.path.join(root, CGROUP_PARENT, name), files)]


def device_rules():
    """The allow list as devices.allow lines ('c 1:3 rwm', 'c 136:* rwm')."""
    return ['%s %d:%s rwm' % (kind, major, '*' if minor is None else minor)
            for kind, major, minor in ALLOWED_DEVICES]


def v1_plan(root, name, limits):
    """([], [(directory, [(file, value)])]) on a cgroup-v1 host, one per hierarchy, and the
    cgroup2 tree of a hybrid host for the device program."""
    files = {'cpu': [], 'cpuacct': [], 'memory': [], 'pids': [], 'blkio': [],
             'devices': [('devices.deny', 'a')] + [('devices.allow', r) for r in device_rules()]}
    if limits.cpus:
        files['cpuset'] = [('cpuset.cpus', limits.cpus)]
    if limits.cpu_quota:
        files['cpu'] = [('cpu.cfs_period_us', str(CFS_PERIOD_US)),
                        ('cpu.cfs_quota_us', str(limits.quota_us()))]
    if limits.mem_limit:
        # memsw (memory + swap) first unlimited, so the order of the writes never matters
        files['memory'] = [('memory.memsw.limit_in_bytes', '-1'),
                           ('memory.limit_in_bytes', str(limits.mem_limit)),
                           ('memory.memsw.limit_in_bytes', str(limits.mem_limit))]
    if limits.pids_limit:
        files['pids'] = [('pids.max', str(limits.pids_limit))]
    plan, seen = [], set()
    for controller in ('cpuset',) + V1_CONTROLLERS:
        hierarchy = os.path.join(root, controller)
        if controller not in files:
            continue
        identity = directory_identity(hierarchy)
        if identity is None:
            # missing accounting or devices is no error (nodev still guards the devices)
            if files[controller] and controller != 'devices':
                raise CockerError("this host has no cgroup '%s' controller for the limits of "
                                  "container '%s'" % (controller, name))
            continue
        if identity in seen:                    # cpu and cpuacct may share a hierarchy
            plan[-1][1].extend(files[controller])
            continue
        seen.add(identity)
        plan.append((os.path.join(hierarchy, CGROUP_PARENT, name), files[controller]))
    if cgroup_version(os.path.join(root, HYBRID_V2_TREE)) == 2:
        plan.append((os.path.join(root, HYBRID_V2_TREE, CGROUP_PARENT, name), []))
    return [], plan


#: files a kernel may lack (no swap accounting): skipped, with a fallback where one exists
OPTIONAL_FILES = {'memory.memsw.limit_in_bytes': ('memory.swappiness', '0'),
                  'memory.swap.max': None}


def directory_identity(path):
    """(device, inode) of the directory at path (through links), or None if there is none:
    the same for two names of one directory, without a realpath's stat of every component."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def write_cgroup_file(directory, filename, value):
    """Write value into a file the kernel made: opened without O_CREAT, as open(path, 'w')
    would, so that a file this kernel lacks is ENOENT (cgroupfs refuses a creation with
    EACCES) and OPTIONAL_FILES' fallbacks are taken."""
    path = os.path.join(directory, filename)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode('ascii'))
        finally:
            os.close(fd)
    except FileNotFoundError:
        if filename not in OPTIONAL_FILES:
            raise CockerError('cgroup file %s does not exist (controller not enabled?)' % path)
        debug('no %s on this host', path)
        if OPTIONAL_FILES[filename]:
            write_cgroup_file(directory, *OPTIONAL_FILES[filename])
    except OSError as e:
        raise CockerError('cannot set %s to %s: %s' % (path, value, e.strerror))


def make_cgroup(path, cpuset=False):
    """mkdir a cgroup; a v1 cpuset (cpuset: path may be one) takes its CPUs and memory nodes
    from its parent, as it cannot hold a process with none."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass
    for key in ('cpuset.mems', 'cpuset.cpus') if cpuset else ():
        mine = os.path.join(path, key)
        if os.path.exists(mine) and not read_small(mine, '').strip() and \
                not is_cgroup2(path):
            write_cgroup_file(path, key, read_small(os.path.join(os.path.dirname(path), key)))


def enable_controllers(root, controllers, limits):
    """cgroup v2: enable the controllers in subtree_control on the way down to cocker/."""
    available = read_small(os.path.join(root, 'cgroup.controllers'), '').split()
    needed = {'cpuset': limits.cpus, 'cpu': limits.cpu_quota, 'memory': limits.mem_limit,
              'pids': limits.pids_limit}
    wanted = []
    for c in controllers:
        if c in available:
            wanted.append(c)
        elif needed.get(c):
            raise CockerError("this host's cgroup v2 tree has no '%s' controller" % c)
    make_cgroup(os.path.join(root, CGROUP_PARENT))
    for directory in (root, os.path.join(root, CGROUP_PARENT)):
        enabled = read_small(os.path.join(directory, 'cgroup.subtree_control'), '').split()
        for c in wanted:
            if c not in enabled:
                write_cgroup_file(directory, 'cgroup.subtree_control', '+' + c)


def cgroup_plan(root, name, limits):
    """(v2 controllers to enable, [(directory, [(file, value)])]) for this host."""
    if cgroup_version(root) == 2:
        return v2_plan(root, name, limits)
    return v1_plan(root, name, limits)


def apply_cgroup_plan(root, controllers, limits, plan):
    for attempt in range(5):
        try:
            if controllers:
                enable_controllers(root, controllers, limits)
            for directory, files in plan:
                cpuset = any(filename.startswith('cpuset.') for filename, _ in files)
                make_cgroup(os.path.dirname(directory), cpuset)
                make_cgroup(directory, cpuset)
            break
        except FileNotFoundError:
            # the last container of a parent removed it between our mkdirs: again
            if attempt == 4:
                raise
    for directory, files in plan:
        for filename, value in files:
            write_cgroup_file(directory, filename, value)


def setup_cgroups(name, root=CGROUP_ROOT):
    """Create the container's cgroups with its limits (and the v1 devices controller's allow
    list, which restrict_container_devices checks); PID 1 joins them (enter_cgroups)."""
    limits = container_limits(name)
    limits.pids_limit = limits.pids_limit or default_pids_limit(name, root)
    controllers, plan = cgroup_plan(root, name, limits)
    write_attr(name, 'cgroups', ''.join(directory + '\n' for directory, _ in plan))
    apply_cgroup_plan(root, controllers, limits, plan)
    debug('cgroups of %s: %s', name, ' '.join(d for d, _ in plan))


def restrict_container_devices(name):
    """The device allow list on each of the container's cgroups (the monitor's step, before
    PID 1 is born in them).  Fails closed: without the record of its cgroups (another
    command's repair), PID 1 would be born in none."""
    if read_attr(name, 'cgroups') is None:
        raise CockerError("the cgroups of '%s' are gone: not starting it" % name)
    methods = restrict_devices(container_cgroups(name))
    debug('devices of %s: %s', name, ', '.join(methods + ['nodev mounts, no CAP_MKNOD']))


# ---- the device allow list -------------------------------------------------------------
# cgroup v1: the devices controller (deny all, allow the list), read back.  cgroup v2 (and
# the v2 tree of a hybrid host): a BPF_PROG_TYPE_CGROUP_DEVICE program attached to the
# container's cgroup, which the kernel runs at every open and mknod of a device; it goes
# with the cgroup.  Either way nodev mounts and the missing CAP_MKNOD hold as well.

BPF_PROG_LOAD, BPF_PROG_ATTACH = 5, 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6                   #: attach type
BPF_F_ALLOW_MULTI = 2                   #: every program on the way up must allow too
BPF_DEVCG_DEV = {'b': 1, 'c': 2}        #: device types in bpf_cgroup_dev_ctx


def restrict_devices(directories):
    """Apply the allow list to each cgroup that can take it; the methods used, for -d."""
    methods = []
    for directory in directories:
        if os.path.exists(os.path.join(directory, 'devices.list')):
            check_device_list(directory)
            methods.append('cgroup v1 devices controller')
        elif is_cgroup2(directory):
            try:
                attach_device_program(directory)
                methods.append('cgroup v2 device program')
            except OSError as e:        # a kernel without cgroup BPF: say so, go on
                log('WARN', 'no device program on %s: %s' % (directory, describe_oserror(e)))
    return methods


def check_device_list(directory):
    """The kernel's list must be exactly the allow list (the writes were each accepted)."""
    listed = set(read_small(os.path.join(directory, 'devices.list'), '').splitlines())
    if listed != set(device_rules()):
        raise CockerError('device cgroup %s lists %s, not the allow list'
                          % (directory, ', '.join(sorted(listed)) or 'nothing'))


def device_program():
    """eBPF instructions: 1 (allow) for a device of ALLOWED_DEVICES, else 0.  The context
    is struct bpf_cgroup_dev_ctx {u32 access_type (access << 16 | type), major, minor}."""
    def insn(code, dst=0, src=0, off=0, imm=0):
        return struct.pack('<BBhi', code, dst | src << 4, off, imm)
    ldx_w, and_k, jne_k, mov_k, exit_ = 0x61, 0x57, 0x55, 0xb7, 0x95
    prog = [insn(ldx_w, 2, 1, 0), insn(and_k, 2, imm=0xffff),     # r2 = type
            insn(ldx_w, 4, 1, 4), insn(ldx_w, 5, 1, 8)]            # r4 = major, r5 = minor
    for kind, major, minor in ALLOWED_DEVICES:
        tests = [(2, BPF_DEVCG_DEV[kind]), (4, major)] + ([] if minor is None else [(5, minor)])
        for i, (register, value) in enumerate(tests):   # a mismatch skips to the next rule
            prog.append(insn(jne_k, register, off=len(tests) - i + 1, imm=value))
        prog += [insn(mov_k, 0, imm=1), insn(exit_)]
    prog += [insn(mov_k, 0, imm=0), insn(exit_)]
    return b''.join(prog)


def attach_device_program(directory):
    """Load the device program and attach it to a cgroup2 directory."""
    import ctypes
    code = device_program()
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b'GPL')
    prog_fd = bpf(BPF_PROG_LOAD, struct.pack(
        '=IIQQIIQII16s', BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8, ctypes.addressof(insns),
        ctypes.addressof(license), 0, 0, 0, 0, 0, b'cocker_devices'))
    try:
        cgroup_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            bpf(BPF_PROG_ATTACH, struct.pack('=IIII', cgroup_fd, prog_fd, BPF_CGROUP_DEVICE,
                                             BPF_F_ALLOW_MULTI))
        finally:
            os.close(cgroup_fd)
    finally:
        os.close(prog_fd)               # the attachment holds the program


def container_cgroups(name):
    """cp/cgroups: a directory a line (cocker 1.0 wrote a JSON list: read too)."""
    text = read_attr(name, 'cgroups')
    if not text:
        return []
    if not text.startswith('['):
        return [line for line in text.splitlines() if line]
    import json                         # (only then: it loads re, 10 ms a command)
    try:
        return [str(d) for d in json.loads(text)]
    except (ValueError, TypeError):
        log('WARN', 'container %s: unreadable cgroups file ignored' % name)
        return []


def enter_cgroups(directories, pid=0):
    """Move a process into the container's cgroups before anything of the container runs:
    PID 1, by its monitor, or (pid 0) a single-threaded process itself (PID 1 born in its
    cgroup2 directory, the file helpers).  A thread that moves itself through a v1 `tasks`
    file takes no global lock, so waits for no RCU grace period, as cgroup.procs does."""
    for directory in directories:
        itself = pid == 0 and not is_cgroup2(directory)
        write_cgroup_file(directory, 'tasks' if itself else 'cgroup.procs', str(pid))


def teardown_cgroups(name):
    """Remove the container's cgroups; processes still in one are killed, and reported."""
    for directory in reversed(container_cgroups(name)):
        remove_cgroup(directory)
        try:
            os.rmdir(os.path.dirname(directory))    # the cocker parent, once empty
        except OSError:
            pass
    write_attr(name, 'cgroups', None)


def remove_cgroup(directory, timeout=5.0):
    deadline = time.time() + timeout
    killed = []
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        # normally empty: PID 1 is gone and the kernel killed the rest of its namespace
        pids = read_small(os.path.join(directory, 'cgroup.procs'), '').split()
        for pid in pids:
            if pid not in killed:
                killed.append(pid)
                log('WARN', 'process %s was still in %s: killed' % (pid, directory))
            if is_decimal(pid):
                signal_process(int(pid), SIGKILL)
        if time.time() > deadline:
            raise CockerError('cgroup %s cannot be removed: processes %s are still in it'
                              % (directory, ' '.join(pids) or '(none listed)'))
        time.sleep(0.02)


def cgroup_counters(name):
    """(CPU time in ns, bytes read, bytes written) of a container's cgroups, None where its
    cgroups do not count them (v1: cpuacct, blkio; v2: cpu.stat, io.stat)."""
    cpu = read = written = None
    for directory in container_cgroups(name):
        value = read_small(os.path.join(directory, 'cpuacct.usage'))
        if value is not None and value.strip().isdigit():
            cpu = int(value)
        for line in (read_small(os.path.join(directory, 'cpu.stat')) or '').splitlines():
            if line.startswith('usage_usec ') and line.split()[1].isdigit():
                cpu = int(line.split()[1]) * 1000
        text = read_small(os.path.join(directory, 'blkio.throttle.io_service_bytes_recursive'))
        if text is not None:
            lines = [l.split() for l in text.splitlines()]
            read = sum(int(l[2]) for l in lines if len(l) == 3 and l[1] == 'Read')
            written = sum(int(l[2]) for l in lines if len(l) == 3 and l[1] == 'Write')
        text = read_small(os.path.join(directory, 'io.stat'))
        if text is not None:
            fields = [f.partition('=') for l in text.splitlines() for f in l.split()[1:]]
            read = sum(int(v) for k, _, v in fields if k == 'rbytes' and v.isdigit())
            written = sum(int(v) for k, _, v in fields if k == 'wbytes' and v.isdigit())
    return cpu, read, written


def cgroup_usage(name):
    """(memory bytes, process count) of a running container, None where unknown."""
    memory = pids = None
    for directory in container_cgroups(name):
        for filename in ('memory.current', 'memory.usage_in_bytes'):
            value = read_small(os.path.join(directory, filename))
            if value is not None and value.strip().isdigit():
                memory = int(value)
        value = read_small(os.path.join(directory, 'pids.current'))
        if value is not None and value.strip().isdigit():
            pids = int(value)
    return memory, pids


# =============================================================================
# Boot sequence
# =============================================================================
# One boot, in the order things happen.  The CLI (under the container lock) takes the host
# steps below, then forks the monitor (or has a running monitor fork it, see Monitors fork
# monitors below), finishes what the host steps left running (a BRIDGE container's eth0
# and its iptables rules: 5 to 10 ms of `ip` and iptables-restore that PID 1's own set-up
# hides), sends GO on the ready channel and
# waits for READY there:
#   monitor: setsid, holds running.lock, takes MONITOR_STEPS (the device allow list, the
#            root's mount), unshare(CLONE_NEWPID), fork -> PID 1, copies cockerinit's
#            log, waits for PID 1, undoes the host steps in reverse, exits.
#   PID 1:   takes PID1_STEPS in order, each checked (a failure ends the boot, which is
#            undone), then runs cockerinit.py's code (loaded before the fork), which pivots
#            into the root, shrinks the capability sets to Podman's, installs the seccomp
#            filter (a user namespace would come first, no_new_privs comes last, before
#            each exec), waits for GO (and for the move into its cgroups), starts the main
#            command and reports READY.
# The CLI prints OK only after READY, so a failed boot is reported, and undone, at once.

#: What a boot sets up on the host, in order, beside its undo.  teardown_container runs the
#: undos in reverse order: when PID 1 has ended, after a failed boot, on a dead container.
#: Each setup writes down what it makes before making it, so its undo removes exactly that.
#: The CLI takes HOST_STEPS, the monitor MONITOR_STEPS before it forks PID 1: those need
#: system calls through ctypes, which a monitor has loaded already, and a CLI that a
#: running monitor serves then never loads (3 ms of a boot).
HOST_STEPS = (
    # BRIDGE: claims, netns, veth pair, iptables rules (cp/network.state); CUSTOM: its netns
    (setup_network, teardown_network),
    # the cgroups with the limits (cp/cgroups)
    (setup_cgroups, teardown_cgroups),
)
MONITOR_STEPS = (
    # the device allow list on those cgroups (a v2 device program goes with its cgroup)
    (restrict_container_devices, None),
    # the nodev overlay root on cp/merged
    (mount_container_root, unmount_root),
)
#: files of a running container that the teardown removes last
RUNNING_FILES = ('pid', 'init_pid', 'cocker.sock', 'monitor.sock')


def teardown_unless_clean(name):
    """teardown_container, unless the container is cleanly STOPED (no pid, cgroups or
    network state file left, no overlay mounted: its monitor tore it down), where it would
    only read the mount table again (2 ms at 1500 mounts)."""
    if container_status(name) != 'STOPED':
        teardown_container(name)


def teardown_container(name):
    """Undo the host steps in reverse order, every one tried; safe to repeat and after a
    crash.  The first failure is raised, the state files stay for the next try."""
    def step(undo):
        undo(name)
        debug('teardown of %s: %s done', name, undo.__name__)
    try:
        best_effort([lambda undo=undo: step(undo)
                     for _, undo in reversed(HOST_STEPS + MONITOR_STEPS) if undo is not None],
                    'teardown of %s' % name)
    except (OSError, CockerError) as e:
        raise CockerError('cleaning up container %s: %s' % (name, error_text(e)))
    finally:
        for key in RUNNING_FILES:
            remove_file(container_file(name, key))


class Boot(object):
    """What PID 1's steps share: the container, its settings (read from the host before
    PID 1 leaves its mount namespace), its root, and the descriptors that go on to
    cockerinit (the ready channel, the log pipe, the alive pipe, the console)."""

    def __init__(self, name, fds):
        self.name, self.fds = name, fds
        self.root = self.merged = container_file(name, 'merged')    # (root: where PID 1 sees it)
        self.directory = container_dir(name)
        self.hostname = read_attr(name, 'hostname') or name
        self.seccomp = read_attr(name, 'seccomp') or 'default'
        self.no_new_privs = read_attr(name, 'no_new_privs') or '0'
        self.main = os.path.exists(container_file(name, 'main'))
        self.volumes = []               # (source, inside, readonly, is_dir); the source a
        for host, inside, readonly in container_volumes(name):     # host path, or its copy
            if not os.path.exists(host):
                raise CockerError("volume source '%s' not found" % host)
            self.volumes.append((host, inside, readonly, os.path.isdir(host)))
        self.devnull = None             # (the real /dev/null, once in PID 1's namespace)
        self.template = MOUNT_TEMPLATE


#: PID 1's steps before it becomes cockerinit, in order.  Nothing to undo: what they make
#: lives in the container's own namespaces and goes with its last process.
PID1_STEPS = (
    # (0. the monitor moves PID 1 into the cgroups meanwhile: cockerinit waits for that
    #     before anything of the container runs, so nothing does outside its limits)
    # 1. the monitor's death takes the container with it; last for the OOM killer
    lambda boot: die_with_monitor(),
    # 2. the network namespace (BRIDGE, CUSTOM; its file is the host's), where ping needs
    #    no CAP_NET_RAW
    lambda boot: enter_network(boot.name),
    # 3. new mount, UTS and IPC namespaces; nothing mounted from here on reaches the host
    lambda boot: enter_private_namespaces(boot),
    # 4.
    lambda boot: sethostname(boot.hostname),
    # 5. volumes, bound nodev on targets resolved inside the root
    lambda boot: bind_volumes(boot),
    # 6. a fresh /proc: knobs read-only, host state masked with a real /dev/null
    lambda boot: mount_proc(boot.root, boot.devnull),
    # 7. a read-only /sys, masked likewise
    lambda boot: mount_sys(boot.root),
    # 8. /dev: the allowed nodes, a private devpts, the console
    lambda boot: boot.fds.update(console=mount_dev(boot.root)),
)


def boot_container(name, exec_cmd, stdio=None):
    """The CLI's part of a boot: the host steps, the monitor, the rest of the host steps
    while PID 1 sets up, GO, the wait for READY; all of it undone if any fails.  stdio:
    {'stdin', 'stdout', 'stderr': fd, 'tty': bool} of a one-shot run, for its main
    process."""
    init = sys.modules.get('cockerinit')    # (a one-shot run has it: it checked -e)
    identity = code_identity(init)          # (and cockerinit.py is there, before any step)
    lock = held_lock('container', name)     # (the monitor holds it too, until it runs)
    if lock is None:
        raise CockerError("a boot of '%s' without its lock" % name)
    ready, theirs = ready_channel()
    asked = ask_sibling(name, identity, exec_cmd, stdio)    # (it forks while we go on)
    try:
        with Rollback(teardown_container, name) as undo:
            pending = []
            for setup, _ in HOST_STEPS:
                rest = setup(name)
                if rest is not None:            # (finished below, while PID 1 sets up)
                    pending.append(rest)
                    undo.push(rest.close)
                debug('boot of %s: %s done', name, setup.__name__)
            monitor = asked and asked.monitor(name, theirs, lock, stdio)
            if monitor is None:             # ours, with cockerinit's code for its PID 1
                init = load_cockerinit()
                monitor = os.fork()
                if monitor == 0:
                    ready.close()
                    run_monitor(name, init, exec_cmd, theirs, lock, stdio,  # never returns
                                take_over=asked is not None and asked.outdated)
            os.close(theirs)
            theirs = None
            undo.push(stop_monitor, name, monitor)
            undo.push(ready.close)              # (first: PID 1 waiting for GO ends at once)
            debug('monitor of %s is pid %d', name, monitor)
            try:
                for rest in pending:
                    rest.finish()
            except (OSError, CockerError):
                answer = said_so_far(ready, 0)  # PID 1 failed first: the monitor's teardown
                if answer and not answer.startswith(READY):     # then failed the rest
                    raise boot_failure(name, answer)
                raise
            send_go(ready)
            debug('host side of %s complete, waiting for cockerinit', name)
            wait_until_ready(name, ready)
            debug('cockerinit of %s is ready', name)
    finally:
        ready.close()
        if theirs is not None:
            os.close(theirs)
        if asked is not None:
            asked.close()               # (without the go, its monitor ends at once)


def ready_channel():
    """A stream socket pair between a boot and its PID 1 -> (our end, a socket object; PID
    1's end, a descriptor).  PID 1 hears GO on it once the host side is complete (nothing
    of the container runs before) and answers READY, or what went wrong."""
    import _socket
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    return ours, theirs.detach()


def send_go(ready):
    try:
        ready.sendall(GO)
    except (BrokenPipeError, ConnectionResetError):
        pass                            # PID 1 has ended: what it said is read next


def receive_answer(ready):
    """The next bytes PID 1 wrote on the ready channel, b'' at its end."""
    try:
        return ready.recv(4096)
    except ConnectionResetError:        # (it ended with GO unread)
        return b''


def wait_until_ready(name, ready):
    """READY on the ready channel, or raise what the boot wrote there (or that it said
    nothing)."""
    answer = said_so_far(ready, BOOT_TIMEOUT)
    if not answer.startswith(READY):
        raise boot_failure(name, answer)


def said_so_far(ready, timeout=None):
    """What PID 1 writes on the ready channel until it ends or timeout seconds pass (None:
    until it ends)."""
    import select
    deadline = None if timeout is None else time.time() + timeout
    answer = b''
    while select.select([ready], [], [], None if deadline is None else
                        max(0.0, deadline - time.time()))[0]:
        chunk = receive_answer(ready)
        if not chunk:
            break
        answer += chunk
    return answer


def boot_failure(name, answer):
    message = answer.decode('utf-8', 'replace').strip()
    return CockerError(message or "container '%s' exited while booting, see %s"
                       % (name, container_file(name, 'cockerinit.log')))


def run_monitor(name, init, exec_cmd, ready_w, lock, stdio=None, take_over=False):
    """The monitor process: never returns; whatever happens, the host steps are undone.
    lock: a copy of the boot's container lock (see become_monitor).  A monitor that a
    running one forked for another boot (see Monitors fork monitors) comes back here with
    that boot's order: at the same depth of the stack, however many monitors were forked
    in a row."""
    order = (name, exec_cmd, ready_w, lock, stdio, False)
    while True:
        order = monitor_once(init, *order, take_over=take_over)


def monitor_once(init, name, exec_cmd, ready_w, lock, stdio, by_sibling, take_over=False):
    """One container's monitor, until its teardown and exit; returns only in a monitor
    forked meanwhile for another boot -> that boot's order.  by_sibling: this monitor was
    forked by another, so forks none itself; take_over: the one that forks runs other
    code, this one forks the next instead (see listen_for_siblings)."""
    status, forked, siblings, running = 1, None, None, None
    try:
        running = become_monitor(name, lock, {ready_w} | stdio_fds(stdio))
        take_monitor_steps(name)
        if stdio is None and not by_sibling:    # (a one-shot run's monitor is soon gone)
            siblings = listen_for_siblings(name, init, take_over)
        debug('monitor of %s: set up', name)
        monitor_container(name, init, exec_cmd, ready_w, stdio, siblings)
        status = 0
    except MonitorForked as e:          # (this process: the new monitor, of e.order[0])
        forked = e.order
    except BaseException as e:          # a fork child's boundary: never back into the CLI
        write_quietly(ready_w, error_text(e))
    finally:
        if forked is None:
            try:
                if siblings is not None:
                    siblings.close()    # a boot asking now forks its own monitor at once
                if running is not None:     # (else the host state is the command's to undo)
                    teardown_container(name)
            except (OSError, CockerError) as e:
                log('ERROR', 'monitor of %s: %s' % (name, error_text(e)))
            finally:
                if running is not None:
                    os.close(running)   # done: the stop command goes on while we exit
                os._exit(status)
    return forked


def become_monitor(name, lock, keep):
    """A session of its own, nothing of the CLI's descriptors (but those in keep),
    running.lock held (the kernel drops it when the monitor dies: a kill -9 can never
    leave a false RUNNING) -> its descriptor.  The container lock (lock: our copy of the
    boot's) is let go only then: a boot whose command died after its go is not DEAD to the
    next command, which would repair it under this monitor, then boot it, for this one to
    take over its state and tear it down."""
    os.setsid()
    os.chdir('/')                       # do not pin the caller's working directory
    devnull = os.open('/dev/null', os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    load_warm_chapters()                # (while the cache is open)
    close_fds_except({0, 1, 2, lock, MOUNT_TEMPLATE} | keep)
    HELD_LOCKS.clear()                  # (the command's: none of them is ours)
    forget_chain_watch()
    prctl(PR_SET_NAME, b'cocker-monitor')
    import gc
    if hasattr(gc, 'freeze'):           # (3.7+) the CLI's objects are never scanned again:
        gc.freeze()                     # their pages stay shared with PID 1, forked next
    running = os.open(container_file(name, 'running.lock'),
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(running, fcntl.LOCK_EX)  # (free: a monitor that held it held the lock too)
    write_attr(name, 'pid', str(os.getpid()))
    os.close(lock)                      # (running, with its pid: no longer DEAD)
    return running


def take_monitor_steps(name):
    """The rest of the host side, before PID 1 is forked (its undo is the teardown's)."""
    for setup, _ in MONITOR_STEPS:
        setup(name)
        debug('monitor of %s: %s done', name, setup.__name__)


def write_quietly(fd, text):
    """Tell the CLI why a boot failed, if it still listens."""
    try:
        os.write(fd, text.encode('utf-8', 'replace'))
    except (OSError, ValueError):
        pass


def stdio_fds(stdio):
    return set(v for k, v in (stdio or {}).items() if k != 'tty')


def monitor_container(name, init, exec_cmd, ready_w, stdio=None, siblings=None):
    """Run PID 1, and again as the container's restart policy says, until it ends for good
    or the operator stops it (SIGTERM: shutdown, kill, destroy)."""
    import _signal
    state = {'init': None, 'stopping': False, 'served': False}

    def stop(signum, frame):            # shutdown: SIGTERM to PID 1, SIGKILL after a while
        state['stopping'] = True
        if state['init']:
            _signal.alarm(STOP_TIMEOUT)
            signal_process(state['init'], _signal.SIGTERM)
    _signal.signal(_signal.SIGTERM, stop)
    _signal.signal(_signal.SIGINT, stop)
    _signal.signal(_signal.SIGALRM, lambda signum, frame: signal_process(state['init'], SIGKILL))
    restarts = quick = 0                # all restarts; those after a short run, in a row
    while True:
        started = time.time()
        status = run_pid1(name, init, exec_cmd, ready_w, state, stdio, siblings)
        booting = ready_w is not None
        ready_w, stdio = None, None     # (the CLI heard the first READY; the rest are ours)
        # a boot whose PID 1 never served has failed (the CLI says why) or was abandoned (the
        # CLI killed before GO): it is over, whatever the restart policy
        if state['stopping'] or (booting and not state['served']) or \
                not restart_wanted(name, status, restarts):
            return
        quick = 0 if time.time() - started >= RESTART_STEADY else quick + 1
        if not sleep_unless_stopped(restart_delay(quick), state, siblings):
            return
        restarts += 1
        write_attr(name, 'restart_count', str(restarts))
        log('INFO', "restarting container '%s' (restart %d, after exit status %d)"
            % (name, restarts, status))


def run_pid1(name, init, exec_cmd, ready_w, state, stdio=None, siblings=None):
    """Fork PID 1 in a new pid namespace, copy its log (and fork the monitors siblings
    asks for), wait for it -> its exit status.  A restart has no CLI waiting for READY:
    the monitor sends GO and reads the ready channel itself.  The operator's SIGTERM waits
    (blocked) until PID 1's pid is known, so none is lost."""
    import _signal
    rotation = log_rotation(name)
    stops = {_signal.SIGTERM, _signal.SIGINT}
    _signal.pthread_sigmask(_signal.SIG_BLOCK, stops)
    if state['stopping']:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, stops)
        return 0
    log_r, log_w = os.pipe()
    alive_r, alive_w = os.pipe()
    moved_r, moved_w = os.pipe()
    served_r, served_w = os.pipe()      # one byte from PID 1 once it is READY
    ours = None
    if ready_w is None:                 # a restart: the host side is complete
        ours, ready_w = ready_channel()
        ours.sendall(GO)
    # our own later children (ip, iptables at teardown) stay in the host's pid namespace
    fds = {'ready': ready_w, 'log': log_w, 'alive': alive_r, 'cgroups': moved_r,
           'served': served_w}
    fds.update((k, v) for k, v in (stdio or {}).items() if k != 'tty')
    cgroups = container_cgroups(name)
    init.packed_filter(os.uname().machine)      # (once: the monitors forked later inherit it)
    init_pid, born_in_cgroup2 = fork_in_pid_namespace(cgroups=cgroups)
    if init_pid == 0:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, stops)   # (an exec keeps the mask)
        if born_in_cgroup2:             # then it joins the v1 controllers itself, at once
            os.close(fds.pop('cgroups'))
            cgroups = [d for d in cgroups if not is_cgroup2(d)]
        else:
            cgroups = []                # the monitor moves it
        boot_child(name, init, exec_cmd, fds, bool((stdio or {}).get('tty')), cgroups)
    for fd in fds.values():
        os.close(fd)
    if born_in_cgroup2:
        os.close(moved_w)
        debug('PID 1 of %s: born in its cgroup2 directory', name)
    else:
        move_into_cgroups(name, init_pid, moved_w)
        debug('PID 1 of %s: moved into its cgroups by the monitor', name)
    state['init'] = init_pid
    write_attr(name, 'init_pid', str(init_pid))
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, stops)   # a shutdown meanwhile: now handled
    copy_log(log_r, container_file(name, 'cockerinit.log'), rotation, siblings)
    os.close(log_r)
    _, wait_status = os.waitpid(init_pid, 0)
    status = exit_status(wait_status)
    _signal.alarm(0)
    state['init'] = None
    state['served'] = os.read(served_r, 1) == b'1'  # (its namespace is gone: no writer left)
    os.close(served_r)
    write_attr(name, 'init_pid', None)  # never a pid that another process may get next
    os.close(alive_w)
    if ours is not None:
        answer = said_so_far(ours)      # (PID 1 has ended)
        ours.close()
        if not answer.startswith(READY):
            log('WARN', "restart of container '%s' failed: %s" % (
                name, answer.decode('utf-8', 'replace').strip() or 'no answer'))
    if operator_removing(name):
        EPHEMERAL.add(name)             # (its files go next: none needs an fsync)
    write_attr(name, 'exit_status', str(status))
    log('INFO', "container '%s' stopped, PID 1 exit status %d" % (name, status))
    return status


def move_into_cgroups(name, init_pid, moved_w):
    """PID 1 into the container's cgroups while it sets up (the wait a cgroup v1 move has
    is no longer the boot's): one byte tells it the move is done; without it (the pipe
    closed) its boot fails."""
    try:
        enter_cgroups(container_cgroups(name), init_pid)
        os.write(moved_w, b'1')
    except (OSError, CockerError) as e:
        log('ERROR', "container '%s': PID 1 not moved into its cgroups: %s" % (
            name, error_text(e)))
    finally:
        os.close(moved_w)


def copy_log(log_r, log_file, rotation, siblings=None):
    """cockerinit (and the main process) write to the log pipe; EOF once PID 1 is gone.
    The log is rotated: (limit, keep) keep files of limit bytes at most besides the current
    one.  Meanwhile the monitor forks the monitors that boots ask siblings for."""
    limit, keep = rotation
    while True:
        if siblings is not None and not siblings.wait_for(log_r):
            continue
        chunk = os.read(log_r, 65536)
        if not chunk:
            return
        try:
            append_log(log_file, chunk, limit, keep)
        except OSError:
            pass


def fork_in_pid_namespace(proc=None, cgroups=()):
    """fork() with the child in the pid namespace of the process whose /proc directory is
    `proc`, or in a new one (this process stays in its own) -> (pid, whether the child was
    born in the cgroup2 directory among `cgroups`).  Born there by clone3 where it can be:
    moved there, it would wait for an RCU grace period (5 to 15 ms); it joins the v1
    controllers of a hybrid host itself, which costs none (enter_cgroups)."""
    home = os.open('/proc/self/ns/pid', os.O_RDONLY | os.O_CLOEXEC)
    try:
        if proc is not None:
            fd = os.open('ns/pid', os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
            try:
                setns(fd, CLONE_NEWPID)
            finally:
                os.close(fd)
        pid = clone_into_cgroup2(0 if proc is not None else CLONE_NEWPID, cgroups)
        born = pid is not None
        if not born:
            if proc is None:
                unshare(CLONE_NEWPID)
            pid = os.fork()
        if pid != 0:
            setns(home, CLONE_NEWPID)
        return pid, born
    finally:
        os.close(home)


def clone_into_cgroup2(flags, cgroups):
    """clone3 of a child born in the cgroup2 directory among cgroups -> its pid (0 in the
    child); None where there is none, or clone3 cannot."""
    v2 = [d for d in cgroups if is_cgroup2(d)]
    if not v2:
        return None
    fd = os.open(v2[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return clone3(flags, fd)
    finally:
        os.close(fd)


def boot_child(name, init, exec_cmd, fds, tty=False, cgroups=()):
    """PID 1 of the new pid namespace: into the cgroups it must join itself, PID1_STEPS,
    then the exec of cockerinit; never returns."""
    try:
        enter_cgroups(cgroups)
        boot = Boot(name, fds)
        for number, step in enumerate(PID1_STEPS, 1):
            step(boot)
            debug('PID 1 of %s: step %d done', name, number)
        become_cockerinit(boot, init, exec_cmd, tty)
    except BaseException as e:          # a fork child's boundary: never back into the CLI
        write_quietly(fds['ready'], 'boot %s: %s' % (name, error_text(e)))
    finally:                            # (whatever the error, even in reporting it)
        os._exit(1)


def die_with_monitor():
    prctl(PR_SET_PDEATHSIG, SIGKILL)
    shield_from_oom_killer()


def shield_from_oom_killer():
    """Out of memory, the kernel kills anything in the container before its PID 1
    (cockerinit sets its children back to 0).  Needs CAP_SYS_RESOURCE: best effort."""
    try:
        with open('/proc/self/oom_score_adj', 'w') as f:
            f.write(str(INIT_OOM_SCORE_ADJ))
    except PermissionError:
        pass


# ---- PID 1's mount namespace ----------------------------------------------------------
# A mount namespace made by unshare is a copy of the host's mount table, which cockerinit
# detaches again once it has pivoted into the root: both cost O(host mounts), and each
# container adds one (its overlay): 8 of a boot's 8.6 ms more at 1400 containers.  So a
# monitor that forks monitors makes a template once, a namespace of one read-only tmpfs
# with /rootfs, /proc and a /dev/null node (what masks are bound from: a bind's source must
# be in the namespace), which PID 1s copy instead (those of the monitors it forks, and its
# own once it has made it).  Such a PID 1 first takes from the
# host what it needs there: detached copies of the root and the volumes (open_tree, as a
# bind mount would make them), its settings, a descriptor of the container directory for
# cockerinit's socket (COCKER_SOCKDIR_FD, closed by cockerinit before it enters the root).
# Then it copies the template, mounts its own /proc there, attaches the root on /rootfs and
# goes on as any PID 1, with /rootfs as the root, COCKER_HOME no longer in reach.
# The container's namespace never holds the host's mounts, not even for a millisecond.
# A kernel before 5.2 (no open_tree), and a monitor that a command forked until it forks
# one itself, copy the host's.

#: The template's descriptor (a monitor that forks monitors makes it; they inherit it)
MOUNT_TEMPLATE = None
TEMPLATE_ROOT = '/rootfs'               #: where the container root is attached in a copy


def make_mount_template(init):
    """MOUNT_TEMPLATE made, if the kernel can use it (else it stays None, and PID 1s copy
    the host's namespace).  Made in a child, whose namespace outlives it as long as a
    descriptor names it.  init: cockerinit."""
    global MOUNT_TEMPLATE
    if MOUNT_TEMPLATE is not None or not has_open_tree():
        return
    done_r, done_w = os.pipe()
    hold_r, hold_w = os.pipe()          # (the child waits on it until we hold its namespace)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(done_r)
            os.close(hold_w)
            build_mount_template(init)
            os.write(done_w, b'1')
            os.read(hold_r, 1)
        except BaseException as e:
            write_quietly(done_w, error_text(e))
        finally:
            os._exit(0)
    os.close(done_w)
    os.close(hold_r)
    try:
        said = os.read(done_r, 4096)    # (one write: b'1', or what went wrong; none: it died)
        if said == b'1':
            MOUNT_TEMPLATE = os.open('/proc/%d/ns/mnt' % pid, os.O_RDONLY | os.O_CLOEXEC)
            debug('mount namespace template made')
        else:
            log('WARN', 'no mount namespace template: %s' % (
                said.decode('utf-8', 'replace') or 'its child died'))
    finally:
        os.close(done_r)
        os.close(hold_w)
        reap_if_child(pid, block=True)


def build_mount_template(init):
    """In the template's child: its own mount namespace left with one empty tmpfs,
    read-only, that has the directories TEMPLATE_ROOT and /proc."""
    unshare(CLONE_NEWNS)
    mount(None, '/', None, MS_REC | MS_PRIVATE)     # (nothing of this reaches the host)
    mount('tmpfs', HOME, 'tmpfs', MS_NOSUID | MS_NOEXEC, 'mode=755,size=16k')
    os.chdir(HOME)
    os.mkdir(TEMPLATE_ROOT.strip('/'), 0o755)
    os.mkdir('proc', 0o555)
    os.mknod('null', stat.S_IFCHR | 0o666, os.makedev(1, 3))    # (what masks are bound from)
    os.chmod('null', 0o666)
    init.enter_root(HOME)               # (the host's tree detached: the tmpfs alone)
    # what PID 1 does in a copy, tried here once: a kernel or a security module may refuse
    # it, and then every PID 1 copies the host's namespace instead
    attach_tree(open_tree('/proc'), TEMPLATE_ROOT)
    umount2(TEMPLATE_ROOT)
    mount('proc', '/proc', 'proc', MS_NOSUID | MS_NODEV | MS_NOEXEC)
    umount2('/proc')
    mount(None, '/', None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def has_open_tree():
    """Whether the kernel has open_tree and move_mount (5.2)."""
    try:
        os.close(open_tree('/'))
        return True
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EPERM):  # (EPERM: a seccomp filter)
            raise
        return False


def enter_private_namespaces(boot):
    """Mount, UTS and IPC namespaces of PID 1's own: a copy of the template, the container
    root attached (see above), or of the host's namespace."""
    if boot.template is None:
        unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
        mount(None, '/', None, MS_REC | MS_PRIVATE)
        boot.devnull = open_devnull()   # (a bind's source must be in the namespace)
        return
    root = open_tree(boot.merged)
    boot.volumes = [(open_tree(host, recursive=True), inside, readonly, is_dir)
                    for host, inside, readonly, is_dir in boot.volumes]
    boot.fds['sockdir'] = os.open(boot.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    leave_home()
    time.localtime()                    # (the host's time zone, read while it is here)
    setns(boot.template, CLONE_NEWNS)
    os.close(boot.template)
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
    mount('proc', '/proc', 'proc', MS_NOSUID | MS_NODEV | MS_NOEXEC)   # (of the container)
    boot.devnull = open_devnull('/null')
    attach_tree(root, TEMPLATE_ROOT)
    boot.root = TEMPLATE_ROOT
    debug('PID 1 of %s: in a copy of the mount namespace template', boot.name)


def attach_tree(tree, target):
    """open_tree's detached copy attached onto target (a path, or an O_PATH descriptor),
    then made private with all the namespace: a copy of a shared mount would be a peer of
    the host's, and what is mounted below it would appear on the host."""
    fd = target if isinstance(target, int) else \
        os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        move_mount(tree, fd)
    finally:
        os.close(tree)
        if fd is not target:
            os.close(fd)
    mount(None, '/', None, MS_REC | MS_PRIVATE)


def leave_home():
    """No path of COCKER_HOME means anything once PID 1 has left the host's tree (it would
    be looked up in the template, or the container's root): HOME is None from here on.
    Under -d, cocker.log stays open (never rotated through its descriptor)."""
    global HOME, LOG_FILE
    if DEBUG and HOME is not None:
        fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        LOG_FILE = '/proc/self/fd/%d' % fd
    HOME = None


def become_cockerinit(boot, init, exec_cmd, tty=False):
    """PID 1 runs cockerinit's code, loaded on the host before the monitor was forked: no
    second interpreter to start (a boot 20 ms shorter) and its pages shared with the
    monitor's.  Nothing else of the CLI stays: cockerinit gets its settings and descriptors
    as the program would, the log pipe as stdout and stderr, every other descriptor closed,
    every signal default, an environment of its own; it never returns here."""
    name, fds = boot.name, boot.fds
    os.close(boot.devnull)
    settings = {'COCKER_ROOT': boot.root, 'COCKER_SOCKDIR': boot.directory,
                'COCKER_HOSTNAME': boot.hostname, 'COCKER_EXEC': exec_cmd,
                'COCKER_SECCOMP': boot.seccomp, 'COCKER_NO_NEW_PRIVS': boot.no_new_privs,
                'COCKER_MAIN': '1' if boot.main else None,
                'COCKER_TTY': '1' if tty else None}     # the one-shot's stdio is a terminal
    settings.update(('COCKER_%s_FD' % k.upper(), str(v)) for k, v in fds.items())
    os.dup2(fds['log'], 1)
    os.dup2(fds['log'], 2)
    close_fds_except({0, 1, 2} | set(fds.values()))
    global LOG_FILE
    LOG_FILE = None                     # (leave_home's descriptor: closed now)
    init.default_signals()
    os.environ.clear()
    os.environ.update(PATH=init.SESSION_PATH, LC_ALL='C.UTF-8')
    init.show_as([init.__file__, '--container', name],
                 ['%s=%s' % (k, settings[k]) for k in ('COCKER_SOCKDIR', 'COCKER_ROOT')] +
                 ['%s=%s' % (k, os.environ[k]) for k in ('PATH', 'LC_ALL')])
    os._exit(init.serve_container(name, dict((k, settings.get(k)) for k in init.CONFIG_ENV)))


def stop_monitor(name, pid, sig=SIGTERM, timeout=STOP_TIMEOUT + 5):
    """Signal the monitor, wait for it to finish its cleanup, kill it after `timeout`."""
    if not signal_process(pid, sig):
        return
    if not wait_for_monitor(name, pid, timeout):
        debug('monitor %d did not stop within %ds, killing it', pid, timeout)
        signal_process(read_pid(name, 'init_pid'), SIGKILL)
        signal_process(pid, SIGKILL)
        wait_for_monitor(name, pid, None)
    reap_if_child(pid)


def wait_for_monitor(name, pid, timeout):
    """Until the monitor has let go of running.lock (its cleanup done: it lets go before
    its exit, or dies), at most timeout seconds (None: no limit) -> whether it did.  A
    container of the C cocker (no running.lock) is watched every 20 ms."""
    try:
        fd = os.open(container_file(name, 'running.lock'), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return wait_for_pid(name, pid, timeout)
    try:
        return lock_within(fd, timeout)
    finally:
        os.close(fd)                    # (our shared lock with it)
        reap_if_child(pid)


class LockTimeout(Exception):
    """The time to wait for a lock is up (raised by lock_within's alarm)."""


def lock_within(fd, timeout):
    """A shared flock on fd, waited for at most timeout seconds (None: no limit) -> whether
    it was taken."""
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return True
    import _signal                      # (not signal.py: its enums cost a stop 3 ms)
    waiting = [True]

    def expired(signum, frame):
        if waiting[0]:                  # (never once the wait is over)
            raise LockTimeout()
    saved = _signal.signal(_signal.SIGALRM, expired)
    try:
        _signal.setitimer(_signal.ITIMER_REAL, max(timeout, 0.001))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            waiting[0] = False
        return True
    except LockTimeout:                 # (or it came just as the lock was taken)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, saved)


def wait_for_pid(name, pid, timeout):
    """wait_for_monitor for a monitor without running.lock (the C cocker's): its pid."""
    deadline = None if timeout is None else time.time() + timeout
    while monitor_alive(name):
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            return False
        reap_if_child(pid)
        time.sleep(0.02 if left is None else min(0.02, left))
    return True


def reap_if_child(pid, block=False):
    try:
        os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        pass


# ---- monitors fork monitors ----------------------------------------------------------
# PID 1 is forked from its monitor, the monitor from the CLI: the two share the pages of
# one interpreter.  But a page that either writes after the fork (a reference count is
# enough) is copied, into both: an idle container cost 6.6 MB.  So a boot asks a running
# monitor, the one HOME/SIBLING_FILE names, to fork its monitor, if it runs the same code
# in the same context as the command (namespaces, root, cgroups, credentials, limits,
# scheduling: a monitor is made as if the command had forked it); the monitors and PID 1s
# of the host then share the pages none of them writes (3.9 MB a container).  That monitor
# is the first that found none to ask: it forks for the boots after it, those it forks fork
# none, until it ends or has forked SIBLINGS_PER_MONITOR, and the next boot's own monitor
# takes over (the kernel finds who maps a page they share by visiting each of them: in
# reclaim, migration and DAMON's sampling, which took half a CPU at 1500 containers forked
# by one, and in every fork, which waits for those visits).  The new monitor is a child of
# init, as a daemon is (born so, or a grandchild whose parent exits), gets the command's
# environment and settings over the socket, sends its pid, then waits for the go, which
# brings the command's descriptors (PID 1's channel, the container lock, its streams: none
# is ever in flight to a monitor that may not read it): a command that gave up
# (SIBLING_TIMEOUT), failed, died or hung for BOOT_TIMEOUT leaves nothing behind.  The
# order goes before the command's host steps and the go after them, so that the checks and
# the fork (3 ms) happen while the command works.  Otherwise, or should anything fail, the
# command forks the monitor itself, as before.

SIBLING_FILE = 'forking_monitor'        #: HOME/forking_monitor: whose monitor forks
SIBLINGS_PER_MONITOR = 32               #: (their shared pages cost each 1/33 of their size)
ORDER_TIMEOUT = 0.25                    #: seconds a monitor waits for an order, once connected
MONITOR_SOCKET = 'monitor.sock'
MONITOR_REQUEST = b'cocker-monitor-1'   #: the first field of a request (its version)
STDIO_KEYS = ('stdin', 'stdout', 'stderr')
#: what the command and the monitor forking for it must have alike, in /proc/PID/
NAMESPACES = ('mnt', 'net', 'pid', 'pid_for_children', 'uts', 'ipc', 'user', 'cgroup',
              'time', 'time_for_children')
CONTEXT_FILES = ('cgroup', 'limits', 'oom_score_adj', 'loginuid', 'sessionid',
                 'attr/current', 'personality', 'timerslack_ns')
CONTEXT_STATUS = (b'Uid', b'Gid', b'Groups', b'Umask', b'CapInh', b'CapPrm', b'CapEff',
                  b'CapBnd', b'CapAmb', b'NoNewPrivs', b'Seccomp', b'Seccomp_filters',
                  b'Speculation_Store_Bypass', b'SpeculationIndirectBranch',
                  b'Cpus_allowed', b'Mems_allowed', b'THP_enabled')
# (not SigIgn: a monitor handles its own signals, PID 1 sets them all to their default, and
# a command started by a shell's background job, SIGINT ignored, would share no pages)
CONTEXT_STAT = (16, 37, 38)             #: /proc/PID/stat after the name: nice, rt priority, policy
CONTEXT_KSM = (b'ksm_merge_any', b'ksm_mergeable')     #: of /proc/PID/ksm_stat (KSM on)


UNDER_A_SUBREAPER = 'this monitor runs under a subreaper'
#: (after an upgrade: the boot's own monitor forks the next ones, as the old one would not)
OTHER_CODE = 'the command runs other code'


class MonitorForked(BaseException):
    """Raised in a monitor just forked for another boot, up to run_monitor: the frames of
    the monitor it was forked from unwind, and it becomes the new one."""

    def __init__(self, order):
        BaseException.__init__(self)
        self.order = order


class SiblingAsked(object):
    """A boot's order sent to the monitor that SIBLING_FILE names, before the host steps:
    it checks the command and forks the new monitor while the command takes them.  That
    monitor does nothing until monitor() sends it the go; close() without it (a failed
    step, a kill) and it ends, having done nothing."""

    def __init__(self, sibling, sock):
        self.sibling, self.sock = sibling, sock
        self.outdated = False           # it runs other code: our monitor takes over

    def monitor(self, name, ready_w, lock, stdio):
        """The pid of this boot's monitor, sent the go with the command's descriptors (PID
        1's channel, the container lock, the standard streams); None (it refused, it
        failed): the command forks its own."""
        import _socket
        fds = [ready_w, lock] + [stdio[k] for k in STDIO_KEYS if k in (stdio or {})]
        try:
            answer = self.sock.recv(512)
            if not answer.startswith(b'P'):
                why = answer[1:].decode('utf-8', 'replace')
                self.outdated = why == OTHER_CODE
                debug('the monitor of %s forks none for %s: %s', self.sibling, name,
                      why or 'no answer')
                return None
            pid = int(answer[1:])
            self.sock.sendmsg([b'G'], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                        struct.pack('%di' % len(fds), *fds))])
            debug('monitor of %s is pid %d, forked by the monitor of %s', name, pid,
                  self.sibling)
            return pid
        except (OSError, ValueError) as e:
            debug('the monitor of %s forks none for %s: %s', self.sibling, name, error_text(e))
            return None
        finally:
            self.close()

    def close(self):
        self.sock.close()


def ask_sibling(name, identity, exec_cmd, stdio):
    """This boot's order to the monitor that SIBLING_FILE names -> SiblingAsked, or None
    (there is none, or it cannot be reached).  identity: the code this boot runs
    (code_identity)."""
    sibling = read_small(os.path.join(HOME, SIBLING_FILE), '')
    if sibling == name or not is_good_name(sibling) or not identity:
        return None
    import _socket
    try:
        sock = connect_unix(container_dir(sibling), MONITOR_SOCKET, _socket.SOCK_SEQPACKET,
                            SIBLING_TIMEOUT)
    except OSError:
        return None                     # (stopped, or a monitor of an older cocker)
    try:
        keys = [k for k in STDIO_KEYS if k in (stdio or {})]
        sock.send(monitor_request(name, identity, exec_cmd, stdio, keys))
        return SiblingAsked(sibling, sock)
    except OSError as e:
        sock.close()
        debug('the monitor of %s forks none for %s: %s', sibling, name, error_text(e))
        return None


def code_identity(init):
    """The interpreter, cocker.py and cockerinit.py as this process loaded them, or would
    load it (init None: a boot that a sibling serves never loads it) ('' for a cockerinit
    imported otherwise, as the tests do)."""
    loaded = file_identity(cockerinit_path()) if init is None else \
        getattr(init, 'LOADED_FROM', '')
    if not LOADED_FROM or not loaded:
        return ''
    return '%s|%s|%s|%s' % (sys.executable, sys.version, LOADED_FROM, loaded)


def monitor_request(name, identity, exec_cmd, stdio, keys):
    """A boot's order to a monitor: fields separated by NUL, the environment last."""
    fields = [identity, HOME, name, '-' if exec_cmd is None else '+' + exec_cmd,
              ','.join(keys), '1' if (stdio or {}).get('tty') else '', '1' if DEBUG else '',
              repr(STARTED), '1' if name in EPHEMERAL else '']
    with open('/proc/self/cmdline', 'rb') as f:
        argv = f.read().split(b'\0')[:-1]
    return b'\0'.join([MONITOR_REQUEST] + [os.fsencode(f) for f in fields] +
                      [str(len(argv)).encode()] + argv +
                      [k + b'=' + v for k, v in os.environb.items()])


def parse_monitor_request(msg):
    fields = msg.split(b'\0')
    if len(fields) < 10 or fields[0] != MONITOR_REQUEST:
        raise ValueError('not a monitor request of this cocker')
    text = [os.fsdecode(f) for f in fields[1:10]]
    keys = [k for k in text[4].split(',') if k]
    if any(k not in STDIO_KEYS for k in keys):
        raise ValueError('standard streams that do not exist')
    words = int(fields[10]) if len(fields) > 10 and fields[10].isdigit() else -1
    if not 0 <= words <= len(fields) - 11:
        raise ValueError('no command line')
    return {'identity': text[0], 'home': text[1], 'name': text[2],
            'exec': None if text[3] == '-' else text[3][1:], 'stdio': keys,
            'tty': text[5] == '1', 'debug': text[6] == '1', 'started': float(text[7]),
            'ephemeral': text[8] == '1', 'argv': fields[11:11 + words],
            'env': [e.split(b'=', 1) for e in fields[11 + words:] if b'=' in e[1:]]}


def context_difference(pid):
    """What of process pid's context differs from this process's, or None."""
    def ns(who, kind):
        try:
            st = os.stat('/proc/%s/ns/%s' % (who, kind))
            return st.st_dev, st.st_ino
        except FileNotFoundError:       # (a kernel without that namespace)
            return None
    for kind in NAMESPACES:
        if ns(pid, kind) != ns('self', kind):
            return 'its %s namespace' % kind
    here, there = os.stat('/proc/self/root'), os.stat('/proc/%d/root' % pid)
    if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        return 'its root directory'
    for key in CONTEXT_FILES:
        if proc_text('self', key) != proc_text(pid, key):
            return 'its ' + key
    for key in ('status', 'stat', 'ksm_stat'):
        if context_of(proc_text('self', key), key) != context_of(proc_text(pid, key), key):
            return 'its ' + key
    if ioprio_get(0) != ioprio_get(pid):
        return 'its I/O priority'
    return None


def proc_text(who, key):
    """/proc/WHO/KEY's bytes, or the errno that opening or reading it gave."""
    try:
        fd = os.open('/proc/%s/%s' % (who, key), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return e.errno
    try:
        return read_exactly(lambda n: os.read(fd, n), 65536)
    except OSError as e:                # (attr/current without an LSM: EINVAL)
        return e.errno
    finally:
        os.close(fd)


def context_of(text, key):
    """The lines of /proc/PID/status in CONTEXT_STATUS (of ksm_stat in CONTEXT_KSM), the
    fields of stat in CONTEXT_STAT."""
    if not isinstance(text, bytes):
        return text                     # (an errno: a kernel without the file)
    if key == 'stat':
        fields = text[text.rindex(b')') + 2:].split()
        return [fields[i] for i in CONTEXT_STAT]
    keys = CONTEXT_STATUS if key == 'status' else CONTEXT_KSM
    return [line for line in text.split(b'\n') if line.split(b':')[0].split(b' ')[0] in keys]


def listen_for_siblings(name, init, take_over=False):
    """The Siblings of a monitor, if none forks for the boots yet, or (take_over) the one
    that does runs other code (None: it does not listen).  One monitor forks them all:
    forked in a chain, each from the one before, every fork would copy the kernel's record
    of every ancestor's memory (its anon_vma chain), and a boot at 1000 containers took
    440 ms."""
    named = read_small(os.path.join(HOME, SIBLING_FILE), '')
    if not take_over and named != name and is_good_name(named) and monitor_alive(named) and \
            os.path.exists(container_file(named, MONITOR_SOCKET)):
        return None
    try:
        return Siblings(name, init)
    except OSError as e:
        log('WARN', 'monitor of %s forks no monitors: %s' % (name, error_text(e)))
        return None


class Siblings(object):
    """A monitor's socket, where boots ask it to fork their monitor."""

    def __init__(self, name, init):
        import _socket
        self.name, self.init, self.forked = name, init, 0
        self.listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET |
                                       _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK)
        dfd = os.open(container_dir(name), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        old = os.umask(0o177)           # (root's only, from its creation on)
        try:
            path = '/proc/self/fd/%d/%s' % (dfd, MONITOR_SOCKET)
            remove_file(path)
            self.listener.bind(path)
            self.listener.listen(64)
            write_small(os.path.join(HOME, SIBLING_FILE), name, durable=False)
        except OSError:
            self.listener.close()
            raise
        finally:
            os.umask(old)
            os.close(dfd)

    def close(self):
        """Serve no more: the next boot's own monitor takes over."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            remove_file(container_file(self.name, MONITOR_SOCKET))

    def wait_for(self, fd, timeout=None):
        """Until fd (None: none) can be read, at most timeout seconds, serving the boots
        that ask meanwhile -> whether it can."""
        import select
        fds = [f for f in (fd, self.listener) if f is not None]
        ready = select.select(fds, [], [], timeout)[0]      # (none: it sleeps, never spins)
        if self.listener is not None and self.listener in ready:
            self.serve()
        return fd is not None and fd in ready

    def serve(self):
        """One boot's order: refused (N and why), or its monitor forked (which raises
        MonitorForked, there)."""
        import _socket
        try:
            fd, _ = self.listener._accept()
        except BlockingIOError:         # (it gave up meanwhile)
            return
        except OSError as e:            # (out of descriptors: do not spin on it)
            log('WARN', 'monitor of %s forks no more monitors: %s' % (self.name, error_text(e)))
            self.close()
            return
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd)
        try:
            conn.settimeout(ORDER_TIMEOUT)  # (sent with the connection: a silent one
            # must not keep this monitor from its own container long)
            peer, uid, _ = struct.unpack('=iII', conn.getsockopt(
                _socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
            msg, _, flags, _ = conn.recvmsg(1 << 20)
            if flags & _socket.MSG_TRUNC:
                raise ValueError('an order of more than 1 MiB')
            request = parse_monitor_request(msg)
            refusal = self.refusal(peer, uid, request)
            if refusal:
                debug('monitor of %s: forks none for %s: %s', self.name, request['name'],
                      refusal)
                conn.send(b'N' + refusal.encode('utf-8', 'replace'))
                if refusal == UNDER_A_SUBREAPER:
                    self.close()        # (it would refuse every boot)
            else:
                if not self.forked:     # (the monitors it forks inherit it)
                    make_mount_template(self.init)
                fork_monitor(conn, request, self)
                self.forked += 1
                if self.forked >= SIBLINGS_PER_MONITOR:
                    self.close()        # the next boot's own monitor takes over
        except MonitorForked:
            raise                       # (the new monitor, on its way to run_monitor)
        except Exception as e:          # (whatever the boot sent: it forks its own)
            debug('monitor of %s: an order not served: %s', self.name, error_text(e))
        conn.close()

    def refusal(self, peer, uid, request):
        """Why this monitor does not fork for that boot, or None."""
        if uid != 0:
            return 'the command is not root'
        if not request['identity'] or request['identity'] != code_identity(self.init):
            return OTHER_CODE
        if request['home'] != HOME:
            return 'the command has another COCKER_HOME'
        name = request['name']
        if not is_good_name(name) or not os.path.isdir(container_dir(name)):
            return 'no such container'
        if os.getppid() != 1:
            return UNDER_A_SUBREAPER    # (ours would be there too)
        difference = context_difference(peer)
        return difference and 'the command differs in %s' % difference


def fork_monitor(conn, request, siblings):
    """Fork the monitor of a boot as a child of our parent (init), as a daemon is: it sends
    its pid, waits for the go, then raises MonitorForked (here, this returns at once).  By
    clone3's CLONE_PARENT, else as a grandchild whose parent ends at once (a fork more:
    1 ms).  It leaves every descriptor of this monitor behind at once: held by another
    process, running.lock would make this container look running after its end."""
    import _signal
    stops = {SIGTERM, _signal.SIGINT, _signal.SIGALRM}
    _signal.pthread_sigmask(_signal.SIG_BLOCK, stops)     # (our handlers: not in there)
    try:
        pid = clone3(CLONE_PARENT)
        twice = pid is None
        if twice:
            pid = os.fork()
        if pid == 0:
            try:
                for sig in stops:
                    _signal.signal(sig, _signal.SIG_DFL)
                siblings.listener.detach()
                close_fds_except({0, 1, 2, conn.fileno(), MOUNT_TEMPLATE})
                if not twice or os.fork() == 0:
                    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, stops)
                    raise MonitorForked(take_order(conn, request, siblings.init))
            except MonitorForked:
                raise
            except BaseException:
                pass
            os._exit(0)
    finally:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, stops)
    if twice:
        os.waitpid(pid, 0)


def take_order(conn, request, init):
    """In the new monitor: the command's settings made ours, our pid sent, its go and its
    descriptors received -> the order for run_monitor.  Without them, this process ends,
    having done nothing."""
    import _socket
    global DEBUG, STARTED
    DEBUG, STARTED = request['debug'], request['started']
    name = request['name']
    EPHEMERAL.clear()
    if request['ephemeral']:
        EPHEMERAL.add(name)
    del _owner[:]
    os.environ.clear()
    for key, value in request['env']:
        os.environb[key] = value
    init.show_as([os.fsdecode(w) for w in request['argv']],     # (ps: as if the command's)
                 [os.fsdecode(k + b'=' + v) for k, v in request['env']], b'cocker-monitor')
    fds = []
    try:
        conn.send(b'P%d' % os.getpid())
        conn.settimeout(BOOT_TIMEOUT)   # (its host steps: then it sends the go, or its end
        # closes the connection; one stuck longer forks its own monitor, if ever it goes on)
        go, ancdata, _, _ = conn.recvmsg(16, _socket.CMSG_SPACE(4 * (2 + len(STDIO_KEYS))))
        for level, kind, data in ancdata:
            if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS):
                fds += struct.unpack('%di' % (len(data) // 4), data[:len(data) // 4 * 4])
    except OSError:
        go = b''
    if go != b'G' or len(fds) != 2 + len(request['stdio']):
        debug('monitor %d forked for %s: no go, it ends', os.getpid(), name)
        os._exit(0)
    conn.close()
    stdio = dict(zip(request['stdio'], fds[2:])) or None
    if stdio:
        stdio['tty'] = request['tty']
    return name, request['exec'], fds[0], fds[1], stdio, True


# =============================================================================
# Container lifecycle
# =============================================================================
# make and remove, start and stop: each under the container's lock, each setup beside its
# undo.  A command that finds a container dead (its monitor gone, its leftovers still on the
# host) repairs it first, explicitly, under that lock.

def make_container(options, name, layers, fill=None, boot=None, stdio=None):
    """Make the container (its VIP, CUSTOM namespace, limits) and, with -b, boot it;
    everything undone on failure.  True if it was booted."""
    boot = options.boot if boot is None else boot
    vip = check_create_options(options, name)
    with locked('container', name):
        if os.path.lexists(container_dir(name)):
            raise CockerError("container '%s' exist" % name)
        clean_legacy_staging(containers_dir())
        if options.net == 'BRIDGE':
            vip = reserve_vip(name, vip)
        with Rollback(forget_vip, name, vip) as undo:
            create_container(options, name, layers, vip, fill)
            undo.push(remove_tree, container_dir(name))
            if options.net == 'CUSTOM':
                undo.push(delete_netns, netns_path(name))   # (quiet if it never came)
                add_custom_netns(name)
            record_limits(name, options)
            record_security(name, options)
            record_run_options(name, options)
            record_production_options(name, options)
            log('INFO', "created container '%s' from '%s'" % (name, options.image))
            if boot:
                start_container(name, options.exec_cmd, stdio)
    return boot


def check_create_options(options, name):
    """Refuse bad create options before anything is made; return the checked --vip."""
    check_name('container', name)
    if options.host is not None:
        check_hostname(options.host)
    for v in options.volumes:
        parse_volume(v)
    if options.net != 'BRIDGE':
        if options.vip or options.port_mapping or options.host_eth:
            debug('--vip, --port-mapping and --host-eth are ignored for --net %s', options.net)
        return None
    return None if options.vip is None else check_vip(options.vip, network_config())


def check_hostname(host):
    if not host or len(host) > 64 or any(ord(ch) < 33 or ord(ch) == 127 for ch in host):
        raise usage_error("hostname '%s' is invalid" % host)


def remove_container(name):
    """Delete a stopped container (under its lock) with what it holds on the host."""
    teardown_unless_clean(name)
    forget_network(name)
    discard(containers_dir(), container_dir(name))


def start_container(name, exec_cmd=None, stdio=None):
    """Boot a stopped container; return when cockerinit serves, or raise with the cause."""
    for key in ('stopped_by_operator', 'restart_count'):
        write_attr(name, key, None)     # a boot starts the policy's count anew
    images = [ref.split(':')[0] for ref in split_list(pinned_layers(name))]
    with locked_images(*images, shared=True):       # del_image waits, then sees us running
        pin_layers(name)
        debug('layers of %s, bottom first: %s', name,
              ' '.join(container_layers(name)) or '(rwlayer only)')
        if write_image_settings(name, exec_cmd):
            exec_cmd = None             # it is in cp/main, with the image's entrypoint
        boot_container(name, exec_cmd, stdio)


def boot_stopped(name, options):
    """-a boot: the limits, security options and --host-eth of this command line are
    recorded (for this boot and the later ones), then the container is started."""
    with locked('container', name):
        require_container(name)
        repair_if_dead(name)
        if is_running(name):
            raise CockerError("container '%s' is already running" % name)
        record_limits(name, options)
        record_security(name, options)
        record_run_options(name, options)
        if options.host_eth is not None:
            write_attr(name, 'host_eth',
                       None if options.host_eth == 'none' else options.host_eth)
        start_container(name, options.exec_cmd)
        log('INFO', "booted container '%s'" % name)


# ---- one-shot runs (create ... -b -e CMD --rm) -------------------------------------------
# As docker run --rm: the main process gets cocker's stdin (with -i), stdout and stderr
# through pipes cocker relays (never cocker's own descriptors: a host file or terminal in
# a container's hands could be chmod'ed or fed keystrokes), or with -t a pty cocker makes;
# its exit status is cocker's, and the container goes when it ends.  HOME/oneshot/NAME
# names the cocker that owns it: a cocker killed meanwhile is noticed by the next command,
# which removes the container.

def one_shot(options, layers, image_name):
    """Create, boot, relay, destroy -> the main process's exit status."""
    if not options.boot:
        raise usage_error("'--rm' runs one command: add -b and -e")
    if (options.restart or 'no') != 'no' or options.autostart is not None:
        raise usage_error("'--rm' does not go with --restart or --autostart")
    name = options.container or '%s-%s' % (image_name[:40], os.urandom(4).hex())
    check_name('container', name)
    claim_one_shot(name)
    EPHEMERAL.add(name)
    relay = OneShotRelay(options.attach, options.interactive)
    try:
        try:
            make_container(options, name, layers, boot=True, stdio=relay.container_ends())
        finally:
            relay.close_container_ends()
        status = relay.copy_until_done(name)
    except KeyboardInterrupt:
        status = 130
    finally:
        relay.close()
        remove_one_shot(name)
    return status


def claim_one_shot(name):
    """HOME/oneshot/NAME: this cocker owns the container (pid and start time)."""
    os.makedirs(one_shot_dir(), 0o700, exist_ok=True)
    path = os.path.join(one_shot_dir(), name)
    if os.path.exists(path) or os.path.lexists(container_dir(name)):
        raise CockerError("container '%s' exist" % name)
    write_small(path, staging_owner())


def remove_one_shot(name):
    """The container of a one-shot run goes (stopped first), then its entry."""
    if os.path.isdir(container_dir(name)):
        destroy_container(name, shutdown=True, force=True)
    remove_file(os.path.join(one_shot_dir(), name))


def clean_one_shots():
    """The containers of one-shot runs whose cocker was killed (cheap: one small directory)."""
    try:
        entries = os.listdir(one_shot_dir())
    except FileNotFoundError:
        return
    for name in entries:
        if name.startswith('.') or owner_running(read_small(os.path.join(one_shot_dir(), name),
                                                            '')):
            continue
        try:
            with locked('oneshot', name, wait=False) as held:
                if held:
                    remove_one_shot(name)
        except (OSError, CockerError) as e:
            log('WARN', 'cannot remove one-shot container %s: %s' % (name, error_text(e)))


class OneShotRelay(object):
    """cocker's side of a one-shot run's stdio: three pipes (or a pty with -t) whose other
    ends go to the main process, copied until both output ends close."""

    def __init__(self, tty, interactive):
        self.tty, self.interactive = tty, interactive
        self.saved = None
        if tty:
            if not os.isatty(0):
                raise CockerError("'-t' needs a terminal on stdin")
            self.master, slave = os.openpty()
            set_window_size(self.master, window_size(0))
            self.ends = {'stdin': slave, 'stdout': os.dup(slave), 'stderr': os.dup(slave),
                         'tty': True}
            self.outputs = {self.master: 1}
        else:
            in_r, self.in_w = os.pipe() if interactive else (os.open('/dev/null', os.O_RDONLY),
                                                              None)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            self.ends = {'stdin': in_r, 'stdout': out_w, 'stderr': err_w}
            self.outputs = {out_r: 1, err_r: 2}

    def container_ends(self):
        return self.ends

    def close_container_ends(self):
        for key, fd in list(self.ends.items()):
            if key != 'tty':
                os.close(fd)
        self.ends = {}

    def copy_until_done(self, name):
        """Relay until the command's outputs close; then wait for the container to stop
        -> the exit status of its main process."""
        import select
        import _signal
        inputs = {}
        if self.tty:
            import termios
            import tty
            self.saved = termios.tcgetattr(0)
            tty.setraw(0)
            inputs = {0: self.master}
            _signal.signal(_signal.SIGWINCH,
                           lambda s, f: set_window_size(self.master, window_size(0)))
        elif self.interactive:
            inputs = {0: self.in_w}
        while self.outputs:
            try:
                readable = select.select(list(self.outputs) + list(inputs), [], [])[0]
            except InterruptedError:
                continue
            for fd in readable:
                self.move(fd, inputs)
        monitor = read_pid(name)
        if monitor is not None:         # (not always our child: see Monitors fork monitors)
            wait_for_monitor(name, monitor, None)
        status = read_attr(name, 'exit_status')
        return int(status) if status and status.isdigit() else 255

    def move(self, fd, inputs):
        """One read from fd to where it goes; an end that closed is dropped."""
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b''
        if fd in inputs:
            if not data:
                if not self.tty:
                    os.close(inputs[fd])    # the command sees the end of its input
                del inputs[fd]
                return
            os.write(inputs[fd], data)
            return
        if not data:
            del self.outputs[fd]
            os.close(fd)
            return
        try:
            os.write(self.outputs[fd], data)
        except BrokenPipeError:
            pass

    def close(self):
        if self.saved is not None:
            import termios
            termios.tcsetattr(0, termios.TCSAFLUSH, self.saved)
        self.close_container_ends()
        for fd in list(self.outputs) + ([self.in_w] if getattr(self, 'in_w', None) else []):
            try:
                os.close(fd)
            except OSError:
                pass


# ---- an imported image's command, environment, working directory and user --------------

BLOB_MAX_JSON = 16 << 20                #: the largest manifest, index or config read


def image_config(name, version):
    """The 'config' of an imported image (Entrypoint, Cmd, Env, WorkingDir, User...), None
    for a cockerimage."""
    try:
        with open(os.path.join(image_dir(name, version), 'config.json'), 'rb') as f:
            data = f.read(BLOB_MAX_JSON)
    except FileNotFoundError:
        return None                     # (before json, which loads re: boots stay quick)
    import json
    try:
        document = json.loads(data.decode('utf-8'))
    except ValueError:
        raise CockerError("config.json of image '%s' is damaged" % image_ref_text(name, version))
    config = document.get('config') if isinstance(document, dict) else None
    return config if isinstance(config, dict) else {}


def container_config(name):
    """The config of the topmost image of the container that has one, or None."""
    for ref in reversed(split_list(pinned_layers(name))):
        config = image_config(*resolve_image(ref))
        if config is not None:
            return config
    return None


def image_settings(name, exec_cmd):
    """What cockerinit runs for a container of an imported image, as (key, value) fields:
    the main process (the entrypoint, recorded --entrypoint or the image's, then -e's words
    or the image's Cmd), its Env (the image's, then --env), WorkingDir and User (--user
    first).  None for a container of cockerimages: -e or nothing, as before."""
    config = container_config(name)
    entrypoint = read_attr(name, 'entrypoint')
    if config is None:
        if entrypoint is None and not read_attr(name, 'env') and not read_attr(name, 'user'):
            return None
        config = {}                     # a cockerimage with run options: they apply too
    split_command = load_cockerinit().split_command
    argv = split_command(entrypoint) if entrypoint is not None else \
        [str(a) for a in config.get('Entrypoint') or []]
    if exec_cmd is not None:
        argv += split_command(exec_cmd)
    elif entrypoint is None:            # as Docker: a new entrypoint drops the image's Cmd
        argv += [str(a) for a in config.get('Cmd') or []]
    env = [str(e) for e in config.get('Env') or []] + \
        read_attr(name, 'env', '').split('\n')
    fields = [('cwd', str(config.get('WorkingDir') or '')),
              ('user', read_attr(name, 'user') or str(config.get('User') or '')),
              ('stop', str(stop_signal_number(config.get('StopSignal'))))] + [
        ('arg', a) for a in argv] + [('env', e) for e in env if e]
    if any('\0' in value for _, value in fields):
        raise CockerError("the image config of container '%s' has a NUL byte" % name)
    if sum(len(k) + len(v) + 2 for k, v in fields) > IMAGE_SETTINGS_MAX:
        raise CockerError("the command and environment of container '%s' are too large"
                          % name)
    return fields


def stop_signal_number(text):
    """An image's StopSignal ('SIGQUIT', 'QUIT', '3', 'SIGRTMIN+3') -> its number; SIGTERM
    when the image names none."""
    if not text:
        return SIGTERM
    import _signal
    text = str(text).upper()
    name = text if text.startswith('SIG') else 'SIG' + text
    base, plus, offset = name.partition('+')
    number = int(text) if text.isdigit() else getattr(_signal, base, None)
    if plus and number is not None:
        number = number + int(offset) if offset.isdigit() else None
    if not isinstance(number, int) or not 0 < number < _signal.NSIG or \
            base in ('SIG_DFL', 'SIG_IGN', 'SIG_BLOCK', 'SIG_UNBLOCK', 'SIG_SETMASK'):
        raise CockerError("the image's StopSignal '%s' is not a signal" % printable(text))
    return number


IMAGE_SETTINGS_MAX = 1 << 20            #: cp/main, which cockerinit reads (4 MiB at most)


def write_image_settings(name, exec_cmd):
    """cp/main for cockerinit (read on the host before it enters the root); True if any."""
    fields = image_settings(name, exec_cmd)
    write_attr(name, 'main', None if fields is None else
               '\0'.join('%s=%s' % field for field in fields))
    return fields is not None


# ---- the container's log ---------------------------------------------------------------
# cp/cockerinit.log holds what cockerinit and the main process write (the monitor copies
# it from PID 1's log pipe), rotated at --log-size into cockerinit.log.1 ... .N
# (--log-count N), so a chatty container never fills COCKER_HOME.

LOG_DEFAULTS = ('10M', 2)               #: --log-size, --log-count when not given
LOG_FILES_MAX = 100


def log_rotation(name):
    """(bytes a log file may hold, rotated files kept) of a container (the defaults for
    values no cocker wrote)."""
    try:
        size = parse_log_size(read_attr(name, 'log_size') or LOG_DEFAULTS[0])
        count = parse_log_count(read_attr(name, 'log_count') or str(LOG_DEFAULTS[1]))
    except CockerError:
        return parse_log_size(LOG_DEFAULTS[0]), LOG_DEFAULTS[1]
    return size, count


def parse_log_size(text):
    size = size_bytes(text, '--log-size')
    if size < 64 << 10:
        raise usage_error("'--log-size' value[%s] is too small (at least 64K)" % printable(text))
    return size


def parse_log_count(text):
    if not is_decimal(text) or not 0 < int(text) <= LOG_FILES_MAX:
        raise usage_error("'--log-count' value[%s] invalid (1 to %d rotated files)"
                          % (printable(text), LOG_FILES_MAX))
    return int(text)


def log_files(name):
    """The container's log files, oldest first."""
    base = container_file(name, 'cockerinit.log')
    rotated = []
    for n in range(LOG_FILES_MAX, 0, -1):
        if os.path.exists('%s.%d' % (base, n)):
            rotated.append('%s.%d' % (base, n))
    return rotated + ([base] if os.path.exists(base) else [])


def show_log(name, tail=None, follow=False):
    """-s logs: the log (its last tail lines), then with follow what comes, until the
    container stops; control characters escaped (it is the container's text)."""
    reader = LogReader(name)
    data = reader.read_new()
    if tail is not None:
        lines = data.splitlines(True)       # (the files joined: a line cut by a rotation
        data = b''.join(lines[len(lines) - tail:])      # counts once)
    write_log_text(data)
    try:
        while follow:
            running = is_running(name)
            write_log_text(reader.read_new())
            if not running:
                break
            time.sleep(0.1)
    finally:
        reader.close()


class LogReader(object):
    """Reads a container's log files, each once, through any number of rotations: a
    rotated file is read to its end and done; the current one stays open (its descriptor
    follows it when it is rotated in turn).  Files are known by inode, each held open while
    it is listed, so that no new file can come with a done one's inode."""

    def __init__(self, name):
        self.name, self.done, self.open = name, {}, {}

    def read_new(self):
        """What was written since the last call, the oldest first."""
        data = []
        files = log_files(self.name)
        listed = set(self.key(p) for p in files)
        for key in [k for k in self.open if k not in listed]:
            data.append(self.open[key].read())  # rotated away between two reads: oldest
            self.finished(key)
        for key in [k for k in self.done if k not in listed]:
            self.done.pop(key).close()      # gone: its inode may now come again
        for n, path in enumerate(files):
            key, f = self.file(path)
            if key is None or key in self.done:
                continue
            data.append(f.read())
            if n < len(files) - 1:          # rotated: it gets no more
                self.finished(key)
        return b''.join(data)

    @staticmethod
    def key(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def file(self, path):
        key = self.key(path)
        if key is not None and key not in self.open and key not in self.done:
            try:
                self.open[key] = open(path, 'rb')
            except FileNotFoundError:       # (renamed between the stat and the open)
                return None, None
        return key, self.open.get(key)

    def finished(self, key):
        self.done[key] = self.open.pop(key)

    def close(self):
        for f in list(self.open.values()) + list(self.done.values()):
            f.close()
        self.open, self.done = {}, {}


def write_log_text(data):
    if not data:
        return
    try:
        sys.stdout.write(printable(data.decode('utf-8', 'surrogateescape'), keep='\n\t'))
        sys.stdout.flush()
    except BrokenPipeError:
        raise ReaderGone()


# ---- restart policies and autostart --------------------------------------------------
# The monitor runs PID 1 again when it ends and the policy says so (Docker's and Podman's
# policies); the host steps stay in place meanwhile, so a restart is a new PID 1 in the
# same root, network and cgroups.  Autostart: -a autostart boots the marked containers
# after a host boot, by priority; -a shutdown_all stops every container before it halts.

RESTART_POLICIES = ('no', 'on-failure', 'always', 'unless-stopped')
RESTART_DELAY = (0.1, 30.0)             #: the first back-off and its cap (doubling between)
RESTART_STEADY = 10                     #: seconds of running after which back-off starts anew


def parse_restart(text):
    """'no', 'on-failure[:MAX]', 'always', 'unless-stopped' -> (policy, MAX or None)."""
    policy, colon, most = text.partition(':')
    if policy not in RESTART_POLICIES or (colon and (policy != 'on-failure' or not (
            is_decimal(most) and 0 < int(most) < 1 << 31))):
        raise usage_error("'--restart' value[%s] invalid (no, on-failure[:MAX], always, "
                          "unless-stopped)" % printable(text))
    return policy, int(most) if colon else None


def restart_wanted(name, status, restarts):
    """Whether the monitor runs PID 1 again after it ended with status."""
    policy, most = parse_restart(read_attr(name, 'restart') or 'no')
    if policy == 'no' or operator_stopping(name):
        return False
    if policy == 'on-failure':
        return status != 0 and (most is None or restarts < most)
    return True


def restart_delay(quick):
    """Seconds before a restart that follows quick short runs (shorter than RESTART_STEADY)
    in a row: doubling, capped."""
    first, cap = RESTART_DELAY
    return min(cap, first * 2 ** min(quick, 16))


def sleep_unless_stopped(seconds, state, siblings=None):
    """Wait (forking the monitors siblings is asked for), unless the operator stops the
    container meanwhile -> False if so."""
    deadline = time.time() + seconds
    while not state['stopping'] and time.time() < deadline:
        pause = min(0.05, max(0.0, deadline - time.time()))
        if siblings is None:
            time.sleep(pause)
        else:
            siblings.wait_for(None, pause)
    return not state['stopping']


def record_production_options(name, options):
    """--restart, --autostart and --autostart-delay of create or update, kept."""
    if options.restart is not None:
        parse_restart(options.restart)
        write_attr(name, 'restart', None if options.restart == 'no' else options.restart)
    if options.autostart is not None:
        write_attr(name, 'autostart', None if options.autostart == 'off' else
                   str(autostart_priority(options.autostart)))
    if options.autostart_delay is not None:
        write_attr(name, 'autostart_delay', str(autostart_delay(options.autostart_delay)))
    if options.log_size is not None:
        parse_log_size(options.log_size)
        write_attr(name, 'log_size', options.log_size)
    if options.log_count is not None:
        write_attr(name, 'log_count', str(parse_log_count(options.log_count)))


def autostart_priority(text):
    if parse_int(text) is not None and abs(parse_int(text)) < 1 << 31:
        return parse_int(text)
    raise usage_error("'--autostart' value[%s] invalid (a priority number, or off)"
                      % printable(text))


def autostart_delay(text):
    if is_decimal(text) and int(text) <= 3600:
        return int(text)
    raise usage_error("'--autostart-delay' value[%s] invalid (seconds, 0 to 3600)"
                      % printable(text))


def autostart_containers():
    """[(name, priority, delay)] of the containers marked for autostart, in boot order:
    the highest priority first (LXD's boot.autostart.priority), then by name."""
    marked = []
    for name in list_containers():
        priority = number_attr(name, 'autostart')
        if priority is not None:
            marked.append((name, priority, max(number_attr(name, 'autostart_delay') or 0, 0)))
    return sorted(marked, key=lambda m: (-m[1], m[0]))


def boot_marked_containers():
    """-a autostart: boot every marked container that is not running, in order, waiting
    its delay after each; a failure is reported and the others still boot -> failures."""
    failed = 0
    for name, _, delay in autostart_containers():
        try:
            with locked('container', name):
                repair_if_dead(name)
                if is_running(name):
                    continue
                start_container(name)
            log('INFO', "autostarted container '%s'" % name)
            say('%s: booted' % name)
            time.sleep(delay)
        except (OSError, CockerError) as e:
            failed += 1
            report('%s: %s' % (name, error_text(e)), EXIT_FAILED)
    return failed


def shutdown_every_container():
    """-a shutdown_all: stop every running container, the autostart order reversed (the
    unmarked first) -> failures."""
    order = [name for name, _, _ in reversed(autostart_containers())]
    failed = 0
    for name in [n for n in list_containers() if n not in order] + order:
        try:
            with locked_to_stop(name):
                repair_if_dead(name)
                if not is_running(name):
                    continue
                stop_container(name, SIGTERM)
            say('%s: shut down' % name)
        except (OSError, CockerError) as e:
            failed += 1
            report('%s: %s' % (name, error_text(e)), EXIT_FAILED)
    return failed


def record_run_options(name, options):
    """--entrypoint, --env and --user of create or boot, kept for later boots."""
    if options.entrypoint is not None:
        write_attr(name, 'entrypoint', options.entrypoint)
    if options.env:
        write_attr(name, 'env', ''.join(e + '\n' for e in options.env))
    if options.user is not None:
        write_attr(name, 'user', options.user or None)


def interrupt_file_action(name):
    """SIGTERM to the file action recorded in cp/file_action, if it is still that process."""
    try:
        pid, start = [int(x) for x in read_attr(name, 'file_action', '').split()]
    except ValueError:
        return
    if process_start_time(pid) == start and pid != os.getpid():
        signal_process(pid, SIGTERM)


class locked_to_stop(locked):
    """The container lock for shutdown, kill and destroy: a file action holding it is
    interrupted, anything else (a boot, another stop) waited for."""

    def __init__(self, name):
        locked.__init__(self, 'container', name, wait=False)
        self.name = name

    def __enter__(self):
        while locked.__enter__(self) is None:
            interrupt_file_action(self.name)
            time.sleep(0.02)
        return self


def stop_container(name, sig, force=False):
    """Stop a running container with SIGTERM (shutdown) or SIGKILL (kill) and tear it down;
    with force, a stopped one's leftovers are torn down instead of an error.  Its restart
    policy never undoes this (stopped_by_operator, written before any signal)."""
    repair_if_dead(name)
    if not is_running(name):
        if force:
            teardown_container(name)
            return
        raise CockerError("container '%s' is not running" % name)
    write_attr(name, 'stopped_by_operator', staging_owner() +    # (this cocker: PID-START)
               (' remove' if name in EPHEMERAL else ''))          # (and a destroy follows)
    monitor = read_pid(name)
    debug('stopping %s (monitor %s) with signal %d', name, monitor, sig)
    if sig == SIGKILL:
        signal_process(read_pid(name, 'init_pid'), SIGKILL)
    if monitor:
        stop_monitor(name, monitor, SIGTERM)
    teardown_unless_clean(name)         # (what a monitor killed meanwhile left)


def stop_locked(name, sig, force=False):
    """shutdown and kill: stop_container under the lock a file action gives up."""
    with locked_to_stop(name):
        stop_container(name, sig, force)
        log('INFO', "%s container '%s'" % ('killed' if sig == SIGKILL else 'shut down', name))


def destroy_container(name, shutdown=False, force=False):
    """Remove a stopped container (with shutdown, a running one is stopped first)."""
    with locked_to_stop(name):
        require_container(name)
        repair_if_dead(name)
        if is_running(name):
            if not shutdown:
                raise CockerError("container '%s' is running (add -h to stop it first)" % name)
            EPHEMERAL.add(name)
            stop_container(name, SIGTERM, force)
        remove_container(name)
        log('INFO', "destroyed container '%s'" % name)


def change_stopped_container(name, key, value, what):
    """Rewrite one attribute file of a stopped container (used from its next boot)."""
    with locked('container', name):
        repair_if_dead(name)
        require_stopped(name, what)
        write_attr(name, key, value)


# ---- the program PID 1 runs ---------------------------------------------------------

def cockerinit_path():
    """cockerinit.py beside this file (a plain copy or a pip install puts it there)."""
    here = os.path.dirname(os.path.realpath(__file__))
    for candidate in (os.path.join(here, 'cockerinit.py'), os.path.join(here, 'cockerinit')):
        if os.path.isfile(candidate):
            with open(candidate, 'rb') as f:
                if b'cockerinit' in f.read(4096):
                    return candidate
    raise CockerError("cockerinit.py not found beside %s" % os.path.realpath(__file__))


def load_cockerinit():
    """cockerinit.py as a module: its confine() is the one confinement of the container's
    processes and of the file helpers (a host file, read before anything is entered).
    Loaded once a command: a one-shot run checks -e with it, then boots with it; a boot
    whose monitor a running one forks (it has this code) never loads it."""
    module = sys.modules.get('cockerinit')
    if module is None:
        try:    # (what importlib.machinery gives, without the warnings it loads: 1 ms a boot)
            from _frozen_importlib_external import SourceFileLoader
        except ImportError:
            from importlib.machinery import SourceFileLoader
        path = cockerinit_path()
        module = type(sys)('cockerinit')
        module.__file__ = path
        module.LOADED_FROM = file_identity(path)
        exec(SourceFileLoader('cockerinit', path).get_code('cockerinit'), module.__dict__)
        sys.modules['cockerinit'] = module
    return module


# =============================================================================
# Talking to cockerinit
# =============================================================================
# Frames on the control socket: 1 type byte, 4-byte big-endian length, payload.
#   client -> init: R request (fields), I input bytes, C input closed, W window size (4 x u16)
#   init -> client: O stdout bytes, E stderr bytes, X exit status (fields), M error text
# Fields are 'key=value' strings separated by NUL bytes (no JSON: it costs `re` at start-up).

FRAME = struct.Struct('>cI')
FRAME_MAX = 1 << 20


def frame(kind, payload=b''):
    return FRAME.pack(kind, len(payload)) + payload


def pack_fields(fields):
    return b'\0'.join(('%s=%s' % (k, v)).encode('utf-8', 'surrogateescape')
                       for k, v in fields.items() if v is not None)


def unpack_fields(payload):
    pairs = (item.decode('utf-8', 'surrogateescape').partition('=')
             for item in payload.split(b'\0') if item)
    return dict((k, v) for k, _, v in pairs)


def split_frames(buf):
    """Complete frames at the start of buf -> ([(kind, payload)], rest)."""
    frames = []
    while len(buf) >= FRAME.size:
        kind, size = FRAME.unpack_from(buf)
        if size > FRAME_MAX:
            raise CockerError('protocol error from cockerinit')
        if len(buf) < FRAME.size + size:
            break
        frames.append((kind, bytes(buf[FRAME.size:FRAME.size + size])))
        buf = buf[FRAME.size + size:]
    return frames, buf


def connect_container(name):
    """A connected socket to the container's cockerinit."""
    import _socket
    require_running(name)
    try:
        return connect_unix(container_dir(name), 'cocker.sock', _socket.SOCK_STREAM)
    except OSError as e:
        raise CockerError("cannot connect to container '%s': %s" % (name, e.strerror))


def window_size(fd):
    import termios
    try:
        return struct.unpack('HHHH', fcntl.ioctl(fd, termios.TIOCGWINSZ, b'\0' * 8))
    except OSError:
        return (24, 80, 0, 0)


def set_window_size(fd, size):
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack('HHHH', *size))


def session(name, sock, request, stdin_fd=None, tty=False):
    """Run one attach or run session; relay until cockerinit reports the exit status."""
    return Session(name, sock, request, stdin_fd, tty).relay()


class Session(object):
    """The client end of a session, one small method per event.  Frames to cockerinit are
    queued and sent without blocking, so that output is always read even while cockerinit
    cannot take more input (no deadlock with both ways full)."""

    def __init__(self, name, sock, request, stdin_fd, tty):
        self.name, self.sock, self.stdin_fd = name, sock, stdin_fd
        self.outgoing = bytearray(frame(b'R', pack_fields(request)))
        self.buf = b''
        self.status = None
        self.resized = []
        self.wake_r = self.watch_window() if tty else None

    def watch_window(self):
        """SIGWINCH wakes the loop through a pipe: the new size goes to the pty."""
        import signal
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGWINCH, lambda s, f: self.resized.append(1))
        return wake_r

    def relay(self):
        import select
        try:
            while self.status is None:
                readers = [self.sock] + ([self.wake_r] if self.wake_r else [])
                if self.stdin_fd is not None and len(self.outgoing) < FRAME_MAX:
                    readers.append(self.stdin_fd)
                try:
                    ready, writable, _ = select.select(
                        readers, [self.sock] if self.outgoing else [], [])
                except InterruptedError:
                    continue
                if writable:
                    self.send_queued()
                if self.wake_r in ready:
                    self.window_changed()
                if self.stdin_fd in ready:
                    self.read_input()
                if self.sock in ready:
                    self.read_frames()
            return self.status
        finally:
            self.sock.close()
            if self.wake_r is not None:
                import signal
                signal.set_wakeup_fd(-1)

    def send_queued(self):
        import _socket
        try:
            del self.outgoing[:self.sock.send(self.outgoing,
                                              _socket.MSG_DONTWAIT | _socket.MSG_NOSIGNAL)]
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            # the command ended before taking all its input: its status follows
            del self.outgoing[:]
            self.stdin_fd = None

    def window_changed(self):
        try:
            os.read(self.wake_r, 64)
        except BlockingIOError:
            pass
        if self.resized and self.stdin_fd is not None:
            del self.resized[:]
            self.outgoing.extend(frame(b'W', struct.pack('>HHHH', *window_size(self.stdin_fd))))

    def read_input(self):
        data = os.read(self.stdin_fd, 65536)
        self.outgoing.extend(frame(b'I' if data else b'C', data))
        if not data:
            self.stdin_fd = None

    def read_frames(self):
        data = self.sock.recv(65536)
        if not data:
            raise CockerError("container '%s' closed the session" % self.name)
        frames, self.buf = split_frames(self.buf + data)
        for kind, payload in frames:
            if kind == b'O':
                write_flushed(sys.stdout.buffer, payload)
            elif kind == b'E':
                write_flushed(sys.stderr.buffer, payload)
            elif kind == b'M':
                raise CockerError(payload.decode('utf-8', 'replace'))
            elif kind == b'X':
                self.status = int(unpack_fields(payload)['status'])
                return


def write_flushed(out, data):
    out.write(data)
    out.flush()


def run_in_container(name, cmd, interactive=False, user=None, cwd=None, env=(), tty=False):
    """-a run: stdout and stderr kept apart, the command's exit status returned; with -i
    cocker's stdin is passed on (else the command reads /dev/null, as ssh -n does); with
    -t on a pty, the caller's terminal raw meanwhile, as attach has it.  user, cwd and
    env (KEY=VALUE) are the command's, over the image's."""
    import _signal                      # (not signal: its enums cost 5 ms a run)
    request = {'cmd': cmd, 'stdin': '1' if interactive else None, 'user': user, 'cwd': cwd,
               'env': '\n'.join(env) or None}
    if tty:
        return terminal_session(name, request, 'run -t')
    # a reader that stops early (cocker -a run ... | head) ends us quietly, like cat
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    return session(name, connect_container(name), request, stdin_fd=0 if interactive else None)


def attach_container(name):
    """-a attach: a login shell on a new pty; the terminal is raw until it ends."""
    return terminal_session(name, {}, 'attach', greeting='connect to container ok')


def terminal_session(name, request, what, greeting=None):
    """A session on a pty: the window size passed on and followed, the terminal raw until
    the session ends."""
    import signal
    import termios
    import tty
    if not os.isatty(0):
        raise CockerError('%s needs a terminal on stdin (use -a run for scripts)' % what)
    rows, cols, xpix, ypix = window_size(0)
    request = dict(request, tty='1', term=os.environ.get('TERM', 'xterm'),
                   LANG=os.environ.get('LANG'), rows=rows, cols=cols, xpix=xpix, ypix=ypix)
    saved = termios.tcgetattr(0)
    sock = connect_container(name)              # fail before touching the terminal
    if greeting:
        say(greeting)
    # SIGTERM or SIGHUP must still give the terminal back: end through the finally below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    tty.setraw(0)
    try:
        return session(name, sock, request, stdin_fd=0, tty=True)
    finally:
        termios.tcsetattr(0, termios.TCSAFLUSH, saved)


# =============================================================================
# Image archives
# =============================================================================
# A .cockerimage is what the C cocker writes: a gzip-compressed tar of the contents of
# rlayer, member names relative (bin, etc/passwd), owners by name and id, devices and
# overlay whiteouts stored natively.  We add the top-level dot-files the C cocker's shell
# glob lost, the overlay and capability xattrs (as PAX records, which tar without --xattrs
# skips), and a NAME.sha256 beside it in sha256sum's format.
#
# GNU tar does the filing (it is as fast as it gets); cocker does the compression, the hash
# and the progress in between, and on import it reads every tar header before tar sees it:
# absolute names, '..', members below a symlink of the archive and hard links out of it are
# refused, device nodes other than whiteouts skipped.  Extraction goes to a staging
# directory, renamed into the store only when complete and checked.

ARCHIVE_SUFFIX = '.cockerimage'
CHUNK = 1 << 20
#: xattrs kept in archives: user data, opaque directories, file capabilities (never the
#: other overlay markers: origin is a file handle of this host, redirect a path to follow)
ARCHIVE_XATTRS = ('user.*', 'trusted.overlay.opaque', 'security.capability')
TAR_BLOCK = 512
TAR_RECORD = CHUNK // TAR_BLOCK         #: blocks tar reads at a time


def tar_xattr_options(kept=ARCHIVE_XATTRS):
    return ['--xattrs'] + ['--xattrs-include=%s' % x for x in kept]


class Progress(object):
    """'what: 12.3 MB of 45.6 MB, 30.1 MB/s, 0:01 left' on a terminal; nothing otherwise."""

    def __init__(self, what, total=None):
        self.what, self.total, self.done = what, total, 0
        self.start = self.shown = time.time()
        self.on = sys.stderr.isatty()

    def add(self, n):
        self.done += n
        now = time.time()
        if self.on and now - self.shown >= 0.2:
            self.shown = now
            self.show(now)

    def show(self, now):
        rate = self.done / max(now - self.start, 1e-6)
        text = '%s: %s' % (printable(self.what), size_text(self.done))
        if self.total:
            left = max(self.total - self.done, 0) / rate if rate else 0
            text += ' of %s, %s/s, %d:%02d left' % (size_text(self.total), size_text(int(rate)),
                                                   left // 60, left % 60)
        else:
            text += ', %s/s' % size_text(int(rate))
        sys.stderr.write('\r%-78s' % text[:78])
        sys.stderr.flush()

    def finish(self):
        if self.on:
            self.show(time.time())
            sys.stderr.write('\n')


def archive_name(name, version):
    return image_ref_text(name, version) + ARCHIVE_SUFFIX


def sha256_line(digest, filename):
    return '%s  %s\n' % (digest, filename)


#: the head of a gzip member as ParallelGzip writes it: magic, deflate, FEXTRA, no time,
#: Unix; then one extra subfield 'Ck' (as BGZF's 'BC') holding the member's whole length
GZIP_MEMBER_HEAD = b'\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\x03\x08\x00Ck\x04\x00'
GZIP_MEMBER_HEAD_SIZE = len(GZIP_MEMBER_HEAD) + 4
GZIP_MEMBER_MAX = 8 << 20           #: longest member read whole (cocker's: ~1 MiB)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      #: mallopt's parameters


def reuse_freed_buffers():
    """Have malloc keep the megabyte buffers an archive streams through, for the next ones,
    rather than give each back to the kernel and fault in fresh zeroed pages for the next:
    a page fault per 4 KiB, a tenth of an import's time on a VM.  (The process ends soon.)"""
    try:
        libc().mallopt(M_MMAP_THRESHOLD, 32 << 20)      # (the most glibc takes)
        libc().mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (AttributeError, ImportError, OSError):
        pass                            # no mallopt (musl) or no ctypes: as it is


class ParallelGzip(object):
    """A gzip compressor (compress() and flush(), as zlib's) that keeps every CPU busy, as
    `pigz --independent` does: the data is cut in blocks, each deflated by a thread (zlib
    lets go of the GIL) into a gzip member of its own.  Members follow one another, which
    gzip, tar xzf, Go's gzip and the C cocker read as one stream; each says how long it is,
    so that gunzip() inflates them on every CPU too."""

    BLOCK = 1 << 20

    def __init__(self, level=6):
        import concurrent.futures
        reuse_freed_buffers()
        self.level, self.threads = level, cpus()
        self.pool = concurrent.futures.ThreadPoolExecutor(self.threads)
        self.pending, self.data = [], []
        self.held = 0
        self.empty = True               # nothing submitted yet: gzip needs one member

    def compress(self, data):
        self.data.append(data)
        self.held += len(data)
        if self.held >= self.BLOCK:
            self.submit()
        return self.ready(2 * self.threads)

    def flush(self):
        """The rest of the stream; the threads are let go."""
        if self.held or self.empty:
            self.submit()
        try:
            return self.ready(0)
        finally:
            self.close()

    def close(self):
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(self):
        block = b''.join(self.data)
        self.data, self.held, self.empty = [], 0, False
        self.pending.append(self.pool.submit(gzip_member, block, self.level))

    def ready(self, keep):
        """What is compressed, in order, waiting while more than keep blocks are queued."""
        out = []
        while self.pending and (len(self.pending) > keep or self.pending[0].done()):
            out.append(self.pending.pop(0).result())
        return b''.join(out)


def gzip_member(block, level):
    """block as a whole gzip member, its length in its header (GZIP_MEMBER_HEAD)."""
    import zlib
    packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = packer.compress(block) + packer.flush()
    length = GZIP_MEMBER_HEAD_SIZE + len(body) + 8
    return b''.join((GZIP_MEMBER_HEAD, length.to_bytes(4, 'little'), body,
                     (zlib.crc32(block) & 0xffffffff).to_bytes(4, 'little'),
                     (len(block) & 0xffffffff).to_bytes(4, 'little')))


def write_archive(rlayer, write, progress):
    """Stream the gzip tar of rlayer's contents to write(bytes); return its sha256 hex."""
    import hashlib
    digest = hashlib.sha256()

    def emit(data):
        if data:
            digest.update(data)
            write(data)
    entries = sorted(os.listdir(rlayer))
    with ParallelGzip(6) as packer:     # gzip's default level
        if not entries:                 # tar refuses to make an empty archive: two zero blocks
            emit(packer.compress(b'\0' * 2 * TAR_BLOCK))
        else:
            with Command(['tar', '-C', rlayer] + tar_xattr_options() + ['-cf', '-', '--'] +
                         entries, stdout=PIPE, failure=lambda argv, status, cause:
                         CockerError('tar failed on %s: %s' % (rlayer, cause))) as tar:
                for chunk in iter(lambda: tar.stdout.read(CHUNK), b''):
                    emit(packer.compress(chunk))
                    progress.add(len(chunk))
                tar.check()
        emit(packer.flush())
    progress.finish()
    return digest.hexdigest()


def tar_number(field):
    """A numeric tar header field, read only where GNU tar reads the same number: octal
    digits after optional spaces, then only NULs and spaces; or base-256 (0x80 positive,
    0xff negative).  Anything else (a blank field, a leading NUL that GNU tar skips but
    others read as an empty string, stray characters) refuses the archive, so the guard and
    tar never disagree on where a member ends."""
    if field[:1] in (b'\x80', b'\xff'):
        value = int.from_bytes(field[1:], 'big')
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    digits = field.lstrip(b' ')
    end = len(digits) - len(digits.lstrip(b'01234567'))
    if end == 0 or digits[end:].strip(b' \0'):
        raise CockerError('the archive has a malformed number field in a tar header')
    return int(digits[:end], 8)


class ArchiveGuard(object):
    """Reads a tar stream header by header and passes on only what is safe to extract.

    feed(bytes) -> bytes-like for `tar -x` (not always bytes): members' data is passed on
    as views of what was fed, not sliced and joined into copies (a layer's whole size,
    twice).  Raises CockerError on a hostile or broken member."""

    MEMBER_TYPES = b'01234567\0'       # old GNU sparse ('S') has blocks its size omits
    HELD_MAX = 4 << 20                  #: extension headers waiting for their member

    def __init__(self, foreign=False):
        self.foreign = foreign      # an OCI layer: no trusted.* xattr of its own
        self.buf = b''
        self.forward = 0            # data bytes of the current member still to pass on
        self.skip = False           # ... or to drop (a skipped device has none, but be exact)
        self.extension = None       # (type, header, size, padded) of a PAX/GNU header read
        self.held = []              # extension headers waiting for the member they describe
        self.pax, self.long_name, self.long_link = {}, None, None
        self.symlinks = set()
        self.skipped = []
        self.ended = False

    def feed(self, data):
        if not isinstance(data, bytes):     # (what it passes on must not change later)
            data = bytes(data)
        buf = memoryview(self.buf + data if self.buf else data)
        pos, out = 0, []
        while True:
            if self.forward:
                n = min(self.forward, len(buf) - pos)
                if n <= 0:
                    break
                if not self.skip:
                    out.append(buf[pos:pos + n])
                pos += n
                self.forward -= n
                continue
            if self.extension:
                padded = self.extension[3]
                if len(buf) - pos < padded:
                    break
                self.read_extension(buf[pos:pos + padded].tobytes())
                pos += padded
                continue
            if len(buf) - pos < TAR_BLOCK:
                break
            out.append(self.header(buf[pos:pos + TAR_BLOCK].tobytes()))
            pos += TAR_BLOCK
        self.buf = buf[pos:].tobytes()
        return out[0] if len(out) == 1 else b''.join(out)

    def finish(self):
        if self.forward or self.extension or self.buf.strip(b'\0') or not self.ended:
            raise CockerError('the archive is truncated')

    def header(self, block):
        if block == b'\0' * TAR_BLOCK:
            self.ended = True
            return block
        stored = tar_number(block[148:156])
        if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise CockerError('the archive is not a tar archive (bad header checksum)')
        self.ended = False
        kind = block[156:157]
        size = tar_number(block[124:136])
        if kind not in (b'x', b'g', b'L', b'K') and 'size' in self.pax:
            # tar reads as many data bytes as the PAX record says: so must we, or a
            # crafted archive would have us judge data as headers and pass headers as data
            if not is_decimal(self.pax['size']):
                raise CockerError('the archive has a malformed PAX size')
            size = int(self.pax['size'])
        if size < 0:
            raise CockerError('the archive has a member of negative size')
        padded = (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        if kind in (b'x', b'g', b'L', b'K'):
            if size > 1 << 20:
                raise CockerError('the archive has an oversized extension header')
            self.extension = (kind, block, size, padded)
            return b''
        if kind not in self.MEMBER_TYPES:
            raise CockerError("the archive has a member of unknown type '%s'"
                              % kind.decode('latin-1'))
        if size and kind not in b'07\0':
            # links, directories, devices and FIFOs carry no data: any would be read
            # differently by different tars
            raise CockerError('the archive has data on a member that has none')
        name = self.pax.get('path') or self.long_name or self.ustar_name(block)
        link = self.pax.get('linkpath') or self.long_link or \
            block[157:257].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
        if kind in b'07\0' and name.endswith('/'):
            raise CockerError("the archive has a file named like a directory: '%s'" % name)
        keep = self.judge(kind, name, link, block)
        out = b''.join(self.held) + block if keep else b''
        self.held, self.pax, self.long_name, self.long_link = [], {}, None, None
        self.forward, self.skip = padded, not keep
        return out

    @staticmethod
    def ustar_name(block):
        name = block[0:100].split(b'\0', 1)[0]
        if block[257:263] == b'ustar\0':      # POSIX ustar only: old GNU has no prefix
            prefix = block[345:500].split(b'\0', 1)[0]
            if prefix:
                name = prefix + b'/' + name
        return name.decode('utf-8', 'surrogateescape')

    def read_extension(self, data):
        kind, block, size, _ = self.extension
        self.extension = None
        body = data[:size]
        if kind in (b'L', b'K'):
            text = body.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
            if kind == b'L':
                self.long_name = text
            else:
                self.long_link = text
        else:
            records = parse_pax(body)
            if kind == b'g':
                # tar applies global records to every later member: only a comment is harmless
                if set(records) - {'comment'}:
                    raise CockerError('the archive has a global header that changes members')
            elif self.pax:
                raise CockerError('the archive has two extended headers for one member')
            else:
                self.pax = records
            if self.foreign and any(k.startswith('SCHILY.xattr.trusted.') for k in records):
                raise CockerError('the layer sets a trusted.* xattr (an overlay marker of its '
                                  'own): refused')
        if any(key.startswith('GNU.sparse') for key in self.pax):
            raise CockerError('the archive has a sparse member (not supported)')
        self.held.append(block + data)
        if sum(len(h) for h in self.held) > self.HELD_MAX:
            raise CockerError('the archive has too many extension headers in a row')

    def judge(self, kind, name, link, block):
        """True to extract the member, False to skip it; CockerError to refuse the archive."""
        path = self.checked_path(name)
        if kind == b'2':
            self.symlinks.add(path)
            return True
        self.symlinks.discard(path)
        if kind == b'1':
            target = self.checked_path(link)
            if target in self.symlinks:
                self.symlinks.add(path)
        if kind in (b'3', b'4'):
            major, minor = tar_number(block[329:337]), tar_number(block[337:345])
            if kind == b'3' and major == 0 and minor == 0:
                return True                     # an overlay whiteout: a deleted file
            self.skipped.append(path)
            return False
        return True

    def checked_path(self, name):
        if name.startswith('/'):
            raise CockerError("the archive has an absolute member name '%s'" % name)
        parts = [p for p in name.split('/') if p not in ('', '.')]     # a//b, ./a/./b
        if '..' in parts:
            raise CockerError("the archive has a member name with '..': '%s'" % name)
        for i in range(1, len(parts)):
            if '/'.join(parts[:i]) in self.symlinks:
                raise CockerError("the archive writes '%s' through its own symbolic link '%s'"
                                  % (name, '/'.join(parts[:i])))
        return '/'.join(parts)


def parse_pax(body):
    """PAX extended header records ('LEN key=value\\n') -> dict."""
    records = {}
    pos = 0
    while pos < len(body) and body[pos:pos + 1] != b'\0':
        space = body.find(b' ', pos)
        try:
            length = int(body[pos:space])
        except ValueError:
            raise CockerError('the archive has a malformed PAX header')
        key, _, value = body[space + 1:pos + length - 1].partition(b'=')
        key = key.decode('utf-8', 'replace')
        if b'\0' in value and key in ('path', 'linkpath', 'size'):   # xattr values may have
            raise CockerError('the archive has a NUL in a PAX header')   # NULs, names not
        records[key] = value.decode('utf-8', 'surrogateescape')
        if length <= 0:
            raise CockerError('the archive has a malformed PAX header')
        pos += length
    return records


def read_archive(read, rlayer, progress, compressed=True, foreign=False):
    """Unpack a gzip tar stream (read(n) -> bytes; a plain one if not compressed) into
    rlayer through ArchiveGuard; return the sha256 hex of the bytes read."""
    import hashlib
    digest = hashlib.sha256()
    guard = ArchiveGuard(foreign)

    def counted(n):
        chunk = read(n)
        digest.update(chunk)
        progress.add(len(chunk))
        return chunk
    tar_data = in_thread(gunzip(counted)) if compressed else iter(lambda: counted(CHUNK), b'')
    # (tar reads its pipe a megabyte at a time, not 10 KiB: import is a third faster)
    with Command(['tar', '-x', '-p', '--numeric-owner', '--blocking-factor=%d' % TAR_RECORD] +
                 tar_xattr_options(LAYER_XATTRS if foreign else ARCHIVE_XATTRS) +
                 ['-C', rlayer, '-f', '-'], stdin=PIPE, input_name='the archive',
                 failure=lambda argv, status, cause:
                 CockerError('tar could not unpack the archive: %s' % cause)) as tar:
        for data in tar_data:
            tar.write(guard.feed(data))
        guard.finish()
        tar.end_input()
        tar.check()
    progress.finish()
    for path in guard.skipped:
        warn('device node %s skipped' % path)
    return digest.hexdigest()


def gunzip(read, digested=False):
    """The data of a gzip stream of one or more members.  Members that say how long they are
    (ParallelGzip's) are inflated by a thread each, as many at once as there are CPUs; from
    the first member that does not, the rest is inflated in order, CHUNK bytes at most at a
    time (a small archive never inflates into a huge buffer).  digested: the caller checks
    a digest of the data (an OCI layer's diff_id), so the CRCs of those members, a tenth of
    their inflating, are left unchecked (a cockerimage's .sha256 is of the compressed
    stream: only the CRC checks the data that was compressed)."""
    import collections
    import concurrent.futures
    reuse_freed_buffers()
    threads = cpus()
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        while True:
            head = read_exactly(read, GZIP_MEMBER_HEAD_SIZE)
            length = indexed_member_length(head)
            if length is None:
                break
            member = head + read_exactly(read, length - len(head))
            if len(member) < length:
                raise CockerError('the archive is truncated')
            pending.append(pool.submit(inflate_member, member, not digested))
            while len(pending) > 2 * threads or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    if head:
        for data in gunzip_in_order(read, head):
            yield data


def indexed_member_length(head):
    """The length a gzip member written by ParallelGzip gives in its head, else None."""
    if len(head) != GZIP_MEMBER_HEAD_SIZE or not head.startswith(GZIP_MEMBER_HEAD):
        return None
    length = int.from_bytes(head[len(GZIP_MEMBER_HEAD):], 'little')
    return length if GZIP_MEMBER_HEAD_SIZE + 8 <= length <= GZIP_MEMBER_MAX else None


def inflate_member(member, check_crc=True):
    """The data of one whole gzip member of ParallelGzip's (raw deflate between its head and
    its CRC and length), its length checked, and its CRC unless told otherwise."""
    import zlib
    unpacker = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = unpacker.decompress(memoryview(member)[GZIP_MEMBER_HEAD_SIZE:], GZIP_MEMBER_MAX)
    except zlib.error as e:
        raise CockerError('the archive is not a complete gzip file (%s)' % e)
    trailer = unpacker.unused_data
    if not unpacker.eof or unpacker.unconsumed_tail or len(trailer) != 8:
        raise CockerError('the archive has a gzip member that is not as long as it says')
    if int.from_bytes(trailer[4:], 'little') != len(data) & 0xffffffff or \
            check_crc and int.from_bytes(trailer[:4], 'little') != zlib.crc32(data):
        raise CockerError('the archive is not a complete gzip file (a member does not '
                          'match its CRC or length)')
    return data


def gunzip_in_order(read, head=b''):
    """The data of a gzip stream (head: its first bytes, already read), inflated in order."""
    import itertools
    import zlib
    unpacker = zlib.decompressobj(16 + zlib.MAX_WBITS)
    fresh = True                # no byte given to the current gzip member yet
    try:
        for chunk in itertools.chain([head], iter(lambda: read(CHUNK), b'')):
            while chunk:
                data = unpacker.decompress(chunk, CHUNK)
                fresh = False
                chunk = unpacker.unconsumed_tail
                if unpacker.eof:            # gzip members may follow one another
                    chunk = unpacker.unused_data
                    unpacker = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    fresh = True
                yield data
    except zlib.error as e:
        raise CockerError('the archive is not a complete gzip file (%s)' % e)
    if not fresh:
        raise CockerError('the archive is truncated')


def in_thread(items, depth=8):
    """The items of an iterator, made by a thread of their own while the caller works on
    the ones before (zlib and hashlib let go of the GIL: inflating on one CPU, hashing and
    guarding on another)."""
    def fill(put):
        for item in items:
            put(item)
    return from_thread(fill, depth)


class Abandoned(Exception):
    """The reader of from_thread went away: its thread stops making more."""


def from_thread(fill, depth=8):
    """What fill(put) puts, in order, made by a thread of its own while the caller works on
    what came before; what the thread raises is raised here, in its place."""
    import queue
    import threading
    made, stop = queue.Queue(depth), threading.Event()

    def hand_over(entry):
        while not stop.is_set():
            try:
                return made.put(entry, timeout=0.1)
            except queue.Full:
                continue
        raise Abandoned()

    def produce():
        try:
            fill(lambda item: hand_over(('item', item)))
            hand_over(('end', None))
        except Abandoned:
            pass
        except BaseException as e:      # (CockerError, OSError...): for the caller
            try:
                hand_over(('error', e))
            except Abandoned:
                pass
    worker = threading.Thread(target=produce)
    worker.daemon = True
    worker.start()
    try:
        while True:
            kind, value = made.get()
            if kind == 'end':
                return
            if kind == 'error':
                raise value
            yield value
    finally:
        stop.set()
        worker.join(5)


def refuse_device_nodes(rlayer):
    """Whatever tar made of the stream: no device node but overlay whiteouts (0:0)."""
    for dirpath, dirnames, filenames in os.walk(rlayer):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and st.st_rdev != 0:
                raise CockerError('the archive made a device node %s'
                                  % os.path.relpath(os.path.join(dirpath, name), rlayer))


def expected_sha256(path):
    """The digest recorded in PATH.sha256, or None when there is none."""
    text = read_small(path + '.sha256')
    if text is None:
        return None
    digest = text.split()[0].lower() if text.split() else ''
    if not is_sha256_hex(digest):
        raise CockerError('%s.sha256 is not a sha256sum line' % path)
    return digest


def import_archive(read, total, name, version, force, expected, what, check=None):
    """Unpack into a staging directory of images/NAME, check (the digest, and check() if
    given: e.g. that the download ended well), then install as NAME:VERSION."""
    with locked('image', name):
        if os.path.exists(image_dir(name, version)):
            if not force:
                raise CockerError("image '%s' exist (add -f to replace it)"
                                  % image_ref_text(name, version))
            refuse_if_used(name, version, True, 'it cannot be replaced')
        with building_image(name, version, replace=force) as rlayer:
            digest = read_archive(read, rlayer, Progress(what, total))
            refuse_device_nodes(rlayer)
            if expected is not None and digest != expected:
                raise CockerError('sha256 of the archive is %s, not %s as recorded: refused'
                                  % (digest, expected))
            if check is not None:
                check()


def export_image(image, fmt=None):
    """IMAGE[:VERSION].cockerimage and its .sha256 in the current directory (or, with fmt
    docker or oci, an archive Docker, Podman and skopeo read)."""
    if fmt in ('docker', 'oci'):
        return export_oci_image(image, fmt)
    refuse_imported(image, 'export it with --format docker or oci')
    name, version = image
    filename = archive_name(name, version)
    rlayer = os.path.join(image_dir(name, version), 'rlayer')
    with locked('image', name):
        require_image(image_ref_text(name, version))
        total = tree_size(rlayer) if sys.stderr.isatty() else None
        tmp = '.%s.tmp%d' % (filename, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with Rollback(remove_file, tmp):
            with os.fdopen(fd, 'wb') as f:
                digest = write_archive(rlayer, f.write, Progress('export ' + filename, total))
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, filename)
        write_small(filename + '.sha256', sha256_line(digest, filename))


def import_file(path, ref, force, platform=None):
    """Import an image archive (a cockerimage, a docker save or OCI archive, an OCI layout
    directory, told by content) as ref, else under the name it carries."""
    try:        # (a missing file is judged by its name first, as the C cocker did)
        source = open_image_source(path) if os.path.lexists(path) else None
    except OSError as e:
        raise CockerError("image file '%s': %s" % (path, e.strerror))
    if source is not None:
        try:
            import_oci(source, path, ref, force, host_platform(platform))
        finally:
            source.close()
        return
    base = os.path.basename(path)
    if ref:
        name, version = image_or_unversioned(ref)
    elif base.endswith(ARCHIVE_SUFFIX) and len(base) > len(ARCHIVE_SUFFIX):
        name, version = image_or_unversioned(base[:-len(ARCHIVE_SUFFIX)])
    else:
        raise CockerError("image file name[%s] invalid (expected NAME[:VERSION]%s, or give -m)"
                          % (base, ARCHIVE_SUFFIX))
    try:
        f = open(path, 'rb')
    except OSError as e:
        raise CockerError("image file '%s': %s" % (path, e.strerror))
    with f:
        import_archive(f.read, os.fstat(f.fileno()).st_size, name, version, force,
                       expected_sha256(path), 'import ' + base)
    log('INFO', "imported '%s' as '%s'" % (path, image_ref_text(name, version)))


# =============================================================================
# OCI and Docker archives
# =============================================================================
# What `docker save`, `podman save` and `skopeo copy` write: a tar (docker-archive: a
# manifest.json, per-layer layer.tar or, from Docker 25 on, blobs/sha256/HEX beside an OCI
# index; oci-archive: oci-layout, index.json, blobs/sha256/HEX) or an OCI layout directory.
# Nothing is trusted: every blob is hashed against its digest and every layer's tar against
# its diff_id as it streams, each layer goes through the ArchiveGuard (with trusted.*
# xattrs refused), and the image is installed only when all of it checked.  Whiteouts
# become overlayfs ones once a layer is unpacked, whatever the order of its members.

OCI_INDEX = 'application/vnd.oci.image.index.v1+json'
DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json'
GOARCH = {'x86_64': 'amd64', 'aarch64': 'arm64', 'armv7l': 'arm', 'ppc64le': 'ppc64le',
          's390x': 's390x', 'riscv64': 'riscv64', 'i686': '386'}
#: xattrs an OCI layer may carry (never trusted.overlay.*: whiteouts are the format's own)
LAYER_XATTRS = ('user.*', 'security.capability')
#: gzip level of exported OCI layers: 1 keeps up with skopeo (Go's compressor), the
#: layers ~10% larger than gzip -6
LAYER_GZIP_LEVEL = 1
WHITEOUT = '.wh.'
OPAQUE = '.wh..wh..opq'


class TarSource(object):
    """The files of an archive tar, read by member name (never extracted as a whole)."""

    def __init__(self, path):
        import tarfile
        try:
            self.tar = tarfile.open(path, 'r:')
        except (tarfile.TarError, OSError) as e:
            raise CockerError("image file '%s' is not an image archive (%s)" % (path, e))

    def has(self, name):
        try:
            self.tar.getmember(name)
            return True
        except KeyError:
            return False

    def open(self, name):
        import tarfile
        try:
            f = self.tar.extractfile(self.followed(self.checked(name)))
        except (KeyError, tarfile.TarError) as e:
            raise CockerError("the archive has no file '%s' (%s)" % (printable(name), e))
        if f is None:
            raise CockerError("'%s' in the archive is not a file" % printable(name))
        return f

    def followed(self, name):
        """The member name names, its links followed inside the archive (legacy docker save
        links a layer it has twice), a few at most."""
        member = self.tar.getmember(name)
        for _ in range(8):
            if not (member.issym() or member.islnk()):
                return member
            target = member.linkname
            if member.issym():
                target = os.path.normpath(os.path.join(os.path.dirname(member.name), target))
            member = self.tar.getmember(self.checked(target))
        raise CockerError("'%s' in the archive is a loop of links" % printable(name))

    @staticmethod
    def checked(name):
        parts = name.split('/')
        if name.startswith('/') or '..' in parts or not name:
            raise CockerError("the archive names a file outside itself: '%s'" % printable(name))
        return name

    def close(self):
        self.tar.close()


class DirSource(TarSource):
    """An OCI layout directory."""

    def __init__(self, path):
        self.path = path

    def has(self, name):
        try:
            self.open(name).close()
            return True
        except CockerError:
            return False

    def open(self, name):
        """A regular file of the layout, each component opened O_NOFOLLOW: a link in it
        never leads the import to another file of the host."""
        parts = self.checked(name).split('/')
        top = os.open(self.path, DIRECTORY_FLAGS)
        try:
            parent = open_below(top, parts[:-1])
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK |
                             os.O_CLOEXEC, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError as e:
            raise CockerError("the OCI layout has no file '%s' (%s)" % (printable(name),
                                                                      e.strerror))
        finally:
            os.close(top)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CockerError("'%s' in the OCI layout is not a regular file" % printable(name))
        return os.fdopen(fd, 'rb')

    def close(self):
        pass


def open_image_source(path):
    """A TarSource or DirSource of an OCI or Docker archive; None for a cockerimage."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'oci-layout')):
            raise CockerError("'%s' is a directory but no OCI layout (no oci-layout)" % path)
        return DirSource(path)
    with open(path, 'rb') as f:
        magic = f.read(2)
    return None if magic == b'\x1f\x8b' else TarSource(path)


def read_json(source, name, digest=None):
    """A small JSON file of the archive (its digest checked when it has one)."""
    import hashlib
    with source.open(name) as f:
        data = f.read(BLOB_MAX_JSON + 1)
    if len(data) > BLOB_MAX_JSON:
        raise CockerError("'%s' in the archive is too large" % printable(name))
    if digest is not None and 'sha256:' + hashlib.sha256(data).hexdigest() != digest:
        raise CockerError('blob %s does not match its digest: refused' % digest)
    return parse_json(data, "'%s' in the archive" % printable(name)), data


def parse_json(data, what, kind=object):
    """JSON from outside -> the document (a kind), or one error line (deep nesting too)."""
    import json
    try:
        document = json.loads(data.decode('utf-8'))
    except (ValueError, RecursionError) as e:
        raise CockerError('%s is not JSON (%s)' % (what, str(e)[:100]))
    if not isinstance(document, kind):
        raise CockerError('%s is not a JSON %s' % (what, 'object' if kind is dict else
                                                    kind.__name__))
    return document


def blob_name(digest):
    return 'blobs/sha256/' + digest_hex(digest)


class ArchiveImage(object):
    """One image of an archive: its config (raw and parsed), layer blobs, tags."""

    def __init__(self, config_name, config_digest, layer_names, layer_digests, tags):
        self.config_name, self.config_digest = config_name, config_digest
        self.layer_names, self.layer_digests, self.tags = layer_names, layer_digests, tags


def archive_images(source, platform):
    """The images an archive holds: from an OCI index.json, else a docker manifest.json."""
    if isinstance(source, DirSource) or source.has('index.json') and source.has('oci-layout'):
        index, _ = read_json(source, 'index.json')      # (a layout's: its error if none)
        return oci_images(source, index, platform)
    if source.has('manifest.json') and not isinstance(source, DirSource):
        return docker_images(source)
    raise CockerError('the archive is neither an OCI layout nor a docker save archive')


def docker_images(source):
    manifest, _ = read_json(source, 'manifest.json')
    if not isinstance(manifest, list):
        raise CockerError('manifest.json of the archive is not a list')
    images = []
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get('Layers'), list):
            raise CockerError('manifest.json of the archive has a malformed entry')
        config = str(entry.get('Config', ''))
        layers = [str(l) for l in entry['Layers']]
        images.append(ArchiveImage(config, name_digest(config), layers,
                                   [name_digest(l) for l in layers],
                                   [str(t) for t in entry.get('RepoTags') or []]))
    return images


def name_digest(name):
    """The digest a docker save name carries: Docker 25's blobs/sha256/HEX, an older
    config's HEX.json; None for an older ID/layer.tar (only its diff_id is known)."""
    base = name.rsplit('/', 1)[-1]
    hex_part = base[:-5] if base.endswith('.json') else base
    if (name.startswith('blobs/sha256/') or base.endswith('.json')) and len(hex_part) == 64:
        return 'sha256:' + hex_part
    return None


def oci_images(source, index, platform):
    images = []
    for descriptor in index.get('manifests') or []:     # `manifests: null` happens
        tag = (descriptor.get('annotations') or {}).get('org.opencontainers.image.ref.name')
        manifest = pick_manifest(source, descriptor, platform)
        layers = manifest.get('layers') or []
        config = manifest.get('config') or {}
        images.append(ArchiveImage(
            blob_name(config.get('digest', '')), config.get('digest'),
            [blob_name(l.get('digest', '')) for l in layers],
            [l.get('digest') for l in layers], [tag] if tag else []))
    return images


def pick_manifest(source, descriptor, platform):
    """The image manifest a descriptor leads to, through nested indexes: the platform's."""
    for _ in range(4):                                  # index -> index -> manifest at most
        document, _ = read_json(source, blob_name(descriptor.get('digest', '')),
                                descriptor.get('digest'))
        if document.get('mediaType') not in (OCI_INDEX, DOCKER_LIST) and \
                'manifests' not in document:
            return document
        candidates = [d for d in document.get('manifests') or []
                      if platform_matches(d.get('platform'), platform)]
        if not candidates:
            raise CockerError('the archive has no image for %s (it has %s)' % (
                '/'.join(platform), ', '.join(sorted(set(
                    platform_text(d.get('platform')) for d in document.get('manifests') or [])))))
        descriptor = candidates[0]
    raise CockerError('the archive nests its indexes too deep')


def host_platform(text=None):
    """(os, architecture, variant or None) asked with --platform, else this host's."""
    if text:
        parts = text.split('/')
        if len(parts) not in (2, 3) or not all(parts):
            raise usage_error("--platform value '%s' is invalid (OS/ARCH[/VARIANT])" % text)
        return tuple(parts) if len(parts) == 3 else (parts[0], parts[1], None)
    machine = os.uname().machine
    return ('linux', GOARCH.get(machine, machine), 'v8' if machine == 'aarch64' else None)


def platform_matches(described, platform):
    if not described:
        return True                     # one image, no platform said: take it
    wanted_os, wanted_arch, wanted_variant = platform
    return (described.get('os') == wanted_os and described.get('architecture') == wanted_arch
            and (wanted_variant is None or described.get('variant') in (None, wanted_variant)))


def platform_text(described):
    described = described or {}
    return '/'.join(p for p in (described.get('os'), described.get('architecture'),
                                described.get('variant')) if p) or 'unknown'


def choose_image(images, ref):
    """The image to import: the only one, or the one whose tag maps to ref's name."""
    if len(images) == 1:
        return images[0]
    if ref:
        wanted = image_or_unversioned(ref)
        for image in images:
            if any(tag_to_image(t) == wanted for t in image.tags):
                return image
    names = sorted(set(t for image in images for t in image.tags)) or ['(untagged)']
    raise CockerError('the archive holds %d images (%s): name one with -m NAME:VERSION'
                      % (len(images), printable(', '.join(names))))


def tag_to_image(tag):
    """'docker.io/library/nginx:1.25' -> ('nginx', '1.25'): the registry and 'library/' go,
    other '/' become '_', characters cocker names do not have become '_' too; no tag:
    'latest'."""
    repository, _, version = tag.rpartition(':') if ':' in tag.rsplit('/', 1)[-1] \
        else (tag, '', 'latest')
    parts = repository.split('/')
    if len(parts) > 1 and ('.' in parts[0] or ':' in parts[0] or parts[0] == 'localhost'):
        parts = parts[1:]
    if parts[:1] == ['library']:
        parts = parts[1:]

    def name_of(text):
        text = ''.join(c if c in NAME_CHARS else '_' for c in text).lstrip('.-')
        return text[:NAME_MAX] or '_'
    return name_of('_'.join(parts)), name_of(version)


def import_oci(source, path, ref, force, platform):
    """Import the archive's image as ref, else as its own tag mapped to a cocker name; the
    layers a failed import stored go too."""
    try:
        install_oci(source, path, ref, force, platform)
    finally:
        collect_layers()


def install_oci(source, path, ref, force, platform):
    try:
        image = choose_image(archive_images(source, platform), ref)
    except (TypeError, AttributeError, KeyError) as e:
        raise CockerError('the archive has a malformed manifest or index (%s)' % e)
    if ref:
        name, version = image_or_unversioned(ref)
    elif image.tags:
        name, version = tag_to_image(image.tags[0])
    else:
        raise CockerError("the archive's image has no name: give -m NAME[:VERSION]")
    store_image(source, image, name, version, force, '%s (%s)' % (
        os.path.abspath(path), 'an OCI layout directory' if isinstance(source, DirSource)
        else 'an archive'))


def store_image(source, image, name, version, force, origin):
    """The image of an archive or a registry (an ArchiveImage whose blobs source opens)
    into the store as name:version: its layers (those not stored yet), then the version."""
    config, raw = read_json(source, image.config_name, image.config_digest)
    rootfs = config.get('rootfs') if isinstance(config, dict) else None
    diff_ids = (rootfs.get('diff_ids') if isinstance(rootfs, dict) else None) or []
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise CockerError('the image config has malformed diff_ids')
    if len(diff_ids) > MAX_IMAGE_LAYERS:
        raise CockerError('the image has %d layers, more than the %d one overlay mount takes'
                          % (len(diff_ids), MAX_IMAGE_LAYERS))
    if len(diff_ids) != len(image.layer_names):
        raise CockerError('the image config lists %d layers, its manifest %d: refused'
                          % (len(diff_ids), len(image.layer_names)))
    with locked('image', name), locked('layers', 'store', shared=True):
        if os.path.exists(image_dir(name, version)):
            if not force:
                raise CockerError("image '%s' exist (add -f to replace it)"
                                  % image_ref_text(name, version))
            refuse_if_used(name, version, True, 'it cannot be replaced')
        for number, (blob, digest, diff_id) in enumerate(
                zip(image.layer_names, image.layer_digests, diff_ids), 1):
            add_layer(source, blob, digest, diff_id, 'layer %d of %d' % (number, len(diff_ids)))
        with building_image(name, version, replace=force) as rlayer:
            staging = os.path.dirname(rlayer)
            write_small(os.path.join(staging, 'layers'), ''.join(d + '\n' for d in diff_ids))
            write_small(os.path.join(staging, 'origin'), origin)
            with open(os.path.join(staging, 'config.json'), 'wb') as f:
                f.write(raw)
    log('INFO', "imported '%s' as '%s' (%d layers)" % (origin, image_ref_text(name, version),
                                                      len(diff_ids)))


def add_layer(source, blob, digest, diff_id, what):
    """Unpack one layer into the layer store, unless it is there already."""
    if os.path.isdir(layer_dir(diff_id)):
        debug('%s %s is stored already', what, diff_id)
        return
    staging = new_staging(layers_dir())
    with Rollback(remove_staged, staging), source.open(blob) as f:
        rlayer = os.path.join(staging, 'rlayer')
        os.mkdir(rlayer, 0o755)
        got_blob, got_diff = unpack_layer(f.read, rlayer, what)
        if digest is not None and got_blob != digest:
            raise CockerError('%s does not match its digest %s: refused' % (what, digest))
        if got_diff != diff_id:
            raise CockerError('%s unpacks to %s, not its diff_id %s: refused'
                              % (what, got_diff, diff_id))
        refuse_device_nodes(rlayer)
        convert_whiteouts(rlayer)
        install_layer(staging, diff_id)


def unpack_layer(read, rlayer, what):
    """Unpack a layer blob (gzip, zstd or plain tar, told by its first bytes) through the
    guard; (sha256 of the blob, sha256 of its tar) as 'sha256:HEX'."""
    import hashlib
    blob_digest = hashlib.sha256()
    head = [read(4)]                    # the magic bytes, read first, counted first

    def blob_read(n):
        chunk = head.pop() if head else read(n)
        blob_digest.update(chunk)
        return chunk
    magic = head[0]
    if magic[:2] == b'\x1f\x8b':
        data = gunzip(blob_read, digested=True)
    elif magic == b'\x28\xb5\x2f\xfd':
        data = unzstd(blob_read)
    else:
        data = iter(lambda: blob_read(CHUNK), b'')
    # read, hashed and inflated by a thread; hashed again, guarded and handed to tar here
    chunks = (chunk for chunk in in_thread(data) if chunk)  # an empty read: the end
    tar_digest = read_archive(lambda n: next(chunks, b''), rlayer, Progress(what),
                              compressed=False, foreign=True)
    for _ in iter(lambda: blob_read(CHUNK), b''):
        pass                            # what tar did not need still counts for the digest
    return 'sha256:' + blob_digest.hexdigest(), 'sha256:' + tar_digest


def unzstd(read):
    """The data of a zstd stream, by the zstd program (the standard library has none)."""
    import shutil
    import threading
    if shutil.which('zstd') is None:
        raise CockerError('the archive has a zstd-compressed layer and this host has no '
                          'zstd program: install zstd')
    with Command(['zstd', '-d', '-c', '-q'], stdin=PIPE, stdout=PIPE) as zstd:
        def feed():
            try:
                for chunk in iter(lambda: read(CHUNK), b''):
                    zstd.stdin.write(chunk)
            except (OSError, ValueError, CockerError):
                pass                    # zstd sees a short stream: its failure says so
            finally:
                zstd.end_input()
        feeder = threading.Thread(target=feed)
        feeder.daemon = True
        feeder.start()
        for chunk in iter(lambda: zstd.stdout.read(CHUNK), b''):
            yield chunk
        feeder.join()
        zstd.check()


def convert_whiteouts(rlayer):
    """.wh.NAME -> a 0:0 character device NAME; .wh..wh..opq -> trusted.overlay.opaque on
    its directory.  Walked without following links (the layer's own may point anywhere)."""
    for directory, dirnames, filenames in os.walk(rlayer):
        for entry in sorted(filenames + dirnames):
            if not entry.startswith(WHITEOUT):
                continue
            path = os.path.join(directory, entry)
            if entry == OPAQUE:
                remove_file(path)
                os.setxattr(directory, 'trusted.overlay.opaque', b'y', follow_symlinks=False)
                continue
            target = entry[len(WHITEOUT):]
            if target in ('', '.', '..'):
                raise CockerError('the layer has a whiteout of %s: refused'
                                  % printable(os.path.relpath(path, rlayer)))
            if os.path.isdir(path) and not os.path.islink(path):
                raise CockerError('the layer has a whiteout that is a directory: refused')
            remove_file(path)
            if os.path.lexists(os.path.join(directory, target)):
                raise CockerError('the layer both has and deletes %s: refused'
                                  % printable(os.path.relpath(os.path.join(directory, target),
                                                              rlayer)))
            os.mknod(os.path.join(directory, target), stat.S_IFCHR | 0o600, os.makedev(0, 0))


# ---- export: docker-archive and oci-archive ----------------------------------------------
# Each layer is written anew from the store (overlay whiteouts made OCI ones again, each
# directory's whiteouts before its other entries, as the image spec asks), so the config
# gets the diff_ids of what is written; the image's own config (command, Env, ...) is kept.

def export_oci_image(image, fmt):
    """IMAGE[_VERSION].docker.tar (a docker-archive in Docker 25's layout) or
    IMAGE[_VERSION].oci.tar (an oci-archive), and its .sha256, in the current directory."""
    import tempfile
    name, version = image
    # no ':' in the name: skopeo and podman would read what follows as a reference
    filename = '%s%s.%s.tar' % (name, '' if version == NO_VERSION else '_' + version, fmt)
    with locked('image', name):
        require_image(image_ref_text(name, version))
        with tempfile.TemporaryDirectory(prefix='.cocker-export.', dir='.') as work:
            layers = [write_layer_blob(rlayer, work, compress=fmt == 'oci', what='layer %d' % n)
                      for n, rlayer in enumerate(exported_rlayers(name, version), 1)]
            config = exported_config(name, version, [diff_id for _, diff_id, _ in layers])
            tmp = os.path.join(work, 'archive')
            digest = write_image_archive(tmp, fmt, image_ref_text(name, version), config,
                                         layers, fmt == 'oci')
            os.rename(tmp, filename)
        write_small(filename + '.sha256', sha256_line(digest, filename))


def exported_rlayers(name, version, above=()):
    """The image's layers as they are stored, bottom first: the layers of the images it was
    built on by to_image (its 'base'), its shared layers, its own rlayer unless empty."""
    base = []
    for ref in image_base(name, version, above):
        base += exported_rlayers(*ref, above=above + ((name, version),))
    own = os.path.join(image_dir(name, version), 'rlayer')
    shared = [os.path.join(layer_dir(d), 'rlayer') for d in image_layer_ids(name, version)]
    below = topmost_once(base + shared)     # a base built on others of the stack: once
    if len(below) > MAX_IMAGE_LAYERS:
        raise CockerError("image '%s' has more than %d layers" % (
            image_ref_text(name, version), MAX_IMAGE_LAYERS))
    return below + ([own] if os.listdir(own) or not below else [])


def image_base(name, version, above=()):
    """[(name, version)] of the images a to_image image was built on, bottom first."""
    found = []
    for ref in split_list(read_small(os.path.join(image_dir(name, version), 'base'), '')):
        base = image_or_unversioned(ref)
        if base in above or base == (name, version):
            raise CockerError("image '%s' is built on itself" % image_ref_text(name, version))
        if not os.path.isdir(os.path.join(image_dir(*base), 'rlayer')):
            raise CockerError("image '%s' was built on '%s', which is gone" % (
                image_ref_text(name, version), printable(ref)))
        found.append(base)
    return found


def exported_config(name, version, diff_ids):
    """The config of the archive: the image's own (its history dropped: it described the
    old layers) or that of the topmost image it was built on that has one, else a new one
    for a cockerimage; with the new diff_ids."""
    import json
    path = stacked_config_path(name, version)
    if path is not None:
        with open(path, 'rb') as f:
            config = json.loads(f.read(BLOB_MAX_JSON).decode('utf-8'))
    else:
        config = {'architecture': host_platform()[1], 'os': 'linux', 'config': {}}
    config.pop('history', None)
    config['rootfs'] = {'type': 'layers', 'diff_ids': diff_ids}
    return json.dumps(config, sort_keys=True).encode('utf-8')


def stacked_config_path(name, version, above=()):
    """config.json of the image, else of the topmost image under it that has one."""
    path = os.path.join(image_dir(name, version), 'config.json')
    if os.path.exists(path):
        return path
    for base in reversed(image_base(name, version, above)):
        path = stacked_config_path(*base, above=above + ((name, version),))
        if path is not None:
            return path
    return None


def write_layer_blob(rlayer, work, compress, what):
    """A layer of rlayer as a tar (gzip if compress) in work -> (path, diff_id, digest)."""
    path = os.path.join(work, 'layer.%s' % os.urandom(4).hex())
    with open(path, 'wb') as out:
        diff_id, digest, _ = write_layer(rlayer, out.write, compress, 'export ' + what)
    return path, diff_id, digest


def write_layer(rlayer, out, compress, what):
    """The layer tar of rlayer (gzip if compress) to out(bytes) -> (diff_id, digest, size)."""
    import contextlib
    import hashlib
    import tarfile
    tar_digest, blob_digest = hashlib.sha256(), hashlib.sha256()
    size = [0]
    progress = Progress(what)
    with (ParallelGzip(LAYER_GZIP_LEVEL) if compress else contextlib.suppress()) as packer:
        def write(data):
            tar_digest.update(data)
            progress.add(len(data))
            data = packer.compress(data) if packer else data
            if data:
                blob_digest.update(data)
                size[0] += len(data)
                out(data)
        stream = WriteOnlyFile(write)
        # utf-8 whatever the locale: names and xattr values go back to their own bytes
        with tarfile.open(fileobj=stream, mode='w|', format=tarfile.PAX_FORMAT,
                          encoding='utf-8') as t:
            top = os.open(rlayer, DIRECTORY_FLAGS)
            try:
                add_layer_tree(t, top, '', {})
            finally:
                os.close(top)
        if packer:
            tail = packer.flush()
            blob_digest.update(tail)
            size[0] += len(tail)
            out(tail)
    progress.finish()
    return 'sha256:' + tar_digest.hexdigest(), 'sha256:' + blob_digest.hexdigest(), size[0]


class WriteOnlyFile(object):
    """A file object for tarfile that hands what it writes to write()."""

    def __init__(self, write):
        self.write = write

    def tell(self):
        return 0


def add_layer_tree(t, fd, prefix, seen):
    """The entries of directory fd into the layer tar: whiteouts first (a 0:0 character
    device is .wh.NAME, an opaque directory gets .wh..wh..opq), then the rest, depth first."""
    import tarfile
    entries = sorted(os.listdir(fd))
    stats = dict((e, os.stat(e, dir_fd=fd, follow_symlinks=False)) for e in entries)
    whiteouts = [e for e in entries if stat.S_ISCHR(stats[e].st_mode) and stats[e].st_rdev == 0]
    for entry in whiteouts:
        info = tarfile.TarInfo(prefix + WHITEOUT + entry)
        t.addfile(info)
    for entry in entries:
        if entry in whiteouts:
            continue
        add_member(t, fd, entry, prefix + entry, stats[entry], seen, LAYER_XATTRS)
        if stat.S_ISDIR(stats[entry].st_mode):
            child = os.open(entry, DIRECTORY_FLAGS, dir_fd=fd)
            try:
                if opaque(child):
                    t.addfile(tarfile.TarInfo(prefix + entry + '/' + OPAQUE))
                add_layer_tree(t, child, prefix + entry + '/', seen)
            finally:
                os.close(child)


def opaque(fd):
    try:
        return os.getxattr(fd, 'trusted.overlay.opaque') == b'y'
    except OSError:
        return False


def write_image_archive(path, fmt, ref, config, layers, oci_media):
    """The archive tar: blobs/sha256/* (config, layers, manifest), oci-layout, index.json,
    and for docker manifest.json; -> its sha256 hex."""
    import hashlib
    import json
    import tarfile
    config_digest = 'sha256:' + hashlib.sha256(config).hexdigest()
    manifest = image_manifest(config, [(d, os.path.getsize(p)) for p, _, d in layers],
                              'oci', oci_media)
    manifest_digest = 'sha256:' + hashlib.sha256(manifest).hexdigest()
    tag = 'localhost/%s' % (ref if ':' in ref else ref + ':latest')
    index = json.dumps({'schemaVersion': 2, 'manifests': [{
        'mediaType': 'application/vnd.oci.image.manifest.v1+json', 'digest': manifest_digest,
        'size': len(manifest), 'annotations': {'org.opencontainers.image.ref.name': tag}}]},
        sort_keys=True).encode('utf-8')
    files = [('oci-layout', b'{"imageLayoutVersion": "1.0.0"}'), ('index.json', index),
             (blob_name(config_digest), config), (blob_name(manifest_digest), manifest)]
    if fmt == 'docker':
        files.append(('manifest.json', json.dumps([{
            'Config': blob_name(config_digest), 'RepoTags': [tag],
            'Layers': [blob_name(digest) for _, _, digest in layers]}]).encode('utf-8')))
    digest = hashlib.sha256()
    with open(path, 'wb') as raw:
        out = WriteOnlyFile(lambda data: (digest.update(data), raw.write(data)))
        with tarfile.open(fileobj=out, mode='w|', format=tarfile.PAX_FORMAT) as t:
            add_directory(t, 'blobs')
            add_directory(t, 'blobs/sha256')
            for name, data in files:
                add_bytes(t, name, data)
            written = set()
            for layer, _, layer_digest in layers:
                if layer_digest in written:         # the same layer twice: one blob
                    continue
                written.add(layer_digest)
                info = tarfile.TarInfo(blob_name(layer_digest))
                info.size, info.mode = os.path.getsize(layer), 0o644
                with open(layer, 'rb') as f:
                    t.addfile(info, f)
    return digest.hexdigest()


MEDIA_TYPES = {                         #: (manifest, config, layer) of each kind
    'oci': ('application/vnd.oci.image.manifest.v1+json',
            'application/vnd.oci.image.config.v1+json', 'application/vnd.oci.image.layer.v1.tar'),
    'docker': ('application/vnd.docker.distribution.manifest.v2+json',
               'application/vnd.docker.container.image.v1+json',
               'application/vnd.docker.image.rootfs.diff.tar')}


def image_manifest(config, layers, kind, gzipped):
    """The manifest (bytes) of a config and [(layer digest, size)], in kind's media types."""
    import hashlib
    import json
    manifest_type, config_type, layer_type = MEDIA_TYPES[kind]
    layer_type += ('.gzip' if kind == 'docker' else '+gzip') if gzipped else ''
    return json.dumps({
        'schemaVersion': 2, 'mediaType': manifest_type,
        'config': {'mediaType': config_type, 'size': len(config),
                   'digest': 'sha256:' + hashlib.sha256(config).hexdigest()},
        'layers': [{'mediaType': layer_type, 'digest': digest, 'size': size}
                   for digest, size in layers]}, sort_keys=True).encode('utf-8')


def add_directory(t, name):
    import tarfile
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    t.addfile(info)


def add_bytes(t, name, data):
    import io
    import tarfile
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    t.addfile(info, io.BytesIO(data))


# =============================================================================
# Image repository over ssh
# =============================================================================
# A directory reached by ssh (the account's home) holding .cockerimage files and their
# .sha256.  Uploads go to a hidden temporary name, renamed once complete.  ssh never asks:
# BatchMode, and COCKER_HOME/ssh_config (if present) as its only configuration.

SSH_TIMEOUT = 10            #: seconds to connect


def srepo_path():
    return os.path.join(HOME, 'srepo')


def parse_srepo(text):
    """'USER@HOST[:PORT]' -> (USER@HOST, port or None)."""
    user, at, rest = text.partition('@')
    host, colon, port = rest.partition(':')
    allowed = NAME_CHARS[:62] + '_.-'
    if (not at or not user or not host or any(c not in allowed for c in user + host)
            or user.startswith('-') or host.startswith('-')
            or (colon and not (is_decimal(port) and 0 < int(port) < 65536))):
        raise usage_error("--srepo value '%s' is invalid (expected USER@HOST[:PORT])" % text)
    return '%s@%s' % (user, host), port or None


def repository(srepo):
    """The repository of --srepo (then saved for later commands), else the saved one."""
    return remembered(srepo, srepo_path(), parse_srepo, 'no image repository yet: give '
                      '--srepo USER@HOST[:PORT] (-s ssearch saves it)')


def remembered(value, path, parse, missing):
    """parse(value), value then saved in path for later commands; else parse of the value
    saved there; else the error missing."""
    if value:
        parsed = parse(value)
        write_small(path, value)
        return parsed  # never read back: a command run beside this one may have saved its own
    text = read_small(path)
    if not text:
        raise CockerError(missing)
    return parse(text)


def ssh_command(repo, command):
    destination, port = repo
    argv = ['ssh', '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=%d' % SSH_TIMEOUT]
    config = os.path.join(HOME, 'ssh_config')
    if os.path.exists(config):
        argv += ['-F', config]
    if port:
        argv += ['-p', port]
    return argv + ['--', destination, command]


def ssh_failure(repo):
    """ssh's own failure (255: refused, unreachable, key not accepted) names ssh; any other
    status is the remote command's."""
    def failure(argv, status, cause):
        if status == 255:
            return CockerError('ssh to %s failed: %s' % (repo[0], cause))
        return CockerError('command in repository %s failed: %s' % (repo[0], cause))
    return failure


def ssh_run(repo, command, ok=(0,)):
    """Run a shell command (see shell_command) in the repository: (status, stdout text)."""
    status, out = run_command(ssh_command(repo, command), ok=ok, failure=ssh_failure(repo))
    return status, out.decode('utf-8', 'replace')


def repository_archives(repo, match=None):
    """(image_id, modify time, size) of the archives in the repository whose name contains
    match."""
    _, out = ssh_run(repo, 'LC_ALL=C ls -l --full-time')
    found = []
    for line in out.splitlines():
        fields = line.split(None, 8)
        if len(fields) < 9 or not fields[8].endswith(ARCHIVE_SUFFIX) or \
                not is_decimal(fields[4]):
            continue
        image_id = fields[8][:-len(ARCHIVE_SUFFIX)]
        if not match or match in image_id:
            found.append((image_id, '%sT%s' % (fields[5], fields[6].split('.')[0]),
                          int(fields[4])))
    return found


def push_image(image, repo, force):
    """Upload the image's archive (and its sha256) to the repository."""
    refuse_imported(image, 'a cockerimage would hold none of them')
    name, version = image
    filename = archive_name(name, version)
    tmp = '.%s.tmp%d' % (filename, os.getpid())
    status, _ = ssh_run(repo, shell_command('test -e {}', filename), ok=(0, 1))
    if status == 0 and not force:
        raise CockerError("image '%s' exist in srepo (add -f to replace it)" % filename)
    rlayer = os.path.join(image_dir(name, version), 'rlayer')
    with locked('image', name):
        require_image(image_ref_text(name, version))
        with Rollback(ssh_run, repo, shell_command('rm -f {} {}', tmp, tmp + '.sha256')):
            with Command(ssh_command(repo, shell_command('cat > {}', tmp)), stdin=PIPE,
                         failure=ssh_failure(repo)) as upload:
                digest = write_archive(rlayer, upload.write, Progress(
                    'spush ' + filename, tree_size(rlayer) if sys.stderr.isatty() else None))
                upload.end_input()
                upload.check()
            # the old .sha256 goes first: an archive is never beside a digest not its own
            ssh_run(repo, shell_command(
                'printf %s {0} > {1} && rm -f {2} && mv -f {3} {4} && mv -f {1} {2}',
                sha256_line(digest, filename), tmp + '.sha256', filename + '.sha256', tmp,
                filename))
    log('INFO', "pushed '%s' to %s" % (filename, repo[0]))


def pull_image(image, repo, force):
    """Download the image's archive from the repository and import it (sha256 checked)."""
    name, version = image
    filename = archive_name(name, version)
    status, out = ssh_run(repo, shell_command(
        'test -f {0} || exit 3; wc -c < {0}; cat {1} 2>/dev/null; exit 0',
        filename, filename + '.sha256'), ok=(0, 3))
    if status == 3:
        raise CockerError("image '%s' not found in srepo" % filename)
    lines = out.split('\n', 1)
    size = int(lines[0]) if is_decimal(lines[0].strip()) else None
    digest = lines[1].split()[0].lower() if len(lines) > 1 and lines[1].split() else None
    if digest is None:
        warn('%s has no .sha256 in the repository: not checked' % filename)
    elif not is_sha256_hex(digest):
        raise CockerError('%s.sha256 in the repository is not a sha256sum line' % filename)
    with Command(ssh_command(repo, shell_command('cat {}', filename)), stdout=PIPE,
                 failure=ssh_failure(repo)) as download:
        # the download must have ended well before the image is installed
        import_archive(download.stdout.read, size, name, version, force, digest,
                       'spull ' + filename, check=download.check)
    log('INFO', "pulled '%s' from %s" % (filename, repo[0]))


# =============================================================================
# Image registry: the server
# =============================================================================
# cocker's own image repository (manual 3.1.20-21) speaks the OCI Distribution API, so
# skopeo, podman and docker use it as they use any registry.  In its directory:
#   blobs/sha256/HEX                  every blob (manifests too), stored once
#   repositories/NAME/_blobs/HEX      what each repository may serve (empty files)
#   repositories/NAME/_manifests/HEX  its manifests (each holds the media type)
#   repositories/NAME/_tags/TAG       its tags (each holds a digest)
#   uploads/ID, uploads/ID.name       uploads as they grow, and their repository
# A blob enters blobs/ by rename only once its digest matched: a crash or a kill -9 never
# shows a partial one.  Repository names follow the spec's grammar, whose components never
# start with '_': nothing escapes the directory or meets cocker's own entries.

REGISTRY_COMPONENT = r'[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*'
REGISTRY_NAME = r'%s(?:/%s)*' % (REGISTRY_COMPONENT, REGISTRY_COMPONENT)
REGISTRY_TAG = r'[A-Za-z0-9_][A-Za-z0-9._-]{0,127}'
REGISTRY_NAME_MAX = 255
MANIFEST_MAX = 4 << 20                  #: the largest manifest taken (distribution's limit)
UPLOAD_ID_BYTES = 16
PBKDF2_ROUNDS = 200000
MANIFEST_TYPES = (
    'application/vnd.oci.image.manifest.v1+json', OCI_INDEX,
    'application/vnd.docker.distribution.manifest.v2+json', DOCKER_LIST)
RIGHTS = ('pull', 'push')               #: push includes pull
MAX_CONNECTIONS = 256                   #: served at once; more wait in the listen queue
MAX_CONNECTIONS_PER_CLIENT = 32         #: from one address (a slow client holds a thread)
DIGEST_PATTERN = 'sha256:[0-9a-f]{64}'


class RegistryError(Exception):
    """An answer of the API's error kind: HTTP status, error code, message."""

    def __init__(self, status, code, message, headers=()):
        Exception.__init__(self, message)
        self.status, self.code, self.headers = status, code, list(headers)


class RegistryStore(object):
    """The registry's directory: blobs, repositories, uploads (see above)."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        for sub in ('blobs/sha256', 'repositories', 'uploads'):
            os.makedirs(os.path.join(self.root, sub), 0o755, exist_ok=True)
        self.hashes = {}                # upload id -> (running sha256, bytes it has seen)

    # ---- paths, every component checked before it is used
    def blob_path(self, digest):
        return os.path.join(self.root, 'blobs', 'sha256', digest_hex(digest))

    def repo_path(self, name, *parts):
        return os.path.join(self.root, 'repositories', name, *parts)

    def upload_path(self, upload):
        if len(upload) != 2 * UPLOAD_ID_BYTES or not all(c in '0123456789abcdef' for c in upload):
            raise RegistryError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload unknown')
        return os.path.join(self.root, 'uploads', upload)

    # ---- blobs
    def has_blob(self, name, digest):
        return os.path.exists(self.repo_path(name, '_blobs', digest_hex(digest))) and \
            os.path.exists(self.blob_path(digest))

    def link_blob(self, name, digest):
        path = self.repo_path(name, '_blobs', digest_hex(digest))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            write_small(path, '')

    def open_blob(self, name, digest):
        if not self.has_blob(name, digest):
            raise RegistryError(404, 'BLOB_UNKNOWN', 'blob unknown to registry')
        return open(self.blob_path(digest), 'rb')

    def delete_blob(self, name, digest):
        if not self.has_blob(name, digest):
            raise RegistryError(404, 'BLOB_UNKNOWN', 'blob unknown to registry')
        os.unlink(self.repo_path(name, '_blobs', digest_hex(digest)))

    def store_bytes(self, data):
        """A small blob (a manifest) into blobs/ -> its digest."""
        import hashlib
        digest = 'sha256:' + hashlib.sha256(data).hexdigest()
        if not os.path.exists(self.blob_path(digest)):
            self.write_file(self.blob_path(digest), data)
        return digest

    def write_file(self, path, data):
        """data into path, whole or not at all (written in uploads/, then renamed)."""
        tmp = os.path.join(self.root, 'uploads', '.%s.tmp' % os.urandom(8).hex())
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    # ---- uploads
    def start_upload(self, name):
        upload = os.urandom(UPLOAD_ID_BYTES).hex()
        write_small(self.upload_path(upload) + '.name', name)
        os.close(os.open(self.upload_path(upload), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return upload

    def upload_size(self, name, upload):
        path = self.upload_path(upload)
        if read_small(path + '.name') != name or not os.path.exists(path):
            raise RegistryError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload unknown')
        return os.path.getsize(path)

    def append(self, name, upload, chunks, start=None):
        """Append what chunks yields; start, if given, must be where the upload stands."""
        with self.upload_file(name, upload) as f:
            size = os.fstat(f.fileno()).st_size
            if start is not None and start != size:
                raise RegistryError(416, 'BLOB_UPLOAD_INVALID', 'the chunk starts at %d, the '
                                    'upload is at %d' % (start, size),
                                    [('Range', '0-%d' % max(size - 1, 0))])
            digest = self.running_hash(upload, f, size)
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.cancel(name, upload)   # a full disk: this upload goes, the others go on
                for _ in chunks:
                    pass                    # the rest of the body read: the client hears why
                raise RegistryError(507, 'BLOB_UPLOAD_INVALID',
                                    'no space left in the registry storage')
            self.hashes[upload] = (digest, size)
            return size

    def upload_file(self, name, upload):
        """The upload, open for appending under its lock (one request at a time on it), or
        404 once it is finished or cancelled."""
        path = self.upload_path(upload)
        try:
            f = open(path, 'ab+')
        except FileNotFoundError:
            raise RegistryError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload unknown')
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            live = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            live = False
        if not live or read_small(path + '.name') != name:
            f.close()
            raise RegistryError(404, 'BLOB_UPLOAD_UNKNOWN', 'blob upload unknown')
        return f

    def running_hash(self, upload, f, size):
        """The sha256 of the upload so far: kept from its last chunk, or (after a restart
        of the server) computed from what is on disk."""
        import hashlib
        digest, seen = self.hashes.pop(upload, (None, -1))
        if seen != size:
            digest = hashlib.sha256()
            f.seek(0)
            for block in iter(lambda: f.read(CHUNK), b''):
                digest.update(block)
        return digest

    def finish(self, name, upload, digest):
        """The upload becomes the blob digest, if that is what it holds; a blob stored
        already is kept as it is (never replaced: another repository may serve it)."""
        digest_hex(digest)
        path = self.upload_path(upload)
        with self.upload_file(name, upload) as f:
            running = self.running_hash(upload, f, os.fstat(f.fileno()).st_size)
            if 'sha256:' + running.hexdigest() != digest:
                self.cancel(name, upload)
                raise RegistryError(400, 'DIGEST_INVALID', 'the upload does not match %s'
                                    % digest)
            os.fsync(f.fileno())
            try:
                os.link(path, self.blob_path(digest))  # the same blob twice: one copy stays
            except FileExistsError:
                pass
            self.cancel(name, upload)
        self.link_blob(name, digest)

    def cancel(self, name, upload):
        self.hashes.pop(upload, None)
        remove_file(self.upload_path(upload))
        remove_file(self.upload_path(upload) + '.name')

    # ---- manifests and tags
    def manifest_digest(self, name, reference):
        import re
        if re.fullmatch(DIGEST_PATTERN, reference):
            digest = reference
        elif re.fullmatch(REGISTRY_TAG, reference):
            digest = read_small(self.repo_path(name, '_tags', reference))
        else:
            raise RegistryError(400, 'MANIFEST_INVALID', 'invalid tag or digest')
        if not digest or not re.fullmatch(DIGEST_PATTERN, digest) or not os.path.isfile(
                self.repo_path(name, '_manifests', digest_hex(digest))):
            raise RegistryError(404, 'MANIFEST_UNKNOWN', 'manifest unknown')
        return digest

    def read_manifest(self, name, reference):
        digest = self.manifest_digest(name, reference)
        media_type = read_small(self.repo_path(name, '_manifests', digest_hex(digest)))
        with open(self.blob_path(digest), 'rb') as f:
            return digest, media_type, f.read()

    def put_manifest(self, name, reference, media_type, data):
        import hashlib
        digest = 'sha256:' + hashlib.sha256(data).hexdigest()
        if reference.startswith('sha256:') and reference != digest:
            raise RegistryError(400, 'DIGEST_INVALID', 'the manifest is not %s' % reference)
        media_type = self.check_manifest(name, media_type, data)
        self.store_bytes(data)
        path = self.repo_path(name, '_manifests', digest_hex(digest))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_small(path, media_type)
        self.link_blob(name, digest)
        if not reference.startswith('sha256:'):
            os.makedirs(self.repo_path(name, '_tags'), exist_ok=True)
            self.write_file(self.repo_path(name, '_tags', reference), digest.encode())
        return digest

    def check_manifest(self, name, media_type, data):
        """A manifest's media type; refused unless everything it names is here."""
        import json
        try:
            document = json.loads(data.decode('utf-8'))
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise RegistryError(400, 'MANIFEST_INVALID', 'the manifest is not a JSON object')
        media_type = document.get('mediaType') or media_type
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(400, 'MANIFEST_INVALID', 'unsupported manifest media type %s'
                                % printable(str(media_type)[:100]))
        try:
            if 'manifests' in document or media_type in (OCI_INDEX, DOCKER_LIST):
                for child in document.get('manifests') or []:
                    digest_hex(str(child['digest']))
                    self.manifest_digest(name, str(child['digest']))
            else:
                for blob in [document['config']] + list(document.get('layers') or []):
                    digest_hex(str(blob['digest']))
                    if not self.has_blob(name, str(blob['digest'])):
                        raise RegistryError(400, 'MANIFEST_BLOB_UNKNOWN',
                                            'blob %s is unknown to the repository'
                                            % printable(str(blob['digest'])[:80]))
        except (KeyError, TypeError, CockerError):
            raise RegistryError(400, 'MANIFEST_INVALID', 'the manifest is malformed')
        return media_type

    def delete_manifest(self, name, reference):
        digest = self.manifest_digest(name, reference)
        tags = self.tags(name)
        if reference.startswith('sha256:'):
            os.unlink(self.repo_path(name, '_manifests', digest_hex(digest)))
            for tag in tags:            # the tags of a deleted manifest go with it
                if read_small(self.repo_path(name, '_tags', tag)) == digest:
                    remove_file(self.repo_path(name, '_tags', tag))
        else:
            os.unlink(self.repo_path(name, '_tags', reference))

    def tags(self, name):
        try:
            return sorted(os.listdir(self.repo_path(name, '_tags')))
        except FileNotFoundError:
            return []

    def is_repository(self, name):
        return os.path.isdir(self.repo_path(name, '_manifests')) or \
            os.path.isdir(self.repo_path(name, '_blobs'))

    def repositories(self):
        """Every repository name (a directory with cocker's entries in it), sorted."""
        found = []
        top = os.path.join(self.root, 'repositories')
        for dirpath, dirnames, filenames in os.walk(top):
            if '_manifests' in dirnames or '_blobs' in dirnames:
                found.append(os.path.relpath(dirpath, top))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith('_'))
        return sorted(found)

    def collect_garbage(self, grace):
        """Remove the blobs no repository lists and the uploads older than grace
        seconds -> (blobs removed, bytes freed)."""
        import json
        kept = set()
        for name in self.repositories():
            for entry in os.listdir(self.repo_path(name, '_manifests')) if os.path.isdir(
                    self.repo_path(name, '_manifests')) else []:
                kept.add(entry)
                try:
                    with open(self.blob_path('sha256:' + entry), 'rb') as f:
                        document = json.loads(f.read(MANIFEST_MAX).decode('utf-8'))
                    for blob in [document.get('config') or {}] + list(
                            document.get('layers') or []):
                        kept.add(digest_hex(str(blob.get('digest'))))
                except (OSError, ValueError, AttributeError, CockerError):
                    continue
        removed = freed = 0
        now = time.time()
        blobs = os.path.join(self.root, 'blobs', 'sha256')
        for entry in os.listdir(blobs):
            path = os.path.join(blobs, entry)
            if entry not in kept and now - os.lstat(path).st_mtime > grace:
                freed += os.lstat(path).st_size
                os.unlink(path)
                removed += 1
        for name in self.repositories():
            links = self.repo_path(name, '_blobs')
            for entry in os.listdir(links) if os.path.isdir(links) else []:
                if not os.path.exists(os.path.join(blobs, entry)):
                    os.unlink(os.path.join(links, entry))
        uploads = os.path.join(self.root, 'uploads')
        for entry in os.listdir(uploads):
            if now - os.lstat(os.path.join(uploads, entry)).st_mtime > grace:
                remove_file(os.path.join(uploads, entry))
        return removed, freed


# ---- users: Basic authentication against salted PBKDF2 hashes -------------------------

def password_hash(password, salt=None, rounds=PBKDF2_ROUNDS):
    import base64
    import hashlib
    salt = salt or os.urandom(16)
    key = hashlib.pbkdf2_hmac('sha256', password.encode('utf-8'), salt, rounds)
    return 'pbkdf2_sha256$%d$%s$%s' % (rounds, base64.b64encode(salt).decode(),
                                       base64.b64encode(key).decode())


UNKNOWN_USER_HASH = 'pbkdf2_sha256$%d$AAAAAAAAAAAAAAAAAAAAAA==$' % PBKDF2_ROUNDS


def password_matches(password, stored):
    import base64
    import hmac
    try:
        kind, rounds, salt, _ = stored.split('$')
        if kind != 'pbkdf2_sha256':
            return False
        again = password_hash(password, base64.b64decode(salt), int(rounds))
    except ValueError:
        return False
    return hmac.compare_digest(again, stored)


def read_users(path):
    """{user: (rights, hash)} of an auth file ('user:rights:hash' lines)."""
    users = {}
    text = read_small(path, '')
    for line in text.splitlines():
        if line.strip() and not line.startswith('#'):
            user, _, rest = line.partition(':')
            rights, _, stored = rest.partition(':')
            if rights in RIGHTS and stored:
                users[user] = (rights, stored)
    return users


def write_users(path, users):
    write_small(path, ''.join('%s:%s:%s\n' % (u, r, h) for u, (r, h) in sorted(users.items())))
    os.chmod(path, 0o600)


def check_user_name(user):
    if not user or len(user) > 64 or any(c not in NAME_CHARS[:62] + '._-@' for c in user) \
            or user.startswith('-'):
        raise usage_error("'--user' value[%s] invalid (letters, digits, . _ - @)"
                          % printable(user or ''))
    return user


def check_rights(rights):
    if rights not in RIGHTS:
        raise usage_error("'--rights' value[%s] invalid (pull|push)" % printable(rights))
    return rights


def read_password(prompt):
    """A password from the terminal (not echoed), else the first line of stdin."""
    if sys.stdin.isatty():
        import getpass
        return getpass.getpass(prompt)
    line = sys.stdin.readline()
    if not line.strip('\r\n'):
        raise CockerError('no password on stdin')
    return line.rstrip('\r\n')


class Authenticator(object):
    """Who may pull and push: the users of the auth file (reread when it changes), each
    password checked once per process (PBKDF2 is slow on purpose)."""

    def __init__(self, path, anonymous_pull):
        self.path, self.anonymous_pull = path, anonymous_pull
        self.users, self.stamp, self.known = {}, None, {}

    def rights(self, header):
        """(user, rights) an Authorization header gives: rights None, 'pull' or 'push'."""
        import base64
        import hashlib
        self.reload()
        if header and header.startswith('Basic '):
            try:
                user, _, password = base64.b64decode(header[6:]).decode('utf-8').partition(':')
            except (ValueError, UnicodeDecodeError):
                return None, None
            if not user and not password:   # ':' (clients without credentials): anonymous
                return None, 'pull' if self.anonymous_pull else None
            entry = self.users.get(user)
            if entry is None:
                password_matches(password, UNKNOWN_USER_HASH)   # (as slow as a known user)
                return user, None
            key = hashlib.sha256(('%s\0%s\0%s' % (user, password, entry[1])).encode(
                'utf-8', 'surrogateescape')).digest()
            if key not in self.known:
                if not password_matches(password, entry[1]):
                    return user, None
                self.known[key] = True
            return user, entry[0]
        return None, 'pull' if self.anonymous_pull else None

    def reload(self):
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self.stamp:
            self.users, self.stamp, self.known = read_users(self.path), stamp, {}


# ---- the HTTP side -------------------------------------------------------------------

def registry_routes():
    """(method names, compiled path pattern, handler method name), tried in order."""
    import re
    name = '(?P<name>%s)' % REGISTRY_NAME
    return [(re.compile(pattern), handler) for pattern, handler in (
        (r'/v2/?', 'api_base'),
        (r'/v2/_catalog', 'api_catalog'),
        (r'/v2/%s/tags/list' % name, 'api_tags'),
        (r'/v2/%s/manifests/(?P<ref>sha256:[0-9a-f]{64}|%s)' % (name, REGISTRY_TAG),
         'api_manifest'),
        (r'/v2/%s/blobs/uploads/?' % name, 'api_upload_start'),
        (r'/v2/%s/blobs/uploads/(?P<upload>[0-9a-f]+)' % name, 'api_upload'),
        (r'/v2/%s/blobs/(?P<digest>sha256:[0-9a-f]{64})' % name, 'api_blob'))]


class RegistryRequests(object):
    """What a registry does with each request, one method an endpoint; mixed into
    http.server's handler by registry_handler (http.server loads only when a registry runs),
    with its store, auth (None: no users), read_only, log_line and routes."""

    def do_GET(self):
        self.serve('GET')

    def do_HEAD(self):
        self.serve('HEAD')

    def do_PUT(self):
        self.serve('PUT')

    def do_POST(self):
        self.serve('POST')

    def do_PATCH(self):
        self.serve('PATCH')

    def do_DELETE(self):
        self.serve('DELETE')

    def serve(self, method):
        import socket
        import urllib.parse
        self.started, self.sent, self.user, self.consumed = time.time(), 0, '-', False
        self.head_sent = False
        url = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(url.query))
        try:
            self.check_framing()
            self.check_rights(method, url.path)
            for pattern, handler in self.routes:
                match = pattern.fullmatch(url.path)
                if match and len(match.groupdict().get('name') or '') <= REGISTRY_NAME_MAX:
                    getattr(self, handler)(method, **match.groupdict())
                    break
            else:
                raise RegistryError(404, 'NAME_INVALID' if url.path.startswith('/v2/')
                                    else 'UNSUPPORTED', 'no such endpoint or invalid '
                                    'repository name')
        except RegistryError as e:
            self.fail(e)
        except CockerError as e:
            self.fail(RegistryError(400, 'DIGEST_INVALID', str(e)))
        except (ConnectionError, socket.timeout) as e:
            self.close_connection = True    # the client went away or fell silent
            self.status = 'aborted (%s)' % printable(str(e)[:100])
        except Exception as e:              # the storage failed; anything unforeseen
            self.close_connection = True
            self.fail(RegistryError(500, 'UNKNOWN', 'the registry failed: %s' % printable(
                getattr(e, 'strerror', None) or str(e) or type(e).__name__)))
        if self.has_body and not self.consumed:
            self.close_connection = True    # a body unread is never taken for a request
        self.log_request_line(method)

    def check_framing(self):
        """One body length, a number: else 400 and the connection closed."""
        length = self.headers.get('Content-Length')
        chunked = 'chunked' in self.headers.get('Transfer-Encoding', '').lower()
        if (length is not None and (not is_decimal(length.strip()) or chunked)) or \
                len(self.headers.get_all('Content-Length') or []) > 1:
            self.close_connection = True
            self.consumed = True            # (nothing of it will be read)
            raise RegistryError(400, 'UNSUPPORTED', 'malformed Content-Length')

    # ---- authentication
    def check_rights(self, method, path):
        if self.auth is None:
            return
        wanted = 'pull' if method in ('GET', 'HEAD') else 'push'
        user, rights = self.auth.rights(self.headers.get('Authorization'))
        self.user = printable(user or '-')
        if path.rstrip('/') == '/v2' and user is None:
            rights = None           # the base challenges: clients learn to send who they are
        if rights == 'push' or rights == wanted:
            return
        if rights is None or user is None:      # (anonymous: credentials may do more)
            raise RegistryError(401, 'UNAUTHORIZED', 'authentication required',
                                [('WWW-Authenticate', 'Basic realm="cocker"')])
        raise RegistryError(403, 'DENIED', 'requested access to the resource is denied')

    def require_push(self):
        if self.read_only:
            raise RegistryError(405, 'UNSUPPORTED', 'the registry is read-only')

    # ---- endpoints
    def api_base(self, method):
        self.answer(200, b'{}', 'application/json', method=method)

    def api_catalog(self, method):
        self.answer_list(method, 'repositories', self.store.repositories(), '/v2/_catalog')

    def api_tags(self, method, name):
        if not self.store.is_repository(name):
            raise RegistryError(404, 'NAME_UNKNOWN', 'repository name not known to registry')
        self.answer_list(method, 'tags', self.store.tags(name), '/v2/%s/tags/list' % name,
                         {'name': name})

    def api_manifest(self, method, name, ref):
        if method in ('GET', 'HEAD'):
            digest, media_type, data = self.store.read_manifest(name, ref)
            self.answer(200, data, media_type, [('Docker-Content-Digest', digest)],
                        method)
        elif method == 'PUT':
            self.require_push()
            data = self.body(MANIFEST_MAX)
            digest = self.store.put_manifest(name, ref, self.headers.get('Content-Type'), data)
            self.answer(201, b'', headers=[
                ('Location', '/v2/%s/manifests/%s' % (name, digest)),
                ('Docker-Content-Digest', digest)])
        elif method == 'DELETE':
            self.require_push()
            self.store.delete_manifest(name, ref)
            self.answer(202, b'')
        else:
            self.unsupported()

    def api_blob(self, method, name, digest):
        if method == 'DELETE':
            self.require_push()
            self.store.delete_blob(name, digest)
            self.answer(202, b'')
        elif method in ('GET', 'HEAD'):
            with self.store.open_blob(name, digest) as f:
                self.send_blob(method, f, digest)
        else:
            self.unsupported()

    def api_upload_start(self, method, name):
        if method != 'POST':
            return self.unsupported()
        self.require_push()
        mount, source = self.query.get('mount'), self.query.get('from')
        if mount and source and self.mountable(source, mount):
            self.store.link_blob(name, mount)
            self.drain_body()
            return self.blob_created(name, mount)
        upload = self.store.start_upload(name)
        if 'digest' in self.query:           # monolithic: the blob is the body
            self.store.append(name, upload, self.body_chunks())
            self.store.finish(name, upload, self.query['digest'])
            return self.blob_created(name, self.query['digest'])
        self.drain_body()
        self.upload_status(202, name, upload, 0)

    def mountable(self, source, digest):
        import re
        return re.fullmatch(REGISTRY_NAME, source) is not None and \
            self.store.has_blob(source, digest)

    def api_upload(self, method, name, upload):
        if method == 'GET':
            return self.upload_status(204, name, upload, self.store.upload_size(name, upload))
        self.require_push()
        if method == 'DELETE':
            self.store.upload_size(name, upload)
            self.store.cancel(name, upload)
            return self.answer(204, b'')
        if method == 'PATCH':
            start = self.content_range_start()
            size = self.store.append(name, upload, self.body_chunks(), start)
            return self.upload_status(202, name, upload, size)
        if method == 'PUT':
            if 'digest' not in self.query:
                raise RegistryError(400, 'DIGEST_INVALID', 'the final PUT needs ?digest=')
            self.store.append(name, upload, self.body_chunks())
            self.store.finish(name, upload, self.query['digest'])
            return self.blob_created(name, self.query['digest'])
        self.unsupported()

    # ---- answers
    def blob_created(self, name, digest):
        self.answer(201, b'', headers=[('Location', '/v2/%s/blobs/%s' % (name, digest)),
                                       ('Docker-Content-Digest', digest)])

    def upload_status(self, status, name, upload, size):
        self.answer(status, b'', headers=[
            ('Location', '/v2/%s/blobs/uploads/%s' % (name, upload)),
            ('Range', '0-%d' % max(size - 1, 0)), ('Docker-Upload-UUID', upload),
            ('OCI-Chunk-Min-Length', '0')])

    def answer_list(self, method, key, items, path, extra=None):
        """A paginated list (?n=&last=), with a Link header to the next page."""
        last, count = self.query.get('last'), self.query.get('n')
        if last:
            items = [i for i in items if i > last]
        import json
        import urllib.parse
        headers = []
        if count is not None:
            if not is_decimal(count):
                raise RegistryError(400, 'PAGINATION_NUMBER_INVALID', 'invalid number')
            if len(items) > int(count):
                items = items[:int(count)]
                headers.append(('Link', '<%s?n=%s&last=%s>; rel="next"' % (
                    path, count, urllib.parse.quote(items[-1] if items else ''))))
        document = dict(extra or {})
        document[key] = items
        self.answer(200, json.dumps(document).encode(), 'application/json', headers, method)

    def send_blob(self, method, f, digest):
        size = os.fstat(f.fileno()).st_size
        start, end = self.requested_range(size)
        headers = [('Docker-Content-Digest', digest), ('Accept-Ranges', 'bytes')]
        partial = size and (start, end) != (0, size - 1)
        if partial:
            headers.append(('Content-Range', 'bytes %d-%d/%d' % (start, end, size)))
        self.send_head(206 if partial else 200, 'application/octet-stream',
                       end - start + 1 if size else 0, headers)
        if method == 'GET' and size:
            self.wfile.flush()
            self.sent = self.connection.sendfile(f, start, end - start + 1)

    def requested_range(self, size):
        text = self.headers.get('Range')
        if not text or not size:
            return 0, size - 1
        first, _, last = text.replace('bytes=', '', 1).partition('-')
        if not is_decimal(first) or (last and not is_decimal(last)) or \
                int(first) >= size or (last and int(last) < int(first)):
            raise RegistryError(416, 'BLOB_UNKNOWN', 'range not satisfiable',
                                [('Content-Range', 'bytes */%d' % size)])
        return int(first), min(int(last), size - 1) if last else size - 1

    def answer(self, status, data, media_type=None, headers=(), method=None):
        self.send_head(status, media_type, len(data), headers)
        if method != 'HEAD' and data:
            self.wfile.write(data)
            self.sent = len(data)

    def send_head(self, status, media_type, length, headers):
        self.head_sent = True
        self.send_response_only(status)
        self.send_header('Docker-Distribution-API-Version', 'registry/2.0')
        if media_type:
            self.send_header('Content-Type', media_type)
        self.send_header('Content-Length', str(length))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.status = status

    def fail(self, error):
        import json
        if self.head_sent:              # too late for an answer: the connection ends
            self.close_connection = True
            self.status = '%s, then %d' % (getattr(self, 'status', '-'), error.status)
            return
        body = json.dumps({'errors': [{'code': error.code, 'message': str(error),
                                       'detail': None}]}).encode()
        if self.has_body and not self.consumed:
            self.close_connection = True    # its body unread: no next request on it
        self.answer(error.status, body, 'application/json', error.headers, self.command)

    def unsupported(self):
        raise RegistryError(405, 'UNSUPPORTED', 'the operation is unsupported')

    # ---- request bodies: Content-Length or chunked
    @property
    def has_body(self):
        length = (self.headers.get('Content-Length') or '0').strip()
        return 'chunked' in self.headers.get('Transfer-Encoding', '').lower() or \
            not is_decimal(length) or int(length) > 0

    def body_chunks(self):
        """The request body as it comes; consumed once all of it was read."""
        for chunk in self.raw_body():
            yield chunk
        self.consumed = True

    def raw_body(self):
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionResetError('the client went away')
                size = chunk_size(line)
                if size == 0:
                    while self.rfile.readline(1024) not in (b'\r\n', b'\n', b''):
                        pass
                    return
                while size:
                    data = self.rfile.read(min(size, CHUNK))
                    if not data:
                        raise ConnectionResetError('the client went away')
                    size -= len(data)
                    yield data
                self.rfile.readline(1024)
        left = int(self.headers.get('Content-Length') or 0)
        while left > 0:
            data = self.rfile.read(min(left, CHUNK))
            if not data:
                raise ConnectionResetError('the client went away')
            left -= len(data)
            yield data

    def body(self, limit):
        data = b''
        for chunk in self.body_chunks():
            data += chunk
            if len(data) > limit:
                self.close_connection = True
                raise RegistryError(413, 'SIZE_INVALID', 'the manifest is too large')
        return data

    def drain_body(self):
        for _ in self.body_chunks():
            pass

    def content_range_start(self):
        text = self.headers.get('Content-Range')
        if not text:
            return None
        first = text.replace('bytes', '').strip(' =').partition('-')[0]
        if not is_decimal(first):
            raise RegistryError(416, 'BLOB_UPLOAD_INVALID', 'invalid Content-Range')
        return int(first)

    # ---- logging: one line a request, control characters escaped
    def log_request_line(self, method):
        self.log_line('%s %s "%s %s" %s %d %.3fs' % (
            self.client_address[0], self.user, method, printable(self.path[:300]),
            getattr(self, 'status', '-'), self.sent, time.time() - self.started))

    def log_message(self, format, *args):
        pass                        # (http.server's own lines: ours say it all)


def registry_handler(store, auth, read_only, log_line):
    """The request handler class of a registry serving store."""
    import http.server

    class Handler(RegistryRequests, http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        server_version = 'cocker-registry/' + VERSION
        timeout = 30                    # a silent client never holds a thread for long
    Handler.store, Handler.auth, Handler.read_only = store, auth, read_only
    Handler.log_line, Handler.routes = staticmethod(log_line), registry_routes()
    return Handler


def chunk_size(line):
    """The size of a chunk of a chunked body: 1 to 16 hex digits (an extension after ';')."""
    digits = line.split(b';')[0].strip()
    if not 0 < len(digits) <= 16 or digits.strip(b'0123456789abcdefABCDEF'):
        raise RegistryError(400, 'BLOB_UPLOAD_INVALID', 'malformed chunk size')
    return int(digits, 16)


def parse_listen(text):
    """'ADDR:PORT' or '[V6]:PORT' -> (address, port)."""
    host, _, port = text.rpartition(':')
    host = host[1:-1] if host.startswith('[') and host.endswith(']') else host
    if not host or not is_decimal(port) or not 0 < int(port) < 65536:
        raise usage_error("'--listen' value[%s] invalid (ADDR:PORT)" % printable(text))
    return host, int(port)


def registry_dir(options):
    return os.path.abspath(options.repo_dir or os.path.join(HOME, 'repo'))


def auth_file(options):
    return os.path.abspath(options.auth_file or os.path.join(registry_dir(options), 'users'))


def serve_registry(options):
    """Serve the registry in the foreground until SIGTERM or SIGINT."""
    import signal
    import threading
    host, port = parse_listen(options.listen)
    if not options.tls_cert and not options.insecure:
        raise usage_error('a registry serves TLS: give --tls-cert and --tls-key, or '
                          '--insecure for plain HTTP')
    store = RegistryStore(registry_dir(options))
    auth = None
    if options.auth_file or os.path.exists(auth_file(options)):
        auth = Authenticator(auth_file(options), options.anonymous_pull)
        if not read_users(auth_file(options)):
            warn('%s has no users: only anonymous pulls are served' % auth_file(options))
    context = tls_server_context(options) if options.tls_cert else None
    log_line = registry_logger(os.path.join(store.root, 'access.log'))
    handler = registry_handler(store, auth, options.read_only, log_line)
    try:
        server = registry_server_class(host, context, log_line)((host, port), handler)
    except OSError as e:
        raise CockerError('cannot listen on %s: %s' % (options.listen, e.strerror))

    def stop(signum, frame):
        threading.Thread(target=server.shutdown).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    log_line('serving %s on %s://%s (%s)' % (
        store.root, 'https' if context else 'http', options.listen, 'users of %s' % auth.path
        if auth else 'no users file: anyone who reaches it may pull and push'))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    log_line('stopped')


def registry_server_class(host, context, log_line):
    """http.server's threading server as a registry needs it: no reverse lookup of its
    name, at most MAX_CONNECTIONS (MAX_CONNECTIONS_PER_CLIENT from one address), the TLS
    handshake (context, or None) in each connection's own thread, failures logged."""
    import http.server
    import socket
    import socketserver
    import threading
    lock, connections = threading.Lock(), {}       # client address -> connections served

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128
        address_family = socket.AF_INET6 if ':' in host else socket.AF_INET

        def server_bind(self):
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

        def process_request(self, request, client_address):
            if not admit(client_address[0]):
                log_line('%s refused: too many connections' % client_address[0])
                self.shutdown_request(request)
                return
            socketserver.ThreadingMixIn.process_request(self, request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                socketserver.ThreadingMixIn.process_request_thread(self, request, client_address)
            finally:
                with lock:
                    connections[client_address[0]] -= 1
                    if not connections[client_address[0]]:
                        del connections[client_address[0]]

        def finish_request(self, request, client_address):
            if context is not None:
                request.settimeout(30)
                try:
                    request = context.wrap_socket(request, server_side=True)
                except (OSError, ValueError) as e:
                    log_line('%s TLS handshake failed: %s' % (client_address[0], printable(
                        str(e)[:200])))
                    request.close()
                    return
            self.RequestHandlerClass(request, client_address, self)

        def handle_error(self, request, client_address):
            log_line('%s connection failed: %s' % (client_address[0], printable(
                str(sys.exc_info()[1])[:200])))

    def admit(address):
        with lock:
            if sum(connections.values()) >= MAX_CONNECTIONS or \
                    connections.get(address, 0) >= MAX_CONNECTIONS_PER_CLIENT:
                return False
            connections[address] = connections.get(address, 0) + 1
            return True
    return Server


def tls_server_context(options):
    import ssl
    if not options.tls_key:
        raise usage_error("expect '--tls-key' with '--tls-cert'")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise CockerError('cannot load the TLS certificate %s and key %s: %s' % (
            options.tls_cert, options.tls_key, getattr(e, 'strerror', None) or e))
    return context


def registry_logger(path):
    """log_line(text): one time-stamped line to the access log and to stderr."""
    import threading
    lock = threading.Lock()
    f = open(path, 'a', encoding='utf-8', errors='replace')

    def log_line(text):
        line = '%s %s\n' % (time.strftime('%Y-%m-%dT%H:%M:%S%z'), text)
        with lock:
            f.write(line)
            f.flush()
            sys.stderr.write(line)
            sys.stderr.flush()
    return log_line


# =============================================================================
# Image registry: the client
# =============================================================================
# push, pull and search against any registry of the OCI Distribution API: cocker's own,
# the distribution registry, Harbor, Docker Hub.  Authentication as docker and podman do it
# (Basic, or the Bearer token the 401 points to), with the credentials of -a login or of
# the files those tools keep.  Everything pulled is checked as an import is (blob digests,
# diff_ids, the archive guard) and installed through the same store_image.  Blobs are
# downloaded into HOME/downloads first, where an interrupted one resumes with Range.

REGISTRY_TIMEOUT = 60                   #: seconds a connection may stay silent
REGISTRY_TRIES = 4                      #: attempts of a request that failed on the way
MANIFEST_ACCEPT = ', '.join(MANIFEST_TYPES)
DOWNLOAD_THREADS = 3
PUSH_THREADS = 1
DEFAULT_TAG = 'latest'


class RemoteRef(object):
    """A registry (host[:port]), a repository path in it and a tag or digest."""

    def __init__(self, registry, repository, reference):
        import re
        self.registry, self.repository, self.reference = registry, repository, reference
        if not re.fullmatch(REGISTRY_NAME, repository) or len(repository) > REGISTRY_NAME_MAX:
            raise CockerError("'%s' is not a valid repository name (lower case letters, "
                              "digits, . _ - separated, / between parts)"
                              % printable(repository))
        if not (re.fullmatch(REGISTRY_TAG, reference) or
                re.fullmatch('sha256:[0-9a-f]{64}', reference)):
            raise CockerError("'%s' is not a valid tag or digest" % printable(reference))

    def __str__(self):
        sep = '@' if self.reference.startswith('sha256:') else ':'
        return '%s/%s%s%s' % (self.registry, self.repository, sep, self.reference)


def registry_repo_path():
    return os.path.join(HOME, 'registry')


def split_repo(text):
    """'HOST[:PORT][/PATH]' -> (HOST[:PORT], PATH or '')."""
    registry, _, path = text.partition('/')
    host, _, port = registry.rpartition(':') if registry.count(':') == 1 else (registry, '', '')
    allowed = NAME_CHARS[:62] + '.-'
    import re
    path = path.strip('/')
    if not registry or any(c not in allowed for c in host) or host.startswith(('-', '.')) or \
            (port and not (is_decimal(port) and 0 < int(port) < 65536)) or \
            (path and not re.fullmatch(REGISTRY_NAME, path)):
        raise usage_error("'--repo' value[%s] invalid (HOST[:PORT][/PATH], PATH in lower case)"
                          % printable(text))
    return registry, path


def remembered_repo(repo):
    """--repo (then saved for later commands, as --srepo is), else the saved one."""
    return remembered(repo, registry_repo_path(), split_repo,
                      'no registry yet: give --repo HOST[:PORT][/PATH]')


def is_full_reference(text):
    """'registry.example:5000/team/app:1.2' names its registry; 'app:1.2' does not."""
    first, slash, _ = text.partition('/')
    return bool(slash) and first.strip('.') != '' and (
        '.' in first or ':' in first or first == 'localhost')


def pull_ref(options):
    """The remote image of pull: -m as a full reference, else --repo's PATH/NAME:TAG."""
    text = options.image
    if is_full_reference(text):
        registry, _, rest = text.partition('/')
    else:
        registry, path = remembered_repo(options.repo)
        rest = '%s/%s' % (path, text) if path else text
    if '@' in rest:
        repository, _, reference = rest.partition('@')
    elif ':' in rest.rsplit('/', 1)[-1]:
        repository, _, reference = rest.rpartition(':')
    else:
        repository, reference = rest, DEFAULT_TAG
    split_repo(registry)
    return RemoteRef(registry, repository, reference)


def push_ref(options, name, version):
    """The remote image of push: --repo's PATH/NAME:VERSION ('_' is the tag latest)."""
    registry, path = remembered_repo(options.repo)
    repository = '%s/%s' % (path, name) if path else name
    return RemoteRef(registry, repository.lower(),
                     DEFAULT_TAG if version == NO_VERSION else version)


# ---- credentials -----------------------------------------------------------------------

def auth_files():
    """Where credentials are looked up, first match wins: cocker's own (-a login), then
    podman's and docker's."""
    files = [os.path.join(HOME, 'auth.json')]
    if os.environ.get('XDG_RUNTIME_DIR'):
        files.append(os.path.join(os.environ['XDG_RUNTIME_DIR'], 'containers', 'auth.json'))
    files.append(os.path.expanduser('~/.docker/config.json'))
    return files


def read_auth_file(path):
    import json
    try:
        with open(path, 'rb') as f:
            document = json.loads(f.read(1 << 20).decode('utf-8'))
    except (OSError, ValueError):
        return {}
    auths = document.get('auths') if isinstance(document, dict) else None
    return auths if isinstance(auths, dict) else {}


def stored_credentials(registry):
    """(user, password) for registry from the auth files, or None."""
    import base64
    for path in auth_files():
        auths = read_auth_file(path)
        for key in (registry, 'https://' + registry, 'http://' + registry,
                    'https://%s/v1/' % registry):
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get('auth'), str):
                try:
                    user, _, password = base64.b64decode(entry['auth']).decode(
                        'utf-8').partition(':')
                except (ValueError, UnicodeDecodeError):
                    continue
                return user, password
    return None


def save_credentials(registry, user, password):
    """Into HOME/auth.json (0600, docker's format); None as user removes them."""
    import base64
    import json
    path = os.path.join(HOME, 'auth.json')
    with locked('registry', 'auth'):
        auths = read_auth_file(path)
        if user is None:
            if auths.pop(registry, None) is None:
                raise CockerError('not logged in to %s' % registry)
        else:
            auths[registry] = {'auth': base64.b64encode(
                ('%s:%s' % (user, password)).encode('utf-8')).decode()}
        fd = os.open(path + '.tmp', os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, 'w') as f:
            json.dump({'auths': auths}, f, indent=1, sort_keys=True)
        os.rename(path + '.tmp', path)


# ---- HTTP ------------------------------------------------------------------------------

class RegistryClient(object):
    """Requests to one registry: TLS (verified, unless --insecure) or plain HTTP with
    --insecure, keep-alive, the 401 challenge answered (Basic, or a Bearer token fetched
    from the realm named), retries with back-off on resets and 5xx, redirects followed
    without the Authorization header to another host."""

    def __init__(self, registry, insecure=False, ca_file=None, credentials=None):
        self.registry, self.insecure, self.ca_file = registry, insecure, ca_file
        self.credentials = credentials if credentials is not None else \
            stored_credentials(registry)
        self.scheme = 'https'
        self.connections = {}           # (scheme, host:port) -> connection
        self.responses = {}             # (scheme, host:port) -> its last response
        self.authorization = None       # the header of the last challenge answered

    def copy(self):
        """A client of its own for another thread, the authentication learnt shared."""
        other = RegistryClient(self.registry, self.insecure, self.ca_file, self.credentials)
        other.scheme, other.authorization = self.scheme, self.authorization
        return other

    def close(self):
        for connection in self.connections.values():
            connection.close()
        self.connections = {}

    # ---- connections
    def connection(self, scheme, netloc):
        import http.client
        key = (scheme, netloc)
        if key not in self.connections:
            host, port = split_netloc(netloc, 443 if scheme == 'https' else 80)
            proxy = proxy_for(scheme, host)
            target = proxy or (host, port)
            if scheme == 'https':
                c = http.client.HTTPSConnection(target[0], target[1], timeout=REGISTRY_TIMEOUT,
                                                context=self.tls_context())
            else:
                c = http.client.HTTPConnection(target[0], target[1], timeout=REGISTRY_TIMEOUT)
            if proxy:
                c.set_tunnel(host, port)
            self.connections[key] = c
        return self.connections[key]

    def tls_context(self):
        import ssl
        if self.insecure:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            return context
        ca_file = self.ca_file or registry_ca_file(self.registry)
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise CockerError('cannot read the CA file %s: %s' % (ca_file, e))

    def drop(self, scheme, netloc):
        connection = self.connections.pop((scheme, netloc), None)
        if connection is not None:
            connection.close()

    # ---- requests
    def request(self, method, path, headers=None, body=None, ok=(200,), scope=None,
                url=None, tries=REGISTRY_TRIES):
        """The response (its body not read) of a request that got a status in ok; a
        RegistryFailure with what the registry said otherwise."""
        import http.client
        import ssl
        headers = dict(headers or {})
        answered = False                # a 401 is answered once: a second one is final
        for attempt in range(REGISTRY_TRIES + 1):
            scheme, netloc, target = self.where(url or path)
            send = dict(headers)
            if netloc == self.registry and self.authorization:
                send['Authorization'] = self.authorization
            try:
                response = self.send(method, scheme, netloc, target, send, body)
            except ssl.SSLError as e:
                if self.insecure and self.scheme == 'https' and url is None and \
                        'WRONG_VERSION_NUMBER' in str(e):
                    self.drop(scheme, netloc)
                    self.scheme = 'http'        # --insecure: the registry speaks plain HTTP
                    continue
                raise CockerError('TLS with %s failed: %s' % (netloc, e.reason or e))
            except (OSError, http.client.HTTPException) as e:
                self.drop(scheme, netloc)
                if attempt + 1 >= tries or not rewindable(body):
                    raise CockerError('cannot reach %s: %s' % (netloc, getattr(
                        e, 'strerror', None) or e or type(e).__name__))
                self.back_off(attempt, body)
                continue
            if response.status == 401 and netloc == self.registry:
                challenge = response.getheader('WWW-Authenticate', '')
                text = failure_text(response)
                if not answered and rewindable(body) and \
                        self.answer_challenge(challenge, scope):
                    answered = True
                    rewind(body)
                    continue
                raise RegistryFailure(401, text if self.credentials else
                                      text + ' (no credentials: -a login first)')
            if response.status in (301, 302, 303, 307, 308) and method in ('GET', 'HEAD'):
                url = self.absolute(response.getheader('Location', ''), scheme, netloc)
                drain(response)
                continue
            if response.status >= 500 and attempt + 1 < tries and rewindable(body):
                drain(response)
                self.back_off(attempt, body)
                continue
            if response.status not in ok:
                raise registry_failure(response)
            return response
        raise CockerError('%s %s: too many redirects or retries' % (method, path))

    def send(self, method, scheme, netloc, target, headers, body):
        last = self.responses.get((scheme, netloc))
        if last is not None and not last.isclosed():
            self.drop(scheme, netloc)       # a body left unread (drain stops): a new connection
        connection = self.connection(scheme, netloc)
        headers.setdefault('User-Agent', 'cocker/' + VERSION)
        if body is None and method in ('PUT', 'POST', 'PATCH'):
            headers['Content-Length'] = '0'
        connection.request(method, target, body=body, headers=headers,
                           encode_chunked='Transfer-Encoding' in headers)
        response = connection.getresponse()
        self.responses[(scheme, netloc)] = response
        return response

    def where(self, url):
        """(scheme, netloc, path?query) of a path of this registry or a full URL."""
        import urllib.parse
        if url.startswith('/'):
            return self.scheme, self.registry, url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ('https', 'http') or not parts.netloc or \
                parts.scheme == 'http' and not self.insecure:
            raise CockerError('the registry sent the client to %s: refused (only https, '
                              'or http with --insecure)' % printable(url[:200]))
        return parts.scheme, parts.netloc, (parts.path or '/') + (
            '?' + parts.query if parts.query else '')

    def absolute(self, location, scheme, netloc):
        import urllib.parse
        return urllib.parse.urljoin('%s://%s/' % (scheme, netloc), location)

    @staticmethod
    def back_off(attempt, body):
        time.sleep(min(0.5 * 2 ** attempt, 8))
        rewind(body)

    def answer_challenge(self, challenge, scope):
        """Set the Authorization header a 401's WWW-Authenticate asks for; False if none
        can be made."""
        import base64
        kind, _, params = challenge.partition(' ')
        if kind.lower() == 'basic':
            if not self.credentials:
                return False
            self.authorization = 'Basic ' + base64.b64encode(
                ('%s:%s' % self.credentials).encode('utf-8')).decode()
            return True
        if kind.lower() == 'bearer':
            token = self.fetch_token(parse_challenge(params), scope)
            self.authorization = 'Bearer ' + token
            return True
        return False

    def fetch_token(self, params, scope):
        """A token from the realm (Docker's token protocol), with the credentials if any."""
        import base64
        import json
        import urllib.parse
        realm = params.get('realm')
        if not realm or not realm.startswith(('https://', 'http://')):
            raise CockerError('the registry asks for a token but names no realm')
        query = [('service', params.get('service', ''))] + [
            ('scope', s) for s in (scope or params.get('scope') or '').split()]
        headers = {}
        if self.credentials:
            headers['Authorization'] = 'Basic ' + base64.b64encode(
                ('%s:%s' % self.credentials).encode('utf-8')).decode()
        scheme, netloc, target = self.where(realm)
        target += ('&' if '?' in target else '?') + urllib.parse.urlencode(query)
        try:
            response = self.send('GET', scheme, netloc, target, headers, None)
        except OSError as e:
            raise CockerError('cannot reach the token service %s: %s' % (netloc, e))
        if response.status != 200:
            raise RegistryFailure(response.status, 'the token service refused: %s'
                                  % failure_text(response))
        try:
            document = json.loads(response.read(1 << 20).decode('utf-8'))
            return str(document.get('token') or document['access_token'])
        except (ValueError, KeyError, AttributeError):
            raise CockerError('the token service answered no token')


class RegistryFailure(CockerError):
    """What a registry answered when it refused: '404 manifest unknown: ...'."""

    def __init__(self, status, text):
        CockerError.__init__(self, '%d %s' % (status, text))
        self.http_status = status


def registry_failure(response):
    return RegistryFailure(response.status, failure_text(response))


def failure_text(response):
    """The first error of an error body ('manifest unknown: ...'), else the reason."""
    import json
    data = response.read(64 << 10)
    try:
        error = json.loads(data.decode('utf-8'))['errors'][0]
        text = str(error.get('message') or error.get('code') or response.reason)
        code = str(error.get('code') or '').lower().replace('_', ' ')
        if code and not text.lower().startswith(code):
            text = '%s: %s' % (code, text)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = response.reason or 'failed'
    return printable(text[:300])


def parse_challenge(params):
    """'realm="https://auth",service="registry",scope="a:b:pull"' -> dict."""
    import re
    return dict((k.lower(), v) for k, v in re.findall(r'(\w+)="([^"]*)"', params))


def registry_ca_file(registry):
    """The CA of a registry where podman and docker users keep it (certs.d/HOST:PORT/
    ca.crt: cocker's own, then theirs), else None: the system's CA store."""
    for top in (os.path.join(HOME, 'certs.d'), '/etc/containers/certs.d', '/etc/docker/certs.d'):
        path = os.path.join(top, registry, 'ca.crt')
        if os.path.isfile(path):
            return path
    return None


def split_netloc(netloc, default_port):
    host, _, port = netloc.rpartition(':') if netloc.count(':') == 1 else (netloc, '', '')
    return host.strip('[]'), int(port) if is_decimal(port) else default_port


def proxy_for(scheme, host):
    """(host, port) of the proxy https_proxy/http_proxy names for host, unless no_proxy
    or a loopback address (never proxied, as Go's clients do) says otherwise."""
    import urllib.parse
    import urllib.request
    if host in ('localhost', '::1') or host.startswith('127.'):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme)
    if not proxy or urllib.request.proxy_bypass_environment(host):
        return None
    parts = urllib.parse.urlsplit(proxy if '://' in proxy else 'http://' + proxy)
    return parts.hostname, parts.port or 3128


def drain(response, limit=64 << 10):
    """Read what is left of a response, up to limit (a body without end is not waited
    for: its connection is not used again)."""
    left = limit
    while left > 0:
        data = response.read(min(left, CHUNK))
        if not data:
            return
        left -= len(data)


def rewindable(body):
    return body is None or isinstance(body, bytes) or hasattr(body, 'seek')


def rewind(body):
    if hasattr(body, 'seek'):
        body.seek(0)


# ---- pull ------------------------------------------------------------------------------

def registry_pull(options):
    """-a pull: the remote image (the host's platform of an index) into the store."""
    ref = pull_ref(options)
    platform = host_platform(options.platform)
    client = RegistryClient(ref.registry, options.insecure, options.ca_file)
    scope = 'repository:%s:pull' % ref.repository
    try:
        manifest, digest = fetch_manifest(client, ref, ref.reference, scope)
        manifest, digest = platform_manifest(client, ref, manifest, digest, platform, scope)
        if manifest.get('schemaVersion') != 2 or not isinstance(manifest.get('config'), dict):
            raise CockerError('%s is not an image manifest of schema 2 (schema 1 images are '
                              'not supported)' % ref)
        layers = [l.get('digest') for l in manifest.get('layers') or []]
        config_digest = manifest['config'].get('digest')
        image = ArchiveImage(blob_name(config_digest), config_digest,
                             [blob_name(d) for d in layers], layers, [str(ref)])
        name, version = pulled_name(options, ref)
        with RegistryBlobs(client, ref, scope) as source:
            for descriptor in [manifest['config']] + list(manifest.get('layers') or []):
                source.sizes[descriptor.get('digest')] = descriptor.get('size')
            config, _ = read_json(source, image.config_name, config_digest)
            diff_ids = (config.get('rootfs') or {}).get('diff_ids') or [] \
                if isinstance(config, dict) else []
            source.prefetch([(d, l) for d, l in zip(diff_ids, layers)
                             if isinstance(d, str) and not os.path.isdir(layer_dir(d))])
            try:
                store_image(source, image, name, version, options.force,
                              '%s (a registry, manifest %s)' % (ref, digest))
            finally:
                collect_layers()
    except (TypeError, AttributeError, KeyError) as e:
        raise CockerError('%s: the manifest is malformed (%s)' % (ref, e))
    finally:
        client.close()
    log('INFO', "pulled '%s' as '%s'" % (ref, image_ref_text(name, version)))


def pulled_name(options, ref):
    """The local name and version: --to-image, else the repository's last part and the
    tag (a digest: its first 12 hex digits)."""
    if options.to_image:
        return image_or_unversioned(options.to_image)
    last = ref.repository.rsplit('/', 1)[-1]
    if ref.reference.startswith('sha256:'):
        return tag_to_image(last)[0], digest_hex(ref.reference)[:12]
    return tag_to_image('%s:%s' % (last, ref.reference))


def fetch_manifest(client, ref, reference, scope):
    """(manifest, digest) of a tag or digest; a digest asked for is checked."""
    import hashlib
    response = client.request('GET', '/v2/%s/manifests/%s' % (ref.repository, reference),
                              {'Accept': MANIFEST_ACCEPT}, scope=scope)
    data = response.read(MANIFEST_MAX + 1)
    if len(data) > MANIFEST_MAX:
        raise CockerError('%s: the manifest is too large' % ref)
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    if reference.startswith('sha256:') and digest != reference:
        raise CockerError('digest mismatch for the manifest %s: refused' % reference)
    return parse_json(data, 'the manifest of %s' % ref, dict), digest


def platform_manifest(client, ref, document, digest, platform, scope):
    """The image manifest for platform: document itself, or the one its index picks."""
    for _ in range(4):
        if document.get('mediaType') not in (OCI_INDEX, DOCKER_LIST) and \
                'manifests' not in document:
            return document, digest
        chosen = platform_descriptor(document, platform)
        child = str(chosen.get('digest'))
        digest_hex(child)                   # a digest, never a tag: the index pins it
        document, digest = fetch_manifest(client, ref, child, scope)
    raise CockerError('%s: the indexes nest too deep' % ref)


def platform_descriptor(index, platform):
    """The descriptor of an index for platform, or the error that lists what it has."""
    manifests = index.get('manifests') or []
    for descriptor in manifests:
        if isinstance(descriptor, dict) and platform_matches(descriptor.get('platform'),
                                                             platform):
            return descriptor
    raise CockerError('no image for %s (there are %s)' % ('/'.join(p for p in platform if p),
                                                           ', '.join(sorted(set(
                                                               platform_text(d.get('platform'))
                                                               for d in manifests))) or 'none'))


class RegistryBlobs(object):
    """The blobs of a remote repository as an image source (open(name), as TarSource):
    each downloaded into HOME/downloads/HEX.part (resumed with Range where an earlier try
    stopped), checked against its digest, then HEX until the pull ends."""

    def __init__(self, client, ref, scope):
        self.client, self.ref, self.scope = client, ref, scope
        self.directory = os.path.join(HOME, 'downloads')
        os.makedirs(self.directory, 0o700, exist_ok=True)
        self.pending, self.done, self.pool = {}, [], None
        self.sizes = {}                 # digest -> size its descriptor gives (read no more)
        self.forget_old_downloads()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for path in self.done:          # what is installed (or refused) is not kept
            remove_file(path)

    def forget_old_downloads(self, age=7 * 86400):
        now = time.time()
        for entry in os.listdir(self.directory):
            path = os.path.join(self.directory, entry)
            if now - os.lstat(path).st_mtime > age:
                remove_file(path)

    def prefetch(self, layers):
        """Start downloading [(diff_id, digest)] in threads (one line per layer; on a
        terminal one at a time, each with its progress)."""
        if sys.stderr.isatty() or not layers:
            return
        import concurrent.futures
        self.pool = concurrent.futures.ThreadPoolExecutor(DOWNLOAD_THREADS)
        for _, digest in layers:
            if digest not in self.pending:
                self.pending[digest] = self.pool.submit(self.download, str(digest),
                                                        self.client.copy())

    def open(self, name):
        digest = 'sha256:' + name.rsplit('/', 1)[-1]
        future = self.pending.pop(digest, None)
        path = future.result() if future is not None else self.download(digest, self.client)
        return open(path, 'rb')

    def download(self, digest, client):
        """HOME/downloads/HEX, complete and checked -> its path."""
        import hashlib
        size = self.sizes.get(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CockerError('the manifest gives blob %s no size' % printable(digest[:80]))
        path = os.path.join(self.directory, digest_hex(digest))
        with locked('download', digest_hex(digest)):
            self.done.append(path)          # (one a killed pull finished: used, then gone)
            if os.path.exists(path):
                return path
            partial = path + '.part'
            have = os.path.getsize(partial) if os.path.exists(partial) else 0
            have = have if have < size else 0
            response = client.request('GET', '/v2/%s/blobs/%s' % (self.ref.repository, digest),
                                      {'Range': 'bytes=%d-' % have} if have else {},
                                      ok=(200, 206), scope=self.scope)
            if response.status != 206 or not (response.getheader('Content-Range') or '').replace(
                    'bytes ', '').startswith('%d-' % have):
                have = 0                    # the whole blob, from its start
            hashed = hashlib.sha256()
            with open(partial, 'ab+' if have else 'wb+') as f:
                f.seek(0)
                for block in iter(lambda: f.read(CHUNK), b''):
                    hashed.update(block)    # what an earlier try got counts too
                progress = Progress('pull %s' % digest[7:19], size)
                progress.add(have)
                while True:
                    block = response.read(min(CHUNK, size - have + 1))
                    if not block:
                        break
                    have += len(block)
                    if have > size:
                        remove_file(partial)
                        raise CockerError('blob %s is larger than its manifest says: refused'
                                          % digest)
                    hashed.update(block)
                    f.write(block)
                    progress.add(len(block))
                progress.finish()
            if 'sha256:' + hashed.hexdigest() != digest:
                remove_file(partial)
                raise CockerError('digest mismatch for blob %s: refused' % digest)
            os.rename(partial, path)
            if not sys.stderr.isatty() and size > 4096:
                sys.stderr.write('cocker: %s %s downloaded\n' % (digest[:19], size_text(size)))
            return path


# ---- push ------------------------------------------------------------------------------

def registry_push(options):
    """-a push: the image's layers (those the registry lacks), its config, its manifest."""
    import hashlib
    name, version = require_image(options.image)
    ref = push_ref(options, name, version)
    kind = options.format or 'docker'
    if kind not in MEDIA_TYPES:
        raise usage_error("'--format' value[%s] invalid for push (docker|oci)" % kind)
    client = RegistryClient(ref.registry, options.insecure, options.ca_file)
    scope = 'repository:%s:pull,push' % ref.repository
    try:
        with locked('image', name):
            require_image(image_ref_text(name, version))
            layers = push_layers(client, ref, scope, exported_rlayers(name, version))
            config = exported_config(name, version, [diff_id for _, _, diff_id in layers])
            push_blob(client, ref, scope, 'sha256:' + hashlib.sha256(config).hexdigest(),
                      config)
            manifest = image_manifest(config, [(d, s) for d, s, _ in layers], kind, True)
            drain(client.request('PUT', '/v2/%s/manifests/%s' % (
                ref.repository, ref.reference), {'Content-Type': MEDIA_TYPES[kind][0]},
                manifest, ok=(200, 201), scope=scope))
    finally:
        client.close()
    log('INFO', "pushed '%s' to '%s'" % (image_ref_text(name, version), ref))


def push_layers(client, ref, scope, rlayers):
    """Every layer, PUSH_THREADS at a time (while one thread walks its tree in Python,
    the others compress, hash and send) -> [(digest, size, diff_id)], bottom first."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(PUSH_THREADS) as pool:
        pushing = [pool.submit(push_layer, client.copy(), ref, scope, rlayer,
                               'layer %d of %d' % (n, len(rlayers)))
                   for n, rlayer in enumerate(rlayers, 1)]
        return [future.result() for future in pushing]


def push_layer(client, ref, scope, rlayer, what):
    """One layer to the registry unless it has it -> (digest, size, diff_id).  The gzip
    blob written for a layer is remembered beside it (pushed-blob: digest, size, diff_id,
    then where it went), so a push that finds it there compresses nothing."""
    record = os.path.join(os.path.dirname(rlayer), 'pushed-blob')
    lines = read_small(record, '').splitlines()
    known = lines[0].split() if lines else []
    if len(known) == 3 and is_decimal(known[1]):
        digest, size, diff_id = known[0], int(known[1]), known[2]
        if blob_exists(client, ref, scope, digest) or \
                mount_blob(client, ref, scope, digest, lines[1:]):
            say_progress('%s %s: the registry has it' % (what, digest[:19]))
            return digest, size, diff_id
    digest, size, diff_id = stream_layer(client, ref, scope, rlayer, what)
    where = '%s %s' % (ref.registry, ref.repository)
    write_small(record, '\n'.join(['%s %d %s' % (digest, size, diff_id)] + [
        l for l in lines[1:] if l != where][-20:] + [where]) + '\n')
    say_progress('%s %s: %s pushed' % (what, digest[:19], size_text(size)))
    return digest, size, diff_id


def stream_layer(client, ref, scope, rlayer, what):
    """Upload a layer as it is written (tar, gzip, chunked PATCH: no file in between, and
    both CPUs busy), then PUT its digest -> (digest, size, diff_id).  Cut off, it starts
    anew: a stream cannot be sent twice."""
    for attempt in range(REGISTRY_TRIES):
        location = start_upload(client, ref, scope)
        written = {}

        def fill(put):
            written['ids'] = write_layer(rlayer, put, True, 'push ' + what)
        try:
            response = client.request('PATCH', '', {'Content-Type': 'application/octet-stream',
                                                    'Transfer-Encoding': 'chunked'},
                                      from_thread(fill), ok=(202,), scope=scope,
                                      url=location, tries=1)
            drain(response)
            diff_id, digest, size = written['ids']
            location = client.absolute(response.getheader('Location') or location,
                                       client.scheme, client.registry)
            drain(client.request('PUT', '', None, None, ok=(201, 204), scope=scope, tries=1,
                                 url=location + ('&' if '?' in location else '?') +
                                 'digest=' + digest))
            return digest, size, diff_id
        except CockerError as e:
            if isinstance(e, RegistryFailure) or attempt + 1 == REGISTRY_TRIES:
                raise
            client.back_off(attempt, None)
    raise CockerError('%s could not be sent' % what)


def start_upload(client, ref, scope):
    """POST a new upload -> its absolute location."""
    response = client.request('POST', '/v2/%s/blobs/uploads/' % ref.repository, ok=(202,),
                              scope=scope)
    drain(response)
    return client.absolute(response.getheader('Location', ''), client.scheme, client.registry)


def say_progress(text):
    if not sys.stderr.isatty():
        sys.stderr.write('cocker: %s\n' % printable(text))


def blob_exists(client, ref, scope, digest):
    try:
        drain(client.request('HEAD', '/v2/%s/blobs/%s' % (ref.repository, digest),
                             scope=scope))
        return True
    except RegistryFailure as e:
        if e.http_status == 404:
            return False
        raise


def mount_blob(client, ref, scope, digest, pushed):
    """Mount the blob from another repository of this registry it was pushed to."""
    import urllib.parse
    for line in reversed(pushed):
        registry, _, repository = line.partition(' ')
        if registry == ref.registry and repository != ref.repository:
            response = client.request('POST', '/v2/%s/blobs/uploads/?%s' % (
                ref.repository, urllib.parse.urlencode({'mount': digest, 'from': repository})),
                ok=(201, 202), scope=scope + ' repository:%s:pull' % repository)
            drain(response)
            if response.status == 201:
                return True
            cancel = response.getheader('Location')
            if cancel:              # no mount: the upload it opened instead is let go
                try:
                    drain(client.request('DELETE', '', url=client.absolute(
                        cancel, client.scheme, client.registry), ok=(204, 404)))
                except CockerError:
                    pass
            return False
    return False


def push_blob(client, ref, scope, digest, body, size=None):
    """A blob into the repository unless it has it: POST an upload, PUT it whole; a try
    cut off (a reset, a registry restarted) starts a new upload, never resumes the old."""
    headers = {'Content-Type': 'application/octet-stream',
               'Content-Length': str(size if size is not None else len(body))}
    for attempt in range(REGISTRY_TRIES):
        if blob_exists(client, ref, scope, digest):
            return
        location = start_upload(client, ref, scope)
        location += ('&' if '?' in location else '?') + 'digest=' + digest
        rewind(body)
        try:
            drain(client.request('PUT', '', headers, body, ok=(201, 204), scope=scope,
                                 url=location, tries=1))
            return
        except CockerError as e:
            if isinstance(e, RegistryFailure) or attempt + 1 == REGISTRY_TRIES:
                raise
            client.back_off(attempt, body)


# ---- search and login ------------------------------------------------------------------

def registry_repositories(client, path):
    """Every repository of the registry under path (the catalog, page after page)."""
    found, target = [], '/v2/_catalog?n=1000'
    for _ in range(100):
        response = client.request('GET', target, scope='registry:catalog:*')
        link = response.getheader('Link', '')
        found += [str(r) for r in registry_json(response, 'catalog').get('repositories') or []]
        if 'rel="next"' not in link:
            break
        target = link.split(';')[0].strip('<> ')
    prefix = path + '/' if path else ''
    return [r for r in found if r.startswith(prefix)]


def registry_tags(client, repository):
    response = client.request('GET', '/v2/%s/tags/list?n=1000' % repository,
                              scope='repository:%s:pull' % repository)
    return [str(t) for t in registry_json(response, 'tag list').get('tags') or []]


def registry_json(response, what):
    """A JSON object the registry answered (4 MiB at most), or one clear error."""
    return parse_json(response.read(MANIFEST_MAX), 'the registry\'s %s' % what, dict)


# =============================================================================
# Files in containers
# =============================================================================
# Every path inside a container is resolved by a helper process that stands where the
# container's processes stand, with no more power than they have:
#   running: it is forked into the container's pid namespace, joins its cgroups, then its
#            IPC, UTS, network and mount namespaces (volumes included);
#   stopped: the root is mounted for the time of the command; the helper gets pid, mount,
#            network, IPC and UTS namespaces of its own and pivots into the root;
# then it confines itself with cockerinit's confine() (Podman's capabilities, the seccomp
# filter; no_new_privs where the container has it).  It has stdio of /dev/null (no terminal
# to push keys into), is not dumpable, loads no module once it has left the host (imports
# are shut off first) and never asks for a user or group name (owners go by number): an NSS
# module or a Python file planted in the container is never loaded, and would gain nothing.
# A symlink in the container, even one swapped while the copy runs, can only lead to
# another file of the container (Docker's CVE-2018-15664).  Nothing the helper opens can
# make it wait (regular files only, O_NONBLOCK, no FIFO or device followed or opened), and
# shutdown, kill and destroy interrupt a copy in progress rather than wait for it.  Files
# travel between the host and the helper as a tar stream on a pipe; what comes out of a
# container is unpacked on the host through the ArchiveGuard, like an image archive.

def in_container(name, work, host_side=None, keep=()):
    """Run work() in the confined helper while this process runs host_side(); raise the
    helper's error, if any.  The caller holds the container lock; `keep` are the
    descriptors the helper uses."""
    # everything the helper will run is loaded now, on the host
    import encodings.ascii, encodings.latin_1, encodings.utf_8, shutil, tarfile  # noqa: F401
    load_every_chapter()
    init = load_cockerinit()
    settings = {'last_cap': int(read_small('/proc/sys/kernel/cap_last_cap')),
                'cgroups': container_cgroups(name),
                'seccomp': read_attr(name, 'seccomp') != 'unconfined',
                'no_new_privs': read_attr(name, 'no_new_privs') == '1'}
    repair_if_dead(name)                # its old root must not lie under the new one
    running = is_running(name)
    if not running:
        mount_root(name, container_layers(name))
    try:
        with interruptible(name):
            error = run_helper(name, running, init, settings, work, host_side, keep)
    finally:
        if not running:
            unmount_root(name)
    if error is not None:
        raise error


def run_helper(name, running, init, settings, work, host_side, keep):
    """Fork the helper, run host_side(), wait for the helper: the error to raise, or None."""
    import signal
    proc = open_container_init(name) if running else None
    result_r, result_w = os.pipe()
    helper = None
    saved = dict((sig, signal.getsignal(sig)) for sig in (signal.SIGCHLD, signal.SIGALRM))
    try:
        cgroups = settings['cgroups'] if proc is not None else ()
        helper, born_in_cgroup2 = fork_in_pid_namespace(proc, cgroups)
        if helper == 0:
            os.close(result_r)
            if born_in_cgroup2:
                settings['cgroups'] = [d for d in settings['cgroups'] if not is_cgroup2(d)]
            helper_main(name, proc, init, settings, work, result_w, keep)   # never returns
        os.close(result_w)
        if proc is not None:
            os.close(proc)
            proc = None
        watch = stop_watch(helper)
        for sig in saved:               # at once, and every half second should one be missed
            signal.signal(sig, watch)
        signal.setitimer(signal.ITIMER_REAL, 0.5, 0.5)
        watch()
        host_error = None
        try:
            if host_side is not None:
                host_side()
        except Interrupted:
            raise
        except (OSError, CockerError) as e:
            host_error = e              # the helper's error, if any, is the cause
        with os.fdopen(result_r, 'rb') as f:
            message = f.read()
        _, status = os.waitpid(helper, 0)
        helper = None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if helper:                      # interrupted: the helper goes too
            os.kill(helper, SIGKILL)
            os.waitpid(helper, 0)
        if proc is not None:
            os.close(proc)
    if status != 0:
        return CockerError(message.decode('utf-8', 'replace') or 'the copy failed')
    return host_error


def helper_main(name, proc, init, settings, work, result_w, keep):
    """The helper process: enter, confine, work; never returns."""
    import signal
    global HOME
    status = 1
    try:
        prctl(PR_SET_DUMPABLE, 0)       # the container's processes see it: no ptrace, no fds
        os.setsid()                     # no controlling terminal to push keys into (TIOCSTI)
        devnull = os.open('/dev/null', os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        close_fds_except({0, 1, 2, result_w} | set(keep) | ({proc} if proc else set()))
        for sig in (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)  # SIGSTOP itself is noticed by run_helper
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # not the command's interruption handlers
        init.shut_off_imports()
        if proc is not None:
            join_container(proc, settings['cgroups'])
        else:
            enter_stopped_root(name, init)
        init.confine(settings['last_cap'], seccomp=settings['seccomp'])
        if settings['no_new_privs']:
            prctl(init.PR_SET_NO_NEW_PRIVS, 1)
        HOME = None                     # no log: a COCKER_HOME in here is the container's
        work()
        status = 0
    except BaseException as e:          # a fork child's boundary: never back into the CLI
        try:
            os.write(result_w, error_text(e).encode('utf-8', 'replace'))
        except OSError:
            pass
    os._exit(status)


def stop_watch(helper):
    """A signal handler that raises Interrupted, once, when the helper is found stopped: the
    container's processes may signal it (it is in their pid namespace), and one that stops
    it must not stall the command and the container lock."""
    raised = []

    def watch(signum=None, frame=None):
        try:
            info = os.waitid(os.P_PID, helper, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return                      # reaped already: it ended
        if info is not None and info.si_code == CLD_STOPPED and not raised:
            raised.append(True)
            os.kill(helper, SIGKILL)    # so that no write to it can block the cleanup
            raise Interrupted("interrupted: a process of the container stopped the copy "
                              "helper")
    return watch


def open_container_init(name, patience=5.0):
    """A descriptor of /proc/PID of the container's PID 1, checked to be the child of its
    live monitor, so that a pid recycled meanwhile is never entered, and to have entered
    the container root: one that the monitor has just started again is waited for, up to
    patience seconds."""
    deadline = time.time() + patience
    while True:
        pid, monitor = read_pid(name, 'init_pid'), read_pid(name)
        try:
            fd = os.open('/proc/%d' % (pid or 0), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise CockerError("container '%s' is not running" % name)
        fields = process_stat('stat', dir_fd=fd)    # the process this descriptor names
        if not fields or int(fields[1]) != monitor or not monitor_alive(name):
            os.close(fd)
            raise CockerError("container '%s' is not running" % name)
        if in_container_root(name, fd):
            return fd
        os.close(fd)
        if time.time() > deadline:
            raise CockerError("container '%s' is still starting" % name)
        time.sleep(0.01)


def in_container_root(name, proc):
    """Whether the PID 1 of /proc descriptor proc has entered the container root (the last
    of its mounts done): a PID 1 that the monitor has just started again, without the
    container lock, may still be in the host's tree or the template's."""
    try:
        there = os.stat('root', dir_fd=proc)
        here = os.stat(container_file(name, 'merged'))
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def join_container(proc, cgroups):
    """The container's cgroups (host paths: first), then its namespaces; root and working
    directory become the container's."""
    enter_cgroups(cgroups)
    namespaces = [(os.open('ns/' + ns, os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc), flag)
                  for ns, flag in (('ipc', CLONE_NEWIPC), ('uts', CLONE_NEWUTS),
                                   ('net', CLONE_NEWNET), ('mnt', CLONE_NEWNS))]
    for fd, flag in namespaces:
        setns(fd, flag)
        os.close(fd)
    os.close(proc)                      # a path through it would lead to the host's /proc
    os.chdir('/')


def enter_stopped_root(name, init):
    """Namespaces of our own, nothing of the host's network, and the container root (as
    cockerinit enters it: pivot_root, the old root detached; a chroot could be left)."""
    unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    mount(None, '/', None, MS_REC | MS_PRIVATE)
    init.enter_root(container_file(name, 'merged'))


class interruptible(object):
    """While a file action holds the container lock: its pid and start time in
    cp/file_action, and SIGTERM ends it, so that shutdown, kill and destroy never wait for a
    copy (one from a container that keeps writing could last forever)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        import signal

        def interrupted(signum, frame):
            # once: the stop command repeats its signal until it has the lock, and the
            # cleanup that follows must not be interrupted in turn
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Interrupted("interrupted: container '%s' is being stopped" % self.name)
        signal.signal(signal.SIGTERM, interrupted)
        write_attr(self.name, 'file_action', '%d %d' % (os.getpid(),
                                                       process_start_time(os.getpid())))
        return self

    def __exit__(self, *exc):
        import signal
        # a SIGTERM still on its way is no longer for us: the command ends, its cleanup
        # (the unmount of a stopped container's root) runs to the end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        write_attr(self.name, 'file_action', None)


def container_path_arg(path, what):
    if not path.startswith('/') or '\0' in path:
        raise usage_error("%s '%s' must be an absolute path in the container" % (what, path))
    return path


def parse_mapping(path):
    """rplfile's mapping file: 'KEY VALUE' per line, the value the rest of the line (it may
    hold blanks), bytes as they are (UTF-8 keys and values)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise CockerError("mapping file '%s': %s" % (path, e.strerror))
    pairs = []
    for number, line in enumerate(data.replace(b'\r', b'\n').split(b'\n'), 1):
        line = line.lstrip(b' \t')
        if not line:
            continue
        key = line.replace(b'\t', b' ').split(b' ', 1)[0]
        if len(key) == len(line):
            raise CockerError("mapping file '%s' line %d: a key without a value"
                              % (path, number))
        pairs.append((key, line[len(key):].lstrip(b' \t')))
    return pairs


def read_template(path):
    """In the container: a template's bytes and stat.  Opened so that it cannot make us
    wait or follow a link (O_NOFOLLOW, O_NONBLOCK), a regular file of RPLFILE_MAX at most."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = ' is a symbolic link' if e.errno == errno.ELOOP else ': ' + e.strerror
        raise CockerError("template '%s'%s" % (path, why))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CockerError("template '%s' is not a regular file" % path)
    with os.fdopen(fd, 'rb') as f:
        data = f.read(RPLFILE_MAX + 1)
    if len(data) > RPLFILE_MAX:
        raise CockerError("template '%s' is larger than %d MiB" % (path, RPLFILE_MAX >> 20))
    return data, st


def replace_in_file(template, instance, pairs):
    """In the container: apply the pairs in order to the template and write the instance
    whole (no old tail), atomically, keeping its mode and owner (a new one: the template's)."""
    text, st = read_template(template)
    for key, value in pairs:
        text = text.replace(key, value)
    if os.path.exists(instance):            # (through a link, inside the container)
        st = os.stat(instance)
    tmp = '%s.cocker%d' % (instance, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with Rollback(remove_file, tmp):
        with os.fdopen(fd, 'wb') as f:
            f.write(text)
            f.flush()
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.rename(tmp, instance)


def instantiate_template(name, template, instance, mapping_file):
    """rplfile: the template with the KEY VALUE pairs of a host file, as the instance."""
    container_path_arg(template, '--template-file')
    container_path_arg(instance, '--instance-file')
    pairs = parse_mapping(mapping_file)
    with locked('container', name):
        in_container(name, lambda: replace_in_file(template, instance, pairs))


def landing(destination, source_name, is_directory):
    """(directory, name) a copy lands as: into DEST when it ends in '/' or is a directory,
    else as DEST itself."""
    if destination.endswith('/') or is_directory(destination):
        return destination, source_name
    return os.path.dirname(destination) or '.', os.path.basename(destination)


def host_directory(path):
    """Is a host destination a real directory?  A link to one is refused unless the operator
    writes DEST/: it may be a link a former copy brought from a container."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) and os.path.isdir(path):
        raise CockerError("'%s' is a symbolic link to a directory: give '%s/' to copy into it"
                          % (path, path))
    return stat.S_ISDIR(st.st_mode)


# ---- tar streams between the host and a helper -----------------------------------------
# Both ends work by descriptors only: the packer opens each directory O_NOFOLLOW from its
# parent's descriptor and each file O_NOFOLLOW|O_NONBLOCK, the unpacker creates every entry
# O_EXCL below directories it opened the same way, in a new hidden directory, and merges it
# into place.  Whichever end a container can write to (a volume as source or destination),
# swapping a directory for a link mid-copy makes the copy fail; it never leads elsewhere.

def pack_tree(path, arcname, fd):
    """Write path (a file or a whole tree; links as links, hard links kept) to fd as a tar
    stream.  Owners go by number: no user or group name is looked up (in a container that
    would load its NSS modules)."""
    import tarfile
    path = os.path.normpath(path)
    parent = os.open(os.path.dirname(path) or '.', os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    seen = {}                           # (device, inode) -> name, for hard links
    try:
        with os.fdopen(fd, 'wb') as out:
            with tarfile.open(fileobj=out, mode='w|', format=tarfile.PAX_FORMAT) as t:
                for directory, entry, name, st in walk_tree(parent, os.path.basename(path),
                                                            arcname):
                    add_member(t, directory, entry, name, st, seen)
    finally:
        os.close(parent)


def walk_tree(parent, entry, name):
    """(directory descriptor, entry, name in the archive, lstat) of entry and all below it."""
    st = os.stat(entry, dir_fd=parent, follow_symlinks=False)
    yield parent, entry, name, st
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(entry, DIRECTORY_FLAGS, dir_fd=parent)
        try:
            if not os.path.samestat(os.fstat(fd), st):
                raise CockerError("'%s' changed while it was copied" % name)
            for child in sorted(os.listdir(fd)):
                for item in walk_tree(fd, child, name + '/' + child):
                    yield item
        finally:
            os.close(fd)


def add_member(t, directory, entry, name, st, seen, xattrs=()):
    """One file into the archive, its data read through a descriptor of that very file;
    the xattrs named (patterns as LAYER_XATTRS) of files and directories as PAX records."""
    import tarfile
    info = tarfile.TarInfo(name)
    if xattrs and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        info.pax_headers = xattr_records(directory, entry, st, xattrs)
    info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    mode, key = st.st_mode, (st.st_dev, st.st_ino)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in seen:
        info.type, info.linkname = tarfile.LNKTYPE, seen[key]
    elif stat.S_ISREG(mode):
        seen[key] = name
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=directory)
        with os.fdopen(fd, 'rb') as f:
            now = os.fstat(fd)
            if not os.path.samestat(now, st) or not stat.S_ISREG(now.st_mode):
                raise CockerError("'%s' changed while it was copied" % name)
            info.type, info.size = tarfile.REGTYPE, now.st_size
            t.addfile(info, f)
        return
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry, dir_fd=directory)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return                          # a socket: tar cannot hold it
    t.addfile(info)


def xattr_records(directory, entry, st, patterns):
    """{'SCHILY.xattr.KEY': value} of the file's xattrs that match patterns ('user.*',
    'security.capability'), as GNU tar writes them; read through a descriptor of it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(entry, flags | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0),
                 dir_fd=directory)
    try:
        if not os.path.samestat(os.fstat(fd), st):
            raise CockerError("'%s' changed while it was copied" % entry)
        records = {}
        for key in os.listxattr(fd):
            if any(key == p or (p.endswith('*') and key.startswith(p[:-1])) for p in patterns):
                # bytes kept as they are: tarfile writes surrogates back as the bytes
                records['SCHILY.xattr.' + key] = os.getxattr(fd, key).decode(
                    'utf-8', 'surrogateescape')
        return records
    finally:
        os.close(fd)


class GuardedStream(object):
    """A file object for tarfile of what read() delivers and the ArchiveGuard passes."""

    def __init__(self, read, progress):
        self.raw, self.progress = read, progress
        self.guard, self.buf, self.ended = ArchiveGuard(), b'', False

    def read(self, n):
        while len(self.buf) < n and not self.ended:
            chunk = self.raw(CHUNK)
            self.progress.add(len(chunk))
            if chunk:
                self.buf += self.guard.feed(chunk)
            else:
                self.guard.finish()
                self.ended = True
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def drain(self):
        """Read to the end (the writer pads the archive), checking all of it."""
        while not self.ended:
            self.buf = b''
            self.read(CHUNK)


def unpack_tree(read, directory, arcname, name, on_host):
    """Extract a stream of pack_tree (top member arcname) into a new hidden directory of
    `directory`, then merge it into directory/name.  On the host (what a container hands
    out) setuid and setgid bits are cleared; device nodes are never made."""
    import shutil
    top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    hidden = '.cocker-copy.%d.%s' % (os.getpid(), os.urandom(4).hex())
    os.mkdir(hidden, 0o700, dir_fd=top)
    try:
        staging = os.open(hidden, DIRECTORY_FLAGS, dir_fd=top)
        try:
            extract_stream(read, staging, on_host)
            move_into_place(staging, arcname, top, name)
        finally:
            os.close(staging)
    finally:
        os.close(top)
        shutil.rmtree(os.path.join(directory, hidden), ignore_errors=True)


def extract_stream(read, root, on_host):
    """Every member created O_EXCL below directories opened O_NOFOLLOW from root: nothing is
    opened or followed that the stream did not make, whatever else changes meanwhile."""
    import tarfile
    stream = GuardedStream(read, Progress('getfile' if on_host else 'putfile'))
    directories = []
    with tarfile.open(fileobj=stream, mode='r|') as t:
        for member in t:
            parts = [p for p in member.name.split('/') if p not in ('', '.')]
            parent = open_below(root, parts[:-1])
            try:
                make_member(t, member, parent, parts[-1], root, on_host)
            finally:
                os.close(parent)
            if member.isdir():
                directories.append((parts, member))
    stream.drain()
    stream.progress.finish()
    for parts, member in reversed(directories):    # after what they hold, as tar does
        fd = open_below(root, parts)
        try:
            set_attributes(fd, member, on_host)
        finally:
            os.close(fd)


def open_below(root, parts):
    """A descriptor of root/parts, every component a real directory (O_NOFOLLOW)."""
    fd = os.dup(root)
    for part in parts:
        try:
            inner = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = inner
    return fd


def make_member(t, member, parent, leaf, root, on_host):
    import shutil
    if member.isdir():
        os.mkdir(leaf, 0o700, dir_fd=parent)            # its attributes come at the end
    elif member.isreg():
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        with os.fdopen(fd, 'wb') as out:
            shutil.copyfileobj(t.extractfile(member), out)
            out.flush()
            set_attributes(fd, member, on_host)
    elif member.issym():
        os.symlink(member.linkname, leaf, dir_fd=parent)
        os.chown(leaf, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
    elif member.islnk():
        parts = [p for p in member.linkname.split('/') if p not in ('', '.')]
        source = open_below(root, parts[:-1])
        try:
            os.link(parts[-1], leaf, src_dir_fd=source, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(source)
    elif member.isfifo():
        os.mkfifo(leaf, 0o600, dir_fd=parent)
        fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent)
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                set_attributes(fd, member, on_host)
        finally:
            os.close(fd)
    elif not on_host:
        raise CockerError("'%s' is a device node: a container cannot have it" % member.name)
    # device nodes from a container (whiteouts, the guard skipped the rest): not made


def set_attributes(fd, member, on_host):
    """Owner, mode and time through the descriptor; no setuid or setgid from a container."""
    os.fchown(fd, member.uid, member.gid)
    os.fchmod(fd, member.mode & (0o1777 if on_host else 0o7777))
    os.utime(fd, (member.mtime, member.mtime))


def move_into_place(source, name, target, target_name):
    """Rename source/name (directory descriptors) to target/target_name.  Where both are
    directories, merge: each entry of the new one goes in by the same rule; anything else
    in the way (a file, a link) is replaced, never followed; a directory where a file
    comes is an error."""
    new = os.stat(name, dir_fd=source, follow_symlinks=False)
    try:
        old = os.stat(target_name, dir_fd=target, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        if not stat.S_ISDIR(new.st_mode):
            raise CockerError("'%s' is a directory" % target_name)
        inner_source = os.open(name, DIRECTORY_FLAGS, dir_fd=source)
        try:
            inner_target = os.open(target_name, DIRECTORY_FLAGS, dir_fd=target)
            try:
                for entry in os.listdir(inner_source):
                    move_into_place(inner_source, entry, inner_target, entry)
                os.fchown(inner_target, new.st_uid, new.st_gid)   # as tar sets a directory
                os.fchmod(inner_target, stat.S_IMODE(new.st_mode))
                os.utime(inner_target, ns=(new.st_atime_ns, new.st_mtime_ns))
            finally:
                os.close(inner_target)
        finally:
            os.close(inner_source)
        return
    if old is not None and stat.S_ISDIR(new.st_mode):
        os.unlink(target_name, dir_fd=target)   # a directory cannot be renamed over a file
    os.rename(name, target_name, src_dir_fd=source, dst_dir_fd=target)


def put_file(name, source, destination):
    """Copy a host file or directory into a container (running or stopped)."""
    container_path_arg(destination, '--dst-file')
    if not os.path.lexists(source):
        raise CockerError("src file '%s' not found" % source)
    arcname = os.path.basename(os.path.normpath(source))
    data_r, data_w = os.pipe()

    def receive():                      # in the container
        os.close(data_w)
        directory, final = landing(destination, arcname, os.path.isdir)
        if not os.path.isdir(directory):
            raise CockerError("'%s' is not a directory in the container" % directory)
        with os.fdopen(data_r, 'rb') as stream:
            unpack_tree(stream.read, directory, arcname, final, on_host=False)

    def send():                         # on the host
        os.close(data_r)
        try:
            pack_tree(source, arcname, data_w)
        except BrokenPipeError:
            pass                        # the helper stopped: its error says why
    with locked('container', name):
        in_container(name, receive, send, keep=(data_r, data_w))


def get_file(name, source, destination):
    """Copy a file or directory of a container (running or stopped) to the host."""
    container_path_arg(source, '--src-file')
    directory, final = landing(destination, os.path.basename(os.path.normpath(source)),
                               host_directory)
    if not os.path.isdir(directory):
        raise CockerError("'%s' is not a directory" % directory)
    data_r, data_w = os.pipe()

    def send():                         # in the container
        os.close(data_r)
        if not os.path.lexists(source):
            raise CockerError("src file '%s' not found in the container" % source)
        pack_tree(source, final, data_w)

    def receive():                      # on the host: what a container hands out is untrusted
        os.close(data_w)
        with os.fdopen(data_r, 'rb') as stream:
            unpack_tree(stream.read, directory, final, final, on_host=True)
    with locked('container', name):
        in_container(name, send, receive, keep=(data_r, data_w))


# =============================================================================
# Test image
# =============================================================================
# -a install_test: a small image made of this host's own binaries and the libraries ldd
# finds for them, like shbin/cocker_install_test.sh of the C cocker.

def install_test_image(version, force):
    check_name('version', version)
    with locked('image', 'test'):
        final = image_dir('test', version)
        if os.path.exists(final) and not force:
            raise CockerError("image '%s' exist (add -f to rebuild it)"
                              % image_ref_text('test', version))
        users = running_users('test', version) if os.path.exists(final) else []
        if users:
            raise CockerError("image '%s' is used by running container(s) %s"
                              % (image_ref_text('test', version), ', '.join(users)))
        with building_image('test', version, replace=True) as rlayer:
            build_test_rootfs(rlayer)


TEST_BINARIES = (
    'bash tty which locale env ls cat echo cp mv rm pwd mkdir rmdir clear ps grep more id '
    'uname hostname vi vim awk sed tr file ldd top netstat ping telnet ssh nc mount umount '
    'sh sleep true false head tail wc kill sort uniq touch chmod chown ln xargs date dd '
    'readlink stat find less du df cut tee expr basename dirname seq test yes printf nohup '
    'timeout md5sum sha256sum diff tar gzip free pkill pgrep uptime whoami stty tput reset').split()
TEST_SBINARIES = 'ifconfig route ip iptables'.split()
SEARCH_PATH = ('/usr/local/bin', '/usr/bin', '/bin', '/usr/sbin', '/sbin')
TEST_PROFILE = ('set -o vi\nexport PATH=.:/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin\n'
                'export TERM=${TERM:-xterm}\necho "--- Welcome to cocker contrainer ---"\necho ""\n')
TEST_ROOT_PROFILE = (
    'export PATH=.:/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin\n'
    "alias l='ls -l'\nalias ll='ls -lF'\nalias lf='ls -F'\nalias lrt='ls -lrt'\n"
    "alias rm='rm -i'\nalias mv='mv -i'\nalias cp='cp -i'\nalias view='vi -R'\n"
    "set -o vi\nPS1='[\\u@\\h $PWD] '\n")


def find_binary(name):
    for d in SEARCH_PATH:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def copy_with_libraries(binaries, root):
    """Copy each (host path, image path) and every library ldd lists, keeping host paths.
    Contents and modes only: a host file capability (ping's cap_net_raw) would make the
    program refuse to start in a container that has no such capability."""
    import shutil
    needed = set()
    for src, dst in binaries:
        target = os.path.join(root, dst.lstrip('/'))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(os.path.realpath(src), target)
        out = run(['ldd', src], check=False)
        for line in out.splitlines():
            for word in line.split():
                if word.startswith('/') and '(' not in word:
                    needed.add(word)
    for lib in sorted(needed):
        target = os.path.join(root, lib.lstrip('/'))
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(os.path.realpath(lib), target)


def build_test_rootfs(root):
    """Fill an empty directory with the test image's files."""
    for d in ('bin', 'sbin', 'etc', 'root', 'dev', 'proc', 'sys', 'mnt/cdrom', 'var/log',
              'tmp', 'usr/local/bin', 'usr/share'):
        os.makedirs(os.path.join(root, d), 0o755, exist_ok=True)
    os.chmod(os.path.join(root, 'tmp'), 0o1777)
    os.chmod(os.path.join(root, 'root'), 0o700)
    for d in ('usr/bin', 'usr/sbin'):
        os.symlink('../' + d.split('/')[1], os.path.join(root, d))
    binaries = []
    for names, sub in ((TEST_BINARIES, 'bin'), (TEST_SBINARIES, 'sbin')):
        for n in names:
            p = find_binary(n)
            if p:
                binaries.append((p, '/%s/%s' % (sub, n)))
    copy_with_libraries(binaries, root)
    for src in ('/usr/share/terminfo', '/lib/terminfo'):
        dst = os.path.join(root, src.lstrip('/'))
        if os.path.isdir(src) and not os.path.exists(dst):
            import shutil
            shutil.copytree(src, dst, symlinks=True)
    files = {
        'etc/passwd': 'root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/:/bin/false\n',
        'etc/group': 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n',
        'etc/profile': TEST_PROFILE,
        'etc/hosts': '127.0.0.1 localhost\n',
        'root/.profile': TEST_ROOT_PROFILE,
        'root/tpl.txt': '{ "leaf":"${LEAF}" }\n',
    }
    for path, text in files.items():
        with open(os.path.join(root, path), 'w') as f:
            f.write(text)


# =============================================================================
# Actions
# =============================================================================
# One function per -a word.  Each returns the exit status; failures raise CockerError.

def action_install_test(options):
    """Build the test image 'test' from this host's binaries."""
    install_test_image(options.version or NO_VERSION, options.force)
    return ok()


def action_create(options):
    """Create a container from one or more stacked images (first is lowest); with --rm, a
    one-shot run of -e's command (its exit status is ours)."""
    refs = split_list(options.image)
    with locked_images(*[parse_image_ref(ref)[0] for ref in refs], shared=True):
        resolved = [resolve_image(ref) for ref in refs]     # no image goes while we use it
        if options.rm:
            return one_shot(options, layers_text(resolved), resolved[-1][0])
        name = options.container or resolved[-1][0]
        booted = make_container(options, name, layers_text(resolved))
    return after_boot(name, options) if booted else ok()


def after_boot(name, options):
    return attach_container(name) if options.attach else ok()


def action_boot(options):
    """Start a stopped container."""
    name = require_container(options.container)
    boot_stopped(name, options)
    return after_boot(name, options)


def action_attach(options):
    """Open a login shell in a running container."""
    return attach_container(require_container(options.container))


def action_run(options):
    """Run a command in a running container; exit with its status."""
    return run_in_container(require_container(options.container), options.cmd,
                            options.interactive, options.user, options.workdir, options.env,
                            options.attach)


def action_shutdown(options):
    """Stop a container: SIGTERM to every process, SIGKILL after a grace period."""
    stop_locked(require_container(options.container), SIGTERM, options.force)
    return ok()


def action_kill(options):
    """Kill a container at once."""
    stop_locked(require_container(options.container), SIGKILL, options.force)
    return ok()


def action_destroy(options):
    """Remove a stopped container and everything it wrote (-h stops it first)."""
    destroy_container(require_container(options.container), options.shutdown, options.force)
    return ok()


def action_volume(options):
    """Replace the volume list of a stopped container."""
    change_stopped_container(require_container(options.container), 'volume',
                             volume_lines(options.volumes), 'volumes can be changed on')
    return ok()


def action_vip(options):
    """Change the VIP of a stopped container (used from its next boot)."""
    change_vip(require_container(options.container), parse_ipv4(options.vip, '--vip'))
    return ok()


def action_update(options):
    """Change the restart policy and autostart of a stopped container."""
    name = require_container(options.container)
    with locked('container', name):
        repair_if_dead(name)
        require_stopped(name, 'update changes only')
        record_production_options(name, options)
    return ok()


def action_autostart(options):
    """At host boot: boot the containers marked for autostart, by priority."""
    return EXIT_FAILED if boot_marked_containers() else EXIT_OK


def action_shutdown_all(options):
    """Before the host halts: shut every running container down."""
    return EXIT_FAILED if shutdown_every_container() else EXIT_OK


def action_port_mapping(options):
    """Change the port mappings of a stopped container (used from its next boot)."""
    change_stopped_container(require_container(options.container), 'port_mapping',
                             options.port_mapping, 'port mappings can be changed on')
    return ok()


def action_del_bridge(options):
    """Remove the bridge and cocker's iptables chains (no BRIDGE container may run)."""
    delete_bridge(network_config())
    return ok()


# ---- images ----------------------------------------------------------------------------

def action_version(options):
    """Rename an image version (no --version: to '_'); -f takes its containers along."""
    rename_version(require_image(options.image), options.version or NO_VERSION,
                   options.force)
    return ok()


def action_copy_image(options):
    """Copy an image version, everything kept (owners, xattrs, whiteouts, hard links)."""
    copy_image(require_image(options.from_image), image_or_unversioned(options.to_image))
    return ok()


def action_del_image(options):
    """Delete an image version; refused while a container uses it, unless -f."""
    delete_image(require_image(options.image), options.force)
    return ok()


def action_to_image(options):
    """A stopped container's own layer (its changes, whiteouts included) becomes an image;
    the container is used up, as with the C cocker."""
    cname = require_container(options.from_container)
    name, given = parse_image_ref(options.to_image)
    container_to_image(cname, name, options.version or given or read_attr(cname, 'version')
                       or NO_VERSION)
    return ok()


def action_to_container(options):
    """An image becomes a container whose own layer is the image's content (over the -m
    base images, if any), to be edited and made an image again; the image is used up."""
    base = layers_text([resolve_image(ref) for ref in split_list(options.image or '')])
    image_to_container(resolve_image(options.from_image), options, base)
    return ok()


def action_export(options):
    """Write IMAGE[:VERSION].cockerimage (and its .sha256) in the current directory."""
    export_image(require_image(options.image), options.format)
    return ok()


def action_import(options):
    """Read an image archive; its name and version come from the file name, or from -m."""
    import_file(options.image_file, options.image, options.force, options.platform)
    return ok()


def action_repo_server(options):
    """Serve cocker's own image repository (the OCI Distribution API) in the foreground."""
    serve_registry(options)
    return EXIT_OK


def action_repo_user_add(options):
    """Add a user of the repository, or change one's password and rights."""
    user = check_user_name(options.user)
    rights = check_rights(options.rights or 'pull')
    path = auth_file(options)
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    password = read_password('password for %s: ' % user)
    with locked('registry', 'users'):
        users = read_users(path)
        users[user] = (rights, password_hash(password))
        write_users(path, users)
    return ok()


def action_repo_user_del(options):
    """Remove a user of the repository."""
    user = check_user_name(options.user)
    path = auth_file(options)
    with locked('registry', 'users'):
        users = read_users(path)
        if users.pop(user, None) is None:
            raise CockerError("user '%s' not found in %s" % (user, path))
        write_users(path, users)
    return ok()


def action_repo_gc(options):
    """Remove the repository's blobs that no manifest needs (and uploads of an hour ago)."""
    removed, freed = RegistryStore(registry_dir(options)).collect_garbage(3600)
    say('removed %d blobs, %s' % (removed, size_text(freed)))
    return EXIT_OK


def action_push(options):
    """Push an image to a registry (--repo HOST[:PORT][/PATH]) as PATH/NAME:VERSION."""
    registry_push(options)
    return ok()


def action_pull(options):
    """Pull an image from a registry into the local image NAME, version TAG."""
    registry_pull(options)
    return ok()


def action_login(options):
    """Check and keep (HOME/auth.json, 0600) the credentials of a registry."""
    registry, _ = remembered_repo(options.repo)
    user = check_user_name(options.user)
    credentials = (user, read_password('password for %s at %s: ' % (user, registry)))
    client = RegistryClient(registry, options.insecure, options.ca_file, credentials)
    try:
        drain(client.request('GET', '/v2/', scope='registry:catalog:*'))
    finally:
        client.close()
    save_credentials(registry, *credentials)
    return ok()


def action_logout(options):
    """Forget the credentials -a login kept for a registry."""
    save_credentials(remembered_repo(options.repo)[0], None, None)
    return ok()


def action_spush(options):
    """Upload an image archive (and its sha256) to the repository."""
    push_image(require_image(options.image), repository(options.srepo), options.force)
    return ok()


def action_spull(options):
    """Download an image archive from the repository and import it (sha256 checked)."""
    pull_image(image_or_unversioned(options.image), repository(options.srepo), options.force)
    return ok()


def action_rplfile(options):
    """Instantiate a template in the container with the KEY VALUE pairs of a host file."""
    instantiate_template(require_container(options.container), options.template_file,
                         options.instance_file or options.template_file, options.mapping_file)
    return ok()


def action_putfile(options):
    """Copy a host file or directory into a container (running or stopped)."""
    put_file(require_container(options.container), options.src_file, options.dst_file)
    return ok()


def action_getfile(options):
    """Copy a file or directory of a container (running or stopped) to the host."""
    get_file(require_container(options.container), options.src_file, options.dst_file)
    return ok()


ACTIONS = {
    'install_test': action_install_test,
    'create': action_create,
    'boot': action_boot,
    'attach': action_attach,
    'run': action_run,
    'shutdown': action_shutdown,
    'kill': action_kill,
    'destroy': action_destroy,
    'volume': action_volume,
    'vip': action_vip,
    'port_mapping': action_port_mapping,
    'del_bridge': action_del_bridge,
    'update': action_update,
    'autostart': action_autostart,
    'shutdown_all': action_shutdown_all,
    'version': action_version,
    'copy_image': action_copy_image,
    'del_image': action_del_image,
    'to_image': action_to_image,
    'to_container': action_to_container,
    'export': action_export,
    'import': action_import,
    'repo_server': action_repo_server,
    'repo_user_add': action_repo_user_add,
    'repo_user_del': action_repo_user_del,
    'repo_gc': action_repo_gc,
    'push': action_push,
    'pull': action_pull,
    'login': action_login,
    'logout': action_logout,
    'spush': action_spush,
    'spull': action_spull,
    'rplfile': action_rplfile,
    'putfile': action_putfile,
    'getfile': action_getfile,
}


# =============================================================================
# Listings
# =============================================================================
# The columns and widths of the C cocker: runbooks parse them.

def print_listing(options, records, header, rule_width, row):
    """A listing: with --format json a JSON array of its records (sizes in bytes, times in
    ISO 8601, UTC), else the C cocker's table of row(record) lines -> EXIT_OK."""
    if options.format == 'json':
        import json
        say(json.dumps([dict((k, iso_time(v) if k in ('modified', 'started') and
                              isinstance(v, float) else v) for k, v in r.items() if k != 'text')
                        for r in records], indent=1, sort_keys=True))
    else:
        print_table(header, rule_width, [row(r) for r in records])
    return EXIT_OK


def local_time(stamp):
    """A time as the C cocker's listings show it (local, to the second)."""
    return time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(stamp))


def iso_time(stamp):
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(stamp))


def print_table(header, rule_width, rows):
    """A header, a rule of dashes and the rows, as the C cocker prints them; nothing at all
    when there is no row."""
    if rows:
        say(header)
        say('-' * rule_width)
        for row in rows:
            say(row)


def show_images(options):
    """List images and their versions."""
    records = []
    try:
        names = sorted(n for n in os.listdir(images_dir()) if not n.startswith('.'))
    except FileNotFoundError:
        names = []
    for name in names:
        versions = image_versions(name)
        versions.sort(key=lambda v: (version_key(v) is not None, version_key(v) or (), v))
        for version in versions:
            records.append({
                'name': name, 'version': version,
                'modified': os.stat(image_dir(name, version)).st_mtime,
                'size': sum(tree_size(rlayer) for rlayer in image_rlayers(name, version,
                                                                           real=True)),
                'layers': image_layer_ids(name, version)})
    return print_listing(options, records, '%-30s %-10s %-19s %-10s' % (
        'image_id', 'version', 'modify_datetime', 'size'), 68, lambda r: '%-30s %-10s %-19s %s'
        % (r['name'], r['version'], local_time(r['modified']), size_text(r['size'])))


def show_containers(options):
    """List containers with their status: RUNNING(pid) or STOPED."""
    records = [container_record(name) for name in list_containers()]
    return print_listing(options, records, '%-20s %-20s %-10s %-10s %-16s %-10s %s' % (
        'container_id', 'image', 'hostname', 'net', 'netns', 'size', 'status'), 107,
        lambda r: '%-20s %-20s %-10s %-10s %-16s %-10s %s' % (
            r['name'], r['image'], r['hostname'], r['net'], r['netns'], size_text(r['size']),
            'RUNNING(%s)' % (r['pid'] or '') if r['state'] == 'running' else 'STOPED'))


def container_record(name):
    """What -s containers says of a container (a dead one repaired on the way, when its
    lock is free)."""
    status = container_status(name)
    if status == 'DEAD':
        with locked('container', name, wait=False) as held:
            if held:
                try:
                    repair_if_dead(name)
                except (OSError, CockerError) as e:
                    log('ERROR', 'repair of %s: %s' % (name, error_text(e)))
        status = container_status(name)
    running = status == 'RUNNING'
    return {'name': name, 'image': read_attr(name, 'image', ''),
            'hostname': read_attr(name, 'hostname', ''), 'net': read_attr(name, 'net', ''),
            'netns': read_attr(name, 'netns', ''),
            'size': tree_size(container_file(name, 'rwlayer')),
            'state': 'running' if running else 'stopped',
            'pid': number_attr(name, 'pid') if running else None}


def number_attr(name, key):
    return parse_int(read_attr(name, key))


def parse_int(text):
    """An integer written as one (an optional '-', ASCII digits), else None."""
    if text is None:
        return None
    digits = text[1:] if text.startswith('-') else text
    return int(text) if is_decimal(digits) else None


def show_container_limits(options):
    """Recorded limits of one container (-c) or all, with memory and process use when running."""
    records = []
    for name in [require_container(options.container)] if options.container else list_containers():
        record = limits_record(name)
        memory = pids = None
        if container_status(name) == 'RUNNING':
            memory, pids = cgroup_usage(name)
        record.update(name=name, mem_usage=memory, pids=pids)
        records.append(record)
    return print_listing(options, records, '%-20s %-10s %-10s %-10s %-10s %-10s %s' % (
        'container_id', 'cpus', 'cpu_quota', 'mem_limit', 'pids_limit', 'mem_usage', 'pids'),
        84, lambda r: '%-20s %-10s %-10s %-10s %-10s %-10s %s' % tuple(
            [r['name']] + [r['text'][key] for _, key in LIMITS] +
            [size_text(r['mem_usage']) if r['mem_usage'] is not None else '-',
             r['pids'] if r['pids'] is not None else '-']))


def limits_record(name):
    """The recorded limits, for JSON (cpus a list, cpu_quota a percentage, mem_limit in
    bytes, pids_limit a number or null), and as the table shows them ('text', not in JSON)."""
    text = dict((key, read_attr(name, key) or '-') for _, key in LIMITS)
    text['pids_limit'] = pids_limit_text(name)
    record = {'pids_limit': int(text['pids_limit']) if is_decimal(text['pids_limit']) else None,
              'text': text}
    for key, parse in (('cpus', parse_cpu_list), ('cpu_quota', parse_cpu_quota),
                       ('mem_limit', parse_size)):
        try:
            record[key] = parse(read_attr(name, key)) if read_attr(name, key) else None
        except (ValueError, CockerError):
            record[key] = None          # (a value this host no longer takes: shown as text)
    return record


STATS_INTERVAL = 0.5                    #: seconds -s stats measures CPU use over


def show_stats(options):
    """CPU use (percent of one CPU over STATS_INTERVAL), memory, processes and block I/O of
    the running containers (-c: of one)."""
    names = [require_container(options.container)] if options.container else \
        [n for n in list_containers() if container_status(n) == 'RUNNING']
    before = dict((n, (time.time(), cgroup_counters(n)[0])) for n in names)
    time.sleep(STATS_INTERVAL if names else 0)
    records = []
    for name in names:
        cpu, read, written = cgroup_counters(name)
        memory, pids = cgroup_usage(name)
        then, cpu_then = before[name]
        percent = None if cpu is None or cpu_then is None else \
            round(max(cpu - cpu_then, 0) / 1e9 / max(time.time() - then, 1e-6) * 100, 1)
        records.append({'name': name, 'cpu_percent': percent, 'mem_usage': memory,
                        'mem_limit': limits_record(name)['mem_limit'], 'pids': pids,
                        'block_read': read, 'block_write': written})
    dash = lambda value, show=str: '-' if value is None else show(value)
    return print_listing(options, records, '%-20s %-8s %-10s %-10s %-6s %-10s %s' % (
        'container_id', 'cpu%', 'mem_usage', 'mem_limit', 'pids', 'blk_read', 'blk_write'),
        80, lambda r: '%-20s %-8s %-10s %-10s %-6s %-10s %s' % (
            r['name'], dash(r['cpu_percent'], lambda v: '%.1f%%' % v),
            dash(r['mem_usage'], size_text), dash(r['mem_limit'], size_text), dash(r['pids']),
            dash(r['block_read'], size_text), dash(r['block_write'], size_text)))


def show_image_info(options):
    """What an image is: where it came from, its layers (how many images share each) and
    the config it runs with."""
    import json
    name, version = require_image(options.image)
    say('image: %s' % image_ref_text(name, version))
    say('origin: %s' % (read_small(os.path.join(image_dir(name, version), 'origin'))
                        or 'cockerimage or built here'))
    base = read_small(os.path.join(image_dir(name, version), 'base'))
    if base:
        say('built on: %s' % printable(base))
    sharing = layer_users()
    for diff_id in image_layer_ids(name, version):
        say('layer: %s %s, in %d image(s)' % (
            diff_id, size_text(tree_size(os.path.join(layer_dir(diff_id), 'rlayer'))),
            sharing.get(diff_id, 0)))
    say('layer: own %s' % size_text(tree_size(os.path.join(image_dir(name, version),
                                                           'rlayer'))))
    config = image_config(name, version) or {}
    for key in ('Entrypoint', 'Cmd', 'Env', 'WorkingDir', 'User', 'ExposedPorts',
                'StopSignal', 'Labels'):
        if config.get(key):
            say('%s: %s' % (key, json.dumps(config[key], sort_keys=True)))
    return EXIT_OK


def layer_users():
    """{diff_id: number of image versions listing it}."""
    counts = {}
    for name in image_names():
        for version in image_versions(name):
            for diff_id in image_layer_ids(name, version):
                counts[diff_id] = counts.get(diff_id, 0) + 1
    return counts


def show_repo_users(options):
    """The users of the repository and their rights."""
    records = [{'user': user, 'rights': rights} for user, (rights, _) in
               sorted(read_users(auth_file(options)).items())]
    return print_listing(options, records, '%-32s %s' % ('user', 'rights'), 40,
                         lambda r: '%-32s %s' % (r['user'], r['rights']))


def show_search(options):
    """The repositories and tags of a registry (--match: those whose name contains it)."""
    registry, path = remembered_repo(options.repo)
    client = RegistryClient(registry, options.insecure, options.ca_file)
    try:
        records = []
        for repository in registry_repositories(client, path):
            short = repository[len(path) + 1:] if path else repository
            if options.match and options.match not in short:
                continue
            records += [{'repository': short, 'tag': tag}
                        for tag in registry_tags(client, repository)]
    finally:
        client.close()
    return print_listing(options, records, '%-45s %s' % ('repository', 'tag'), 70,
                         lambda r: '%-45s %s' % (r['repository'], r['tag']))


def show_inspect(options):
    """Everything known about one container, as one JSON object."""
    import json
    say(json.dumps(inspect_record(require_container(options.container)), indent=1,
                   sort_keys=True))
    return EXIT_OK


def inspect_record(name):
    """-s inspect's object (its keys documented in the man page, never renamed)."""
    record = container_record(name)
    running = record['state'] == 'running'
    try:
        policy, most = parse_restart(read_attr(name, 'restart') or 'no')
    except CockerError:
        policy, most = None, None       # (a value no cocker wrote)
    try:
        layers = [os.path.realpath(os.path.join(HOME, p)) for p in container_layers(name)]
    except CockerError:
        layers = None                   # an image of it is gone (del_image -f)
    started = os.path.getmtime(container_file(name, 'init_pid')) if running and \
        os.path.exists(container_file(name, 'init_pid')) else None
    record.update({
        'images': split_list(pinned_layers(name)),
        'layers': layers,
        'root': container_file(name, 'merged'),
        'network': {'model': record.pop('net'), 'netns': record.pop('netns') or None,
                    'vip': read_attr(name, 'vip'), 'host_eth': read_attr(name, 'host_eth'),
                    'port_mappings': split_list(read_attr(name, 'port_mapping') or '')},
        'volumes': [{'host': h, 'container': c, 'read_only': ro}
                    for h, c, ro in container_volumes(name)],
        'limits': limits_record(name),
        'security': {'seccomp': read_attr(name, 'seccomp') or 'default',
                     'no_new_privs': bool(read_attr(name, 'no_new_privs'))},
        'restart': {'policy': policy, 'maximum': most,
                    'count': number_attr(name, 'restart_count') or 0},
        'autostart': {'priority': number_attr(name, 'autostart'),
                      'delay': number_attr(name, 'autostart_delay') or 0},
        'init_pid': number_attr(name, 'init_pid') if running else None,
        'started': iso_time(started) if started else None,
        'exit_status': number_attr(name, 'exit_status'),
        'stopped_by_operator': bool(read_attr(name, 'stopped_by_operator'))})
    del record['limits']['text']
    return record


def show_logs(options):
    """What the container's main process and cockerinit wrote (--tail N: the last N lines;
    --follow: then what comes, until the container stops)."""
    name = require_container(options.container)
    show_log(name, int(options.tail) if options.tail is not None else None, options.follow)
    return EXIT_OK


def show_container_root(options):
    """Print the host path of a container's root directory."""
    name = require_container(options.container)
    say(container_file(name, 'merged'))
    return EXIT_OK


def show_ssearch(options):
    """List the image archives in the repository (--match: those whose name contains it)."""
    records = [{'image_id': image_id, 'modified': stamp, 'size': size} for image_id, stamp, size
               in repository_archives(repository(options.srepo), options.match)]
    return print_listing(options, records, '%-45s %-19s %-10s' % (
        'image_id', 'modify_datetime', 'size'), 70, lambda r: '%-45s %-19s %s' % (
        r['image_id'], r['modified'], size_text(r['size'])))


# =============================================================================
# Command line
# =============================================================================
# The grammar of the C cocker: options in any order, a later one wins (--volume adds up),
# no --opt=value, no bundling.  Requirements per action live in REQUIRED.

USAGE = """USAGE : cocker -v
               -s images
               -s containers
               -s container_root (-c|--container) (container)
               -s image_info (-m|--image) (image[:version])
               -s container_limits [ (-c|--container) (container) ]
               -s inspect (-c|--container) (container)
               -s logs (-c|--container) (container) [ --tail (lines) ] [ --follow ]
               -s stats [ (-c|--container) (container) ]
  (listings)   -s images|containers|container_limits|stats|ssearch|search|repo_users ... [ --format json ]
               -a create (-m|--image) (image[:version])[,(image[:version])]... [ create options ] [ (-c|--container) (container) ] [ (-b|--boot) [ cgroup options ] [ (-t|--attach) | (-e|--exec) (cmd|"program para1 ...") ] ]
               -a create (-m|--image) (image[:version])[,...] [ create options ] [ (-c|--container) (container) ] (-b|--boot) (-e|--exec) (cmd) --rm [ (-i|--interactive) ] [ -t ]  (one-shot: its exit status is ours)
               -a boot (-c|--container) (container) [ --host-eth (eth) ] [ cgroup options ] [ security options ] [ run options ] [ (-t|--attach) | (-e|--exec) (cmd|"program para1 ...") ]
               -a attach (-c|--container) (container)
               -a rplfile (-c|--container) (container) (--template-file) (template_file) (--mapping-file) (mapping_file) [ (--instance-file) (instance_file) ]
               -a putfile (-c|--container) (container) (--src-file) (host_path) (--dst-file) (container_path)
               -a getfile (-c|--container) (container) (--src-file) (container_path) (--dst-file) (host_path)
               -a run (-c|--container) (container) (--cmd) (cmd) [ (-i|--interactive) ] [ -t ] [ (-u|--user) (user[:group]) ] [ (-w|--workdir) (dir) ] [ --env (KEY=VALUE) ]...
               -a shutdown (-c|--container) (container) [ (-f|--forcely) ]
               -a kill (-c|--container) (container) [ (-f|--forcely) ]
               -a destroy (-c|--container) (container) [ (-f|--forcely) ] [ (-h|--shutdown) ]
               -a vip (-c|--container) (container) --vip (ip)
               -a port_mapping (-c|--container) (container) --port-mapping ([host_ip:]src_port:dst_port[/udp])[,...]
               -a volume (-c|--container) (container) --volume (host_path[:container_path[:ro]])[ ...]
               -a version (-m|--image) (image[:version]) [ --version (version) ] [ (-f|--forcely) ]
               -a to_image --from-container (container) [ --version (version) ] --to-image (image)
               -a to_container --from-image (image[:version]) [ (-m|--image) (image[:version])[,(image[:version])]... ] [ create options ] --to-container (container) [ (-f|--forcely) ]
               -a copy_image --from-image (image[:version]) --to-image (image[:version])
               -a del_image (-m|--image) (image[:version]) [ (-f|--forcely) ]
               -a import --image-file (file|oci_dir) [ (-m|--image) (image[:version]) ] [ --platform (os/arch[/variant]) ] [ (-f|--forcely) ]
               -a export (-m|--image) (image[:version]) [ --format (cockerimage|docker|oci) ]
               -s ssearch [ --srepo (user@host[:port]) ] [ --match (text) ]
               -a spush (-m|--image) (image[:version]) [ --srepo (user@host[:port]) ] [ (-f|--forcely) ]
               -a spull (-m|--image) (image[:version]) [ --srepo (user@host[:port]) ] [ (-f|--forcely) ]
               -a push (-m|--image) (image[:version]) [ --repo (host[:port][/path]) ] [ --format (docker|oci) ] [ registry options ]
               -a pull (-m|--image) (name[:tag]|host[:port]/path/name[:tag|@digest]) [ --repo (host[:port][/path]) ] [ --to-image (image[:version]) ] [ --platform (os/arch[/variant]) ] [ (-f|--forcely) ] [ registry options ]
               -s search [ --repo (host[:port][/path]) ] [ --match (text) ] [ registry options ]
               -a login --user (user) [ --repo (host[:port]) ] [ registry options ]  (password from the terminal or stdin)
               -a logout [ --repo (host[:port]) ]
               -a repo_server --listen (addr:port) [ --repo-dir (dir) ] [ --tls-cert (file) --tls-key (file) | --insecure ] [ --auth-file (file) ] [ --anonymous-pull ] [ --read-only ]
               -a repo_user_add --user (user) [ --rights (pull|push) ] [ --repo-dir (dir) | --auth-file (file) ]  (password from the terminal or stdin)
               -a repo_user_del --user (user) [ --repo-dir (dir) | --auth-file (file) ]
               -s repo_users [ --repo-dir (dir) | --auth-file (file) ]
               -a repo_gc [ --repo-dir (dir) ]
               -a install_test [ --version (version) ] [ (-f|--forcely) ]
               -a del_bridge
               -a update (-c|--container) (container) [ --restart (policy) ] [ --autostart [ (priority)|off ] ] [ --autostart-delay (seconds) ] [ --log-size (size) ] [ --log-count (files) ]
               -a autostart
               -a shutdown_all
create options : [ --volume (host_path:container_path[:ro]) ][ --volume ... ] [ --host (hostname) ] [ --net (BRIDGE|HOST|CUSTOM) ] [ --host-eth (eth) ] [ --vip (ip) ] [ --port-mapping ([host_ip:]src_port:dst_port[/udp])[,...] ] [ --restart (no|on-failure[:max]|always|unless-stopped) ] [ --autostart [ (priority) ] ] [ --autostart-delay (seconds) ] [ --log-size (size) ] [ --log-count (files) ] [ security options ] [ run options ]
cgroup options : [ --cpus [(cpu_num,...)|(cpu_num-cpu_num2)] ] [ --cpu-quota (percent%) ] [ --mem-limit (num|numK|numM|numG) ] [ --pids-limit (num) ]  ('none' drops a recorded limit; without --pids-limit: 4096)
security options : [ --seccomp (default|unconfined) ] [ --no-new-privs ]  (recorded for later boots)
registry options : [ --insecure ] [ --ca-file (file) ]  (--insecure: plain HTTP or an unverified certificate; the --repo given last is remembered)
   run options : [ --entrypoint (cmd) ] [ --env (KEY=VALUE) ]... [ --user (user[:group]) ]  (create and boot, recorded; an imported image's command, Env and User otherwise)
  enable debug : [ (-d|--debug) ]
   environment : COCKER_HOME (default /var/cocker), COCKER_IPTABLES (default iptables)
 bridge config : COCKER_HOME/network.conf: bridge = cocker0, address = 166.88.0.1/16"""

#: -s WHAT -> its listing (the Listings chapter loads on the first call of one)
SHOWS = {
    'images': show_images,
    'containers': show_containers,
    'container_root': show_container_root,
    'image_info': show_image_info,
    'container_limits': show_container_limits,
    'ssearch': show_ssearch,
    'repo_users': show_repo_users,
    'search': show_search,
    'inspect': show_inspect,
    'logs': show_logs,
    'stats': show_stats,
}

#: option -> (attribute, takes a value)
OPTIONS = {
    '-s': ('show', True), '-a': ('action', True), '--version': ('version', True),
    '-m': ('image', True), '--image': ('image', True),
    '-c': ('container', True), '--container': ('container', True),
    '--host': ('host', True), '--net': ('net', True), '--host-eth': ('host_eth', True),
    '--vip': ('vip', True), '--port-mapping': ('port_mapping', True),
    '--volume': ('volumes', True),
    '--cpus': ('cpus', True), '--cpu-quota': ('cpu_quota', True),
    '--mem-limit': ('mem_limit', True), '--pids-limit': ('pids_limit', True),
    '--seccomp': ('seccomp', True), '--no-new-privs': ('no_new_privs', False),
    '-b': ('boot', False), '--boot': ('boot', False),
    '-t': ('attach', False), '--attach': ('attach', False),
    '-e': ('exec_cmd', True), '--exec': ('exec_cmd', True),
    '--entrypoint': ('entrypoint', True), '--env': ('env', True), '--user': ('user', True),
    '-u': ('user', True), '-w': ('workdir', True), '--workdir': ('workdir', True),
    '-h': ('shutdown', False), '--shutdown': ('shutdown', False), '--rm': ('rm', False),
    '--cmd': ('cmd', True),
    '--from-image': ('from_image', True), '--to-image': ('to_image', True),
    '--from-container': ('from_container', True), '--to-container': ('to_container', True),
    '--image-file': ('image_file', True), '--platform': ('platform', True),
    '--format': ('format', True),
    '--srepo': ('srepo', True), '--match': ('match', True),
    '--listen': ('listen', True), '--repo-dir': ('repo_dir', True),
    '--tls-cert': ('tls_cert', True), '--tls-key': ('tls_key', True),
    '--auth-file': ('auth_file', True), '--insecure': ('insecure', False),
    '--read-only': ('read_only', False), '--anonymous-pull': ('anonymous_pull', False),
    '--restart': ('restart', True), '--autostart': ('autostart', True),
    '--autostart-delay': ('autostart_delay', True),
    '--log-size': ('log_size', True), '--log-count': ('log_count', True),
    '--tail': ('tail', True), '--follow': ('follow', False),
    '--rights': ('rights', True), '--repo': ('repo', True), '--ca-file': ('ca_file', True),
    '--template-file': ('template_file', True), '--mapping-file': ('mapping_file', True),
    '--instance-file': ('instance_file', True),
    '--src-file': ('src_file', True), '--dst-file': ('dst_file', True),
    '-i': ('interactive', False), '--interactive': ('interactive', False),
    '-d': ('debug', False), '--debug': ('debug', False),
    '-f': ('force', False), '--forcely': ('force', False),
}

#: action -> [(attribute, option named in the message)]
REQUIRED = {
    'create': [('image', '--image')],
    'boot': [('container', '--container')],
    'attach': [('container', '--container')],
    'run': [('container', '--container'), ('cmd', '--cmd')],
    'shutdown': [('container', '--container')],
    'kill': [('container', '--container')],
    'destroy': [('container', '--container')],
    'vip': [('container', '--container'), ('vip', '--vip')],
    'port_mapping': [('container', '--container'), ('port_mapping', '--port-mapping')],
    'volume': [('container', '--container'), ('volumes', '--volume')],
    'version': [('image', '--image')],
    'copy_image': [('from_image', '--from-image'), ('to_image', '--to-image')],
    'del_image': [('image', '--image')],
    'to_image': [('from_container', '--from-container'), ('to_image', '--to-image')],
    'to_container': [('from_image', '--from-image'), ('to_container', '--to-container')],
    'export': [('image', '--image')],
    'import': [('image_file', '--image-file')],
    'update': [('container', '--container')],
    'repo_server': [('listen', '--listen')],
    'repo_user_add': [('user', '--user')],
    'repo_user_del': [('user', '--user')],
    'push': [('image', '--image')],
    'pull': [('image', '--image')],
    'login': [('user', '--user')],
    'spush': [('image', '--image')],
    'spull': [('image', '--image')],
    'rplfile': [('container', '--container'), ('template_file', '--template-file'),
                ('mapping_file', '--mapping-file')],
    'putfile': [('container', '--container'), ('src_file', '--src-file'),
                ('dst_file', '--dst-file')],
    'getfile': [('container', '--container'), ('src_file', '--src-file'),
                ('dst_file', '--dst-file')],
    'container_root': [('container', '--container')],
    'image_info': [('image', '--image')],
    'inspect': [('container', '--container')],
    'logs': [('container', '--container')],
}


class Options(object):
    """Parsed command line: every attribute of OPTIONS, None/False/[] when absent."""

    def __init__(self):
        for attr, takes_value in OPTIONS.values():
            setattr(self, attr, None if takes_value else False)
        self.volumes = []
        self.env = []
        self.version_flag = False
        self.layers = None


def parse_args(argv):
    options = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == '-v':
            options.version_flag = True
            return options
        if arg in ('--help', '-?'):
            options.action = 'help'
            return options
        if arg == '--autostart' and (i + 1 >= len(argv) or not (
                parse_int(argv[i + 1]) is not None or argv[i + 1] == 'off')):
            options.autostart = '0'     # (its priority may be left out)
            i += 1
            continue
        spec = OPTIONS.get(arg)
        if spec is None or (spec[1] and i + 1 >= len(argv)):
            raise CockerError("invalid parameter '%s'" % arg, EXIT_USAGE)
        attr, takes_value = spec
        if not takes_value:
            setattr(options, attr, True)
        elif attr in ('volumes', 'env'):           # these add up
            getattr(options, attr).append(argv[i + 1])
            i += 1
        else:
            setattr(options, attr, argv[i + 1])
            i += 1
        i += 1
    return options


def check_args(options):
    """Per-action requirements and value checks; raise usage errors (exit 7)."""
    if options.net is None:
        options.net = 'HOST'
    elif options.net not in NETS:
        raise usage_error("'--net' value[%s] invalid" % options.net)
    if options.show is not None:
        if options.show not in SHOWS:
            raise usage_error('show[%s] invalid' % options.show)
        word, kind = options.show, '-s'
    elif options.action is not None:
        if options.action not in ACTIONS:
            raise usage_error('action[%s] invalid' % options.action)
        word, kind = options.action, '-a'
    else:
        raise usage_error('cmd para action[(null)] invalid')
    for attr, option in REQUIRED.get(word, []):
        if not getattr(options, attr) or (attr == 'image' and not split_list(options.image)):
            raise usage_error("expect '%s' with action '%s %s'" % (option, kind, word))
    if options.attach and options.exec_cmd is not None and not options.rm:
        raise usage_error("'-t' and '-e' cannot be used together")
    if options.exec_cmd is not None:
        try:
            if not load_cockerinit().split_command(options.exec_cmd):
                raise ValueError('it is empty')
        except ValueError as e:
            raise usage_error("'-e' value[%s] invalid: %s" % (options.exec_cmd, e))
    check_run_options(options)
    if options.restart is not None:
        parse_restart(options.restart)
    if options.autostart not in (None, 'off'):
        autostart_priority(options.autostart)
    if options.autostart_delay is not None:
        autostart_delay(options.autostart_delay)
    if options.log_size is not None:
        parse_log_size(options.log_size)
    if options.log_count is not None:
        parse_log_count(options.log_count)
    if options.tail is not None and not is_decimal(options.tail):
        raise usage_error("'--tail' value[%s] invalid (a number of lines)" % options.tail)
    formats = ('json',) if options.show else EXPORT_FORMATS
    if options.format is not None and options.format not in formats:
        raise usage_error("'--format' value[%s] invalid (%s)" % (options.format,
                                                                 '|'.join(formats)))
    if options.container is not None:
        check_name('container', options.container)
    if options.vip is not None:
        parse_ipv4(options.vip, '--vip')
    if options.port_mapping is not None:
        parse_port_mappings(options.port_mapping)
    if options.host_eth is not None and options.host_eth != 'none':
        check_ifname(options.host_eth, '--host-eth')
    if any(getattr(options, option) is not None for option, _ in LIMITS):
        check_limit_options(options)    # (the Cgroups chapter loads only then)
    if options.seccomp is not None and options.seccomp not in SECCOMP_MODES:
        raise usage_error("'--seccomp' value[%s] invalid (default or unconfined)"
                          % options.seccomp)
    if options.srepo is not None:
        parse_srepo(options.srepo)


def check_run_options(options):
    if options.workdir is not None and (not options.workdir.startswith('/') or
                                        '\n' in options.workdir or '\0' in options.workdir):
        raise usage_error("'--workdir' value[%s] invalid (an absolute path in the container)"
                          % printable(options.workdir))
    for item in options.env:
        if '=' not in item or item.startswith('=') or '\n' in item or '\0' in item:
            raise usage_error("'--env' value[%s] invalid (KEY=VALUE)" % item)
    if options.entrypoint:
        try:
            load_cockerinit().split_command(options.entrypoint)
        except ValueError as e:
            raise usage_error("'--entrypoint' value[%s] invalid: %s" % (options.entrypoint, e))
    if options.user is not None and any(c in options.user for c in '\n\0/') or \
            options.user is not None and options.user.count(':') > 1:
        raise usage_error("'--user' value[%s] invalid (NAME, UID, NAME:GROUP or UID:GID)"
                          % options.user)


def ensure_environment():
    """HOME, images/, containers/, layers/ and cocker.log exist (created on first use).
    The stores are root's alone: they hold setuid programs and files owned by container
    uids, which no host user may run or edit through them."""
    for path, mode in ((HOME, 0o755), (images_dir(), 0o700), (containers_dir(), 0o700),
                       (layers_dir(), 0o700), (os.path.join(HOME, 'l'), 0o700)):
        try:
            os.makedirs(path, mode)
        except FileExistsError:
            if path != HOME and os.stat(path).st_mode & 0o077:
                os.chmod(path, mode)        # a store made by the C cocker or an older cocker
        except OSError as e:
            raise CockerError('cannot create %s: %s' % (path, e.strerror), EXIT_ENV)
    if not os.path.exists(log_path()):
        try:
            os.close(os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise CockerError('cannot create %s: %s' % (log_path(), e.strerror), EXIT_ENV)


def clean_stores():
    """What commands killed half-way left behind (cheap: a look at a directory each, seldom
    anything there; the chapters that clean load only then)."""
    for store in (images_dir(), containers_dir(), layers_dir()):
        if os.path.isdir(os.path.join(store, STAGING)):
            clean_staging(store)
    if os.path.isdir(one_shot_dir()) and os.listdir(one_shot_dir()):
        clean_one_shots()


# =============================================================================
# main
# =============================================================================

def dispatch(options):
    if options.show is not None:
        return SHOWS[options.show](options)
    return ACTIONS[options.action](options)


def report(message, status):
    sys.stderr.write('*** ERROR : %s\n' % printable(message))
    sys.stderr.flush()
    log('ERROR', message)
    return status


def open_standard_descriptors():
    """0, 1 and 2 open, on /dev/null where the caller closed them (cocker 0<&-): else the
    first file the command opens, the container lock say, would be one of them, and the
    monitor's /dev/null put over it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open('/dev/null', os.O_RDWR)     # (the lowest free number: this one)


def main(argv=None):
    """Run one cocker command; return the exit status."""
    global HOME, DEBUG
    import gc
    gc.enable()     # (the header keeps it off while it loads: nothing it makes is garbage)
    argv = sys.argv[1:] if argv is None else argv
    open_standard_descriptors()
    # (absolute: a monitor works from /, and a boot gives its HOME to a sibling)
    HOME = os.path.abspath(os.environ.get('COCKER_HOME') or DEFAULT_HOME)
    try:
        try:
            options = parse_args(argv)
        except CockerError as e:
            report(e.message, e.status)
            sys.stderr.write(USAGE + '\n')
            return e.status
        if options.version_flag:
            say('cocker v%s build %s' % (VERSION, BUILD))
            return EXIT_OK
        if not argv or options.action == 'help':
            say(USAGE)
            return EXIT_OK
        DEBUG = options.debug
        if os.geteuid() != 0:
            raise CockerError('cocker must run as root', EXIT_ENV)
        ensure_environment()
        clean_stores()
        check_args(options)
        what = '-s %s' % options.show if options.show else '-a %s' % options.action
        log('INFO', 'cocker %s' % ' '.join(argv))
        status = dispatch(options)
        log('INFO', '%s returned %d' % (what, status))
        return status
    except ReaderGone:
        # our reader went away (cocker -s containers | head): stop quietly, like ls
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 141
    except CockerError as e:
        return report(e.message, e.status)
    except OSError as e:
        return report(describe_oserror(e), EXIT_FAILED)
    except KeyboardInterrupt:
        return report('interrupted', 130)
    except Exception as e:
        if DEBUG:
            import traceback
            traceback.print_exc()
        return report('internal error: %s: %s' % (type(e).__name__, e), EXIT_FAILED)


def exit_quickly(status):
    """End the command without the interpreter's teardown (4 ms of freeing what the kernel
    frees anyway): our output flushed first, nothing else pending; should a thread still
    run (none does once an action returns), the ordinary exit waits for it."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    threading = sys.modules.get('threading')
    if threading is not None and threading.active_count() > 1:
        sys.exit(status)
    os._exit(status)


def entry_point():
    exit_quickly(main())


if __name__ == '__main__':
    exit_quickly(main())
