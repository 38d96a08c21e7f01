// --config validation: one test per kind of mistake, each asserting the exact JSON path and
// message; a full config translated field by field; the single-disk command line as a config.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseOptions, UsageError } from '../../src/cli/args.js';
import { configFromOptions, ConfigError, exportSpec, loadConfig, parseConfig, resolveConfig, type DaemonConfig } from '../../src/cli/config.js';
import { closest } from '../../src/cli/config-errors.js';
import { compileValidator, configValidator } from '../../src/cli/config-validate.js';
import { exportSpecFromArgs } from '../../src/control/export-commands.js';
import { exportAccess } from '../../src/cli/access-args.js';

const BASE = '/etc/vubd';

function load(doc: unknown): DaemonConfig {
  return parseConfig(typeof doc === 'string' ? doc : JSON.stringify(doc), 'vubd.json', BASE);
}

/** the problems as 'path: message' lines, in the order reported */
function problems(doc: unknown): string[] {
  try {
    load(doc);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    assert.equal(e.file, 'vubd.json');
    const lines = e.message.split('\n');
    assert.equal(lines.length, e.problems.length, 'one line per problem');
    for (const l of lines) assert.ok(l.startsWith('vubd.json: '), `every line names the file: ${l}`);
    return lines.map((l) => l.slice('vubd.json: '.length));
  }
  assert.fail('expected a ConfigError');
}

const file = (name: string, extra: Record<string, unknown> = {}) => ({ 'node-name': name, driver: 'file', filename: `/img/${name}.img`, ...extra });
const exp = (id: string, node: string, extra: Record<string, unknown> = {}) => ({ type: 'vhost-user-blk', id, 'node-name': node, addr: { type: 'unix', path: `/run/vubd/${id}.sock` }, ...extra });
const one = (nodeExtra: Record<string, unknown> = {}, expExtra: Record<string, unknown> = {}, top: Record<string, unknown> = {}) => ({
  nodes: [file('d0', nodeExtra)],
  exports: [exp('e0', 'd0', expExtra)],
  ...top,
});

describe('config file mistakes', () => {
  test('bad JSON: file, line and column', () => {
    const text = '{\n  "nodes": [\n    {"node-name": "a",}\n  ]\n}\n';
    const [p] = problems(text);
    assert.match(p!, /^line 3, column 23: not valid JSON: /);
    // a truncated file: where it ends
    assert.match(problems('{"nodes": [\n  ')[0]!, /^line 2, column 3: not valid JSON: Unexpected end of JSON input$/);
    // read from a real file, named as given
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-config-'));
    const f = path.join(dir, 'broken.json');
    fs.writeFileSync(f, '{"workers": 2 "nodes": []}');
    assert.throws(() => loadConfig(f), (e: ConfigError) => e.message.startsWith(`${f}: line 1, column 15: not valid JSON: `));
    assert.throws(() => loadConfig(path.join(dir, 'missing.json')), (e: ConfigError) => /missing\.json: cannot read the config file: ENOENT/.test(e.message));
    fs.rmSync(dir, { recursive: true });
  });

  test('wrong type', () => {
    assert.deepEqual(problems({ workers: '2' }), ["/workers: must be integer, got '2'"]);
    assert.deepEqual(problems(one({ 'read-only': 'yes' })), ["/nodes/0/read-only: must be true or false, got 'yes'"]);
    assert.deepEqual(problems(one({ size: 1 }, {}, { nodes: [{ 'node-name': 'd0', driver: 'null-co', size: true }] })), [
      "/nodes/0/size: must be a size: bytes as an integer, or a string such as '512M' or '8G' (K, M, G, T are powers of 1024), got true",
    ]);
    assert.deepEqual(problems({ nodes: {} }), ['/nodes: must be an array, got {}']);
    assert.deepEqual(problems([]), ['must be an object, got []']);
  });

  test('missing required property', () => {
    assert.deepEqual(problems({ nodes: [file('d0')], exports: [{ type: 'vhost-user-blk', id: 'e0', 'node-name': 'd0' }] }), ["/exports/0: missing required property 'addr'"]);
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'd0', filename: '/x' }] }), ["/nodes/0: missing required property 'driver' (one of 'file', 'host_device', 'null-co', 'null', 'nbd', 'rbd', 'throttle')"]);
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'd0', driver: 'file' }] }), ["/nodes/0: missing required property 'filename'"]);
    assert.deepEqual(problems(one({}, { addr: { type: 'unix' } })), ["/exports/0/addr: missing required property 'path'"]);
  });

  test('unknown property: named, with the closest known one suggested', () => {
    // the misspelt required property is one problem, not also "missing 'node-name'"
    assert.deepEqual(problems({ nodes: [{ nodename: 'd0', driver: 'file', filename: '/x' }] }), ["/nodes/0/nodename: unknown property (did you mean 'node-name'?)"]);
    assert.deepEqual(problems(one({}, { num_queues: 2 })), ["/exports/0/num_queues: unknown property (did you mean 'num-queues'?)"]);
    assert.deepEqual(problems({ export: [] }), ["/export: unknown property (did you mean 'exports'?)"]);
    assert.deepEqual(problems(one({ cache: { direct: true, noflush: true } })), ["/nodes/0/cache/noflush: unknown property (did you mean 'no-flush'?)"]);
    assert.deepEqual(problems(one({ colour: 'red' })), [
      '/nodes/0/colour: unknown property (expected one of: node-name, driver, filename, read-only, cache, locking)',
    ]);
    assert.equal(closest('iothreads', ['iothread']), 'iothread');
    assert.equal(closest('qsize', ['queue-size', 'serial']), null);
  });

  test('out of range', () => {
    assert.deepEqual(problems(one({}, { 'num-queues': 0 })), ['/exports/0/num-queues: must be integer >= 1, got 0']);
    assert.deepEqual(problems(one({}, { 'num-queues': 65 })), ['/exports/0/num-queues: must be integer <= 64, got 65']);
    assert.deepEqual(problems({ 'poll-us': -1 }), ['/poll-us: must be integer >= 0, got -1']);
    assert.deepEqual(problems({ metrics: '127.0.0.1:70000' }), ['/metrics: port must be between 1 and 65535, got 70000']);
    assert.deepEqual(problems({ metrics: 'localhost' }), ["/metrics: port must be a number, got 'localhost' (expected [ADDR:]PORT, e.g. 9400, 127.0.0.1:9400 or [::1]:9400)"]);
    assert.deepEqual(load({ metrics: 9180 }).metrics, { host: '127.0.0.1', port: 9180 });
    assert.deepEqual(problems(one({}, { serial: 'x'.repeat(21) })), ['/exports/0/serial: must be at most 20 characters, got 21']);
    assert.deepEqual(problems(one({}, { serial: 'ä'.repeat(11) })), ["/exports/0/serial: must be at most 20 bytes (virtio-blk's ID), got 22"]);
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'n', driver: 'null-co', size: 1000 }] }), ['/nodes/0/size: must be a multiple of 512, got 1000']);
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'n', driver: 'null-co', size: '0' }] }), ["/nodes/0/size: size '0' is out of range"]);
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'n', driver: 'null-co', size: 0 }] }), ['/nodes/0/size: must be integer >= 1, got 0']);
    assert.deepEqual(
      problems({ nodes: [{ 'node-name': 'n', driver: 'null-co', size: '1536' }], exports: [exp('e0', 'n', { 'logical-block-size': 4096 })] }),
      ["/exports/0/logical-block-size: node 'n' is 1536 bytes, not a multiple of 4096"],
    );
    assert.deepEqual(problems(one({}, { socket: { owner: 2 ** 32 } })), ['/exports/0/socket/owner: must be integer <= 4294967294, got 4294967296']);
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'a'.repeat(32), driver: 'null-co', size: 512 }] }), ['/nodes/0/node-name: must be at most 31 characters, got 32']);
  });

  test('bad enum or const: driver, cache, locking, logical-block-size, aio, export type, addr type', () => {
    assert.deepEqual(problems({ nodes: [{ 'node-name': 'd0', driver: 'fiel', filename: '/x' }] }), [
      "/nodes/0/driver: must be one of 'file', 'host_device', 'null-co', 'null', 'nbd', 'rbd', 'throttle', got 'fiel' (did you mean 'file'?)",
    ]);
    assert.deepEqual(problems(one({ cache: 'none' })), [
      '/nodes/0/cache: must be an object {"direct": true|false, "no-flush": true|false} (the command line\'s --cache=none is {"direct": true}), got \'none\'',
    ]);
    assert.deepEqual(problems(one({ locking: 'maybe' })), ["/nodes/0/locking: must be one of 'auto', 'on', 'off', got 'maybe'"]);
    assert.deepEqual(problems(one({}, { 'logical-block-size': 1024 })), ['/exports/0/logical-block-size: must be one of 512, 4096, got 1024']);
    assert.deepEqual(problems(one({}, { 'queue-size': 100 })), [
      '/exports/0/queue-size: must be one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, got 100',
    ]);
    assert.deepEqual(problems({ aio: 'io-uring' }), ["/aio: must be one of 'io_uring', 'sync', got 'io-uring' (did you mean 'io_uring'?)"]);
    assert.deepEqual(problems(one({}, { type: 'nbd' })), ["/exports/0/type: must be 'vhost-user-blk', got 'nbd'"]);
    assert.deepEqual(problems(one({}, { addr: { type: 'inet', host: 'x' } })), ["/exports/0/addr/type: must be one of 'unix', 'fd', got 'inet'"]);
    assert.deepEqual(problems(one({}, { addr: { type: 'fd', str: 'three' } })), ["/exports/0/addr/str: must be a file descriptor number as a string, such as '3', got 'three'"]);
  });

  test('duplicate node-name', () => {
    assert.deepEqual(problems({ nodes: [file('d0'), file('d1'), file('d0')] }), ["/nodes/2/node-name: duplicate node-name 'd0' (first at /nodes/0/node-name)"]);
  });

  test('duplicate export id', () => {
    assert.deepEqual(problems({ nodes: [file('d0')], exports: [exp('e0', 'd0'), { ...exp('e0', 'd0'), addr: { type: 'unix', path: '/run/other.sock' } }] }), [
      "/exports/1/id: duplicate export id 'e0' (first at /exports/0/id)",
    ]);
  });

  test('an export naming a missing node', () => {
    assert.deepEqual(problems({ nodes: [file('disk0')], exports: [exp('e0', 'diskO')] }), ["/exports/0/node-name: no node named 'diskO' (did you mean 'disk0'?)"]);
    assert.deepEqual(problems({ exports: [exp('e0', 'd0')] }), ["/exports/0/node-name: no node named 'd0' (the file has no nodes)"]);
  });

  test('throttle: a missing node below, a cycle, itself; listed before its node is fine', () => {
    const thr = (name: string, below: string) => ({ 'node-name': name, driver: 'throttle', file: below });
    assert.deepEqual(problems({ nodes: [thr('t0', 'd9'), file('d0')] }), ["/nodes/0/file: no node named 'd9' (did you mean 'd0'?)"]);
    assert.deepEqual(problems({ nodes: [file('d0'), thr('t1', 't3'), thr('t2', 't1'), thr('t3', 't2')] }), ['/nodes/1/file: throttle nodes form a cycle: t1 -> t3 -> t2 -> t1']);
    assert.deepEqual(problems({ nodes: [thr('t0', 't0')] }), ['/nodes/0/file: throttle nodes form a cycle: t0 -> t0']);
    const c = load({ nodes: [thr('t2', 't1'), thr('t1', 'd0'), file('d0')], exports: [exp('e0', 't2')] });
    assert.deepEqual(c.nodes.map((n) => n['node-name']), ['d0', 't1', 't2'], 'blockdev-add order: every node after the one below it');
  });

  test('duplicate socket path (relative paths taken from the config file\'s directory), also the control socket', () => {
    const second = { ...exp('e1', 'd0'), addr: { type: 'unix', path: 'e0.sock' } };
    const doc = { nodes: [file('d0')], exports: [{ ...exp('e0', 'd0'), addr: { type: 'unix', path: '/etc/vubd/e0.sock' } }, second], control: { path: './e0.sock' } };
    assert.deepEqual(problems(doc), [
      "/exports/0/addr/path: duplicate socket path '/etc/vubd/e0.sock' (first at /control/path)",
      "/exports/1/addr/path: duplicate socket path '/etc/vubd/e0.sock' (first at /control/path)",
    ]);
    const fd = (id: string, str: string) => ({ ...exp(id, 'd0'), addr: { type: 'fd', str } });
    assert.deepEqual(problems({ nodes: [file('d0')], exports: [fd('e0', '3'), fd('e1', '03')] }), ["/exports/1/addr/str: duplicate socket fd '3' (first at /exports/0/addr/str)"]);
  });

  test('iothread-vq-mapping: worker names, workers, vqs covering each queue exactly once', () => {
    const map = (m: unknown, queues = 2, workers = 2) => problems(one({}, { 'num-queues': queues, 'iothread-vq-mapping': m }, { workers }));
    assert.deepEqual(map([{ iothread: 'iothread0' }]), ["/exports/0/iothread-vq-mapping/0/iothread: must be a pool worker's name: 'worker0', 'worker1', ..., got 'iothread0'"]);
    assert.deepEqual(map([{ iothread: 'worker2' }]), ['/exports/0/iothread-vq-mapping/0/iothread: no pool worker \'worker2\': workers is 2 (worker0 .. worker1)']);
    assert.deepEqual(map([{ iothread: 'worker0' }, { iothread: 'worker0' }]), [
      "/exports/0/iothread-vq-mapping/1/iothread: duplicate iothread 'worker0' (first at /exports/0/iothread-vq-mapping/0/iothread)",
    ]);
    assert.deepEqual(map([{ iothread: 'worker0', vqs: [0] }, { iothread: 'worker1' }]), [
      "/exports/0/iothread-vq-mapping/1: missing 'vqs': give vqs on every entry or on none (none: queues are spread round-robin over the listed workers)",
    ]);
    assert.deepEqual(map([{ iothread: 'worker0', vqs: [0, 1] }, { iothread: 'worker1', vqs: [1] }]), [
      '/exports/0/iothread-vq-mapping/1/vqs/0: queue 1 is mapped twice (also at /exports/0/iothread-vq-mapping/0/vqs/1)',
    ]);
    assert.deepEqual(map([{ iothread: 'worker0', vqs: [0] }], 3), ["/exports/0/iothread-vq-mapping: queues 1, 2 not mapped: each of the 3 queues must be in exactly one entry's vqs"]);
    assert.deepEqual(map([{ iothread: 'worker0', vqs: [0, 1, 2] }]), ['/exports/0/iothread-vq-mapping/0/vqs/2: no queue 2: num-queues is 2 (queues 0 .. 1)']);
    assert.deepEqual(map([{ iothread: 'worker0', vqs: [-1] }]), ['/exports/0/iothread-vq-mapping/0/vqs/0: must be integer >= 0, got -1']);
    // vqs left out: round-robin over the listed workers, as QEMU does
    const c = load(one({}, { 'num-queues': 5, 'iothread-vq-mapping': [{ iothread: 'worker1' }, { iothread: 'worker0' }] }, { workers: 2 }));
    assert.deepEqual(c.exports[0]!.args['iothread-vq-mapping'], [{ iothread: 'worker1', vqs: [0, 2, 4] }, { iothread: 'worker0', vqs: [1, 3] }]);
  });

  test('bad mode string', () => {
    assert.deepEqual(problems(one({}, { socket: { mode: '0999' } })), ["/exports/0/socket/mode: must be an octal mode string such as '0600' or '0660' (at most 0777), got '0999'"]);
    assert.deepEqual(problems(one({}, { socket: { mode: 600 } })), ["/exports/0/socket/mode: must be an octal mode string such as '0600' or '0660' (at most 0777), got 600"]);
    assert.deepEqual(problems({ control: { path: '/run/c.sock', mode: 'rw-------' } }), ["/control/mode: must be an octal mode string such as '0600' or '0660' (at most 0777), got 'rw-------'"]);
    assert.equal(load(one({}, { socket: { mode: '660' } })).exports[0]!.socketAccess.mode, 0o660);
  });

  test('users and groups that do not exist; a writable export on a read-only node', () => {
    assert.deepEqual(problems(one({}, { socket: { owner: 'no-such-user-x' }, 'allow-gid': [0, 'no-such-group-x'] })), [
      "/exports/0/allow-gid/1: no group named 'no-such-group-x' (checked with getgrnam: /etc/group and NSS)",
      "/exports/0/socket/owner: no user named 'no-such-user-x' (checked with getpwnam: /etc/passwd and NSS)",
    ]);
    assert.deepEqual(problems(one({ 'read-only': true }, { writable: true })), ["/exports/0/writable: node 'd0' is read-only (/nodes/0/read-only); make the export read-only or the node writable"]);
  });

  test('every problem is reported, in file order', () => {
    assert.deepEqual(problems({ exports: [exp('e0', 'x', { 'num-queues': 'two' })], nodes: [file('d0', { locking: 1 })], workers: 0 }), [
      '/workers: must be integer >= 1, got 0',
      "/nodes/0/locking: must be one of 'auto', 'on', 'off', got 1",
      "/exports/0/num-queues: must be integer, got 'two'",
    ]);
  });
});

describe('a valid config', () => {
  test('the full example round-trips into blockdev-add and block-export-add arguments', () => {
    const doc = {
      workers: 2,
      control: { path: '/run/vubd/control.sock', mode: '0600' },
      metrics: '127.0.0.1:9180',
      'log-level': 'info',
      aio: 'io_uring',
      nodes: [
        { 'node-name': 'disk0', driver: 'file', filename: 'vm1.img', cache: { direct: true, 'no-flush': false }, 'read-only': false, locking: 'auto' },
        { 'node-name': 'scratch', driver: 'null-co', size: '1G' },
        { 'node-name': 'disk0-limit', driver: 'throttle', file: 'disk0', limits: { 'iops-total': 1000, 'bps-write': '10M' } },
      ],
      exports: [
        {
          type: 'vhost-user-blk', id: 'vm1-disk0', 'node-name': 'disk0-limit', addr: { type: 'unix', path: '/run/vubd/vm1-disk0.sock' },
          writable: true, 'num-queues': 2, 'queue-size': 256, 'logical-block-size': 512, serial: 'vm1-disk0',
          socket: { mode: '0660', group: 0, owner: 'root' }, 'allow-uid': ['root', 107], 'allow-gid': [0],
          'iothread-vq-mapping': [{ iothread: 'worker0', vqs: [0] }, { iothread: 'worker1', vqs: [1] }],
        },
        { type: 'vhost-user-blk', id: 'scratch0', 'node-name': 'scratch', addr: { type: 'fd', str: '3' } },
      ],
    };
    const expected: DaemonConfig = {
      source: 'vubd.json',
      workers: 2,
      control: { path: '/run/vubd/control.sock', access: { mode: 0o600, uid: -1, gid: -1 } },
      controlFd: null,
      metrics: { host: '127.0.0.1', port: 9180 },
      logLevel: 'info',
      aio: 'io_uring',
      pollUs: 0,
      incoming: false,
      nodes: [
        { 'node-name': 'disk0', driver: 'file', filename: '/etc/vubd/vm1.img', 'read-only': false, cache: { direct: true, 'no-flush': false }, locking: 'auto' },
        { 'node-name': 'scratch', driver: 'null-co', size: 2 ** 30, 'read-only': false },
        { 'node-name': 'disk0-limit', driver: 'throttle', file: 'disk0', limits: { 'iops-total': 1000, 'bps-write': 10 * 2 ** 20 } },
      ],
      exports: [
        {
          args: {
            type: 'vhost-user-blk', id: 'vm1-disk0', 'node-name': 'disk0-limit', addr: { type: 'unix', path: '/run/vubd/vm1-disk0.sock' },
            writable: true, writethrough: false, 'num-queues': 2, 'logical-block-size': 512,
            'iothread-vq-mapping': [{ iothread: 'worker0', vqs: [0] }, { iothread: 'worker1', vqs: [1] }],
            'queue-size': 256, serial: 'vm1-disk0', 'ring-packed': false,
          },
          socketAccess: { mode: 0o660, uid: 0, gid: 0 },
          peers: { uids: [0, 107], gids: [0] },
        },
        {
          // qemu-storage-daemon's defaults: read-only, one queue
          args: {
            type: 'vhost-user-blk', id: 'scratch0', 'node-name': 'scratch', addr: { type: 'fd', str: '3' },
            writable: false, writethrough: false, 'num-queues': 1, 'logical-block-size': 512, 'iothread-vq-mapping': null,
            'queue-size': 1024, serial: 'scratch0', 'ring-packed': false,
          },
          socketAccess: { mode: 0o600, uid: -1, gid: -1 },
          peers: null,
        },
      ],
    };
    assert.deepEqual(load(doc), expected);
    assert.deepEqual(load({ $schema: 'vubd.schema.json' }).nodes, [], 'an empty daemon; $schema is allowed for editors');
  });

  test('contrib/vubd.example.json is valid', () => {
    const example = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../../contrib/vubd.example.json');
    const text = fs.readFileSync(example, 'utf8').replace(/libvirt-qemu/g, 'root'); // the names may not exist here; the integration test uses them
    const c = parseConfig(text, 'vubd.example.json', '/');
    assert.ok(c.exports.length >= 3, 'a host serving several disks');
    assert.ok(c.nodes.some((n) => n.driver === 'throttle'));
  });
});

describe('the command line as a config', () => {
  const cases: [string, string[], unknown][] = [
    [
      'a file, cache=none, 4 queues, 4k sectors, read-only, locking off',
      ['--socket-path=/run/a.sock', '--blk-file=/img/a.img', '--cache=none', '--num-queues=4', '--logical-block-size=4096', '--read-only', '--force-share', '--queue-size=256', '--serial=A1'],
      {
        nodes: [{ 'node-name': 'file0', driver: 'file', filename: '/img/a.img', 'read-only': true, cache: { direct: true }, locking: 'off' }],
        exports: [{ type: 'vhost-user-blk', id: 'export0', 'node-name': 'file0', addr: { type: 'unix', path: '/run/a.sock' }, 'num-queues': 4, 'logical-block-size': 4096, 'queue-size': 256, serial: 'A1' }],
      },
    ],
    [
      'a null disk on an inherited fd, writethrough, packed rings, peers, control socket, sync aio',
      ['--fd=5', '--blk-driver=null', '--size=64M', '--cache=writethrough', '--ring-packed', '--allow-uid=0', '--allow-gid=0,1', '--num-queues=1', '--control=/run/c.sock', '--control-mode=0660', '--aio=sync', '--poll-us=50', '--log-level=warn', '--incoming', '--metrics=[::1]:9400'],
      {
        control: { path: '/run/c.sock', mode: '0660' }, metrics: '[::1]:9400', aio: 'sync', 'poll-us': 50, 'log-level': 'warn', incoming: true,
        nodes: [{ 'node-name': 'null0', driver: 'null-co', size: '64M' }],
        exports: [{ type: 'vhost-user-blk', id: 'export0', 'node-name': 'null0', addr: { type: 'fd', str: '5' }, writable: true, writethrough: true, 'ring-packed': true, 'allow-uid': [0], 'allow-gid': [0, 1], serial: 'vubd-null' }],
      },
    ],
    [
      'cache=unsafe with socket mode and group',
      ['--socket-path=/run/b.sock', '--blk-file=/img/b.img', '--cache=unsafe', '--num-queues=2', '--socket-mode=0660', '--socket-group=0'],
      {
        nodes: [{ 'node-name': 'file0', driver: 'file', filename: '/img/b.img', cache: { 'no-flush': true } }],
        exports: [{ type: 'vhost-user-blk', id: 'export0', 'node-name': 'file0', addr: { type: 'unix', path: '/run/b.sock' }, writable: true, 'num-queues': 2, serial: 'b.img', socket: { mode: '0660', group: 0 } }],
      },
    ],
  ];
  for (const [name, argv, doc] of cases) {
    test(`configFromOptions equals the same disk written as a file: ${name}`, () => {
      const fromArgs = configFromOptions(parseOptions(argv));
      const fromFile = load(doc);
      assert.deepEqual({ ...fromArgs, source: '' }, { ...fromFile, source: '' });
      assert.equal(fromArgs.source, 'the command line');
    });
  }

  test('the exportless command line (only --control) is a config with no node and no export', () => {
    const c = configFromOptions(parseOptions(['--control=/run/c.sock', '--workers=3']));
    assert.deepEqual([c.nodes, c.exports, c.workers, c.control?.path], [[], [], 3, '/run/c.sock']);
  });

  test("a file's export is the ExportSpec that block-export-add makes of the same export", () => {
    const c = load({
      workers: 2,
      nodes: [file('d0')],
      exports: [
        exp('e0', 'd0', { writable: true, 'num-queues': 3, 'queue-size': 256, 'logical-block-size': 4096, serial: 'S', socket: { mode: '0660', group: 0 }, 'allow-uid': [0, 'root'], 'iothread-vq-mapping': [{ iothread: 'worker1', vqs: [0, 2] }, { iothread: 'worker0', vqs: [1] }] }),
        { ...exp('e1', 'd0', { 'num-queues': 3, 'iothread-vq-mapping': [{ iothread: 'worker1' }, { iothread: 'worker0' }] }), addr: { type: 'fd', str: '7' } },
      ],
    });
    const qmp = [
      { type: 'vhost-user-blk', id: 'e0', 'node-name': 'd0', addr: { type: 'unix', path: '/run/vubd/e0.sock' }, writable: true, 'num-queues': 3, 'queue-size': 256, 'logical-block-size': 4096, serial: 'S', 'socket-mode': '0660', 'socket-group': '0', 'allow-uid': '0,root', 'iothread-vq-mapping': [{ iothread: 'worker1', vqs: [0, 2] }, { iothread: 'worker0', vqs: [1] }] },
      { type: 'vhost-user-blk', id: 'e1', 'node-name': 'd0', addr: { type: 'fd', str: '7' }, 'num-queues': 3, 'iothread-vq-mapping': [{ iothread: 'worker1' }, { iothread: 'worker0' }] },
    ];
    assert.deepEqual(exportSpec(c.exports[0]!), { ...exportSpecFromArgs(qmp[0]!, 2, exportAccess), ringPacked: false });
    // block-export-add without access keys leaves access/peers to the manager's defaults (0600, everyone)
    assert.deepEqual(exportSpec(c.exports[1]!), { ...exportSpecFromArgs(qmp[1]!, 2, exportAccess), access: { mode: 0o600, uid: -1, gid: -1 }, peers: null, ringPacked: false });
    assert.deepEqual(exportSpec(c.exports[1]!).mapping, [1, 0, 1]);
  });

  test('--config refuses the disk options; daemon options given on the command line override the file', () => {
    assert.throws(() => parseOptions(['--config=x.json', '--blk-file=a.img']), (e: Error) => e instanceof UsageError && /^--blk-file cannot be used with --config/.test(e.message));
    for (const o of ['--socket-path=a.sock', '--fd=3', '--blk-driver=null', '--num-queues=2', '--cache=none']) {
      assert.throws(() => parseOptions(['--config=x.json', o]), UsageError, o);
    }
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vubd-config-'));
    const f = path.join(dir, 'vubd.json');
    fs.writeFileSync(f, JSON.stringify({ 'log-level': 'debug', aio: 'sync', control: { path: 'c.sock', mode: '0600' }, ...one() }));
    const plain = resolveConfig(parseOptions([`--config=${f}`]));
    assert.deepEqual([plain.logLevel, plain.aio, plain.control], ['debug', 'sync', { path: path.join(dir, 'c.sock'), access: { mode: 0o600, uid: -1, gid: -1 } }]);
    const over = resolveConfig(parseOptions([`--config=${f}`, '--log-level=warn', '--control-mode=0660', '--metrics=9400']));
    assert.deepEqual([over.logLevel, over.aio, over.control!.access.mode, over.metrics], ['warn', 'sync', 0o660, { host: '127.0.0.1', port: 9400 }]);
    // --workers over the file's is checked against its iothread-vq-mapping
    fs.writeFileSync(f, JSON.stringify({ workers: 2, ...one({}, { 'num-queues': 2, 'iothread-vq-mapping': [{ iothread: 'worker0', vqs: [0] }, { iothread: 'worker1', vqs: [1] }] }) }));
    assert.equal(resolveConfig(parseOptions([`--config=${f}`, '--workers=4'])).workers, 4);
    assert.throws(
      () => resolveConfig(parseOptions([`--config=${f}`, '--workers=1'])),
      (e: ConfigError) => e.message === `${f}: /exports/0/iothread-vq-mapping/1/iothread: no pool worker 'worker1': --workers is 1 (worker0 .. worker0)`,
    );
    // a vhost-user socket from systemd must be an export's addr {"type": "fd"}
    assert.throws(
      () => resolveConfig(parseOptions([`--config=${f}`], { vhost: 3, control: null })),
      (e: ConfigError) => e.message === `${f}: /exports: systemd passed a listening socket as fd 3 (LISTEN_FDS), but no export's addr is {"type": "fd", "str": "3"}`,
    );
    fs.rmSync(dir, { recursive: true });
  });
});

test('the validator precompiled by npm run build:ts is used, and judges as the schema compiled now does', () => {
  const { validate, precompiled } = configValidator();
  assert.equal(precompiled, true, 'dist/src/cli/config-validator.cjs missing or built from another schema: run npm run build:ts');
  const fresh = compileValidator();
  const docs: unknown[] = [
    one(),
    { nodes: [{ nodename: 'x', driver: 'fiel' }], exports: [exp('e0', 'd0', { 'num-queues': 0, socket: { mode: '0999' }, addr: { type: 'tcp' } })] },
    { workers: 'x', 'log-level': 'loud', nodes: {}, metrics: true },
    [],
  ];
  for (const d of docs) {
    assert.equal(validate(d), fresh(d));
    assert.deepEqual(validate.errors ?? null, fresh.errors ?? null);
  }
});

test("nbd nodes take QEMU's nbd options; a unix path is taken from the config file's directory; TLS and other server types are refused", () => {
  const c = load({
    nodes: [
      { 'node-name': 'r0', driver: 'nbd', server: { type: 'inet', host: 'storage1', port: 10809 }, export: 'vm1', 'reconnect-delay': 30, 'open-timeout': 5 },
      { 'node-name': 'r1', driver: 'nbd', server: { type: 'unix', path: 'nbd.sock' }, 'read-only': true },
    ],
    exports: [exp('e0', 'r0')],
  });
  assert.deepEqual(c.nodes, [
    { 'node-name': 'r0', driver: 'nbd', server: { type: 'inet', host: 'storage1', port: '10809' }, export: 'vm1', 'reconnect-delay': 30, 'open-timeout': 5, 'read-only': false },
    { 'node-name': 'r1', driver: 'nbd', server: { type: 'unix', path: path.join(BASE, 'nbd.sock') }, export: '', 'reconnect-delay': 0, 'open-timeout': 0, 'read-only': true },
  ]);
  assert.deepEqual(problems({ nodes: [{ 'node-name': 'r0', driver: 'nbd', server: { type: 'unix', path: '/s' }, 'tls-creds': 'tls0' }] }), [
    '/nodes/0/tls-creds: unknown property (expected one of: node-name, driver, server, export, reconnect-delay, open-timeout, read-only)',
  ]);
  assert.deepEqual(problems({ nodes: [{ 'node-name': 'r0', driver: 'nbd', server: { type: 'vsock', cid: '3' } }] }), ["/nodes/0/server/type: must be one of 'inet', 'unix', got 'vsock'"]);
  assert.deepEqual(problems({ nodes: [{ 'node-name': 'r0', driver: 'nbd', server: { type: 'inet', host: 'h' } }] }), ["/nodes/0/server: missing required property 'port'"]);
});
