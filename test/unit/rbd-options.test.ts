// rbd node options without a cluster: QEMU's rbd filename form, and the message a vubd built
// without librbd gives (the addon's stub and the graph layer say the same thing).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { NO_LIBRBD, openRbdNode, parseRbdFilename } from '../../src/graph/rbd-open.js';
import { DEFAULT_CACHE } from '../../src/graph/open.js';
import { GraphError } from '../../src/graph/snapshot.js';
import { repoRoot } from '../helpers/daemon.js';
import { parseConfig, ConfigError } from '../../src/cli/config.js';

test('rbd filenames: pool/image, namespace, snapshot, conf, id, keyring; malformed ones are refused', () => {
  assert.deepEqual(parseRbdFilename('rbd:rbd/vm1'), { pool: 'rbd', image: 'vm1' });
  assert.deepEqual(parseRbdFilename('rbd:pool/ns/vm1@snap:conf=/etc/ceph/ceph.conf:id=libvirt:keyring=/k'), {
    pool: 'pool',
    namespace: 'ns',
    image: 'vm1',
    snapshot: 'snap',
    conf: '/etc/ceph/ceph.conf',
    user: 'libvirt',
    keyring: '/k',
  });
  assert.throws(() => parseRbdFilename('rbd:vm1'), /pool\/image/);
  assert.throws(() => parseRbdFilename('rbd:a//b'), /pool\/image/);
  assert.throws(() => parseRbdFilename('rbd:a/b:mon_host=x'), /not supported/);
  assert.throws(() => parseRbdFilename('rbd:a/b:conf'), /key=value/);
  assert.throws(() => parseRbdFilename('/tmp/x'), /not an rbd filename/);
});

test('without librbd, driver rbd fails with a message naming librbd-dev and the rebuild, the same text as the addon stub', () => {
  assert.match(NO_LIBRBD, /librbd-dev/);
  assert.match(NO_LIBRBD, /npm run build:native/);
  const absent = {
    rbdAvailable: false,
    RbdImage: class {
      constructor() {
        throw new Error('must not be called');
      }
    },
  } as unknown as Parameters<typeof openRbdNode>[4];
  assert.throws(
    () => openRbdNode('r', { pool: 'rbd', image: 'x' }, false, DEFAULT_CACHE, absent),
    (e: unknown) => e instanceof GraphError && e.message === NO_LIBRBD,
  );
  // The addon built without librbd-dev (VUBD_NO_RBD=1 or no header) throws this from RbdImage.
  const stub = fs.readFileSync(path.join(repoRoot, 'native-bindings/src/rbd.c'), 'utf8');
  assert.ok(stub.includes(`"${NO_LIBRBD}"`), 'rbd.c stub message matches NO_LIBRBD');
});

test('the config file takes an rbd node with blockdev-add\'s names; relative conf and keyring paths are from the file\'s directory', () => {
  const doc = {
    nodes: [{ 'node-name': 'vm1', driver: 'rbd', pool: 'vms', image: 'vm1-disk0', conf: 'ceph.conf', user: 'libvirt', keyring: '/etc/ceph/k', snapshot: 's1', cache: { direct: true } }],
    exports: [{ type: 'vhost-user-blk', id: 'e0', 'node-name': 'vm1', addr: { type: 'unix', path: '/run/vubd/e0.sock' } }],
  };
  const c = parseConfig(JSON.stringify(doc), 'vubd.json', '/etc/vubd');
  assert.deepEqual(c.nodes[0], {
    'node-name': 'vm1',
    driver: 'rbd',
    pool: 'vms',
    image: 'vm1-disk0',
    conf: '/etc/vubd/ceph.conf',
    user: 'libvirt',
    keyring: '/etc/ceph/k',
    snapshot: 's1',
    'read-only': false,
    cache: { direct: true, 'no-flush': false },
  });
  const bad = { ...doc, nodes: [{ 'node-name': 'vm1', driver: 'rbd', pool: 'vms', 'key-secret': 'sec0' }] };
  assert.throws(() => parseConfig(JSON.stringify(bad), 'vubd.json', '/etc/vubd'), (e: unknown) => e instanceof ConfigError && /image/.test(e.message) && /key-secret/.test(e.message));
});
