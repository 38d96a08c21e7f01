// The real vubd binary with --config: a bad file exits 2 with one line per problem naming the
// file and the field, before any socket, control socket or image is opened; --check-config
// prints the example host config resolved.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { repoRoot, tempDir, vubdMain } from '../helpers/daemon.js';
import { e2eSkip } from '../e2e/guest.js';
import { native } from '../../src/native/index.js';

function runVubd(args: string[], cwd: string): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [vubdMain, ...args], { cwd, encoding: 'utf8', timeout: 20000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('vubd --config', () => {
  test('a bad config exits 2, names the file and each bad field, and creates no socket', () => {
    const dir = tempDir('vubd-config-');
    const bad = {
      control: { path: 'control.sock' },
      nodes: [
        { 'node-name': 'disk0', driver: 'file', filename: 'disk0.img', 'read-only': false },
        { nodename: 'disk1', driver: 'file', filename: 'disk1.img' },
      ],
      exports: [
        { type: 'vhost-user-blk', id: 'e0', 'node-name': 'disk0', addr: { type: 'unix', path: 'e0.sock' }, writable: true, 'num-queues': 0 },
        { type: 'vhost-user-blk', id: 'e1', 'node-name': 'disk0', addr: { type: 'unix', path: 'e1.sock' }, socket: { mode: '0999' } },
      ],
    };
    fs.writeFileSync(path.join(dir, 'bad.json'), JSON.stringify(bad, null, 2));
    fs.writeFileSync(path.join(dir, 'disk0.img'), Buffer.alloc(1 << 20));
    const r = runVubd(['--config=bad.json'], dir);
    assert.equal(r.status, 2, r.stderr);
    assert.deepEqual(r.stderr.trimEnd().split('\n'), [
      "bad.json: /nodes/1/nodename: unknown property (did you mean 'node-name'?)",
      'bad.json: /exports/0/num-queues: must be integer >= 1, got 0',
      "bad.json: /exports/1/socket/mode: must be an octal mode string such as '0600' or '0660' (at most 0777), got '0999'",
    ]);
    assert.equal(r.stdout, '');
    assert.deepEqual(fs.readdirSync(dir).sort(), ['bad.json', 'disk0.img'], 'no socket, no control socket, no image created');

    // cross-field problems and names NSS does not know are found before anything opens, too
    const bad2 = {
      nodes: [{ 'node-name': 'disk0', driver: 'file', filename: 'disk0.img' }],
      exports: [
        { type: 'vhost-user-blk', id: 'e0', 'node-name': 'disk0', addr: { type: 'unix', path: 'e0.sock' }, 'allow-uid': ['no-such-user-vubd'] },
        { type: 'vhost-user-blk', id: 'e0', 'node-name': 'disk9', addr: { type: 'unix', path: 'e0.sock' } },
      ],
    };
    fs.writeFileSync(path.join(dir, 'bad2.json'), JSON.stringify(bad2));
    const r2 = runVubd([`--config=${path.join(dir, 'bad2.json')}`], dir);
    assert.equal(r2.status, 2, r2.stderr);
    const f = path.join(dir, 'bad2.json');
    assert.deepEqual(r2.stderr.trimEnd().split('\n'), [
      `${f}: /exports/0/allow-uid/0: no user named 'no-such-user-vubd' (checked with getpwnam: /etc/passwd and NSS)`,
      `${f}: /exports/1/addr/path: duplicate socket path '${path.join(dir, 'e0.sock')}' (first at /exports/0/addr/path)`,
      `${f}: /exports/1/id: duplicate export id 'e0' (first at /exports/0/id)`,
      `${f}: /exports/1/node-name: no node named 'disk9' (did you mean 'disk0'?)`,
    ]);

    fs.writeFileSync(path.join(dir, 'syntax.json'), '{\n  "nodes": [\n    {"node-name": "d0" "driver": "file"}\n  ]\n}\n');
    const r3 = runVubd(['--config=syntax.json'], dir);
    assert.equal(r3.status, 2);
    assert.match(r3.stderr, /^syntax\.json: line 3, column 24: not valid JSON: /);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['bad.json', 'bad2.json', 'disk0.img', 'syntax.json']);
    fs.rmSync(dir, { recursive: true });
  });

  test('--config with a disk option is a usage error (exit 2, no socket)', () => {
    const dir = tempDir('vubd-config-');
    fs.writeFileSync(path.join(dir, 'ok.json'), '{}');
    const r = runVubd(['--config=ok.json', '--socket-path=x.sock'], dir);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /^vubd: --socket-path cannot be used with --config: the file describes every disk/);
    assert.deepEqual(fs.readdirSync(dir), ['ok.json']);
    fs.rmSync(dir, { recursive: true });
  });

  const group = native.lookupGroup('libvirt-qemu');
  const user = native.lookupUser('libvirt-qemu');
  test(
    '--check-config prints contrib/vubd.example.json resolved, opening nothing',
    { skip: e2eSkip(group === null || user === null ? 'no libvirt-qemu user and group (Debian package libvirt-daemon-system)' : null) },
    () => {
      const r = runVubd(['--config', path.join(repoRoot, 'contrib/vubd.example.json'), '--check-config'], repoRoot);
      assert.equal(r.status, 0, r.stderr);
      const out = JSON.parse(r.stdout) as { 'blockdev-add': { 'node-name': string }[]; 'block-export-add': Record<string, unknown>[] };
      assert.deepEqual(out['blockdev-add'].map((n) => n['node-name']), ['vm1-disk0', 'vm1-disk0-limit', 'vm1-data', 'vm2-disk0', 'vm2-iso', 'bench']);
      const e0 = out['block-export-add'][0]!;
      assert.deepEqual([e0.id, e0.socket, e0['allow-uid']], ['vm1-disk0', { mode: '0660', uid: -1, gid: group }, [user!.uid]]);
      assert.equal(out['block-export-add'].length, 5);
      assert.ok(!fs.existsSync('/run/vubd/vm1-disk0.sock'));
    },
  );
});
