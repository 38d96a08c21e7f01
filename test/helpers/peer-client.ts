// A frontend in its own process (spawned with another uid/gid by socket-access tests): connects,
// negotiates, writes and reads back 8 KiB, and prints one JSON line saying what happened.
import { Frontend, BLK } from './frontend.js';
import { pattern } from './sessions.js';

const socketPath = process.argv[2]!;
const seed = Number(process.argv[3] ?? '1');
let fe: Frontend | null = null;
try {
  fe = Frontend.connect(socketPath);
  fe.negotiate();
  const ring = fe.setupRing(0, 128);
  const data = pattern(seed, 8192);
  const w = fe.statusOf(fe.run(ring, BLK.OUT, 64 + seed * 16, data));
  const r = fe.run(ring, BLK.IN, 64 + seed * 16, 8192, { region: 1 });
  const same = Buffer.from(fe.dataOf(r)).equals(Buffer.from(data));
  console.log(JSON.stringify({ served: true, writeStatus: w, readStatus: fe.statusOf(r), same, uid: process.getuid!() }));
} catch (e) {
  console.log(JSON.stringify({ served: false, error: (e as Error).message, uid: process.getuid!() }));
} finally {
  try {
    fe?.close();
  } catch {
    /* closed by the backend */
  }
  fe?.ram.close();
}
