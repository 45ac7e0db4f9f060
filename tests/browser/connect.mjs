// Runs the real twilio-video SDK in Debian's Chromium against sigrelay, for tests/browser.rs.
//
// Usage: node connect.mjs '<spec as JSON>'
//   spec: { relay: "wss://localhost:PORT", token, signaling: "/signaling",
//           insights: "/v1/VideoEvents", screenshot?: "file.png", probe?: true }
// With probe, a bare WebSocket first sends a hello and reports the close it gets
// ({"event":"probe_closed","code":...,"reason":...}).
// Prints JSON lines on stdout: {"event":"connected","roomSid":...} or
// {"event":"failed","code":...,"message":...}. After "connected" it waits for a line
// "disconnect" on stdin, calls room.disconnect(), and prints {"event":"disconnected"}.
// The page is served on 127.0.0.1 and every other host name resolves to a closed loopback port,
// so nothing leaves the machine.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { launch } from './launch.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const spec = JSON.parse(process.argv[2]);
const sdk = fs.readFileSync(path.join(here, 'node_modules/twilio-video/dist/twilio-video.min.js'));
const page = '<!doctype html><meta charset="utf-8"><title>sigrelay browser test</title>' +
  '<script src="/twilio-video.min.js"></script><body>sigrelay browser test</body>';

const say = (event) => process.stdout.write(JSON.stringify(event) + '\n');

const server = http.createServer((req, res) => {
  if (req.url === '/twilio-video.min.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' });
    res.end(sdk);
  } else {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(page);
  }
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await launch('127.0.0.1:9', ['localhost', '127.0.0.1']);
let exitCode = 0;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const tab = await context.newPage();
  tab.on('console', (m) => process.stderr.write(`[page ${m.type()}] ${m.text()}\n`));
  tab.on('pageerror', (e) => process.stderr.write(`[page error] ${e}\n`));
  await tab.goto(origin + '/');
  if (spec.probe) {
    // A bare WebSocket, to see the close code and reason a page gets from the relay.
    say(await tab.evaluate((s) => new Promise((resolve) => {
      const ws = new WebSocket(s.relay + s.signaling);
      ws.onopen = () => ws.send(JSON.stringify({ type: 'hello', version: 2, body: { token: s.token, type: 'ice' } }));
      ws.onclose = (e) => resolve({ event: 'probe_closed', code: e.code, reason: e.reason, wasClean: e.wasClean });
    }), spec));
  }
  const result = await tab.evaluate(async (s) => {
    try {
      const room = await Twilio.Video.connect(s.token, {
        tracks: [],
        wsServer: s.relay + s.signaling,
        wsServerInsights: s.relay + s.insights,
        logLevel: 'warn',
      });
      window.room = room;
      return { event: 'connected', roomSid: room.sid, roomName: room.name, identity: room.localParticipant.identity };
    } catch (e) {
      return { event: 'failed', code: e.code, message: String(e.message) };
    }
  }, spec);
  say(result);
  if (result.event === 'connected') {
    const lines = readline.createInterface({ input: process.stdin });
    for await (const line of lines) {
      if (line.trim() === 'disconnect') break;
    }
    await tab.evaluate(() => new Promise((resolve) => {
      window.room.once('disconnected', () => resolve());
      window.room.disconnect();
    }));
    // Let the SDK's bye and close frames leave before the browser goes.
    await tab.waitForTimeout(500);
    say({ event: 'disconnected' });
  }
  if (spec.screenshot) await tab.screenshot({ path: spec.screenshot });
} catch (e) {
  process.stderr.write(`connect.mjs: ${e.stack || e}\n`);
  exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
process.exit(exitCode);
