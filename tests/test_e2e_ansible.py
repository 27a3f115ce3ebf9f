"""The Ansible collection (ansible/), with a real ansible-core: a playbook against localhost
makes and starts two containers, copies a file into one through the cocker connection
plugin, runs a command there and checks its output; run again, it changes nothing; a
second playbook removes them."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import COCKER, PYTHON

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ansible_tool(name):
    """ansible-galaxy or ansible-playbook of the interpreter running the tests."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        path = shutil.which(name)
    if path is None:
        pytest.fail('%s is missing: tests/run.sh installs ansible-core' % name)
    return path


@pytest.fixture(scope='module')
def collections(tmp_path_factory):
    """The collection, built and installed as an operator would, into a path of its own."""
    top = tmp_path_factory.mktemp('ansible')
    subprocess.check_call([ansible_tool('ansible-galaxy'), 'collection', 'build', '--force',
                           '--output-path', str(top), os.path.join(REPO, 'ansible')],
                          stdout=subprocess.DEVNULL)
    tarball = [f for f in os.listdir(str(top)) if f.endswith('.tar.gz')][0]
    subprocess.check_call([ansible_tool('ansible-galaxy'), 'collection', 'install', '-p',
                           str(top / 'collections'), str(top / tarball)],
                          stdout=subprocess.DEVNULL)
    return str(top / 'collections')


def playbook(collections, tmp_path, inventory, text):
    path = str(tmp_path / ('play%d.yml' % len(os.listdir(str(tmp_path)))))
    with open(path, 'w') as f:
        f.write(text)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_NOCOLOR='1',
               ANSIBLE_LOCAL_TEMP=str(tmp_path / 'tmp'), ANSIBLE_REMOTE_TMP='/tmp',
               ANSIBLE_RETRY_FILES_ENABLED='0', ANSIBLE_PYTHON_INTERPRETER='auto_silent')
    p = subprocess.Popen([ansible_tool('ansible-playbook'), '-i', inventory, path],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out, _ = p.communicate(timeout=600)
    text = out.decode('utf-8', 'replace')
    assert p.returncode == 0, text[-4000:]
    recap = dict((m.group(1), (int(m.group(2)), int(m.group(3)))) for m in re.finditer(
        r'^(\S+)\s+: ok=(\d+)\s+changed=(\d+)', text, re.M))
    return recap, text


def test_a_playbook_drives_containers_and_runs_in_them(collections, cocker, test_image,
                                                       names, home, tmp_path):
    one, two = names('an'), names('an')
    command = '%s %s' % (PYTHON, COCKER)
    inventory = str(tmp_path / 'hosts')
    with open(inventory, 'w') as f:
        f.write('localhost ansible_connection=local ansible_python_interpreter=%s\n'
                '[containers]\n%s\n%s\n[containers:vars]\n'
                'ansible_connection=cocker.cocker.cocker\nansible_cocker_command="%s"\n'
                'ansible_cocker_home=%s\nansible_python_interpreter=/usr/bin/python3\n'
                % (sys.executable, one, two, command, home))
    plays = str(tmp_path / 'plays')
    os.mkdir(plays)
    common = 'cocker_command: "%s"\n        cocker_home: %s' % (command, home)
    up = '''
- hosts: localhost
  gather_facts: false
  tasks:
    - cocker.cocker.cocker_image:
        name: %(image)s
        %(common)s
    - cocker.cocker.cocker_container:
        name: "{{ item }}"
        image: %(image)s
        state: started
        restart: on-failure
        volumes: ["/usr:/usr:ro"]
        %(common)s
      loop: [%(one)s, %(two)s]
- hosts: %(one)s
  gather_facts: false
  tasks:
    - copy:
        content: "hello from ansible\\n"
        dest: /root/greeting
    - command: cat /root/greeting
      register: greeting
      changed_when: false
    - assert:
        that: greeting.stdout == "hello from ansible"
    - raw: hostname
      register: hostname_out
      changed_when: false
    - assert:
        that: hostname_out.stdout.strip() == "%(one)s"
    - fetch:
        src: /root/greeting
        dest: %(plays)s/fetched
        flat: true
''' % dict(image=test_image, common=common, one=one, two=two, plays=plays)
    recap, text = playbook(collections, tmp_path, inventory, up)
    assert recap['localhost'][1] == 1 and recap[one][1] == 2, text[-3000:]   # (tasks)
    assert open(os.path.join(plays, 'fetched')).read() == 'hello from ansible\n'
    rows = dict((l.split()[0], l.split()[-1]) for l in cocker('-s', 'containers').out
                .splitlines()[2:])
    assert rows[one].startswith('RUNNING') and rows[two].startswith('RUNNING')
    r = cocker('-a', 'run', '-c', one, '--cmd', 'cat /root/greeting')
    assert r.out == 'hello from ansible\n'
    recap, text = playbook(collections, tmp_path, inventory, up)
    assert all(changed == 0 for _, changed in recap.values()), text[-3000:]
    down = '''
- hosts: localhost
  gather_facts: false
  tasks:
    - cocker.cocker.cocker_container:
        name: "{{ item }}"
        state: absent
        %(common)s
      loop: [%(one)s, %(two)s]
''' % dict(common=common, one=one, two=two)
    recap, text = playbook(collections, tmp_path, inventory, down)
    assert recap['localhost'][1] == 1, text[-3000:]
    listed = [l.split()[0] for l in cocker('-s', 'containers').out.splitlines()[2:]]
    assert one not in listed and two not in listed
    recap, text = playbook(collections, tmp_path, inventory, down)
    assert recap['localhost'][1] == 0, text[-3000:]
