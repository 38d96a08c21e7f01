#!/usr/bin/env node
// Scrapes a vubd --metrics endpoint at a fixed rate over one keep-alive connection, as Prometheus
// does, for scripts/bench/run.mjs's scrape rows. Prints one JSON line: scrapes done, failures, the
// rate reached, scrape latency (p50/p99 ms) and the body size.
//   node scripts/bench/scraper.mjs PORT HZ SECONDS
import http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';

const [port, hz, seconds] = process.argv.slice(2).map(Number);
if (!(port > 0 && hz > 0 && seconds > 0)) {
  console.error('usage: scraper.mjs PORT HZ SECONDS');
  process.exit(2);
}
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function scrape() {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/metrics', agent }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => (res.statusCode === 200 && body.includes('vubd_queue_requests_total') ? resolve(body.length) : reject(new Error(`status ${res.statusCode}`))));
    });
    req.setTimeout(2000, () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

const lat = [];
let failures = 0, bytes = 0, lastError = '';
const t0 = performance.now();
let next = t0;
while (performance.now() - t0 < seconds * 1000) {
  const s = performance.now();
  try {
    bytes = await scrape();
    lat.push(performance.now() - s);
  } catch (e) {
    failures++;
    lastError = e.message;
  }
  next += 1000 / hz;
  const wait = next - performance.now();
  if (wait > 0) await sleep(wait);
  else next = performance.now(); // behind: do not burst to catch up
}
const wall = (performance.now() - t0) / 1000;
lat.sort((a, b) => a - b);
const q = (p) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] : NaN);
agent.destroy();
console.log(JSON.stringify({ scrapes: lat.length, failures, lastError, hz: lat.length / wall, p50_ms: q(0.5), p99_ms: q(0.99), bytes }));
