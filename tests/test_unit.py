"""Pure helpers of cocker.py and cockerinit.py, imported by path: no root, no kernel state."""

import os
import struct
import subprocess
import time

import pytest

from conftest import COCKER, COCKERINIT, PYTHON, load_script

cocker = load_script('cocker_under_test', COCKER)
init = load_script('cockerinit_under_test', COCKERINIT)


@pytest.mark.parametrize('name', ['test', 'calvin=rhel-7.4-x86_64', 'calvin=G6', 'a', 'x' * 64,
                                  'web_1', 'db+replica', 'a.b-c@d%e'])
def test_good_names_are_accepted(name):
    assert cocker.check_name('container', name) == name


@pytest.mark.parametrize('name', ['', '.', '..', '../x', 'a/b', '/abs', 'x' * 65, 'a\nb', 'tab\t',
                                  'sp ace', '-rf', '.hidden', 'a:b', 'a,b', '$(reboot)', 'a;b',
                                  'back`tick', 'ctl\x01', 'del\x7f', '数据库', 'caf\xe9',
                                  'csi\x9b', 'rtl\u202e', 'bad\udcff'])
def test_bad_names_are_refused_as_usage_errors(name):
    with pytest.raises(cocker.CockerError) as e:
        cocker.check_name('container', name)
    assert e.value.status == cocker.EXIT_USAGE
    assert '\n' not in e.value.message


def test_image_reference_splits_at_the_first_colon():
    assert cocker.parse_image_ref('test') == ('test', None)
    assert cocker.parse_image_ref('calvin=G6:1.0.0') == ('calvin=G6', '1.0.0')
    with pytest.raises(cocker.CockerError):
        cocker.parse_image_ref('test:1:2')
    with pytest.raises(cocker.CockerError):
        cocker.parse_image_ref('../etc:1')


def test_versions_compare_numerically_part_by_part():
    key = cocker.version_key
    assert key('1.10.0') > key('1.9.0')
    assert key('2') > key('1.99.99')
    assert key('1.0') == key('1.0.0')
    assert key('0.9.1') < key('1.0')
    assert key('1.2.3-rc1') == key('1.2.3')
    assert key('_') is None and key('latest') is None


def test_highest_version_prefers_numbers_then_unversioned(tmp_path, monkeypatch):
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path))
    for v in ['_', '1.9.0', '1.10.0', '0.9.1', '.hidden.installing.1']:
        os.makedirs(str(tmp_path / 'images' / 'app' / v / 'rlayer'))
    assert cocker.highest_version('app') == '1.10.0'
    os.makedirs(str(tmp_path / 'images' / 'plain' / '_' / 'rlayer'))
    assert cocker.highest_version('plain') == '_'
    assert cocker.highest_version('missing') is None
    with pytest.raises(cocker.CockerError) as e:
        cocker.resolve_image('missing')
    assert "image 'missing' not found" in e.value.message


def test_size_text_matches_the_c_cocker():
    assert cocker.size_text(0) == '0 B'
    assert cocker.size_text(1024) == '1024 B'
    assert cocker.size_text(1025) == '1 KB'
    assert cocker.size_text(24 * 1024 * 1024 + 5) == '24 MB'
    assert cocker.size_text(1 << 30) == '1024 MB'
    assert cocker.size_text(3 << 30) == '3 GB'
    assert cocker.size_text(-1) == '(unknow)'


def test_netns_name_is_the_c_cocker_md5_prefix():
    assert cocker.netns_name('test') == 'nns098F6BCD46'
    assert cocker.netns_name('calvin=G6') == 'nns2513F44178'


def test_volume_specifications():
    assert cocker.parse_volume('/tmp') == ('/tmp', '/tmp', False)
    assert cocker.parse_volume('/srv/data:/data') == ('/srv/data', '/data', False)
    assert cocker.parse_volume('/srv/data:/data:ro') == ('/srv/data', '/data', True)
    for bad in ['relative:/x', '/x:relative', '/a:/b:rx', '/a:/b:ro:x']:
        with pytest.raises(cocker.CockerError):
            cocker.parse_volume(bad)


def parse(*argv):
    o = cocker.parse_args(list(argv))
    cocker.check_args(o)
    return o


def test_options_in_any_order_later_wins_volumes_add_up():
    o = parse('-c', 'a', '-a', 'create', '--volume', '/x:/x', '-m', 'test', '-c', 'b',
              '--volume', '/y:/y', '-b', '-d')
    assert (o.action, o.container, o.image, o.boot, o.debug) == ('create', 'b', 'test', True, True)
    assert o.volumes == ['/x:/x', '/y:/y']
    assert o.net == 'HOST'


@pytest.mark.parametrize('argv,message', [
    (['-a', 'create'], "expect '--image' with action '-a create'"),
    (['-a', 'boot'], "expect '--container' with action '-a boot'"),
    (['-a', 'run', '-c', 'x'], "expect '--cmd' with action '-a run'"),
    (['-a', 'volume', '-c', 'x'], "expect '--volume' with action '-a volume'"),
    (['-a', 'vip', '-c', 'x'], "expect '--vip' with action '-a vip'"),
    (['-a', 'nosuch'], 'action[nosuch] invalid'),
    (['-s', 'nosuch'], 'show[nosuch] invalid'),
    (['-d'], 'cmd para action[(null)] invalid'),
    (['-a', 'create', '-m', 't', '--net', 'bridge'], "'--net' value[bridge] invalid"),
    (['-a', 'boot', '-c', 'x', '-t', '-e', 'sh'], "'-t' and '-e' cannot be used together"),
])
def test_missing_or_wrong_arguments_are_usage_errors(argv, message):
    with pytest.raises(cocker.CockerError) as e:
        parse(*argv)
    assert e.value.message == message
    assert e.value.status == 7


def test_unknown_option_and_missing_value_are_invalid_parameters():
    for argv in (['-a', 'boot', '--bogus'], ['-a', 'boot', '-c']):
        with pytest.raises(cocker.CockerError) as e:
            cocker.parse_args(argv)
        assert e.value.status == 7 and 'invalid parameter' in e.value.message


def test_frames_round_trip_and_split_at_any_boundary():
    class Sink(object):
        data = b''

        def sendall(self, b):
            self.data += b
    s = Sink()
    s.sendall(cocker.frame(b'R', b'cmd=true'))
    init.send_frame(s, b'O', b'x' * 70000)
    init.send_frame(s, b'X', init.pack_fields({'status': 3}))
    stream = s.data
    for cut in (1, 4, 5, 9, 70000, len(stream) - 1):
        frames, rest = cocker.split_frames(stream[:cut])
        more, rest = init.split_frames(rest + stream[cut:])
        assert [k for k, _ in frames + more] == [b'R', b'O', b'X'] and rest == b''
        assert (frames + more)[1][1] == b'x' * 70000
        assert cocker.unpack_fields((frames + more)[2][1]) == {'status': '3'}


def test_commands_split_as_shlex_splits_them_with_its_errors():
    import random
    import shlex

    def words(split, text):
        try:
            return split(text)
        except ValueError as e:
            return 'ValueError: %s' % e
    samples = ['', '  ', 'true', "sh -c 'echo \"a b\"; exit 3'", 'a\\ b "c\\"d" \'\'', '"x',
               "'y", 'z\\', '"w\\', 'é "ü ß"']
    rnd = random.Random(15)
    samples += [''.join(rnd.choice('ab \t\n\'"\\') for _ in range(rnd.randint(1, 14)))
                for _ in range(20000)]
    for text in samples:
        assert words(init.split_command, text) == words(shlex.split, text), repr(text)
    assert init.split_command("sh -c 'echo \"a b\"; exit 3'") == ['sh', '-c', 'echo "a b"; exit 3']
    assert words(init.split_command, '"x') == 'ValueError: No closing quotation'


def test_exit_status_is_code_or_128_plus_signal():
    assert init.exit_status(3 << 8) == 3 and cocker.exit_status(0) == 0
    assert init.exit_status(9) == 137 and cocker.exit_status(15) == 143


def test_podman_default_capabilities_are_kept():
    # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE
    # SYS_CHROOT SETFCAP; never SYS_ADMIN (21) nor SYS_PTRACE (19); not Docker's MKNOD (27),
    # NET_RAW (13), AUDIT_WRITE (29)
    assert sum(1 << c for c in init.KEEP_CAPS) == 0x800405fb
    assert not {21, 19, 27, 13, 29} & init.KEEP_CAPS


def test_open_in_root_keeps_symlinks_inside_the_root(tmp_path):
    root = tmp_path / 'root'
    outside = tmp_path / 'outside'
    os.makedirs(str(root / 'etc'))
    os.makedirs(str(outside))
    os.symlink(str(outside), str(root / 'abs'))          # absolute: means root/<outside>
    os.symlink('../../../..', str(root / 'etc' / 'up'))   # climbs: stops at root
    fd = os.open(str(root), os.O_PATH | os.O_DIRECTORY)
    try:
        for path, expect in (('/abs/x', root / str(outside).lstrip('/') / 'x'),
                             ('/etc/up/y', root / 'y')):
            target = cocker.open_in_root(fd, path)
            try:
                assert os.readlink('/proc/self/fd/%d' % target) == str(expect)
            finally:
                os.close(target)
    finally:
        os.close(fd)
    assert os.listdir(str(outside)) == [], 'a symlink made cocker create a directory outside'


def test_request_fields_round_trip_between_the_two_scripts():
    request = {'cmd': 'echo a=b; echo "数据" | tr = :', 'tty': '1', 'rows': 33, 'stdin': None}
    assert init.unpack_fields(cocker.pack_fields(request)) == {
        'cmd': 'echo a=b; echo "数据" | tr = :', 'tty': '1', 'rows': '33'}
    assert cocker.unpack_fields(init.pack_fields({'status': 137})) == {'status': '137'}


# ---- network values --------------------------------------------------------------------

def test_port_mappings_parse_with_host_address_and_protocol():
    parse = cocker.parse_port_mappings
    assert [str(m) for m in parse('19527:9527,5142:5142')] == ['19527:9527', '5142:5142']
    m, = parse('127.0.0.1:8080:80/udp')
    assert (m.host_ip, m.host_port, m.port, m.proto) == ('127.0.0.1', 8080, 80, 'udp')
    assert parse('8080:80/tcp')[0].proto == 'tcp'
    assert parse('') == [] and parse(',,') == []
    # the same port number over two protocols, or on two distinct addresses, is fine
    assert len(parse('53:53,53:53/udp,127.0.0.1:80:80,127.0.0.2:80:81')) == 4


@pytest.mark.parametrize('text', ['80', '80:', ':80', '0:80', '80:65536', '-1:80', 'a:80',
                                  '80:80/sctp', '1.2.3:80:80', 'localhost:80:80', '1:2:3:4',
                                  '80:80,80:81', '127.0.0.1:80:80,80:81', ' 80:80'])
def test_bad_port_mappings_are_usage_errors(text):
    with pytest.raises(cocker.CockerError) as e:
        cocker.parse_port_mappings(text)
    assert e.value.status == cocker.EXIT_USAGE and '\n' not in e.value.message


def bridge(address='166.88.0.1/16', name='cocker0'):
    return cocker.Bridge(name, address)


def test_vip_must_be_a_host_address_of_the_bridge_subnet():
    b = bridge()
    assert cocker.check_vip('166.88.0.2', b) == '166.88.0.2'
    assert cocker.check_vip('166.88.1.0', b) == '166.88.1.0'
    for vip, text in (('166.88.0.0', 'network'), ('166.88.255.255', 'broadcast'),
                      ('166.88.0.1', 'bridge'), ('166.89.0.2', 'outside the bridge subnet')):
        with pytest.raises(cocker.CockerError) as e:
            cocker.check_vip(vip, b)
        assert text in e.value.message
    with pytest.raises(cocker.CockerError) as e:
        cocker.check_vip('166.88.0.2/16', b)
    assert e.value.status == cocker.EXIT_USAGE


def test_chain_names_follow_the_bridge():
    assert (bridge().dnat_chain, bridge().post_chain, bridge().forward_chain) == (
        'COCKER', 'COCKER-POST', 'COCKER-FWD')
    long_bridge = bridge('10.9.0.1/16', 'b' * 15)
    assert long_bridge.post_chain == 'COCKER-%s-POST' % ('b' * 15)
    assert max(len(long_bridge.post_chain), len(long_bridge.forward_chain),
               len(long_bridge.vip_chain)) <= 28


def test_container_rules_match_only_its_own_traffic():
    """DNAT per mapping in the container's own chains (the bridge's hold only jumps into
    them); masquerading is the bridge's, but out of --host-eth only for such a container."""
    b = bridge()
    maps = cocker.parse_port_mappings('8080:80,127.0.0.1:5353:53/udp')
    chains, rules, first = cocker.container_rules('web', b, '166.88.0.5', maps, None)
    x = cocker.netns_name('web')[3:]
    assert [(table, chain, [' '.join(words) for words in own]) for table, chain, own in chains] \
        == [('nat', 'CKR-%s-D' % x, [
                '-p tcp -m tcp --dport 8080 -m comment --comment cocker:web '
                '-j DNAT --to-destination 166.88.0.5:80',
                '-d 127.0.0.1/32 -p udp -m udp --dport 5353 -m comment --comment cocker:web '
                '-j DNAT --to-destination 166.88.0.5:53']),
            # the host reaches VIP:8080 as the manual's `ssh root@VIP -p 2222` does
            ('nat', 'CKR-%s-V' % x, [
                '-d 166.88.0.5/32 -p tcp -m tcp --dport 8080 -m comment --comment cocker:web '
                '-j DNAT --to-destination 166.88.0.5:80',
                '-d 166.88.0.5/32 -p udp -m udp --dport 5353 -m comment --comment cocker:web '
                '-j DNAT --to-destination 166.88.0.5:53'])]
    assert [(table, ' '.join(words)) for table, words in rules] == [
        ('nat', 'COCKER -m comment --comment cocker:web -j CKR-%s-D' % x),
        ('nat', 'COCKER-VIP -m comment --comment cocker:web -j CKR-%s-V' % x)]
    assert first == []
    assert max(len(chain) for _, chain, _ in chains) <= 28
    # the same port inside: nothing for the host to VIP:HOST_PORT
    chains, rules, _ = cocker.container_rules('web', b, '166.88.0.5',
                                              cocker.parse_port_mappings('80:80'), None)
    assert [chain for _, chain, _ in chains] == ['CKR-%s-D' % x] and len(rules) == 1
    assert cocker.container_rules('web', b, '166.88.0.5', [], None) == ([], [], [])
    # the bridge masquerades its containers, not the host's own packets from its address
    assert ['-s', '166.88.0.0/16', '!', '-o', 'cocker0', '-m', 'addrtype', '!', '--src-type',
            'LOCAL', '-j', 'MASQUERADE'] in \
        dict((chain, rules) for _, chain, rules in cocker.bridge_chains(b))['COCKER-POST']
    # --host-eth: masqueraded out of it, before the bridge's rule, elsewhere routed as it is
    parts = cocker.container_rules('web', b, '166.88.0.5',
                                   cocker.parse_port_mappings('8080:8080'), 'bond0')
    lines = [(table, ' '.join(words)) for table, words in cocker.rules_to_add(*parts)]
    assert lines == [
        ('nat', ':CKR-%s-D - [0:0]' % x),
        ('nat', '-A CKR-%s-D -p tcp -m tcp --dport 8080 -m comment --comment cocker:web '
                '-j DNAT --to-destination 166.88.0.5:8080' % x),
        ('nat', '-A COCKER -m comment --comment cocker:web -j CKR-%s-D' % x),
        # (RETURN, not ACCEPT: the rest of POSTROUTING, the host's own rules, still applies)
        ('nat', '-I COCKER-POST 1 -s 166.88.0.5/32 ! -o cocker0 -m comment --comment '
                'cocker:web -j RETURN'),
        ('nat', '-I COCKER-POST 1 -s 166.88.0.5/32 -o bond0 -m comment --comment cocker:web '
                '-j MASQUERADE')]
    # the jumps keep DNAT to connections addressed to this host
    jumps = [(table, chain, ' '.join(words)) for table, chain, words in cocker.bridge_jumps(b)]
    assert ('nat', 'OUTPUT', '-m addrtype --dst-type LOCAL -j COCKER') in jumps
    assert ('nat', 'PREROUTING', '! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j COCKER') \
        in jumps, 'other machines never reach a mapping bound to 127.0.0.1'


def test_a_link_is_gone_at_its_own_rtm_dellink_only():
    """The wait for a veth to go with its namespace: the RTM_DELLINK of its index, not the
    bridge's AF_BRIDGE one of the port nor a message of another link."""
    import struct
    watch = cocker.link_watch.__new__(cocker.link_watch)
    watch.index = 42

    def message(kind, family, index):       # (with an IFLA_IFNAME attribute)
        return struct.pack('=IHHII', 40, kind, 0, 0, 0) + struct.pack(
            '=BxHiII', family, 1, index, 0, 0) + struct.pack('=HH', 8, 3) + b'eth\0'
    assert not watch.deleted(message(17, 7, 42))            # AF_BRIDGE: the port left
    assert not watch.deleted(message(16, 0, 42))            # RTM_NEWLINK
    assert not watch.deleted(message(17, 0, 41))
    assert watch.deleted(message(16, 0, 42) + message(17, 7, 42) + message(17, 0, 42))
    assert not watch.deleted(b'') and not watch.deleted(message(17, 0, 42)[:31])


def test_a_deleted_chain_is_seen_in_nf_tables_notices():
    """The notice a committed deletion of a container's chain sends (NFT_MSG_DELCHAIN,
    its table and name among other attributes), parsed as chain_watch reads it."""
    import struct

    def attribute(number, value):
        return struct.pack('=HH', 4 + len(value), number) + value + b'\0' * (-len(value) % 4)

    def notice(kind, table, chain):
        body = struct.pack('=BBH', 2, 0, 0) + attribute(1, table + b'\0') + attribute(
            2 | 0x4000, struct.pack('>Q', 7)) + attribute(3, chain + b'\0')
        return struct.pack('=IHHII', 16 + len(body), kind, 0, 0, 4321) + body
    data = notice((10 << 8) | 3, b'nat', b'CKR-X-D') + notice(cocker.NFT_DELCHAIN, b'nat',
                                                              b'CKR-X-V')
    assert [(kind, sender, info[0], attributes[1], attributes[3]) for kind, sender, info,
            attributes in cocker.netlink_messages(data, 4)] == [
        ((10 << 8) | 3, 4321, 2, b'nat', b'CKR-X-D'),
        (cocker.NFT_DELCHAIN, 4321, 2, b'nat', b'CKR-X-V')]
    assert list(cocker.netlink_messages(data[:-1], 4))[1:] == [], 'a cut message is not read'
    # an attribute said to be longer than its message is not read into the next one
    long_name = notice(cocker.NFT_DELCHAIN, b'nat', b'CKR-X-V')
    long_name = long_name[:-12] + struct.pack('=HH', 40, 3) + long_name[-8:]
    assert [3 in attributes for _, _, _, attributes in cocker.netlink_messages(
        long_name + data, 4)] == [False, True, True]


def test_a_stop_written_down_says_whether_a_removal_follows(tmp_path, monkeypatch):
    """stopped_by_operator: the stopping command (PID-START), ' remove' for a destroy (its
    monitor fsyncs nothing more); a command that is gone stops and removes nothing."""
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path))
    (tmp_path / 'containers' / 'c').mkdir(parents=True)
    say = lambda text: cocker.write_attr('c', 'stopped_by_operator', text)
    mine, dead = cocker.staging_owner(), '%d-1' % (2 ** 22 + 1)
    for text, stopping, removing in ((mine, True, False), (mine + ' remove', True, True),
                                     (dead + ' remove', False, False), (None, False, False)):
        say(text)
        assert (cocker.operator_stopping('c'), cocker.operator_removing('c')) == \
            (stopping, removing), text


def test_network_config_defaults_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path))
    b = cocker.network_config()
    assert (b.name, str(b.address), str(b.network)) == ('cocker0', '166.88.0.1', '166.88.0.0/16')
    conf = tmp_path / 'network.conf'
    conf.write_text('# private range\nbridge = br-ck\naddress = 172.30.0.1/24  # lab\n')
    b = cocker.network_config()
    assert (b.name, str(b.address), str(b.network)) == ('br-ck', '172.30.0.1', '172.30.0.0/24')
    for mask in ('255.255.252.0', '0.0.3.255'):             # a netmask, a host mask
        conf.write_text('address = 10.4.3.2/%s\n' % mask)
        b = cocker.network_config()
        assert (b.cidr, str(b.network), b.network.prefixlen) == ('10.4.3.2/22', '10.4.0.0/22',
                                                                   22)
    for text in ('bridge = a/b\n', 'address = 172.30.0.1\n', 'address = 172.30.0.0/24\n',
                 'address = 172.30.0.255/24\n', 'address = 10.0.0.1/31\n',
                 'address = 10.0.0.1/255.0.255.0\n', 'address = 10.0.0.1/127.0.0.0\n',
                 'address = 10.0.0.1/+8\n', 'address = 10.0.0.256/8\n',
                 'address = 10.0.0.1/16/2\n', 'color = blue\n', 'bridge\n',
                 'bridge = waytoolongbridgename\n'):
        conf.write_text(text)
        with pytest.raises(cocker.CockerError) as e:
            cocker.network_config()
        assert '\n' not in e.value.message, text


def test_veth_and_netns_names_are_the_c_cocker_ones():
    assert cocker.veth_name('test') == 'eth098F6BCD46'
    assert cocker.netns_path('calvin=G6') == '/run/netns/nns2513F44178'


# ---- cgroup limits ---------------------------------------------------------------------

def test_cpu_lists_sizes_and_quotas_parse(monkeypatch):
    monkeypatch.setattr(cocker, 'online_cpus', lambda: [0, 1, 2, 3])
    assert cocker.parse_cpu_list('0,2-3') == [0, 2, 3]
    assert cocker.parse_cpus('1-3') == '1,2,3' and cocker.parse_cpus('0') == '0'
    assert cocker.parse_cpu_quota('25%') == 25.0 and cocker.parse_cpu_quota('250%') == 250.0
    assert cocker.parse_cpu_quota('12.5%') == 12.5
    assert cocker.Limits(cpu_quota=12.5).quota_us() == 12500
    assert cocker.parse_size('100M') == 100 << 20 and cocker.parse_size('1g') == 1 << 30
    assert cocker.parse_size('4096K') == 4 << 20 and cocker.parse_size('8MB') == 8 << 20
    assert cocker.parse_size(str(5 << 20)) == 5 << 20
    assert cocker.parse_pids_limit('20') == 20


@pytest.mark.parametrize('parser, text', [
    ('parse_cpus', '4'), ('parse_cpus', '0-4'), ('parse_cpus', ''), ('parse_cpus', '1,'),
    ('parse_cpus', '3-1'), ('parse_cpus', 'x'), ('parse_cpus', '\u0661'),
    ('parse_cpu_quota', '0%'), ('parse_cpu_quota', '401%'), ('parse_cpu_quota', '30'),
    ('parse_cpu_quota', '-1%'), ('parse_cpu_quota', 'nan%'), ('parse_cpu_quota', '0.5%'),
    ('parse_size', '-1M'), ('parse_size', '1.5G'), ('parse_size', 'M'), ('parse_size', '3M'),
    ('parse_size', '10X'), ('parse_pids_limit', '0'), ('parse_pids_limit', '-3'),
    ('parse_pids_limit', '1e3')])
def test_bad_limits_are_usage_errors(parser, text, monkeypatch):
    monkeypatch.setattr(cocker, 'online_cpus', lambda: [0, 1, 2, 3])
    with pytest.raises(cocker.CockerError) as e:
        getattr(cocker, parser)(text)
    assert e.value.status == cocker.EXIT_USAGE and '\n' not in e.value.message


def recording_writes(monkeypatch):
    """Record every cgroup file write as (path relative to the root, value)."""
    writes = []
    real = cocker.write_cgroup_file

    def record(directory, filename, value):
        writes.append((os.path.join(directory, filename), value))
        real(directory, filename, value)
    monkeypatch.setattr(cocker, 'write_cgroup_file', record)
    return writes


def kernel_files(monkeypatch, names):
    """make_cgroup in a fake tree: each new directory gets the files (empty) that the
    kernel's mkdir would make there; cocker writes only into files that exist."""
    real_make = cocker.make_cgroup

    def make(path, cpuset=False):
        if not os.path.isdir(path):
            os.mkdir(path)
            for key in names(path):
                open(os.path.join(path, key), 'w').close()
        real_make(path, cpuset)
    monkeypatch.setattr(cocker, 'make_cgroup', make)


V2_FILES = ('cgroup.controllers', 'cgroup.subtree_control', 'cpuset.cpus', 'cpu.max',
            'memory.max', 'memory.swap.max', 'pids.max')


def test_cgroup_v2_tree_gets_the_kernel_files_and_values(tmp_path, monkeypatch):
    """A temporary directory laid out like the root of a cgroup2 mount."""
    root = str(tmp_path)
    (tmp_path / 'cgroup.controllers').write_text('cpuset cpu io memory hugetlb pids rdma\n')
    (tmp_path / 'cgroup.subtree_control').write_text('memory\n')
    assert cocker.cgroup_version(root) == 2
    kernel_files(monkeypatch, lambda path: V2_FILES)
    writes = recording_writes(monkeypatch)
    limits = cocker.Limits(cpus='0,1', cpu_quota=30.0, mem_limit=64 << 20, pids_limit=20)
    controllers, plan = cocker.cgroup_plan(root, 'web', limits)
    cocker.apply_cgroup_plan(root, controllers, limits, plan)
    base = os.path.join(root, 'cocker', 'web')
    assert [d for d, _ in plan] == [base]
    rel = [(os.path.relpath(p, root), v) for p, v in writes]
    assert rel == [
        # memory was already enabled at the root; the rest is enabled on the way down
        ('cgroup.subtree_control', '+pids'), ('cgroup.subtree_control', '+cpuset'),
        ('cgroup.subtree_control', '+cpu'),
        ('cocker/cgroup.subtree_control', '+memory'), ('cocker/cgroup.subtree_control', '+pids'),
        ('cocker/cgroup.subtree_control', '+cpuset'), ('cocker/cgroup.subtree_control', '+cpu'),
        ('cocker/web/cpuset.cpus', '0,1'), ('cocker/web/cpu.max', '30000 100000'),
        ('cocker/web/memory.max', '67108864'), ('cocker/web/memory.swap.max', '0'),
        ('cocker/web/pids.max', '20')]
    # no limits: the container still gets its cgroup (accounting), nothing is written in it
    del writes[:]
    controllers, plan = cocker.cgroup_plan(root, 'idle', cocker.Limits())
    cocker.apply_cgroup_plan(root, controllers, cocker.Limits(), plan)
    assert plan == [(os.path.join(root, 'cocker', 'idle'), [])]
    assert not [w for w in writes if '/idle/' in w[0]]


def test_cgroup_v2_without_a_needed_controller_is_refused(tmp_path):
    (tmp_path / 'cgroup.controllers').write_text('memory pids\n')
    (tmp_path / 'cgroup.subtree_control').write_text('')
    limits = cocker.Limits(cpu_quota=50.0)
    controllers, plan = cocker.cgroup_plan(str(tmp_path), 'web', limits)
    with pytest.raises(cocker.CockerError) as e:
        cocker.apply_cgroup_plan(str(tmp_path), controllers, limits, plan)
    assert "no 'cpu' controller" in e.value.message


def test_cgroup_v1_hierarchies_one_directory_each(tmp_path, monkeypatch):
    """RHEL 7 style: cpu and cpuacct share one hierarchy behind two symlinks."""
    for d in ('cpuset', 'cpu,cpuacct', 'memory', 'pids'):
        (tmp_path / d).mkdir()
    (tmp_path / 'cpu').symlink_to('cpu,cpuacct')
    (tmp_path / 'cpuacct').symlink_to('cpu,cpuacct')
    (tmp_path / 'cpuset' / 'cpuset.cpus').write_text('0-3\n')
    (tmp_path / 'cpuset' / 'cpuset.mems').write_text('0\n')
    root = str(tmp_path)
    assert cocker.cgroup_version(root) == 1
    writes = recording_writes(monkeypatch)
    limits = cocker.Limits(cpus='2', cpu_quota=150.0, mem_limit=100 << 20, pids_limit=64)
    controllers, plan = cocker.cgroup_plan(root, 'db', limits)
    assert controllers == []
    assert [os.path.relpath(d, root) for d, _ in plan] == [
        'cpuset/cocker/db', 'cpu/cocker/db', 'memory/cocker/db', 'pids/cocker/db']
    kernel_files(monkeypatch, v1_files)
    cocker.apply_cgroup_plan(root, controllers, limits, plan)
    rel = [(os.path.relpath(p, root), v) for p, v in writes]
    assert rel == [
        ('cpuset/cocker/cpuset.mems', '0'), ('cpuset/cocker/cpuset.cpus', '0-3'),
        ('cpuset/cocker/db/cpuset.mems', '0'), ('cpuset/cocker/db/cpuset.cpus', '0-3'),
        ('cpuset/cocker/db/cpuset.cpus', '2'),
        ('cpu/cocker/db/cpu.cfs_period_us', '100000'), ('cpu/cocker/db/cpu.cfs_quota_us', '150000'),
        ('memory/cocker/db/memory.memsw.limit_in_bytes', '-1'),
        ('memory/cocker/db/memory.limit_in_bytes', str(100 << 20)),
        ('memory/cocker/db/memory.memsw.limit_in_bytes', str(100 << 20)),
        ('pids/cocker/db/pids.max', '64')]


def v1_files(path, swap_accounting=True):
    """The files a v1 hierarchy's mkdir makes (of those cocker writes)."""
    if '/cpuset/' in path + '/':
        return ('cpuset.cpus', 'cpuset.mems')
    if '/memory/' in path + '/':
        return ('memory.limit_in_bytes', 'memory.swappiness') + (
            ('memory.memsw.limit_in_bytes',) if swap_accounting else ())
    return ('cpu.cfs_period_us', 'cpu.cfs_quota_us', 'pids.max')


def test_cgroup_v1_memory_limit_without_swap_accounting(tmp_path, monkeypatch):
    """Debian's kernels count no swap unless booted with swapaccount=1: no memsw files, so
    the limit holds with swappiness 0 instead."""
    for d in ('cpu', 'cpuacct', 'memory', 'pids'):
        (tmp_path / d).mkdir()
    root = str(tmp_path)
    kernel_files(monkeypatch, lambda path: v1_files(path, swap_accounting=False))
    writes = recording_writes(monkeypatch)
    limits = cocker.Limits(mem_limit=64 << 20)
    controllers, plan = cocker.cgroup_plan(root, 'db', limits)
    cocker.apply_cgroup_plan(root, controllers, limits, plan)
    written = dict((os.path.relpath(p, root), open(p).read()) for p, _ in writes
                   if os.path.exists(p))
    assert written == {'memory/cocker/db/memory.swappiness': '0',
                       'memory/cocker/db/memory.limit_in_bytes': str(64 << 20)}


def test_cgroup_v1_without_pids_controller_refuses_only_a_pids_limit(tmp_path):
    for d in ('cpu', 'cpuacct', 'memory'):
        (tmp_path / d).mkdir()
    _, plan = cocker.cgroup_plan(str(tmp_path), 'old', cocker.Limits(mem_limit=64 << 20))
    assert len(plan) == 3
    with pytest.raises(cocker.CockerError) as e:
        cocker.cgroup_plan(str(tmp_path), 'old', cocker.Limits(pids_limit=10))
    assert "no cgroup 'pids' controller" in e.value.message


def test_network_values_are_strict_on_every_python():
    for text in ('166.88.00.5', '010.1.1.1', '1.2.3.4 ', '1.2.3.4\n', '1.2.3', '1.2.3.4.5',
                 '1.2.3.256', '1.2.3.-1', '1.2.3.+1', '1.2.3.\u0661', '', '1..2.3', '0x1.2.3.4'):
        with pytest.raises(cocker.CockerError):
            cocker.parse_ipv4(text, '--vip')
    assert cocker.parse_ipv4('0.10.255.1', '--vip') == '0.10.255.1'
    assert [cocker.ipv4_text(n) for n in cocker.Subnet(cocker.ipv4_number('10.1.2.3'),
                                                          30).hosts()] == ['10.1.2.1', '10.1.2.2']
    assert cocker.parse_port_mappings('0.0.0.0:80:80')[0].host_ip is None
    with pytest.raises(cocker.CockerError):
        cocker.parse_port_mappings('\u00b2:80')
    for bad in ('eth0#x', 'a"b', "a'b", 'a\\b', 'a b', 'a:1'):
        with pytest.raises(cocker.CockerError):
            cocker.check_ifname(bad, '--host-eth')
    assert cocker.check_ifname('bond0.100', '--host-eth') == 'bond0.100'


def test_containers_cannot_reach_the_hosts_loopback_services():
    chains = dict((chain, [' '.join(rule) for rule in rules])
                  for _, chain, rules in cocker.bridge_chains(bridge()))
    assert chains['COCKER-IN'] == [
        '-i cocker0 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP']
    assert ('filter', 'INPUT', ['-j', 'COCKER-IN']) in cocker.bridge_jumps(bridge())


# ---- archive guard ---------------------------------------------------------------------

def tar_stream(members, fmt=None):
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w', format=fmt or tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def test_archive_guard_follows_the_pax_size_as_tar_does():
    import tarfile
    # a member whose PAX size (what tar reads) differs from its header size: the data hide a
    # header that the guard must not take for one, nor pass on unjudged
    hidden = tar_stream([(tarfile.TarInfo('/etc/evil'), b'')])[:512]
    info = tarfile.TarInfo('innocent')
    info.size = 0
    info.pax_headers = {'size': '512'}
    raw = tar_stream([(info, None)])
    assert b'size=512' in raw[512:1024], 'a PAX header, then the member header'
    # the 512 data bytes tar will read for 'innocent' are the hidden header
    guard = cocker.ArchiveGuard()
    out = guard.feed(raw[:1536] + hidden + b'\0' * 1024)
    guard.finish()
    assert hidden in out, 'passed on as the data of innocent, not judged as a member'


def test_archive_guard_refuses_data_on_links_and_directories():
    import tarfile
    info = tarfile.TarInfo('d')
    info.type = tarfile.DIRTYPE
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = b'%011o\0' % 512
    block[148:156] = b' ' * 8
    block[148:156] = b'%06o\0 ' % sum(block)
    with pytest.raises(cocker.CockerError) as e:
        cocker.ArchiveGuard().feed(bytes(block) + b'\0' * 512)
    assert 'data on a member' in e.value.message


def guard_refuses(data, text):
    with pytest.raises(cocker.CockerError) as e:
        guard = cocker.ArchiveGuard()
        guard.feed(data + b'\0' * 1024)
        guard.finish()
    assert text in e.value.message, e.value.message


def test_archive_guard_refuses_what_tar_would_read_differently():
    import tarfile

    def info(name, kind=tarfile.REGTYPE, size=0, link='', pax=None):
        i = tarfile.TarInfo(name)
        i.type, i.size, i.linkname = kind, size, link
        if pax:
            i.pax_headers = pax
        return i

    def buf(i, fmt=tarfile.PAX_FORMAT):
        return i.tobuf(fmt, 'utf-8', 'surrogateescape')
    data = b'\0' * 1024
    # a file named like a directory: tar would not read its data
    guard_refuses(buf(info('d/', size=1024)) + data, 'named like a directory')
    # a global header that changes every later member
    glob = tarfile.TarInfo._create_pax_generic_header({'size': '1024'}, tarfile.XGLTYPE,
                                                       'utf-8')
    guard_refuses(glob + buf(info('f')), 'global header')
    # two extended headers for one member: tar keeps only the last
    x_only = buf(info('a', pax={'size': '1024'}))[:-512]
    guard_refuses(x_only + buf(info('b', pax={'mtime': '1'})), 'two extended headers')
    # sparse members, whose data tar lays out its own way
    guard_refuses(buf(info('s', pax={'GNU.sparse.name': 'l'})), 'sparse')
    sparse = bytearray(buf(info('s'), tarfile.USTAR_FORMAT))
    sparse[156:157] = b'S'
    sparse[148:156] = b' ' * 8
    sparse[148:156] = b'%06o\0 ' % sum(sparse)
    guard_refuses(bytes(sparse), "unknown type 'S'")
    # a.//l/f is written through the symlink l
    guard_refuses(buf(info('l', tarfile.SYMTYPE, link='/')) + buf(info('.//l/./f')),
                  "through its own symbolic link 'l'")


# ---- confinement: the seccomp filter and the device program, run by small interpreters --

def run_seccomp(prog, nr, arch, arg0=0):
    """The action classic BPF `prog` returns for struct seccomp_data {nr, arch, ip, args}."""
    data = struct.pack('<iIQ6Q', nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    a, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:                                    # ld [k]
            a, pc = struct.unpack_from('<I', data, k)[0], pc + 1
        elif code in (0x15, 0x35, 0x45):                    # jeq, jge, jset
            taken = a == k if code == 0x15 else a >= k if code == 0x35 else a & k
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:                                  # ret k
            return k
        else:
            raise AssertionError('unexpected instruction %r' % (prog[pc],))


ALLOW, EPERM, ENOSYS = 0x7fff0000, 0x50001, 0x50026


def loaded_program(machine):
    """The instructions of the filter as PID 1 hands it to the kernel (packed)."""
    packed = init.packed_filter(machine)
    assert len(packed) == 8 * len(init.seccomp_program(machine))
    return [init.SOCK_FILTER.unpack_from(packed, i) for i in range(0, len(packed), 8)]


def test_the_seccomp_filter_decides_as_documented_on_x86_64():
    prog = loaded_program('x86_64')
    assert len(prog) < 4096 and all(0 <= jt < 256 and 0 <= jf < 256 for _, jt, jf, _ in prog)
    arch = 0xc000003e
    numbers = dict((name, n[0]) for name, n in init.SYSCALLS.items())
    for name in init.DENIED:
        if numbers[name] is not None:
            assert run_seccomp(prog, numbers[name], arch) == EPERM, name
    assert run_seccomp(prog, 435, arch) == ENOSYS                       # clone3
    for allowed in (0, 1, 39, 57, 59, 60, 231, 500):                   # read ... exit_group
        assert run_seccomp(prog, allowed, arch) == ALLOW, allowed
    assert run_seccomp(prog, 56, arch, 0x01200011) == ALLOW            # fork as glibc does it
    assert run_seccomp(prog, 56, arch, 0x10000011) == EPERM            # CLONE_NEWUSER
    assert run_seccomp(prog, 56, arch, 0x40000000 | 17) == EPERM       # CLONE_NEWNET
    assert run_seccomp(prog, 56, arch, (1 << 32) | 17) == ALLOW        # high word: unused
    assert run_seccomp(prog, 272, arch, 0x200) == ALLOW                # unshare(CLONE_FS)
    assert run_seccomp(prog, 272, arch, 0x80) == EPERM                 # CLONE_NEWTIME
    assert run_seccomp(prog, 41, arch, 40) == EPERM                    # socket(AF_VSOCK)
    assert run_seccomp(prog, 41, arch, 2) == ALLOW                     # socket(AF_INET)
    assert run_seccomp(prog, 41, arch, 1) == ALLOW                     # socket(AF_UNIX)
    for persona in init.PERSONALITIES:
        assert run_seccomp(prog, 135, arch, persona) == ALLOW, persona
    assert run_seccomp(prog, 135, arch, 0x0400000) == EPERM            # READ_IMPLIES_EXEC
    assert run_seccomp(prog, 0x40000000 | 39, arch) == EPERM           # x32
    assert run_seccomp(prog, 39, 0x40000003) == EPERM                  # i386
    assert run_seccomp(prog, 39, 0xc00000b7) == EPERM                  # another machine


def test_the_seccomp_filter_has_the_aarch64_numbers_and_none_for_others():
    prog = loaded_program('aarch64')
    arch = 0xc00000b7
    assert run_seccomp(prog, 219, arch) == EPERM                       # keyctl
    assert run_seccomp(prog, 39, arch) == EPERM                        # umount2
    assert run_seccomp(prog, 172, arch) == ALLOW                       # getpid
    assert run_seccomp(prog, 220, arch, 0x10000011) == EPERM           # clone NEWUSER
    assert run_seccomp(prog, 198, arch, 40) == EPERM                   # socket(AF_VSOCK)
    assert run_seccomp(prog, 0x40000000 | 172, arch) == ALLOW          # no x32 here
    assert run_seccomp(prog, 172, 0xc000003e) == EPERM
    assert init.packed_filter('s390x') is None, 'no table: the boot is refused'


def run_device_program(code, kind, major, minor):
    """What the eBPF device program returns for bpf_cgroup_dev_ctx (read access)."""
    ctx = struct.pack('<III', 2 << 16 | {'b': 1, 'c': 2}[kind], major, minor)
    insns = [struct.unpack_from('<BBhi', code, i) for i in range(0, len(code), 8)]
    regs, pc = [0] * 11, 0
    while True:
        op, registers, off, imm = insns[pc]
        dst, src = registers & 0xf, registers >> 4
        if op == 0x61:                                      # ldx w
            assert src == 1 and off in (0, 4, 8)
            regs[dst] = struct.unpack_from('<I', ctx, off)[0]
        elif op == 0x57:                                    # and k
            regs[dst] &= imm
        elif op == 0x55:                                    # jne k
            pc += off if regs[dst] != imm else 0
        elif op == 0xb7:                                    # mov k
            regs[dst] = imm
        elif op == 0x95:                                    # exit
            return regs[0]
        else:
            raise AssertionError('unexpected instruction %r' % (insns[pc],))
        pc += 1


def test_the_device_program_allows_exactly_the_allow_list():
    code = cocker.device_program()
    for kind, major, minor in (('c', 1, 3), ('c', 1, 5), ('c', 1, 7), ('c', 1, 8), ('c', 1, 9),
                               ('c', 5, 0), ('c', 5, 2), ('c', 136, 0), ('c', 136, 77)):
        assert run_device_program(code, kind, major, minor) == 1, (kind, major, minor)
    for kind, major, minor in (('b', 7, 0), ('b', 8, 0), ('b', 1, 3), ('c', 1, 1),
                               ('c', 1, 4), ('c', 5, 1), ('c', 10, 229), ('c', 4, 0),
                               ('c', 137, 0), ('c', 0, 0)):
        assert run_device_program(code, kind, major, minor) == 0, (kind, major, minor)
    assert cocker.device_rules() == ['c 1:3 rwm', 'c 1:5 rwm', 'c 1:7 rwm', 'c 1:8 rwm',
                                     'c 1:9 rwm', 'c 5:0 rwm', 'c 5:2 rwm', 'c 136:* rwm']


# ---- text and files from outside --------------------------------------------------------

@pytest.mark.parametrize('field, value', [
    (b'0000644\0', 0o644), (b'   644 \0', 0o644), (b'00000001130\0', 600),
    (b'000644\0 ', 0o644), (b'\x80' + b'\0' * 6 + b'\x01', 1),
    (b'\xff' + b'\xff' * 7, -1)])
def test_tar_numbers_as_gnu_tar_reads_them(field, value):
    assert cocker.tar_number(field) == value


@pytest.mark.parametrize('field', [b'\x00000644', b'\0' * 8, b' ' * 8, b'0644x\0\0\0',
                                   b'06 44\0\0\0', b'+0000644', b'0o644\0\0\0', b'\t0644\0\0\0'])
def test_tar_numbers_gnu_tar_could_read_otherwise_are_refused(field):
    with pytest.raises(cocker.CockerError) as e:
        cocker.tar_number(field)
    assert 'malformed number field' in e.value.message


def test_printable_escapes_control_characters_only():
    assert cocker.printable('plain: 我的树叶 / a-b_c') == 'plain: 我的树叶 / a-b_c'
    assert cocker.printable('\x1b]0;x\x07\x1b[2J') == '\\x1b]0;x\\x07\\x1b[2J'
    assert cocker.printable('c1\x9b del\x7f nul\0 tab\t') == 'c1\\x9b del\\x7f nul\\x00 tab\\x09'
    assert cocker.printable(b'raw\xff'.decode('utf-8', 'surrogateescape')) == 'raw\\xff'
    assert cocker.printable('two\nlines\n', keep='\n') == 'two\nlines\n'
    assert cocker.printable('two\nlines') == 'two\\x0alines'


def test_printable_is_the_character_by_character_escape():
    """What printable() does at C speed (a JSON listing or a log is one text of many
    lines), checked against the plain definition on random text of every kind."""
    import random

    def escaped(text, keep):
        out = []
        for ch in text:
            code = ord(ch)
            if ch in keep or not (code < 32 or 127 <= code < 160 or 0xdc80 <= code <= 0xdcff):
                out.append(ch)
            else:
                out.append('\\x%02x' % (code - 0xdc00 if code >= 0xdc80 else code))
        return ''.join(out)
    rng = random.Random(15)
    alphabet = [chr(c) for c in list(range(0, 300)) + list(range(0xdc70, 0xdd10))] + \
        ['我', '\u2028', '\xa0', '\U0001f600']
    for _ in range(2000):
        text = ''.join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        for keep in ('', '\n', '\n\t'):
            assert cocker.printable(text, keep) == escaped(text, keep), (text, keep)


def test_tree_size_never_follows_a_link(tmp_path):
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'f').write_bytes(b'x' * 100)
    (tmp_path / 'big').write_bytes(b'y' * 10000)
    (tmp_path / 'd' / 'top').symlink_to('/')
    (tmp_path / 'd' / 'bigfile').symlink_to(tmp_path / 'big')
    (tmp_path / 'd' / 'bigdir').symlink_to(tmp_path)
    assert cocker.tree_size(str(tmp_path / 'd')) == 100
    assert cocker.tree_size(str(tmp_path / 'd' / 'top')) == 0, 'not even at the top'


def test_write_small_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    victim = tmp_path / 'victim'
    victim.write_text('precious\n')
    target = tmp_path / 'x.sha256'
    target.symlink_to(victim)
    cocker.write_small(str(target), 'digest\n')
    assert victim.read_text() == 'precious\n' and target.read_text() == 'digest\n'
    assert not target.is_symlink()
    # the temporary name is new every time: a link planted there (were it guessed) is refused
    monkeypatch.setattr(os, 'urandom', lambda n: b'\1' * n)
    planted = tmp_path / ('x.sha256.tmp%d.%s' % (os.getpid(), '01' * 4))
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        cocker.write_small(str(target), 'again\n')
    assert victim.read_text() == 'precious\n'


def test_mask_patterns_expand_to_the_existing_paths(tmp_path):
    for cpu in ('cpu0', 'cpu1', 'cpufreq'):
        (tmp_path / 'devices' / 'system' / 'cpu' / cpu).mkdir(parents=True)
    (tmp_path / 'devices' / 'system' / 'cpu' / 'cpu1' / 'thermal_throttle').mkdir()
    (tmp_path / 'firmware').mkdir()
    base = str(tmp_path)
    assert cocker.expand_paths(base, 'devices/system/cpu/cpu*/thermal_throttle') == [
        os.path.join(base, 'devices/system/cpu/cpu1/thermal_throttle')]
    assert cocker.expand_paths(base, 'firmware') == [os.path.join(base, 'firmware')]
    assert cocker.expand_paths(base, 'fs/selinux') == []


def test_mounts_under_fails_closed_and_nothing_is_removed(tmp_path, monkeypatch):
    """Without the mount table nothing can be known to be unmounted: no empty answer."""
    tree = tmp_path / 'tree'
    (tree / 'sub').mkdir(parents=True)
    monkeypatch.setattr(cocker, 'MOUNT_TABLE', str(tmp_path / 'no-such-table'))
    with pytest.raises(cocker.CockerError) as e:
        cocker.mounts_under(str(tree))
    assert 'cannot read the mount table' in e.value.message
    with pytest.raises(cocker.CockerError):
        cocker.remove_tree(str(tree))
    assert (tree / 'sub').is_dir(), 'nothing removed'


def test_mounts_under_finds_the_points_at_and_below_a_path_only(tmp_path, monkeypatch):
    """The table searched whole: a point at the path, below it (escaped), not beside it
    (a longer name), not in an NFS statistics line; deepest first; the last line without
    its newline."""
    table = tmp_path / 'mountstats'
    table.write_bytes(
        b'device overlay mounted on /h/c/a/merged with fstype overlay\n'
        b'device /dev/sda1 mounted on /h/c/ab with fstype ext4\n'
        b'device srv:/e mounted on /mnt with fstype nfs4 statvers=1.1\n'
        b'\topts:\trw,/h/c/a/x\n'
        b'no device mounted on /h/c/a/merged/my\\040dir with fstype tmpfs\n'
        b'device tmpfs mounted on /h/c/a with fstype tmpfs')
    monkeypatch.setattr(cocker, 'MOUNT_TABLE', str(table))
    assert cocker.mounts_under('/h/c/a') == ['/h/c/a/merged/my dir', '/h/c/a/merged',
                                             '/h/c/a']
    assert cocker.mounts_under('/h/c/a/') == cocker.mounts_under('/h/c/a')
    assert cocker.mounts_under('/h/c/ab') == ['/h/c/ab']
    assert cocker.mounts_under('/h/d') == []


def test_mount_point_of_reads_mountstats_lines():
    assert cocker.mount_point_of(
        b'device overlay mounted on /var/c/a\\040b/merged with fstype overlay\n') == \
        b'/var/c/a\\040b/merged'
    assert cocker.mount_point_of(b'no device mounted on /x with fstype tmpfs\n') == b'/x'
    assert cocker.mount_point_of(
        b'device srv:/e mounted on /mnt with fstype nfs4 statvers=1.1\n') == b'/mnt'
    assert cocker.mount_point_of(b'\topts:\trw,vers=4.2\n') == b''


# ---- starting commands -------------------------------------------------------------------

def test_a_command_gets_its_input_and_gives_both_outputs_whole():
    """300 KB in, the same out and a line on stderr: neither pipe may stall the other."""
    data = os.urandom(300000)
    status, out = cocker.run_command(['sh', '-c', 'cat; echo done >&2'], input=data)
    assert status == 0 and out == data
    status, out = cocker.run_command(['head', '-c', '10'], input=data, ok=None)
    assert status == 0 and out == data[:10], 'a reader that stops early is no error of ours'


def test_a_command_fails_with_its_last_stderr_line_or_its_signal():
    with pytest.raises(cocker.CockerError) as e:
        cocker.run(['sh', '-c', 'echo first >&2; echo the cause >&2; exit 3'])
    assert e.value.message.endswith('failed: the cause')
    with pytest.raises(cocker.CockerError) as e:
        cocker.run(['no-such-program-of-cocker'])
    assert e.value.message == 'cannot run no-such-program-of-cocker: No such file or directory'
    assert cocker.run_command(['sh', '-c', 'kill -9 $$'], ok=None)[0] == -9


def test_a_command_gets_no_descriptor_of_ours_and_default_signals():
    """As Popen's close_fds and restore_signals: an inheritable descriptor cocker was
    given stays with cocker, and SIGPIPE (which Python ignores) is default again."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        listed = cocker.run(['sh', '-c', 'ls /proc/self/fd; grep SigIgn /proc/self/status'])
    finally:
        os.close(r)
        os.close(w)
    fds = sorted(int(word) for word in listed.split('SigIgn:')[0].split())
    assert fds == [0, 1, 2, 3], 'sh, ls and its own directory only: %s' % fds
    ignored = int(listed.split('SigIgn:')[1].split()[0], 16)
    assert not ignored & (1 << (13 - 1)), 'SIGPIPE is ignored in the command'


def test_a_command_keeps_its_outputs_apart_when_cocker_has_no_stdout_or_stdin():
    """cocker started with fd 1 (then fd 0) closed: a pipe or the stderr file of a command
    lands there, and must still reach the command as what it is."""
    script = ('import importlib.util, os, sys; os.close(%d); '
              's = importlib.util.spec_from_file_location("c", %r); '
              'c = importlib.util.module_from_spec(s); s.loader.exec_module(c)\n'
              'with c.Command(["sh", "-c", "echo OUT; echo ERR >&2; exit 3"], stdout=c.PIPE) as k:\n'
              '    out = k.stdout.read()\n'
              '    try:\n'
              '        k.check()\n'
              '    except c.CockerError as e:\n'
              '        os.write(2, out + e.message.encode() + b"\\n")\n'
              'try:\n'
              '    c.run(["sh", "-c", "echo OUT; echo ERR2 >&2; exit 3"])\n'
              'except c.CockerError as e:\n'
              '    os.write(2, e.message.encode())\n')
    for closed in (1, 0):
        p = subprocess.run([PYTHON, '-I', '-c', script % (closed, COCKER)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stderr.decode().splitlines() == [
            'OUT', 'sh -c echo OUT; echo ERR >&2; exit 3 failed: ERR',
            'sh -c echo OUT; echo ERR2 >&2; exit 3 failed: ERR2'], (closed, p.stderr)


def test_running_a_command_loads_no_subprocess_where_posix_spawn_is():
    """subprocess costs 12 ms of imports: Python 3.8 and newer start commands without it."""
    script = ('import importlib.util, sys; s = importlib.util.spec_from_file_location("c", %r); '
              'c = importlib.util.module_from_spec(s); s.loader.exec_module(c); '
              'c.run(["true"]); print(sys.version_info >= (3, 8), "subprocess" in sys.modules)'
              % COCKER)
    newer, loaded = subprocess.check_output([PYTHON, '-I', '-c', script]).decode().split()
    assert loaded == ('False' if newer == 'True' else 'True')


# ---- staging -----------------------------------------------------------------------------

def test_the_staging_cleaner_knows_every_name_it_leaves(tmp_path, monkeypatch):
    """What a killed command left in .staging goes at the next command, an image version
    replaced with -f comes back if its replacement never came, a live owner's entry stays;
    cocker 1.0's hidden names are swept where that image or container is made."""
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path))
    images, dead = os.path.join(str(tmp_path), 'images'), '%d-1' % (2 ** 22 + 1)
    for entry in ('new.%s.dead' % dead, 'doomed.%s.dead' % dead, 'old.%s.app:1.0' % dead,
                  'old.%s.app:2.0' % dead, 'new.%s.alive' % cocker.staging_owner()):
        os.makedirs(os.path.join(images, '.staging', entry, 'rlayer'))
    os.makedirs(os.path.join(images, 'app', '2.0', 'rlayer'))       # its replacement came
    cocker.clean_stores()
    assert os.listdir(os.path.join(images, '.staging')) == [
        'new.%s.alive' % cocker.staging_owner()], 'only the live owner keeps its entry'
    assert sorted(os.listdir(os.path.join(images, 'app'))) == ['1.0', '2.0']
    os.rmdir(os.path.join(images, '.staging', 'new.%s.alive' % cocker.staging_owner(), 'rlayer'))
    os.rmdir(os.path.join(images, '.staging', 'new.%s.alive' % cocker.staging_owner()))
    cocker.clean_stores()
    assert not os.path.exists(os.path.join(images, '.staging')), 'an empty .staging goes'
    legacy = os.path.join(images, 'app')
    for entry in ('.staging.%d.ab' % (2 ** 22 + 1), '.old.%d.3.0' % (2 ** 22 + 1),
                  '.1.0.installing.%d' % (2 ** 22 + 1), '.deleting.0.x'):
        os.makedirs(os.path.join(legacy, entry, 'rlayer'))
    cocker.clean_legacy_staging(legacy, 'app')
    assert sorted(os.listdir(legacy)) == ['.deleting.0.x', '1.0', '2.0', '3.0'], \
        'pid 0 is never taken for a dead owner; the rest is swept, 3.0 put back'


# ---- registries ------------------------------------------------------------------------

def test_a_password_hash_is_salted_and_checks_only_its_password():
    one, two = cocker.password_hash('s3cret', rounds=1000), cocker.password_hash('s3cret',
                                                                               rounds=1000)
    assert one != two and one.startswith('pbkdf2_sha256$1000$'), 'a salt of its own each'
    assert cocker.password_matches('s3cret', one) and not cocker.password_matches('s3cre', one)
    assert not cocker.password_matches('s3cret', 'md5$1$x$y')
    assert not cocker.password_matches('s3cret', 'garbage')


@pytest.mark.parametrize('text,ref', [
    ('registry.example:5000/team/app:1.2', ('registry.example:5000', 'team/app', '1.2')),
    ('localhost/app', ('localhost', 'app', 'latest')),
    ('127.0.0.1:5000/a/b/c@sha256:' + 'a' * 64, ('127.0.0.1:5000', 'a/b/c', 'sha256:' + 'a' * 64)),
])
def test_a_full_pull_reference_names_its_registry(text, ref):
    class Options(object):
        image, repo = text, None
    got = cocker.pull_ref(Options())
    assert (got.registry, got.repository, got.reference) == ref


@pytest.mark.parametrize('repository', ['../x', 'UPPER', 'a//b', '_blobs', 'a/_tags', 'a-', '',
                                        'a' * 256, 'a/..', 'x\ny'])
def test_repository_names_follow_the_distribution_grammar(repository):
    with pytest.raises(cocker.CockerError):
        cocker.RemoteRef('r', repository, 'latest')


@pytest.mark.parametrize('tag', ['..', '.x', '-x', 'a/b', 'a' * 129, 'sha256:abc', 'x y'])
def test_tags_follow_the_distribution_grammar(tag):
    with pytest.raises(cocker.CockerError):
        cocker.RemoteRef('r', 'a', tag)


@pytest.mark.parametrize('text', ['', '-host', 'host:0', 'host:99999', 'ho st', 'h/../x:1:2'])
def test_bad_repo_values_are_usage_errors(text):
    with pytest.raises(cocker.CockerError) as e:
        cocker.split_repo(text)
    assert e.value.status == cocker.EXIT_USAGE


def test_a_bearer_challenge_is_parsed():
    assert cocker.parse_challenge('realm="https://auth.example/token",service="reg",'
                                  'scope="repository:a/b:pull,push"') == {
        'realm': 'https://auth.example/token', 'service': 'reg',
        'scope': 'repository:a/b:pull,push'}


def test_loopback_is_never_proxied(monkeypatch):
    monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
    monkeypatch.delenv('no_proxy', raising=False)
    assert cocker.proxy_for('https', '127.0.0.1') is None
    assert cocker.proxy_for('https', 'localhost') is None
    assert cocker.proxy_for('https', 'registry.example') == ('proxy.example', 3128)
    monkeypatch.setenv('no_proxy', '.example')
    assert cocker.proxy_for('https', 'registry.example') is None


def parallel_gzip(data, level=6, piece=10240):
    with cocker.ParallelGzip(level) as packer:
        out = [packer.compress(data[i:i + piece]) for i in range(0, len(data), piece)]
        return b''.join(out) + packer.flush()


def test_parallel_gzip_writes_members_that_gzip_reads_as_one_stream(tmp_path):
    import gzip
    import subprocess
    data = os.urandom(3 << 20) + b'text ' * 400000
    out = parallel_gzip(data)
    assert gzip.decompress(out) == data
    (tmp_path / 'x.gz').write_bytes(out)
    assert subprocess.check_output(['gzip', '-dc', str(tmp_path / 'x.gz')]) == data
    members, pos = [], 0                # each member says how long it is
    while pos < len(out):
        length = cocker.indexed_member_length(out[pos:pos + cocker.GZIP_MEMBER_HEAD_SIZE])
        members.append(gzip.decompress(out[pos:pos + length]))
        pos += length
    assert len(members) > 3 and b''.join(members) == data
    assert gzip.decompress(parallel_gzip(b'')) == b''


def gunzipped(stream):
    import io
    return b''.join(cocker.gunzip(io.BytesIO(stream).read))


def test_gunzip_reads_cockers_members_in_parallel_and_any_gzip_in_order():
    import gzip
    data = os.urandom(2 << 20) + b'text ' * 600000
    ours, plain = parallel_gzip(data), gzip.compress(data)
    assert gunzipped(ours) == data
    assert gunzipped(plain) == data
    assert gunzipped(ours + plain + ours) == data * 3       # ours, then in order to the end
    assert gunzipped(b'') == b''


def test_gunzip_refuses_a_member_that_lies_or_ends_early():
    import gzip
    import io
    ours = parallel_gzip(b'text ' * 600000)
    head = cocker.GZIP_MEMBER_HEAD_SIZE
    length = cocker.indexed_member_length(ours[:head])
    for bad, why in [(ours[:-5], 'truncated'),
                     (ours[:head - 4] + (length + 3).to_bytes(4, 'little') + ours[head:],
                      'not as long as it says'),
                     (ours[:head - 4] + (length - 3).to_bytes(4, 'little') + ours[head:],
                      'not as long as it says'),
                     (ours[:head + 40] + b'\xff' * 9 + ours[head + 49:], 'gzip')]:
        with pytest.raises(cocker.CockerError) as e:
            gunzipped(bad)
        assert why in str(e.value)
    # the CRC, unless the caller checks a digest of the data; the length in any case
    crc_off = ours[:length - 8] + bytes([ours[length - 8] ^ 1]) + ours[length - 7:]
    size_off = ours[:length - 4] + bytes([ours[length - 4] ^ 1]) + ours[length - 3:]
    for bad, digested in ((crc_off, False), (size_off, False), (size_off, True)):
        with pytest.raises(cocker.CockerError) as e:
            b''.join(cocker.gunzip(io.BytesIO(bad).read, digested))
        assert 'CRC or length' in str(e.value)
    assert b''.join(cocker.gunzip(io.BytesIO(crc_off).read, True)) == b'text ' * 600000
    # a member inflating beyond what cocker writes is refused, not inflated into memory
    bomb = b'\0' * (cocker.GZIP_MEMBER_MAX + 1)
    big = cocker.gzip_member(bomb, 9)
    with pytest.raises(cocker.CockerError):
        gunzipped(big)
    assert gunzipped(gzip.compress(bomb)) == bomb             # any other gzip: in order


def test_in_thread_hands_over_items_and_errors_in_order():
    def items():
        yield 1
        yield 2
        raise cocker.CockerError('boom')
    got = []
    with pytest.raises(cocker.CockerError):
        for item in cocker.in_thread(items()):
            got.append(item)
    assert got == [1, 2]
    assert list(cocker.in_thread(iter(range(100)), depth=2)) == list(range(100))


def test_credentials_come_from_cocker_then_podman_then_docker(tmp_path, monkeypatch):
    import base64
    import json
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path / 'home'))
    monkeypatch.setenv('HOME', str(tmp_path / 'user'))
    monkeypatch.setenv('XDG_RUNTIME_DIR', str(tmp_path / 'run'))
    os.makedirs(str(tmp_path / 'home'))
    os.makedirs(str(tmp_path / 'user' / '.docker'))
    os.makedirs(str(tmp_path / 'run' / 'containers'))

    def auths(path, entries):
        with open(str(path), 'w') as f:
            json.dump({'auths': dict((k, {'auth': base64.b64encode(v.encode()).decode()})
                                     for k, v in entries.items())}, f)
    auths(tmp_path / 'user' / '.docker' / 'config.json', {'https://reg.example': 'd:1',
                                                          'other.example:5000': 'd:2'})
    auths(tmp_path / 'run' / 'containers' / 'auth.json', {'reg.example': 'p:1'})
    assert cocker.stored_credentials('reg.example') == ('p', '1'), "podman's before docker's"
    assert cocker.stored_credentials('other.example:5000') == ('d', '2')
    assert cocker.stored_credentials('nowhere.example') is None
    cocker.save_credentials('reg.example', 'c', 'pw:with:colons')
    assert cocker.stored_credentials('reg.example') == ('c', 'pw:with:colons'), 'ours first'
    assert oct(os.stat(str(tmp_path / 'home' / 'auth.json')).st_mode & 0o777) == '0o600'
    cocker.save_credentials('reg.example', None, None)
    assert cocker.stored_credentials('reg.example') == ('p', '1')
    with pytest.raises(cocker.CockerError):
        cocker.save_credentials('reg.example', None, None)


def test_the_restart_back_off_doubles_and_is_capped():
    assert [cocker.restart_delay(n) for n in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert cocker.restart_delay(5000) == cocker.RESTART_DELAY[1], 'no overflow, the cap'


@pytest.mark.parametrize('text,value', [('7', 7), ('-3', -3), ('0', 0), ('--3', None),
                                        ('²', None), ('', None), (None, None), ('1e3', None)])
def test_integers_are_parsed_strictly(text, value):
    assert cocker.parse_int(text) == value


def test_the_log_reader_sees_every_byte_through_rotations(tmp_path, monkeypatch):
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path))
    os.makedirs(str(tmp_path / 'containers' / 'c'))
    path = str(tmp_path / 'containers' / 'c' / 'cockerinit.log')
    reader = cocker.LogReader('c')
    seen, written = [], []
    for n in range(300):
        chunk = ('line %d\n' % n).encode() * 300     # each chunk: a rotation
        cocker.append_log(path, chunk, limit=4096, keep=3)
        written.append(chunk)
        if n % 2:                   # two rotations may come between two reads
            seen.append(reader.read_new())
    seen.append(reader.read_new())
    reader.close()
    assert b''.join(seen) == b''.join(written)
    assert sorted(os.listdir(str(tmp_path / 'containers' / 'c'))) == [
        'cockerinit.log', 'cockerinit.log.1', 'cockerinit.log.2', 'cockerinit.log.3']
    cocker.append_log(path, b'x' * 5000, limit=4096, keep=1)     # a count lowered
    cocker.append_log(path, b'y', limit=4096, keep=1)
    assert sorted(os.listdir(str(tmp_path / 'containers' / 'c'))) == [
        'cockerinit.log', 'cockerinit.log.1']


def test_the_cgroups_file_is_read_in_both_formats(tmp_path, monkeypatch):
    monkeypatch.setattr(cocker, 'HOME', str(tmp_path))
    os.makedirs(str(tmp_path / 'containers' / 'c'))
    path = str(tmp_path / 'containers' / 'c' / 'cgroups')
    with open(path, 'w') as f:
        f.write('/sys/fs/cgroup/cpu/cocker/c\n/sys/fs/cgroup/memory/cocker/c\n')
    assert cocker.container_cgroups('c') == ['/sys/fs/cgroup/cpu/cocker/c',
                                             '/sys/fs/cgroup/memory/cocker/c']
    with open(path, 'w') as f:          # as cocker 1.0 wrote it
        f.write('["/sys/fs/cgroup/cpu/cocker/c", "/sys/fs/cgroup/memory/cocker/c"]')
    assert cocker.container_cgroups('c') == ['/sys/fs/cgroup/cpu/cocker/c',
                                             '/sys/fs/cgroup/memory/cocker/c']


LOAD_AS_THE_HEADER_DOES = r'''
import sys
path = sys.argv[1]
module = sys.modules['cocker'] = type(sys)('cocker')
module.__file__ = path
head = open(path, 'rb').read().split(b'\n# ---- end of loading ----\n')[0]
exec(compile(head, path, 'exec'), module.__dict__)
module.load_cocker(path)
names = vars(module)
whole = {'__name__': 'whole'}
exec(compile(open(path).read(), path, 'exec'), whole)
print('cold before:', 'ArchiveGuard' in names, names['export_image'].__code__.co_name)
print('warm before:', 'Boot' in names, names['boot_container'].__code__.co_name)
print('srepo:', module.parse_srepo('u@h:2222'))
print('cold after:', 'ArchiveGuard' in names, names['export_image'].__code__.co_name)
print('warm after:', 'Boot' in names, names['boot_container'].__code__.co_name)
module.load_every_chapter()
print('missing:', sorted(set(whole) - set(names)))
'''


def test_lazy_chapters_load_on_the_first_call_of_one_of_their_functions(tmp_path):
    import subprocess
    import sys
    copy = str(tmp_path / 'cocker')
    with open(COCKER, 'rb') as f, open(copy, 'wb') as g:
        g.write(f.read())
    out = subprocess.check_output([sys.executable, '-I', '-S', '-c', LOAD_AS_THE_HEADER_DOES,
                                   copy]).decode().splitlines()
    assert out[0] == 'cold before: False stub', out
    assert out[1] == 'warm before: False stub', out
    assert out[2].startswith('srepo: ') and 'u' in out[2] and '2222' in out[2], out
    assert out[3] == 'cold after: True export_image', out
    # (the cold code needs the image store's and the lifecycle's constants: not the boot's)
    assert out[4] == 'warm after: False stub', out
    assert out[5] == 'missing: []', out
    assert [f for f in os.listdir(str(tmp_path / '__pycache__')) if f.endswith('.chapters')]


def test_every_warm_chapter_is_loaded_on_its_own_and_the_cold_ones_together():
    # (a change that makes the hot code read one of their constants or classes, or gives
    # one module-level work, would make it hot again, and every command would load it)
    hot, units = cocker.compile_chapters(COCKER)
    titles = [unit['chapters'] for unit in units]
    assert sorted(titles) == sorted([list(cocker.COLD_CHAPTERS)] +
                                    [[t] for t in cocker.WARM_CHAPTERS]), titles
    assert all(unit['warm'] == (unit['chapters'][0] in cocker.WARM_CHAPTERS) for unit in units)
    cold = titles.index(list(cocker.COLD_CHAPTERS))
    assert cold not in [k for unit in units for k in unit['needs']], 'none needs the cold'


def header_code(path, then):
    """The Python that the sh header of the file at path runs, with `then` for its last
    statement (the command)."""
    with open(path) as f:
        line = [l for l in f.read().split('\n') if l.startswith('"exec"')][0]
    code = line.split('"-c" "', 1)[1].rsplit('" "$0" "$@"', 1)[0]
    assert code.endswith('m.exit_quickly(m.main(sys.argv[2:]))'), code
    return code[:-len('m.exit_quickly(m.main(sys.argv[2:]))')] + then


def cache_of(copy):
    """(path, [index, layout, hot code's bytes, [each unit's bytes]]) of a copy's cache."""
    import marshal
    directory = os.path.join(os.path.dirname(copy), '__pycache__')
    cache = [os.path.join(directory, n) for n in os.listdir(directory)
             if n.endswith('.chapters')][0]
    with open(cache, 'rb') as f:
        index, layout = marshal.load(f), marshal.load(f)
        hot = f.read(index[1])
        units = [f.read(entry['size']) for entry in layout]
        assert f.read() == b''
    return cache, [index, layout, hot, units]


def write_cache(cache, index, layout, hot, units):
    import marshal
    offset = 0
    for entry, unit in zip(layout, units):
        entry.update(at=offset, size=len(unit))
        offset += len(unit)
    part = marshal.dumps(layout)
    index[2] = len(part) + offset
    with open(cache + '.new', 'wb') as f:
        f.write(marshal.dumps(index) + part + hot + b''.join(units))
    os.replace(cache + '.new', cache)


def test_the_header_reads_the_hot_code_and_the_rest_comes_later_from_the_cache(tmp_path):
    import marshal
    import subprocess
    import sys
    copy = str(tmp_path / 'cocker')
    with open(COCKER, 'rb') as f, open(copy, 'wb') as g:
        g.write(f.read())
    code = header_code(copy, "print(type(m.UNIT_CODE).__name__, m.parse_srepo('u@h:2222'))")
    run = [sys.executable, '-I', '-S', '-c', code, copy]
    first = subprocess.check_output(run).decode()     # (compiles, and makes the cache)
    assert first.startswith('list ') and 'u' in first and '2222' in first, first
    cache, (index, layout, hot, units) = cache_of(copy)
    assert isinstance(marshal.loads(hot), type(header_code.__code__))
    cold = [entry['chapters'] for entry in layout].index(list(cocker.COLD_CHAPTERS))
    assert 'parse_srepo' in layout[cold]['names']
    # the cold code the next command finds there is the one it runs
    variant = str(tmp_path / 'variant.py')
    with open(COCKER) as f, open(variant, 'w') as g:
        g.write(f.read().replace('def parse_srepo(text):\n',
                                 'def parse_srepo(text):\n    return "from the cache"\n', 1))
    units[cold] = marshal.dumps(cocker.compile_chapters(variant)[1][cold]['code'])
    write_cache(cache, index, layout, hot, units)
    second = subprocess.check_output(run).decode()
    assert second.strip() == 'NoneType from the cache', second
    # a cache made again after the hot code was read is not read: the rest comes from the
    # one the header opened...
    replaced = header_code(copy, "import shutil; shutil.copy(c, c + '.x'); os.replace(c + "
                                 "'.x', c); open(c, 'r+b').write(b'x' * 4096); "
                                 "print(m.parse_srepo('u@h:2222'))")
    out = subprocess.check_output([sys.executable, '-I', '-S', '-c', replaced, copy])
    assert out.decode().strip() == 'from the cache', out
    os.remove(cache)
    subprocess.check_output(run)        # (made again)
    # ...and once that is let go of (a monitor, a helper), nothing more: never from a path
    closed = header_code(copy, "m.let_go_of_the_cache(); m.parse_srepo('u@h:2222')")
    failed = subprocess.run([sys.executable, '-I', '-S', '-c', closed, copy],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert failed.returncode != 0 and b'is not loaded in this process' in failed.stderr, \
        failed.stderr
    # a cache cut short (a crash while it was written) is made again
    subprocess.check_output(run)
    size = os.path.getsize(cache)
    with open(cache, 'r+b') as f:
        f.truncate(size - 10)
    assert subprocess.check_output(run).decode().startswith('list ')
    assert os.path.getsize(cache) == size


THREADS_CALL_ONE_STUB = r'''
import sys, threading
sys.setswitchinterval(1e-6)
failed = []
def call():
    try:
        m.parse_srepo('u@h:2222')
    except Exception as e:
        failed.append(repr(e))
threads = [threading.Thread(target=call) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(failed)
'''


def test_threads_that_call_one_stub_at_once_all_get_its_function(tmp_path):
    """One loads the chapter, the others wait for it: none finds a name not yet defined."""
    import subprocess
    import sys
    copy = str(tmp_path / 'cocker')
    with open(COCKER, 'rb') as f, open(copy, 'wb') as g:
        g.write(f.read())
    code = header_code(copy, 'exec(%r)' % THREADS_CALL_ONE_STUB)
    for _ in range(6):
        out = subprocess.check_output([sys.executable, '-I', '-S', '-c', code, copy])
        assert out.decode().strip() == '[]', out


def test_a_stop_waits_for_the_lock_and_no_longer_than_it_was_told(tmp_path):
    import fcntl
    import signal
    path = str(tmp_path / 'running.lock')
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    pid = os.fork()
    if pid == 0:                        # holds it (as the monitor does) for 0.3 s
        time.sleep(0.3)
        os._exit(0)
    os.close(holder)                    # (the child's copy holds it now)
    fd = os.open(path, os.O_RDONLY)
    try:
        handler = signal.getsignal(signal.SIGALRM)
        assert cocker.lock_within(fd, 0.05) is False
        started = time.time()
        assert cocker.lock_within(fd, 10) is True
        assert 0.1 < time.time() - started < 5
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)


def test_chapters_stay_whole_when_the_hot_part_reads_a_cold_constant(tmp_path):
    rule = '# ' + '=' * 20
    source = '\n'.join([
        rule, '# Hot', rule, 'def hot():', '    return COLD_LIMIT + cold()', '',
        rule, '# Test image', rule, 'COLD_LIMIT = 3', 'def cold():', '    return 4', ''])
    path = tmp_path / 'x.py'
    path.write_text(source)
    hot, units = cocker.compile_chapters(str(path))
    assert units == []
    path.write_text(source.replace('COLD_LIMIT + cold()', 'cold()'))
    hot, units = cocker.compile_chapters(str(path))
    assert [(unit['names'], unit['chapters']) for unit in units] == [(['cold'], ['Test image'])]
    namespace = {}
    exec(hot, namespace)
    assert 'cold' not in namespace and 'COLD_LIMIT' not in namespace
    exec(units[0]['code'], namespace)
    assert namespace['hot']() == 4


def test_a_chapter_that_reads_anothers_constant_loads_it_first(tmp_path):
    rule = '# ' + '=' * 20
    source = '\n'.join([
        rule, '# Hot', rule, 'def hot():', '    return boot()', '',
        rule, '# Network', rule, 'PORT = 80', 'def net():', '    return PORT', '',
        rule, '# Boot sequence', rule, 'def boot():', '    return PORT + net()', '',
        rule, '# Listings', rule, 'print("a chapter with work of its own")', ''])
    path = tmp_path / 'x.py'
    path.write_text(source)
    hot, units = cocker.compile_chapters(str(path))
    assert [(unit['chapters'], unit['needs'], unit['names']) for unit in units] == [
        (['Network'], [], ['net']), (['Boot sequence'], [0], ['boot'])]
    # (a call needs nothing: the stub loads on its own; a constant read each way does)
    path.write_text(source.replace('    return PORT\n', '    return PORT + boot()\n'))
    assert [unit['needs'] for unit in cocker.compile_chapters(str(path))[1]] == [[], [0]]
    path.write_text(source.replace('    return PORT\n', '    return WAIT\n').replace(
        'def boot():', 'WAIT = 5\ndef boot():'))
    hot, units = cocker.compile_chapters(str(path))
    assert [(sorted(unit['chapters']), unit['needs']) for unit in units] == [
        (['Boot sequence', 'Network'], [])]


def test_network_state_round_trips_and_reads_the_json_of_older_cockers():
    import json
    state = {'veth': 'ethFBFBA2E45C', 'netns': '/run/netns/nnsFBFBA2E45C',
             'iptables': 'iptables-legacy',
             'claims': ['/var/cocker/network/in-use/10.0.0.3', '/var/co cker/ports/tcp-80/0.0.0.0'],
             'rules': [['nat', ['COCKER-c0-POST', '-s', '10.0.0.3/32', '!', '-o', 'c0', '-j',
                                'MASQUERADE']], ['filter', ['COCKER-c0-FWD', '-j', 'ACCEPT']]],
             'chains': [['nat', 'CKR-FBFBA2E45C-D']]}
    text = cocker.network_state_text(state)
    assert not text.startswith('{') and cocker.parse_network_state(text) == state
    older = dict(state)
    del older['chains']                 # (before containers had chains of their own)
    assert cocker.parse_network_state(json.dumps(older, indent=1)) == older
    assert cocker.parse_network_state(cocker.network_state_text(dict(older, chains=[]))) == \
        dict(older, chains=[])
    with pytest.raises(ValueError):
        cocker.parse_network_state('what is this\n')
    bad = dict(state, rules=[['nat', ['COCKER-c0-POST', '--comment', 'two words']]])
    with pytest.raises(cocker.CockerError):
        cocker.network_state_text(bad)
    with pytest.raises(cocker.CockerError):
        cocker.network_state_text(dict(state, claims=['/var/cocker\n/in-use/x']))


def test_a_monitor_request_is_read_back_and_a_bad_one_refused(monkeypatch):
    monkeypatch.setattr(init, 'LOADED_FROM', 'cockerinit here', raising=False)
    monkeypatch.setattr(cocker, 'HOME', '/tmp/home')
    msg = cocker.monitor_request('web', cocker.code_identity(init), 'sleep 1', {'stdin': 5, 'tty': True}, ['stdin'])
    request = cocker.parse_monitor_request(msg)
    assert (request['name'], request['exec'], request['stdio'], request['tty']) == \
        ('web', 'sleep 1', ['stdin'], True)
    assert request['home'] == '/tmp/home' and request['identity'] == cocker.code_identity(init)
    assert dict(request['env']) == dict(os.environb)
    assert request['argv'] == open('/proc/self/cmdline', 'rb').read().split(b'\0')[:-1]
    assert cocker.parse_monitor_request(
        cocker.monitor_request('web', cocker.code_identity(init), None, None, []))['exec'] is None
    head = msg.split(b'\0')[:10]
    for bad in (b'cocker-monitor-0' + msg[16:], b'\0' * 40, b'', msg[:40],
                b'\0'.join(head + [b'99999']), b'\0'.join(head + [b'x']),
                msg.replace(b'\0stdin\0', b'\0stdin,../x\0')):
        with pytest.raises(ValueError):
            cocker.parse_monitor_request(bad)
    monkeypatch.delattr(init, 'LOADED_FROM')
    assert cocker.code_identity(init) == ''      # a cockerinit imported otherwise: no forks


def test_a_boot_that_has_not_loaded_cockerinit_names_the_code_it_would_load(monkeypatch):
    """A sibling compares the file's identity with the one of the cockerinit it loaded."""
    import sys
    monkeypatch.setitem(sys.modules, 'cockerinit', None)     # (none loaded yet)
    loaded = cocker.load_cockerinit()
    assert loaded is not init and loaded.LOADED_FROM
    assert cocker.code_identity(None) == cocker.code_identity(loaded) != ''
    assert cocker.cockerinit_path() in cocker.code_identity(None)


def test_the_context_a_monitor_compares_tells_a_process_apart_from_itself():
    assert cocker.context_difference(os.getpid()) is None
    import signal
    import subprocess
    import sys
    quiet = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)'],
                             preexec_fn=lambda: signal.signal(signal.SIGQUIT, signal.SIG_IGN))
    try:                                # (as a shell's background job starts a command)
        time.sleep(0.2)
        assert cocker.context_difference(quiet.pid) is None
    finally:
        quiet.kill()
        quiet.wait()
    sleeper = [sys.executable, '-c', 'import time; time.sleep(5)']
    for argv, preexec, what in ((sleeper, lambda: os.umask(0o077), 'its status'),
                                (sleeper, lambda: os.nice(3), 'its stat'),
                                (['ionice', '-c3'] + sleeper, None, 'its I/O priority')):
        child = subprocess.Popen(argv, preexec_fn=preexec)
        time.sleep(0.2)                 # (ionice: until it has exec'd the sleeper)
        try:
            assert cocker.context_difference(child.pid) == what
        finally:
            child.kill()
            child.wait()


def test_a_staging_directory_removed_and_made_again_meanwhile_is_entered_again(tmp_path):
    """Of three commands, one removes the empty STAGING (tidy_staging) just before ours
    renames into it, a third makes it again before ours looks: ours must try again."""
    store = str(tmp_path)
    staging = os.path.join(store, '.staging')
    doomed = os.path.join(store, 'doomed-container')
    os.mkdir(doomed)
    calls = []

    def rename(target):
        calls.append(target)
        if len(calls) == 1:
            os.rmdir(staging)           # tidy_staging of another command
            try:
                os.rename(doomed, target)
            finally:
                os.mkdir(staging)       # a third command's into_staging
        os.rename(doomed, target)
    path = cocker.into_staging(store, rename, 'doomed')
    assert len(calls) == 2 and os.path.isdir(path) and not os.path.exists(doomed)
    with pytest.raises(FileNotFoundError):      # a source that is gone is an error
        cocker.into_staging(store, lambda target: os.rename(doomed, target), 'doomed')


def test_a_staging_directory_removed_between_the_mkdir_and_the_check_is_made_again(tmp_path,
                                                                                 monkeypatch):
    """os.makedirs(exist_ok=True) raises FileExistsError when the directory it found was
    removed (tidy_staging) before it looked whether it is one: into_staging tries again."""
    real, calls = os.makedirs, []

    def makedirs(path, mode=0o777, exist_ok=False):
        calls.append(path)
        if len(calls) == 1:
            raise FileExistsError(17, 'File exists', path)
        return real(path, mode, exist_ok)
    monkeypatch.setattr(os, 'makedirs', makedirs)
    path = cocker.into_staging(str(tmp_path), os.mkdir, 'new')
    assert len(calls) == 2 and os.path.isdir(path)


def test_a_monitor_that_serves_no_more_still_sleeps_out_its_restart_delay():
    """Its listener closed (under a subreaper, out of descriptors), the restart back-off
    must wait, not spin."""
    siblings = cocker.Siblings.__new__(cocker.Siblings)
    siblings.listener, siblings.name = None, 'gone'
    start = time.monotonic()
    assert siblings.wait_for(None, 0.2) is False
    assert time.monotonic() - start >= 0.19


def test_pid1_whose_cocker_went_away_after_go_says_it_served(monkeypatch):
    """GO received, the main command started, then the booting cocker is gone: PID 1 serves
    on, and has told its monitor it did (so the restart policy stands)."""
    import socket
    cli, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready = ours.detach()
    served_r, served_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDWR)
    monkeypatch.setattr(init, 'set_up', lambda config: (None, None))
    monkeypatch.setattr(init, 'wait_for_go', lambda fd: (os.read(fd, 1), cli.close()))
    monkeypatch.setattr(init, 'Pid1', lambda *a: type('Pid1', (), {'serve': lambda s: 7})())
    monkeypatch.setattr(init, 'start_image_command', lambda config, hostname: 4242)
    monkeypatch.setattr(init, 'log', lambda *a: None)
    config = dict.fromkeys(init.CONFIG_ENV)
    config.update(COCKER_READY_FD=str(ready), COCKER_ALIVE_FD=str(devnull),
                  COCKER_CONSOLE_FD=str(devnull), COCKER_LOG_FD=str(devnull),
                  COCKER_SERVED_FD=str(served_w))
    cli.sendall(init.GO)
    try:
        assert init.serve_container('c1', config) == 7
        assert os.read(served_r, 1) == b'1'
    finally:
        os.close(served_r)
        os.close(devnull)


#: an interpreter that clones a child of its own parent (cocker's clone3, CLONE_PARENT): the
#: child writes its parent's pid on fd 1 and ends; the interpreter prints the child's pid
CLONE_A_SIBLING = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location('cocker_clone', sys.argv[1])
cocker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cocker)
pid = cocker.clone3(cocker.CLONE_PARENT)
if pid == 0:
    os.write(1, b'parent %d\\n' % os.getppid())
    os._exit(7)
print('child %s' % pid, flush=True)
"""


def test_clone3_with_clone_parent_makes_a_child_of_the_callers_parent():
    """How a monitor forks another's: the new one is born a child of init, with no process
    forked between that would have to end."""
    out = subprocess.check_output([PYTHON, '-I', '-S', '-c', CLONE_A_SIBLING, COCKER])
    lines = dict(line.split() for line in out.decode().splitlines())
    if lines.get('child') == 'None':
        pytest.skip('clone3 cannot be used here (an old kernel, Python or glibc, or a '
                    'seccomp filter): monitors fork twice instead')
    assert lines['parent'] == str(os.getpid()), out
    child = int(lines['child'])
    assert os.waitpid(child, 0) == (child, 7 << 8), 'the child is ours to reap'
