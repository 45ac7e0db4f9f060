// Runs several versions of the real twilio-video SDK, one after another in one browser, through
// sigrelay, for tests/compat.rs.
//
// Usage: node sdk.mjs '<spec as JSON>'
//   spec: { engine: "chromium" | "firefox", relay: "wss://localhost:PORT", token,
//           signaling: "/signaling", insights: "/v1/VideoEvents",
//           packages: ["twilio-video-2.5", "twilio-video", ...] }  (names in package.json)
// For each package, in its own tab: `Video.connect` with `tracks: []`, then prints
//   {"event":"connected","package":…,"sdk":<Video.version>,"roomSid":…,"identity":…}
// (or {"event":"failed","code":…,"webrtc":<whether the engine has RTCPeerConnection>}, after
// which only `next` is accepted) and waits for a command on stdin:
//   next          room.disconnect(); prints {"event":"disconnected",…} and goes on to the next
//   reconnected?  waits up to 30 s for the room's `reconnected`; prints {"event":"reconnected",
//                 "roomSid":…,"reconnecting_ms":…} (from `reconnecting` to `reconnected`) or
//                 {"event":"not_reconnected","state":…}, then waits for the next command
// and prints {"event":"done","browser":…} at the end. The page is served on 127.0.0.1; every
// other host name leads to a closed loopback port, so nothing leaves the machine.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { engine } from './launch.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const spec = JSON.parse(process.argv[2]);
const say = (event) => process.stdout.write(JSON.stringify(event) + '\n');

const sdks = new Map(spec.packages.map((p) => {
  if (!/^twilio-video(-[0-9.]+)?$/.test(p)) throw new Error(`not an SDK package: ${p}`);
  return [p, fs.readFileSync(path.join(here, 'node_modules', p, 'dist/twilio-video.min.js'))];
}));

const server = http.createServer((req, res) => {
  const [, pkg, file] = req.url.split('/');
  if (sdks.has(pkg) && file === 'twilio-video.min.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' });
    res.end(sdks.get(pkg));
  } else if (sdks.has(pkg)) {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(`<!doctype html><meta charset="utf-8"><title>${pkg}</title>` +
      `<script src="/${pkg}/twilio-video.min.js"></script><body>${pkg}</body>`);
  } else {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function command() {
  const { value, done } = await lines.next();
  return done ? 'next' : value.trim();
}

const browser = await engine(spec.engine, '127.0.0.1:9');
let exitCode = 0;
try {
  for (const pkg of spec.packages) {
    const tab = await browser.tab();
    tab.log(pkg);
    await tab.goto(`${origin}/${pkg}/`);
    const result = await tab.evaluate(async (s) => {
      const times = { reconnecting: null, reconnected: null };
      window.times = times;
      try {
        const room = await Twilio.Video.connect(s.token, {
          tracks: [],
          name: `compat-${Twilio.Video.version}`,
          wsServer: s.relay + s.signaling,
          wsServerInsights: s.relay + s.insights,
          logLevel: 'warn',
        });
        window.room = room;
        room.on('reconnecting', () => { times.reconnecting = performance.now(); });
        room.on('reconnected', () => { times.reconnected = performance.now(); });
        return { event: 'connected', sdk: Twilio.Video.version, roomSid: room.sid, identity: room.localParticipant.identity };
      } catch (e) {
        return {
          event: 'failed', sdk: Twilio.Video.version, code: e.code, message: String(e.message),
          webrtc: typeof RTCPeerConnection === 'function',
        };
      }
    }, spec);
    say({ package: pkg, ...result });
    if (result.event !== 'connected') {
      // The test checks what the failure left behind before this tab goes.
      if (await command() !== 'next') throw new Error('expected next');
    } else {
      for (let c = await command(); c !== 'next'; c = await command()) {
        if (c !== 'reconnected?') throw new Error(`unknown command ${c}`);
        say({ package: pkg, ...await tab.evaluate(() => new Promise((resolve) => {
          const answer = () => resolve(window.times.reconnected === null
            ? { event: 'not_reconnected', state: window.room.state }
            : {
              event: 'reconnected',
              roomSid: window.room.sid,
              state: window.room.state,
              reconnecting_ms: window.times.reconnecting === null ? null
                : Math.round(window.times.reconnected - window.times.reconnecting),
            });
          if (window.times.reconnected !== null) return answer();
          const timer = setTimeout(answer, 30000);
          window.room.once('reconnected', () => { clearTimeout(timer); setTimeout(answer, 0); });
        })) });
      }
      say({ package: pkg, ...await tab.evaluate(() => new Promise((resolve) => {
        window.room.once('disconnected', (_, e) => resolve({ event: 'disconnected', error: e ? String(e) : null }));
        window.room.disconnect();
      })) });
    }
    // Let the SDK's bye and close frames leave before the tab goes.
    await new Promise((r) => setTimeout(r, 300));
    await tab.close();
  }
  say({ event: 'done', browser: browser.version });
} catch (e) {
  process.stderr.write(`sdk.mjs: ${e.stack || e}\n`);
  exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
process.exit(exitCode);
