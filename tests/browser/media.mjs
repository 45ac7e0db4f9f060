// Media through sigrelay's TURN relay, in Debian's Chromium, for tests/media.rs.
//
// Usage: node media.mjs '<spec as JSON>'
//   spec: { relay: "wss://localhost:PORT", token, signaling, insights,
//           iceServers?: [...],   // skip the SDK and use these
//           bytes: 1048576 }      // the data channel's payload each way
// Prints one JSON line on stdout:
//   { sdkIceServers, connected, relayProtocols, localTypes, received: {a, b}, intact,
//     videoBytes, error? }
// First the real twilio-video SDK connects through the relay, with RTCPeerConnection wrapped so
// the ICE servers the SDK hands it are recorded. Then two RTCPeerConnections in the page, both
// `iceTransportPolicy: 'relay'` with those servers, exchange a fake camera track and a data
// channel (every byte checked). Every host name but localhost resolves to nothing, so a relay
// candidate can only come through the relay.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const spec = JSON.parse(process.argv[2]);
const sdk = fs.readFileSync(path.join(here, 'node_modules/twilio-video/dist/twilio-video.min.js'));
// Before the SDK loads: record every configuration a peer connection is made with.
const wrap = `<script>
  window.recordedConfigs = [];
  const Native = window.RTCPeerConnection;
  // A subclass, not a wrapper function: the SDK extends RTCPeerConnection itself.
  window.RTCPeerConnection = class extends Native {
    constructor(config, ...rest) {
      window.recordedConfigs.push(JSON.parse(JSON.stringify(config || {})));
      super(config, ...rest);
    }
  };
  window.NativeRTCPeerConnection = Native;
</script>`;
const page = `<!doctype html><meta charset="utf-8"><title>sigrelay media test</title>${wrap}` +
  '<script src="/twilio-video.min.js"></script><body>sigrelay media test</body>';

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

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--ignore-certificate-errors',
    '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    // Only the relay's name resolves: Twilio's TURN and STUN hosts do not exist here.
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1',
  ],
});
let result;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, permissions: ['camera', 'microphone'] });
  const tab = await context.newPage();
  tab.on('console', (m) => process.stderr.write(`[page ${m.type()}] ${m.text()}\n`));
  tab.on('pageerror', (e) => process.stderr.write(`[page error] ${e}\n`));
  await tab.goto(origin + '/');
  result = await tab.evaluate(async (s) => {
    const out = {};
    let iceServers = s.iceServers;
    if (!iceServers) {
      const room = await Twilio.Video.connect(s.token, {
        tracks: [], wsServer: s.relay + s.signaling, wsServerInsights: s.relay + s.insights,
      });
      const configs = window.recordedConfigs.filter((c) => c.iceServers && c.iceServers.length);
      iceServers = configs.length ? configs[0].iceServers : [];
      out.sdkIceServers = iceServers;
      room.disconnect();
    }
    const Native = window.NativeRTCPeerConnection;
    const config = { iceServers, iceTransportPolicy: 'relay' };
    const a = new Native(config);
    const b = new Native(config);
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const stream = await navigator.mediaDevices.getUserMedia({ video: true });
    stream.getTracks().forEach((t) => a.addTrack(t, stream));
    const channelA = a.createDataChannel('bytes', { negotiated: true, id: 0 });
    const channelB = b.createDataChannel('bytes', { negotiated: true, id: 0 });
    for (const c of [channelA, channelB]) c.binaryType = 'arraybuffer';
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    const opened = (c) => new Promise((resolve) => { if (c.readyState === 'open') resolve(); else c.onopen = resolve; });
    const connected = await Promise.race([
      Promise.all([opened(channelA), opened(channelB)]).then(() => true),
      new Promise((resolve) => setTimeout(() => resolve(false), s.connectTimeoutMs || 20000)),
    ]);
    out.connected = connected;
    // The local candidate of the pair the transport selected. Read once the data has flowed:
    // right after the channels open, the answering side's stats may not name it yet.
    const localOf = async (pc) => {
      const stats = await pc.getStats();
      let pair;
      stats.forEach((r) => { if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId); });
      if (!pair) stats.forEach((r) => { if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pair = r; });
      return pair ? stats.get(pair.localCandidateId) : null;
    };
    const gathered = async (pc) => {
      const stats = await pc.getStats();
      const types = [];
      stats.forEach((r) => { if (r.type === 'local-candidate') types.push(`${r.candidateType}/${r.relayProtocol || '-'}`); });
      return types;
    };
    out.gathered = { a: await gathered(a), b: await gathered(b) };
    if (!connected) {
      a.close(); b.close();
      return out;
    }
    // A byte pattern each way, checked byte for byte on arrival.
    const send = (channel, total, seed) => new Promise((resolve) => {
      let sent = 0;
      const chunk = 16 * 1024;
      channel.bufferedAmountLowThreshold = 256 * 1024;
      const pump = () => {
        while (sent < total && channel.bufferedAmount < 1024 * 1024) {
          const n = Math.min(chunk, total - sent);
          const buf = new Uint8Array(n);
          for (let i = 0; i < n; i++) buf[i] = (sent + i + seed) % 251;
          channel.send(buf);
          sent += n;
        }
        if (sent < total) channel.onbufferedamountlow = pump; else resolve();
      };
      pump();
    });
    const receive = (channel, total, seed) => new Promise((resolve) => {
      let got = 0;
      let intact = true;
      channel.onmessage = (e) => {
        const buf = new Uint8Array(e.data);
        for (let i = 0; i < buf.length; i++) if (buf[i] !== (got + i + seed) % 251) intact = false;
        got += buf.length;
        if (got >= total) resolve({ got, intact });
      };
    });
    const [ra, rb] = await Promise.all([
      receive(channelA, s.bytes, 7), receive(channelB, s.bytes, 3),
      send(channelA, s.bytes, 3), send(channelB, s.bytes, 7),
    ]);
    out.received = { a: ra.got, b: rb.got };
    out.intact = ra.intact && rb.intact;
    // The camera's frames arrive at b.
    const deadline = Date.now() + 10000;
    out.videoBytes = 0;
    while (Date.now() < deadline && out.videoBytes < 10000) {
      await new Promise((r) => setTimeout(r, 250));
      const stats = await b.getStats();
      stats.forEach((r) => { if (r.type === 'inbound-rtp' && r.kind === 'video') out.videoBytes = r.bytesReceived; });
    }
    const la = await localOf(a);
    const lb = await localOf(b);
    out.localTypes = [la && la.candidateType, lb && lb.candidateType];
    out.relayProtocols = [la && la.relayProtocol, lb && lb.relayProtocol];
    a.close();
    b.close();
    stream.getTracks().forEach((t) => t.stop());
    return out;
  }, spec);
} catch (e) {
  result = { error: String(e && e.stack || e) };
} finally {
  await browser.close();
  server.close();
}
process.stdout.write(JSON.stringify(result) + '\n');
