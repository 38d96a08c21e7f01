// Shared by the benchmarks (run.mjs, scale.mjs): paths, the load generator's build, the bench image,
// /proc sampling and number formatting.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '../..');
export const OUT = path.join(HERE, 'out');
export const LOADGEN_SRC = path.join(HERE, 'loadgen.c');
export const LOADGEN = path.join(OUT, 'loadgen');
export const LOGS = path.join(OUT, 'logs');
export const VUBD_MAIN = path.join(ROOT, 'dist/src/cli/main.js');
export const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;
export const GiB = 2 ** 30;

export function ensureLoadgen() {
  fs.mkdirSync(OUT, { recursive: true });
  const stale = !fs.existsSync(LOADGEN) || fs.statSync(LOADGEN).mtimeMs < fs.statSync(LOADGEN_SRC).mtimeMs;
  if (!stale) return;
  console.error(`compiling ${path.relative(ROOT, LOADGEN_SRC)}`);
  const r = spawnSync('gcc', ['-O2', '-Wall', '-pthread', '-o', LOADGEN, LOADGEN_SRC], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error('gcc failed');
}

/** A 1 GiB raw image, filled (not sparse) once, then read through so it sits in the page cache. */
export function ensureImage(img) {
  const size = 1 * GiB;
  let ok = false;
  try { ok = fs.statSync(img).size === size && fs.existsSync(img + '.filled'); } catch {}
  if (!ok) {
    console.error(`creating ${img} (1 GiB, sparse, then filled with dd)`);
    fs.mkdirSync(path.dirname(img), { recursive: true });
    spawnSync('truncate', ['-s', String(size), img], { stdio: 'inherit' });
    const r = spawnSync('dd', [`if=/dev/zero`, `of=${img}`, 'bs=1M', `count=${size / 2 ** 20}`, 'conv=notrunc', 'status=none'], { stdio: 'inherit' });
    if (r.status !== 0) throw new Error('dd failed');
    fs.writeFileSync(img + '.filled', '');
  }
  spawnSync('dd', [`if=${img}`, 'of=/dev/null', 'bs=1M', 'status=none']); // cheap when already cached
}

/** utime+stime of the whole process (all threads), in seconds */
export function procCpuSeconds(pid) {
  const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' '); // f[0] = field 3 (state)
  return (Number(f[11]) + Number(f[12])) / CLK_TCK; // fields 14 utime, 15 stime
}

/** one `Key: N kB` field of /proc/PID/status, in MiB */
export function procStatus(pid, key) {
  const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/** VmRSS and its parts (RssAnon, RssFile, RssShmem; guest memory shows up as shmem), in MiB */
export function procMemory(pid) {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const get = (key) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text);
    return m ? Number(m[1]) / 1024 : NaN;
  };
  return { rss: get('VmRSS'), anon: get('RssAnon'), file: get('RssFile'), shmem: get('RssShmem'), threads: Number(/^Threads:\s+(\d+)/m.exec(text)?.[1]) };
}

export const fmt = (v, d = 0) =>
  v === undefined || v === null || Number.isNaN(v) ? '—' : Number(v).toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });
export const ratio = (a, b) => (a > 0 && b > 0 && Number.isFinite(a) && Number.isFinite(b) ? (a / b).toFixed(2) + '×' : '—');
export const median = (xs) => {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return NaN;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};
