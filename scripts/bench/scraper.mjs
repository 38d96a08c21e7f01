#!/usr/bin/env node
// Scrapes a vubd --metrics endpoint at a fixed rate over one keep-alive connection, as Prometheus
// does, for scripts/bench/run.mjs's scrape rows. Prints one JSON line: scrapes done, failures, the
// rate reached, scrape latency (p50/p99 ms) and the body size.
//   node scripts/bench/scraper.mjs PORT HZ SECONDS [--alternate MS --pid PID]
//   node scripts/bench/scraper.mjs PORT --cpu-per-scrape N --pid PID
// --alternate: phases of MS alternate between HZ and one scrape per phase (the one at its start,
// which every phase has); each phase start reads the requests counter, so each phase gets its
// IOPS from vubd's own counters and its backend CPU from /proc/PID/stat. A machine whose load
// drifts during the run shifts neighbouring phases alike, so their ratio keeps the scrape cost.
// --cpu-per-scrape: N scrapes back to back (after 50 unmeasured), and the backend's CPU time per scrape;
// then as many GET / (a fixed line) for the part the HTTP exchange alone costs.
import fs from 'node:fs';
import http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';

const argv = process.argv.slice(2);
const flag = (name) => {
  const i = argv.indexOf(name);
  return i < 0 ? undefined : Number(argv.splice(i, 2)[1]);
};
const alternate = flag('--alternate');
const perScrape = flag('--cpu-per-scrape');
const pid = flag('--pid');
const [port, hz, seconds] = argv.map(Number);
if (perScrape > 0 && pid > 0 && port > 0) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = (urlPath = '/metrics') => new Promise((resolve, reject) => http.get({ host: '127.0.0.1', port, path: urlPath, agent }, (res) => {
    let n = 0;
    res.on('data', (d) => (n += d.length));
    res.on('end', () => (res.statusCode === 200 ? resolve(n) : reject(new Error(`status ${res.statusCode}`))));
  }).on('error', reject));
  const cpu = () => {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  };
  // the same number of GET / (a fixed line, no stats): what the HTTP exchange alone costs
  const measure = async (urlPath) => {
    for (let i = 0; i < 50; i++) await get(urlPath);
    const c0 = cpu(), t0 = performance.now();
    let bytes = 0;
    for (let i = 0; i < perScrape; i++) bytes = await get(urlPath);
    return { cpu_ms: ((cpu() - c0) * 1000) / perScrape, wall_ms: (performance.now() - t0) / perScrape, bytes };
  };
  const m = await measure('/metrics');
  const root = await measure('/');
  agent.destroy();
  console.log(JSON.stringify({ scrapes: perScrape, ...m, http_cpu_ms: root.cpu_ms }));
  process.exit(0);
}
if (!(port > 0 && hz > 0 && seconds > 0) || (alternate !== undefined && !(alternate > 0 && pid > 0))) {
  console.error('usage: scraper.mjs PORT HZ SECONDS [--alternate MS --pid PID]');
  process.exit(2);
}
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const CLK_TCK = 100;

function scrape() {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/metrics', agent }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => (res.statusCode === 200 && body.includes('vubd_queue_requests_total') ? resolve(body) : reject(new Error(`status ${res.statusCode}`))));
    });
    req.setTimeout(2000, () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

function requests(body) {
  let n = 0;
  for (const m of body.matchAll(/^vubd_queue_requests_total\{[^}]*\} (\d+)$/gm)) n += Number(m[1]);
  return n;
}

function cpuSeconds() {
  const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

const lat = [];
let failures = 0, bytes = 0, lastError = '';
async function timed() {
  const s = performance.now();
  try {
    const body = await scrape();
    lat.push(performance.now() - s);
    bytes = body.length;
    return body;
  } catch (e) {
    failures++;
    lastError = e.message;
    return null;
  }
}

/** Scrapes at `rate` until `until` (performance.now() ms); the first scrape at once. */
async function scrapeUntil(rate, until) {
  let next = performance.now();
  let first = null;
  while (performance.now() < until) {
    const body = await timed();
    first ??= body;
    if (rate <= 0) break;
    next += 1000 / rate;
    const wait = Math.min(next, until) - performance.now();
    if (wait > 0) await sleep(wait);
    else next = performance.now(); // behind: do not burst to catch up
  }
  return first;
}

const t0 = performance.now();
const end = t0 + seconds * 1000;
const phases = [];
if (alternate === undefined) await scrapeUntil(hz, end);
else {
  let on = false;
  let prev = null;
  for (let start = t0; start + alternate <= end; start += alternate, on = !on) {
    const cpu = cpuSeconds();
    const body = await scrapeUntil(on ? hz : 0, start + alternate);
    const at = { t: start, n: body ? requests(body) : NaN, cpu, on };
    if (prev) phases.push({ on: prev.on, iops: ((at.n - prev.n) * 1000) / (start - prev.t), cpuPct: (100 * (at.cpu - prev.cpu) * 1000) / (start - prev.t) });
    prev = at;
    const wait = start + alternate - performance.now();
    if (wait > 0) await sleep(wait);
  }
}
const wall = (performance.now() - t0) / 1000;
lat.sort((a, b) => a - b);
const q = (p) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] : NaN);
agent.destroy();
const self = process.cpuUsage();
// the scraper's own CPU per scrape: it runs beside the loadgen and takes from it what it uses
const clientMs = (self.user + self.system) / 1000 / Math.max(1, lat.length);
const out = { scrapes: lat.length, failures, lastError, hz: lat.length / wall, p50_ms: q(0.5), p99_ms: q(0.99), bytes, client_cpu_ms: clientMs };
if (alternate !== undefined) {
  // each scraped phase against the mean of the unscraped phases either side of it
  const ratios = [], cpuDiffs = [];
  for (let i = 1; i + 1 < phases.length; i++) {
    if (!phases[i].on || phases[i - 1].on || phases[i + 1].on) continue;
    ratios.push(phases[i].iops / ((phases[i - 1].iops + phases[i + 1].iops) / 2));
    cpuDiffs.push(phases[i].cpuPct - (phases[i - 1].cpuPct + phases[i + 1].cpuPct) / 2);
  }
  Object.assign(out, { phaseMs: alternate, phases, ratios, cpuDiffs });
}
console.log(JSON.stringify(out));
