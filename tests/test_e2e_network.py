"""Networks end to end: HOST, CUSTOM and BRIDGE with real namespaces, veth pairs, the bridge
and iptables rules.  Traffic goes only to loopback, to the containers and to an "outside"
network namespace this file makes itself (a client host wired to this host by a veth pair).

Servers inside containers are busybox nc, bind-mounted read-only at /bb.
"""

import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import (container_path, cocker_process, free_test_subnet, load_script, COCKER,
                      wait_for)

PY = sys.executable

SERVER = r'''
import socket, sys
kind = socket.SOCK_DGRAM if sys.argv[4] == 'udp' else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
if kind == socket.SOCK_STREAM:
    s.listen(16)
print('ready', flush=True)
while True:
    if kind == socket.SOCK_DGRAM:
        data, peer = s.recvfrom(100)
        s.sendto(('%s %s\n' % (sys.argv[3], peer[0])).encode(), peer)
        continue
    c, peer = s.accept()
    c.sendall(('%s %s\n' % (sys.argv[3], peer[0])).encode())
    c.close()
'''

CLIENT = r'''
import socket, sys, time
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
end = time.time() + float(sys.argv[4])
while True:
    try:
        if proto == 'udp':
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.5)
            s.sendto(b'ping', (host, port))
            data = s.recv(100)
        else:
            s = socket.create_connection((host, port), timeout=2)
            data = b''
            while True:
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
        if data:
            sys.stdout.write(data.decode())
            break
    except OSError as e:
        if time.time() > end:
            sys.stdout.write('ERROR %s\n' % e)
            break
        time.sleep(0.05)
'''


def fetch(host, port, netns=None, proto='tcp', timeout=5.0):
    """What a server at host:port answers, asked from this host or from a named netns."""
    argv = [PY, '-c', CLIENT, host, str(port), proto, str(timeout)]
    if netns:
        argv = ['ip', 'netns', 'exec', netns] + argv
    return subprocess.check_output(argv, timeout=timeout + 10).decode().strip()


def bridge_plan(home):
    text = open(os.path.join(home, 'network.conf')).read()
    conf = dict(line.split(' = ') for line in text.splitlines())
    return conf['bridge'], conf['address'].split('/')[0]


GIVEN_PORTS = set()     #: a port is free when asked, but cocker claims it only at boot


def free_port(proto='tcp'):
    """A host port no process listens on and no earlier call of this session handed out
    (twenty containers created before any boots must not draw the same one)."""
    kind = socket.SOCK_DGRAM if proto == 'udp' else socket.SOCK_STREAM
    while True:
        port = random.randint(20000, 29999)
        if port in GIVEN_PORTS:
            continue
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(('0.0.0.0', port))
            GIVEN_PORTS.add(port)
            return port
        except OSError:
            continue
        finally:
            s.close()


def netns_name(name):
    return load_script('cocker_names', COCKER).netns_name(name)


def leftovers(name):
    """Network objects of container `name` still on the host (netns, veth, its rules and
    its own chains)."""
    x = netns_name(name)[3:]
    found = []
    if os.path.exists('/run/netns/nns' + x):
        found.append('netns nns' + x)
    if os.path.exists('/sys/class/net/eth' + x):
        found.append('link eth' + x)
    for argv in (['iptables-save'], ['iptables-legacy-save']):
        try:
            out = subprocess.check_output(argv, stderr=subprocess.DEVNULL).decode()
        except (OSError, subprocess.CalledProcessError):
            continue
        found += [l for l in out.splitlines() if 'cocker:%s"' % name in l or
                  'cocker:%s ' % name in l or l.startswith(':CKR-%s-' % x)]
    return found


@pytest.fixture(scope='session')
def busybox(home):
    """A directory with a static busybox, to be bind-mounted read-only at /bb."""
    path = shutil.which('busybox')
    if path is None:
        pytest.fail('busybox (busybox-static) is not installed: tests/run.sh installs it')
    directory = os.path.join(home, 'bb')
    os.makedirs(directory, exist_ok=True)
    shutil.copy(path, os.path.join(directory, 'busybox'))
    return '%s:/bb:ro' % directory


@pytest.fixture
def server(cocker, test_image, names, busybox):
    """server(*create_options) -> name of a booted BRIDGE container whose PID 1 is busybox nc
    on port 80 answering '<name>'."""
    def make(*options, **kw):
        name = names(kw.get('prefix', 'br'))
        r = cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                   '--volume', busybox, *options)
        assert r.rc == 0, r
        r = cocker('-a', 'boot', '-c', name,
                   '-e', '/bb/busybox nc -ll -p 80 -e /bb/busybox echo %s' % name)
        assert r.rc == 0 and r.out == 'OK\n', r
        return name
    return make


class Outside(object):
    """A client host: a network namespace wired to this host by its own veth pair."""

    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.netns, self.link = 'ckx' + tag, 'cx' + tag
        second = free_test_subnet()
        self.host_ip, self.ip = '10.%d.0.1' % second, '10.%d.0.2' % second
        self.servers = []
        for argv in (['ip', 'netns', 'add', self.netns],
                     ['ip', 'link', 'add', self.link, 'type', 'veth', 'peer', 'name', 'eth0',
                      'netns', self.netns],
                     ['ip', 'addr', 'add', self.host_ip + '/24', 'dev', self.link],
                     ['ip', 'link', 'set', self.link, 'up'],
                     ['ip', '-n', self.netns, 'addr', 'add', self.ip + '/24', 'dev', 'eth0'],
                     ['ip', '-n', self.netns, 'link', 'set', 'eth0', 'up'],
                     ['ip', '-n', self.netns, 'link', 'set', 'lo', 'up']):
            subprocess.check_call(argv)

    def serve(self, port, answer, proto='tcp'):
        p = subprocess.Popen(['ip', 'netns', 'exec', self.netns, PY, '-c', SERVER, '0.0.0.0',
                              str(port), answer, proto], stdout=subprocess.PIPE)
        self.servers.append(p)
        assert p.stdout.readline() == b'ready\n'

    def remove(self):
        for p in self.servers:
            p.kill()
            p.wait()
        subprocess.call(['ip', 'link', 'del', self.link], stderr=subprocess.DEVNULL)
        subprocess.check_call(['ip', 'netns', 'del', self.netns])


@pytest.fixture
def outside():
    o = Outside()
    yield o
    o.remove()


@pytest.fixture
def host_server():
    """host_server(address, port, answer[, proto]): a server in the host's own namespace."""
    procs = []

    def start(address, port, answer, proto='tcp'):
        p = subprocess.Popen([PY, '-c', SERVER, address, str(port), answer, proto],
                             stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout.readline() == b'ready\n'
    yield start
    for p in procs:
        p.kill()
        p.wait()


def iptables_save(command='iptables-save'):
    return subprocess.check_output([command], stderr=subprocess.DEVNULL)


def vip_of(home, name):
    return open(container_path(home, name, 'vip')).read().strip()


# ---- BRIDGE: reachable -----------------------------------------------------------------

def test_bridge_container_answers_on_its_vip_and_mapped_ports(server, cocker, home, outside):
    bridge, gateway = bridge_plan(home)
    port = free_port()
    name = server('--port-mapping', '%d:80' % port)
    vip = vip_of(home, name)
    assert vip.startswith(gateway.rsplit('.', 2)[0] + '.'), 'VIP chosen from the bridge subnet'
    # the VIP from the host, the mapped port through the bridge address and on loopback
    assert fetch(vip, 80).startswith(name)
    assert fetch(gateway, port).startswith(name)
    assert fetch('127.0.0.1', port).startswith(name)
    # another machine reaches it through this host's address: PREROUTING
    assert fetch(outside.host_ip, port, netns=outside.netns) == name
    # the container reaches its own mapped port through the host (hairpin)
    r = cocker('-a', 'run', '-c', name, '--cmd', '/bb/busybox nc -w 5 %s %d' % (gateway, port))
    assert r.rc == 0 and r.out.startswith(name), r
    # inside: eth0 with the VIP on the bridge subnet, default route via the bridge, lo up
    r = cocker('-a', 'run', '-c', name, '--cmd', 'ip -o -4 addr; ip route')
    addresses = sorted(tuple(line.split()[1:4:2]) for line in r.out.splitlines() if ' inet ' in line)
    assert addresses == [('eth0', '%s/16' % vip), ('lo', '127.0.0.1/8')], r
    assert 'default via %s dev eth0' % gateway in r.out, r
    # operators find it under the C cocker's names
    x = netns_name(name)
    assert cocker('-s', 'containers').out.count(x) == 1
    assert subprocess.check_output(['ip', 'netns', 'exec', x, 'ip', '-o', 'link', 'show',
                                    'eth0']).decode().startswith('2: eth0')
    master = os.path.realpath('/sys/class/net/eth%s/master' % x[3:])
    assert os.path.basename(master) == bridge
    # IPv4 only, as Docker has it: nothing of eth0 (no address detection, MLD, router
    # solicitation) for the bridge to flood to every other container; the host end quiet too
    r = cocker('-a', 'run', '-c', name, '--cmd', 'cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6;'
               ' ip -o -6 addr show dev eth0 | wc -l')
    assert r.out.split() == ['1', '0'], r
    assert subprocess.check_output(['ip', '-o', '-6', 'addr', 'show', 'dev', 'eth' + x[3:]]) \
        == b''


def test_container_reaches_the_host_and_beyond_through_nat(server, cocker, home, outside,
                                                          host_server):
    bridge, gateway = bridge_plan(home)
    name = server()
    vip = vip_of(home, name)
    port = free_port()
    host_server(gateway, port, 'host')
    r = cocker('-a', 'run', '-c', name, '--cmd', '/bb/busybox nc -w 5 %s %d' % (gateway, port))
    assert r.out == 'host %s\n' % vip, r
    # a machine outside sees the host's address, not the VIP: masquerading
    outside.serve(port, 'outside')
    r = cocker('-a', 'run', '-c', name, '--cmd', '/bb/busybox nc -w 5 %s %d' % (outside.ip, port))
    assert r.out == 'outside %s\n' % outside.host_ip, r
    assert open('/proc/sys/net/ipv4/ip_forward').read().strip() == '1'


def test_host_eth_masquerades_only_out_of_that_interface(server, cocker, home, outside):
    """--host-eth: out of that interface the container is masqueraded, out of any other it
    is routed with its own address (here to an outside that routes the bridge subnet back);
    the bridge's own rule masquerades the others."""
    _, gateway = bridge_plan(home)
    subnet = gateway.rsplit('.', 2)[0] + '.0.0/16'
    subprocess.check_call(['ip', '-n', outside.netns, 'route', 'add', subnet, 'via',
                           outside.host_ip])
    port = free_port()
    outside.serve(port, 'outside')
    through, elsewhere, default = (server('--host-eth', outside.link), server('--host-eth', 'lo'),
                                   server())
    for name, seen in ((through, outside.host_ip), (elsewhere, vip_of(home, elsewhere)),
                       (default, outside.host_ip)):
        r = cocker('-a', 'run', '-c', name, '--cmd', '/bb/busybox nc -w 5 %s %d'
                   % (outside.ip, port))
        assert r.out == 'outside %s\n' % seen, (name, r)
    for name in (through, elsewhere):
        assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0
        assert leftovers(name) == []


def test_mapping_catches_only_traffic_addressed_to_this_host(server, outside):
    port = free_port()
    name = server('--port-mapping', '%d:80' % port)
    outside.serve(port, 'outside')
    # the same port number on another machine is that machine's (the C cocker hijacked it)
    assert fetch(outside.ip, port) == 'outside %s' % outside.host_ip
    assert fetch('127.0.0.1', port).startswith(name)


def test_mapping_bound_to_one_host_address(server, outside):
    port = free_port()
    name = server('--port-mapping', '127.0.0.1:%d:80' % port)
    assert fetch('127.0.0.1', port).startswith(name)
    r = fetch(outside.host_ip, port, netns=outside.netns, timeout=1)
    assert r.startswith('ERROR'), 'a loopback-only mapping must not be reachable from outside'


def test_udp_mapping(cocker, test_image, names, home):
    name = names('udp')
    port = free_port('udp')
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
               '--port-mapping', '%d:5353/udp' % port, '-b')
    assert r.rc == 0, r
    # a UDP echo server in the container's network namespace (busybox nc has no UDP)
    p = subprocess.Popen(['ip', 'netns', 'exec', netns_name(name), PY, '-c', SERVER, '0.0.0.0',
                          '5353', 'udp-' + name, 'udp'], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b'ready\n'
        assert fetch('127.0.0.1', port, proto='udp').startswith('udp-' + name)
        assert fetch(bridge_plan(home)[1], port, proto='udp').startswith('udp-' + name)
    finally:
        p.kill()
        p.wait()


# ---- CUSTOM and HOST -------------------------------------------------------------------

def test_custom_has_only_loopback_and_keeps_its_namespace_until_destroy(cocker, test_image,
                                                                       names):
    name = names('cu')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'CUSTOM').rc == 0
    x = netns_name(name)
    assert os.path.exists('/run/netns/' + x), 'the operator can furnish it before the boot'
    subprocess.check_call(['ip', 'netns', 'exec', x, 'ip', 'link', 'add', 'cv0', 'type',
                           'veth', 'peer', 'name', 'cv1'])
    assert cocker('-a', 'boot', '-c', name).rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd', 'ip -o link')
    links = sorted(l.split(':')[1].strip().split('@')[0] for l in r.out.splitlines())
    assert links == ['cv0', 'cv1', 'lo'], r
    assert 'LOOPBACK,UP' in r.out
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    assert os.path.exists('/run/netns/' + x)
    # a reboot empties /run: the next boot makes the namespace again
    subprocess.check_call(['ip', 'netns', 'del', x])
    assert cocker('-a', 'boot', '-c', name).rc == 0
    r = cocker('-a', 'run', '-c', name, '--cmd', 'ip -o link')
    assert [l.split(':')[1].strip() for l in r.out.splitlines()] == ['lo'], r
    assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0
    assert not os.path.exists('/run/netns/' + x)


def test_host_sees_the_host_interfaces(running, cocker):
    name = running()
    inside = cocker('-a', 'run', '-c', name, '--cmd', 'ip -o link').out
    host = subprocess.check_output(['ip', '-o', 'link']).decode()
    names_of = lambda text: sorted(l.split(':')[1].strip().split('@')[0]
                                   for l in text.splitlines())
    assert names_of(inside) == names_of(host)


# ---- changes, conflicts, bad values ----------------------------------------------------

def test_vip_and_port_mapping_changes_apply_at_the_next_boot(server, cocker, home):
    _, gateway = bridge_plan(home)
    old_port, new_port = free_port(), free_port()
    name = server('--port-mapping', '%d:80' % old_port)
    new_vip = gateway.rsplit('.', 1)[0] + '.%d' % random.randint(200, 250)
    r = cocker('-a', 'vip', '-c', name, '--vip', new_vip)
    assert r.rc == 255 and 'running' in r.err, r
    assert cocker('-a', 'shutdown', '-c', name).rc == 0
    assert cocker('-a', 'vip', '-c', name, '--vip', new_vip).out == 'OK\n'
    assert cocker('-a', 'port_mapping', '-c', name, '--port-mapping',
                  '%d:80' % new_port).out == 'OK\n'
    r = cocker('-a', 'boot', '-c', name, '-e', '/bb/busybox nc -ll -p 80 -e /bb/busybox echo new')
    assert r.rc == 0, r
    assert fetch(new_vip, 80) == 'new'
    r = cocker('-a', 'run', '-c', name, '--cmd', 'ip -o -4 addr show eth0')
    assert ' %s/16 ' % new_vip in r.out, r
    assert fetch('127.0.0.1', new_port).startswith('new')
    assert fetch('127.0.0.1', old_port, timeout=0.5).startswith('ERROR')


def test_conflicts_and_bad_values_are_refused_before_anything_is_set_up(
        server, cocker, test_image, names, home, host_server):
    bridge, gateway = bridge_plan(home)
    port = free_port()
    holder = server('--port-mapping', '%d:80' % port)
    vip = vip_of(home, holder)
    net = gateway.rsplit('.', 2)[0]
    listened = free_port()
    host_server('0.0.0.0', listened, 'host')
    name = names('cf')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE').rc == 0
    before = iptables_save().decode().count('\n-A ')
    at_boot = [
        (['--vip', vip], "VIP %s is in use by container '%s'" % (vip, holder)),
        (['--port-mapping', '%d:81' % port],
         "host port %d/tcp is in use by container '%s'" % (port, holder)),
        (['--port-mapping', '127.0.0.1:%d:81' % port],
         "host port 127.0.0.1:%d/tcp is in use by container '%s'" % (port, holder)),
        (['--port-mapping', '%d:81' % listened],
         'host port %d/tcp is in use by a process of the host' % listened),
        (['--port-mapping', '192.0.2.254:%d:81' % listened],
         '192.0.2.254 is not an address of this host (port mapping 192.0.2.254:%d:81)' % listened),
    ]
    for option, message in at_boot:
        change = cocker('-a', option[0][2:].replace('-', '_'), '-c', name, *option)
        assert change.rc == 0, change
        r = cocker('-a', 'boot', '-c', name)
        assert r.rc == 255 and r.err == '*** ERROR : %s\n' % message, (option, r)
        assert leftovers(name) == [] and not os.path.exists(container_path(home, name, 'pid'))
        assert cocker('-a', 'port_mapping', '-c', name, '--port-mapping', '%d:80' %
                      free_port()).rc == 0
        assert cocker('-a', 'vip', '-c', name, '--vip', '%s.7.7' % net).rc == 0
    assert iptables_save().decode().count('\n-A ') == before
    bad = [
        (['--vip', '%s.0.0' % net], 255, 'is the network address'),
        (['--vip', gateway], 255, 'is the bridge address'),
        (['--vip', '%s.255.255' % net], 255, 'is the broadcast address'),
        (['--vip', '192.0.2.77'], 255, 'is outside the bridge subnet'),
        (['--vip', '10.1.2'], 7, "--vip '10.1.2' is not an IPv4 address"),
        (['--vip', '1.2.3.4; reboot'], 7, 'is not an IPv4 address'),
        (['--port-mapping', '80'], 7, "port mapping '80' is invalid"),
        (['--port-mapping', '70000:80'], 7, 'ports are 1 to 65535'),
        (['--port-mapping', 'a:b'], 7, 'ports are 1 to 65535'),
        (['--port-mapping', '1:2/sctp'], 7, 'is invalid'),
        (['--port-mapping', '1.2.3:1:2'], 7, 'is not an IPv4 address'),
        (['--port-mapping', '8080:80,8080:81'], 7, 'repeats host port 8080/tcp'),
        (['--host-eth', 'a/b'], 7, "--host-eth 'a/b' is invalid"),
    ]
    for option, rc, message in bad:
        other = names('bad')
        r = cocker('-a', 'create', '-m', test_image, '-c', other, '--net', 'BRIDGE', *option)
        assert r.rc == rc and message in r.err and r.err.count('\n') == 1, (option, r)
        assert not os.path.exists(container_path(home, other))
    other = names('bad')
    r = cocker('-a', 'create', '-m', test_image, '-c', other, '--net', 'BRIDGE',
               '--host-eth', 'nosuch0', '-b')
    assert r.rc == 255 and "host interface 'nosuch0' (--host-eth) does not exist" in r.err, r
    assert not os.path.exists(container_path(home, other)), 'create -b is rolled back'
    assert not any(os.readlink(os.path.join(home, 'network', 'addresses', a)) == other
                   for a in os.listdir(os.path.join(home, 'network', 'addresses')))
    assert fetch('127.0.0.1', port).startswith(holder), 'the holder is untouched'


# ---- nothing left behind ---------------------------------------------------------------

@pytest.mark.parametrize('how', ['shutdown', 'kill', 'destroy -h', 'main process exits',
                                 'kill -9 PID 1', 'kill -9 monitor'])
def test_nothing_of_a_stopped_container_is_left(how, server, cocker, home):
    port = free_port()
    name = server('--port-mapping', '%d:80,%d:81/udp' % (port, free_port('udp')))
    assert fetch('127.0.0.1', port).startswith(name)
    assert len(leftovers(name)) == 2 + 4 + 2 + 2, 'netns, veth, 2 DNAT rules, 2 for the ' \
        'host to VIP:HOST_PORT, the jumps into its 2 chains, the chains'
    cp = container_path(home, name)
    if how in ('shutdown', 'kill', 'destroy -h'):
        verb, _, flag = how.partition(' ')
        r = cocker('-a', verb, '-c', name, *([flag] if flag else []))
        assert r.rc == 0, r
    else:
        if how == 'main process exits':
            init_pid = open(os.path.join(cp, 'init_pid')).read()
            children = open('/proc/%s/task/%s/children' % (init_pid, init_pid)).read().split()
            assert len(children) == 1
            os.kill(int(children[0]), 15)
        else:
            pid = open(os.path.join(cp, 'init_pid' if 'PID 1' in how else 'pid')).read()
            os.kill(int(pid), 9)
        # the monitor cleans up after its PID 1 (its pid file goes last); a dead monitor is
        # found by the next command
        wait_for(lambda: not os.path.exists(os.path.join(cp, 'pid'))
                 or 'monitor' in how, what='the container to stop')
        if 'monitor' in how:
            listing = cocker('-s', 'containers').out.splitlines()
            assert [l.split()[-1] for l in listing if l.startswith(name + ' ')] == ['STOPED']
    assert leftovers(name) == []
    claims = os.path.join(home, 'network', 'in-use')
    assert [f for f in os.listdir(claims) if os.path.islink(os.path.join(claims, f)) and
            os.readlink(os.path.join(claims, f)) == name] == []
    assert fetch('127.0.0.1', port, timeout=0.3).startswith('ERROR')


def test_the_veth_goes_even_while_a_process_holds_the_namespace(server, cocker, home):
    """The veth pair usually goes with the container's network namespace; a process of the
    host in that namespace (an operator's `ip netns exec` shell) keeps it alive, and the
    veth is then deleted by itself."""
    name = server()
    x = netns_name(name)
    holder = subprocess.Popen(['ip', 'netns', 'exec', x, 'sleep', '60'])
    try:
        wait_for(lambda: os.path.exists('/proc/%d/ns/net' % holder.pid) and
                 os.stat('/proc/%d/ns/net' % holder.pid).st_ino ==
                 os.stat('/run/netns/' + x).st_ino, what='the holder in the namespace')
        r = cocker('-a', 'shutdown', '-c', name)
        assert r.rc == 0, r
        assert leftovers(name) == [] and holder.poll() is None
        assert 'eth%s is still there after its namespace' % x[3:] in \
            open(os.path.join(home, 'cocker.log')).read()
    finally:
        holder.kill()
        holder.wait()


def test_a_stop_goes_on_once_the_deletion_of_the_rules_has_committed(cocker, test_image,
                                                                     names, home):
    """nf_tables: the monitor sees the notice that the container's chains went (the
    transaction committed) and lets go of the container without waiting for iptables-restore
    to end, an RCU grace period later.  A jump deleted behind cocker's back fails that
    transaction: no notice, and the rules are then removed one by one."""
    if b'nf_tables' not in subprocess.check_output(['iptables', '-V']):
        pytest.skip('iptables here is not iptables-nft')
    made = []
    for take_a_jump in (False, True):
        name = names('cm')
        assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                      '--port-mapping', '%d:80' % free_port()).rc == 0
        assert cocker('-a', 'boot', '-c', name, '-d').rc == 0    # (its monitor logs -d too)
        if take_a_jump:
            jump = [l for l in iptables_save().decode().splitlines()
                    if l.startswith('-A COCKER') and 'cocker:%s"' % name in l][0]
            subprocess.check_call(['iptables', '-t', 'nat', '-D'] + shlex.split(jump)[1:])
        assert cocker('-a', 'shutdown', '-c', name).rc == 0
        assert leftovers(name) == []
        made.append(name)
    log = open(os.path.join(home, 'cocker.log')).read()
    seen = ['CKR-%s-D CKR-%s-V has committed' % ((netns_name(n)[3:],) * 2) in log for n in made]
    assert seen == [True, False], 'only the transaction that committed was seen to'


def test_a_boot_after_a_firewall_reload_made_the_chains_again(server, cocker, home):
    """A firewall reload removed cocker's chains behind its back (the record of their layout
    says they are there): the boot's rules, applied while it goes on, fail, and the chains
    are made again before they are applied once more."""
    first = server()
    bridge = dict(l.split(' = ') for l in open(os.path.join(home, 'network.conf')).read()
                  .splitlines())['bridge']
    assert cocker('-a', 'shutdown', '-c', first).rc == 0
    ours = re.compile(r'COCKER-%s(-[A-Z]+)?$' % re.escape(bridge))
    for table in ('nat', 'filter'):
        rules = subprocess.check_output(['iptables', '-t', table, '-S'],
                                        stderr=subprocess.DEVNULL).decode().splitlines()
        for rule in rules:              # the jumps into our chains, then the chains
            words = rule.split()
            if words[0] == '-A' and not ours.match(words[1]) and '-j' in words and \
                    ours.match(words[words.index('-j') + 1]):
                subprocess.check_call(['iptables', '-t', table, '-D'] + words[1:])
        for rule in rules:
            if rule.split()[0] == '-N' and ours.match(rule.split()[1]):
                subprocess.check_call(['iptables', '-t', table, '-F', rule.split()[1]])
                subprocess.check_call(['iptables', '-t', table, '-X', rule.split()[1]])
    assert 'COCKER-%s' % bridge not in iptables_save().decode()
    port = free_port()
    name = server('--port-mapping', '%d:80' % port)
    assert fetch('127.0.0.1', port).startswith(name)
    assert iptables_save().decode().count('cocker:%s' % name) == 4, \
        'a DNAT rule, one for the host to VIP:HOST_PORT and the jumps into their chains'


SLOW_RESTORE = """#!/bin/sh
# iptables-restore, but one that appends a container's rules first waits a second
input=$(cat)
case "$input" in *"-A COCKER"*"cocker:"*)
    touch "$0.started"
    sleep 1
    printf '%s\\n' "$input" | iptables-restore "$@"
    status=$?
    echo $status > "$0.done"
    exit $status ;;
esac
printf '%s\\n' "$input" | exec iptables-restore "$@"
"""


def test_a_boot_killed_while_its_rules_are_applied_leaves_none(cocker, test_image, names,
                                                              home, tmp_path):
    """The rules are applied while the boot goes on; a boot killed meanwhile leaves
    iptables-restore running, and the repair that removes its rules (the monitor's, or the
    next command's) must wait for it: it holds the iptables lock too."""
    name = names('kr')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                  '--port-mapping', '%d:80' % free_port()).rc == 0
    slow = tmp_path / 'slowipt'
    slow.write_text('#!/bin/sh\nexec iptables "$@"\n')
    restore = tmp_path / 'slowipt-restore'
    restore.write_text(SLOW_RESTORE)
    for script in (slow, restore):
        script.chmod(0o755)
    tag = 'cocker:%s' % name
    try:
        boot = cocker_process(home, '-a', 'boot', '-c', name, env={'COCKER_IPTABLES': str(slow)})
        wait_for(lambda: os.path.exists(str(restore) + '.started'), what='iptables-restore')
        boot.kill()
        boot.communicate()
        assert not os.path.exists(str(restore) + '.done')
        wait_for(lambda: [name, 'STOPED'] in [[w[0], w[-1]] for w in map(
            str.split, cocker('-s', 'containers').out.splitlines()) if w] and
                 not os.path.exists(container_path(home, name, 'network.state')),
                 what='the boot undone')     # (the listing repairs it, at once)
        wait_for(lambda: os.path.exists(str(restore) + '.done'), what='its end')
        assert open(str(restore) + '.done').read() == '0\n'
        assert tag not in iptables_save().decode(), 'rules added after their removal'
    finally:
        for line in iptables_save().decode().splitlines():
            if tag in line and line.startswith('-A'):   # (a failed run's, so no rule stays)
                table = 'nat' if 'DNAT' in line or 'MASQUERADE' in line or 'CKR-' in line \
                    else 'filter'
                subprocess.call(['iptables', '-t', table, '-D'] + shlex.split(line)[1:])
        for kind in 'DV':
            chain = 'CKR-%s-%s' % (netns_name(name)[3:], kind)
            if subprocess.call(['iptables', '-t', 'nat', '-F', chain],
                               stderr=subprocess.DEVNULL) == 0:
                subprocess.call(['iptables', '-t', 'nat', '-X', chain])
    assert cocker('-a', 'destroy', '-c', name).rc == 0


def test_twenty_bridge_containers_booted_at_once_all_answer(cocker, test_image, names, busybox,
                                                           home):
    made = [(names('many'), free_port()) for _ in range(20)]
    for name, port in made:
        r = cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                   '--volume', busybox, '--port-mapping', '%d:80' % port)
        assert r.rc == 0, r
    results = {}

    def boot(name):
        results[name] = cocker('-a', 'boot', '-c', name, '-e',
                               '/bb/busybox nc -ll -p 80 -e /bb/busybox echo %s' % name)
    threads = [threading.Thread(target=boot, args=(name,)) for name, _ in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.rc == 0 for r in results.values()), results
    vips = set()
    for name, port in made:
        vip = vip_of(home, name)
        vips.add(vip)
        assert fetch(vip, 80).startswith(name)
        assert fetch('127.0.0.1', port).startswith(name)
    assert len(vips) == 20, 'every container got an address of its own'


def test_the_iptables_legacy_backend_works_too(cocker, test_image, names, busybox, home):
    if shutil.which('iptables-legacy') is None or subprocess.call(
            ['iptables-legacy', '-t', 'nat', '-n', '-L'], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL) != 0:
        pytest.skip('no iptables-legacy on this host (or no legacy tables in its kernel)')
    legacy = {'COCKER_IPTABLES': 'iptables-legacy'}
    name = names('leg')
    port = free_port()
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE', '--volume',
               busybox, '--port-mapping', '%d:80' % port, env=legacy)
    assert r.rc == 0, r
    r = cocker('-a', 'boot', '-c', name, '-e', '/bb/busybox nc -ll -p 80 -e /bb/busybox echo '
               'legacy', env=legacy)
    assert r.rc == 0, r
    saved = iptables_save('iptables-legacy-save').decode()
    assert 'cocker:%s' % name in saved
    assert 'cocker:%s' % name not in iptables_save().decode()
    assert fetch('127.0.0.1', port).startswith('legacy')
    # the teardown uses the backend the boot used, whatever this command's environment says
    assert cocker('-a', 'destroy', '-c', name, '-h').rc == 0
    assert leftovers(name) == []
    assert cocker('-a', 'del_bridge', env=legacy).rc == 0
    assert 'COCKER' not in iptables_save('iptables-legacy-save').decode()


def test_the_manual_address_plan_by_default(cocker, test_image, names, tmp_path):
    """No network.conf: bridge cocker0 with 166.88.0.1/16 and chains named COCKER."""
    if os.path.exists('/sys/class/net/cocker0'):
        pytest.skip('this host already has a cocker0 bridge, which is not ours to remove')
    from conftest import run_cocker
    home = str(tmp_path / 'home')
    os.makedirs(home)
    assert run_cocker(home, '-a', 'install_test').rc == 0
    try:
        r = run_cocker(home, '-a', 'create', '-m', 'test', '-c', 'test', '--net', 'BRIDGE',
                       '--port-mapping', '%d:9527' % free_port(), '-b')
        assert r.rc == 0, r
        addr = subprocess.check_output(['ip', '-o', '-4', 'addr', 'show', 'cocker0']).decode()
        assert ' 166.88.0.1/16 ' in addr
        assert os.path.exists('/run/netns/nns098F6BCD46')
        assert os.path.exists('/sys/class/net/eth098F6BCD46/master')
        r = run_cocker(home, '-a', 'run', '-c', 'test', '--cmd', 'ip -o -4 addr show eth0')
        assert ' 166.88.0.2/16 ' in r.out, r
        saved = iptables_save().decode()
        assert '-A PREROUTING ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j COCKER' in saved
        assert '-A INPUT -j COCKER-IN' in saved
        assert '-A COCKER -m comment --comment "cocker:test" -j CKR-098F6BCD46-D' in saved
        assert '-A CKR-098F6BCD46-D -p tcp -m tcp --dport' in saved
    finally:
        assert run_cocker(home, '-a', 'destroy', '-c', 'test', '-h', '-f').rc == 0
        assert run_cocker(home, '-a', 'del_bridge').rc == 0
    assert not os.path.exists('/sys/class/net/cocker0')
    default_chains = re.compile(r'(^|[\s:])COCKER(-POST|-FWD|-IN|-VIP)?(\s|$)', re.M)
    assert not default_chains.search(iptables_save().decode())


def test_del_bridge_removes_the_chains_of_a_container_whose_record_was_lost(tmp_path):
    """A container's network.state lost (an earlier cocker's teardown could not read it):
    its chains stay behind with the jumps into them, and del_bridge removes them too."""
    from conftest import run_cocker, unique_names
    home = str(tmp_path / 'home')
    os.makedirs(home)
    with open(os.path.join(home, 'network.conf'), 'w') as f:
        f.write('bridge = ckl%s\naddress = 10.%d.0.1/16\n' % (uuid.uuid4().hex[:8],
                                                             free_test_subnet()))
    name = unique_names('lost')()
    x = netns_name(name)[3:]
    assert run_cocker(home, '-a', 'install_test').rc == 0
    try:
        r = run_cocker(home, '-a', 'create', '-m', 'test', '-c', name, '--net', 'BRIDGE',
                       '--port-mapping', '%d:80' % free_port(), '-b')
        assert r.rc == 0, r
        os.remove(container_path(home, name, 'network.state'))
        assert run_cocker(home, '-a', 'shutdown', '-c', name).rc == 0
        assert ':CKR-%s-D ' % x in iptables_save().decode(), 'left behind'
        subprocess.check_call(['ip', 'netns', 'del', 'nns' + x])
        r = run_cocker(home, '-a', 'del_bridge')
        assert r.rc == 0, r
        assert 'CKR-%s-' % x not in iptables_save().decode()
    finally:
        subprocess.call(['ip', 'netns', 'del', 'nns' + x], stderr=subprocess.DEVNULL)
        assert run_cocker(home, '-a', 'destroy', '-c', name, '-f').rc == 0
        run_cocker(home, '-a', 'del_bridge')
    assert leftovers(name) == []


def test_a_boot_killed_after_its_network_setup_is_repaired(cocker, test_image, names, home):
    """What a cocker killed -9 right after wiring the network leaves: netns, veth, rules,
    claims and network.state, no pid file, nothing mounted."""
    name = names('halfnet')
    port = free_port()
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                  '--port-mapping', '%d:80' % port).rc == 0
    script = ('import os, sys; sys.path.insert(0, %r); import conftest; '
              'm = conftest.load_script("cocker_killed", %r); m.HOME = %r; '
              'm.setup_network(%r).finish(); os._exit(9)' % (os.path.dirname(COCKER) + '/tests', COCKER,
                                                    home, name))
    assert subprocess.call([PY, '-c', script]) == 9
    assert len(leftovers(name)) == 8, 'netns, veth, two DNAT rules, two jumps and two ' \
        'chains are there'
    listing = cocker('-s', 'containers').out.splitlines()
    assert [l.split()[-1] for l in listing if l.startswith(name + ' ')] == ['STOPED']
    assert leftovers(name) == [] and not os.path.exists(container_path(home, name,
                                                                       'network.state'))
    r = cocker('-a', 'boot', '-c', name)
    assert r.rc == 0, r
    assert len(leftovers(name)) == 8, 'exactly one set of rules after the boot'


IP_SHIM = r'''#!/bin/sh
# the real ip, but a batch with %s in it is %s
if [ "$1" = -batch ]; then
    input=$(cat)
    case "$input" in *%s*)
        echo "$$" >> %s
        %s ;;
    esac
    printf '%%s\n' "$input" | exec %s "$@"
fi
exec %s "$@"
'''
ETH0_BATCH, VETH_BATCH = '"route add default"', '"type veth"'


def ip_shim(tmp_path, batch, what, action):
    """{'PATH': ...} that puts an `ip` of IP_SHIM first -> (env, file of the pids of the
    batches it caught)."""
    real = shutil.which('ip')
    log = tmp_path / 'batches'
    shim = tmp_path / 'bin' / 'ip'
    shim.parent.mkdir()
    shim.write_text(IP_SHIM % (batch, what, batch, log, action, real, real))
    shim.chmod(0o755)
    return {'PATH': '%s:%s' % (shim.parent, os.environ['PATH'])}, log


def caught(log):
    """The pids of the batches the shim caught so far."""
    return [int(pid) for pid in log.read_text().split()] if log.exists() else []


def gone(pid):
    return not os.path.exists('/proc/%d' % pid)


def test_the_main_command_starts_only_once_eth0_is_configured(cocker, test_image, names,
                                                               tmp_path):
    """eth0's address and route are set while PID 1 sets up; the container's first process
    waits for them (an `ip` here takes 0.5 s over them)."""
    env, log = ip_shim(tmp_path, ETH0_BATCH, 'half a second late', 'sleep 0.5')
    name = names('gate')
    r = cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE', '-b', '--rm',
               '-e', 'cat /proc/net/route', env=env)
    assert r.rc == 0, r
    assert len(caught(log)) == 1, 'the slow batch ran, once'
    routes = [line.split() for line in r.out.splitlines()[1:]]
    assert [(iface, gateway != '00000000') for iface, dest, gateway, *_ in routes
            if dest == '00000000'] == [('eth0', True)], r.out


def test_a_failure_while_pid1_sets_up_undoes_the_boot_at_once(cocker, test_image, names,
                                                               tmp_path, home):
    env, log = ip_shim(tmp_path, ETH0_BATCH, 'refused',
                       'echo "RTNETLINK answers: Injected failure" >&2; exit 2')
    name = names('gatefail')
    port = free_port()
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                  '--port-mapping', '%d:80' % port).rc == 0
    started = time.time()
    r = cocker('-a', 'boot', '-c', name, env=env)
    assert r.rc != 0 and r.err.strip().splitlines() == [
        '*** ERROR : ip -batch - failed: RTNETLINK answers: Injected failure'], r
    assert time.time() - started < 5, 'PID 1 waiting for GO ended with the boot, not later'
    assert len(caught(log)) == 1
    assert leftovers(name) == []
    for key in ('pid', 'init_pid', 'network.state', 'cocker.sock'):
        assert not os.path.exists(container_path(home, name, key)), key
    listing = cocker('-s', 'containers').out.splitlines()
    assert [l.split()[-1] for l in listing if l.startswith(name + ' ')] == ['STOPED']
    r = cocker('-a', 'boot', '-c', name)
    assert r.rc == 0, r
    assert len(leftovers(name)) == 2 + 4 + 2


def test_pid1s_own_failure_is_reported_while_the_network_is_still_being_set_up(
        cocker, test_image, names, tmp_path):
    env, log = ip_shim(tmp_path, VETH_BATCH, 'half a second late', 'sleep 0.5')
    source = tmp_path / 'gone'
    source.mkdir()
    name = names('gatevol')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                  '--volume', '%s:/mnt' % source).rc == 0
    source.rmdir()
    r = cocker('-a', 'boot', '-c', name, env=env)
    assert r.rc != 0 and r.err.strip().splitlines() == [
        "*** ERROR : boot %s: volume source '%s' not found" % (name, source)], r
    assert len(caught(log)) == 1 and leftovers(name) == []


def test_ctrl_c_ends_a_boot_whose_ip_hangs(cocker, home, test_image, names, tmp_path):
    env, log = ip_shim(tmp_path, VETH_BATCH, 'hung', 'exec sleep 60')
    name = names('gateint')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE').rc == 0
    boot = cocker_process(home, '-a', 'boot', '-c', name, env=env)
    wait_for(lambda: caught(log), what='the veth batch to hang')
    boot.send_signal(signal.SIGINT)
    _, err = boot.communicate(timeout=10)
    assert boot.returncode == 130 and err.decode().strip().splitlines() == [
        '*** ERROR : interrupted'], err
    assert gone(caught(log)[0]), 'the hung ip was killed'
    assert leftovers(name) == []
    listing = cocker('-s', 'containers').out.splitlines()
    assert [l.split()[-1] for l in listing if l.startswith(name + ' ')] == ['STOPED']


def test_a_boot_abandoned_before_go_is_not_restarted(cocker, home, test_image, names,
                                                     tmp_path):
    """The CLI killed while PID 1 waits for GO: PID 1 ends, and its monitor, restart
    policy or not, tears the container down for good."""
    env, log = ip_shim(tmp_path, ETH0_BATCH, 'a second late', 'sleep 1')
    name = names('gatekill')
    assert cocker('-a', 'create', '-m', test_image, '-c', name, '--net', 'BRIDGE',
                  '--restart', 'always').rc == 0
    boot = cocker_process(home, '-a', 'boot', '-c', name, env=env)
    wait_for(lambda: caught(log), what='the eth0 batch to start')
    boot.kill()
    boot.communicate()
    cp = container_path(home, name)
    wait_for(lambda: not os.path.exists(os.path.join(cp, 'pid')), what='the monitor to end')
    wait_for(lambda: gone(caught(log)[0]), what='the orphaned ip to end')
    time.sleep(0.5)         # (a restart would come after 0.1 s)
    listing = cocker('-s', 'containers').out.splitlines()
    assert [l.split()[-1] for l in listing if l.startswith(name + ' ')] == ['STOPED']
    assert not os.path.exists(os.path.join(cp, 'restart_count'))
    assert leftovers(name) == []
    assert cocker('-a', 'boot', '-c', name).rc == 0


def test_concurrent_creates_get_distinct_vips(cocker, test_image, names, home):
    made = [names('vip') for _ in range(8)]
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(cocker(
        '-a', 'create', '-m', test_image, '-c', n, '--net', 'BRIDGE'))) for n in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.rc == 0 for r in results), results
    vips = [vip_of(home, n) for n in made]
    assert len(set(vips)) == 8, vips
    records = os.path.join(home, 'network', 'addresses')
    assert sorted(os.readlink(os.path.join(records, v)) for v in vips) == sorted(made)
    for n in made:
        assert cocker('-a', 'destroy', '-c', n).rc == 0
    assert not any(os.path.lexists(os.path.join(records, v)) for v in vips), \
        'destroy gives the addresses back'
