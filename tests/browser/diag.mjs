// Opens sigrelay's /diag page in Debian's Chromium and runs its checks, for tests/diag_page.rs.
//
// Usage: node diag.mjs '<spec as JSON>'
//   spec: { url: "https://localhost:PORT/diag", closed: PORT, screenshot: "file.png",
//           runs: [{ token: "...", wsServer: "...", media: true }, ...],
//           simulate: ["no-webrtc", "ws-blocked"] (optional: an old browser, a proxy that
//           refuses WebSocket upgrades) }
// Every host name but localhost resolves to 127.0.0.1:<closed> (a closed port), so the page's
// direct-to-Twilio check reaches nothing and nothing leaves the machine.
// Prints one JSON line per run: {"event":"run","checks":[...],"connIds":[...],"findings":[...],
// "report":"...","clipboard":"..."}, then {"event":"done","cspViolations":[...]}.
import { launch } from './launch.mjs';

const spec = JSON.parse(process.argv[2]);
const say = (event) => process.stdout.write(JSON.stringify(event) + '\n');

const browser = await launch(`127.0.0.1:${spec.closed}`);
let exitCode = 0;
try {
  const origin = new URL(spec.url).origin;
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 900 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
  // Simulated causes, set up before the page's own script runs.
  if ((spec.simulate || []).includes('no-webrtc')) {
    await context.addInitScript(() => { window.RTCPeerConnection = undefined; });
  }
  if ((spec.simulate || []).includes('ws-blocked')) {
    // Like a proxy that refuses WebSocket upgrades: the echo's upgrade gets a 404 instead.
    await context.addInitScript(() => {
      const Real = window.WebSocket;
      window.WebSocket = function (url, protocols) {
        return new Real(String(url).replace('/diag/echo', '/diag/blocked'), protocols);
      };
      window.WebSocket.prototype = Real.prototype;
    });
  }
  const tab = await context.newPage();
  const csp = [];
  tab.on('console', (m) => {
    if (/Content Security Policy/i.test(m.text())) csp.push(m.text());
    process.stderr.write(`[page ${m.type()}] ${m.text()}\n`);
  });
  tab.on('pageerror', (e) => { csp.push(`page error: ${e}`); process.stderr.write(`[page error] ${e}\n`); });
  await tab.goto(spec.url);
  await tab.evaluate(() => document.addEventListener('securitypolicyviolation',
    (e) => console.error(`Content Security Policy violation: ${e.violatedDirective} ${e.blockedURI}`)));
  for (const run of spec.runs) {
    await tab.fill('#token', run.token || '');
    await tab.fill('#wsserver', run.wsServer || '');
    await tab.setChecked('#media', !!run.media);
    await tab.evaluate(() => { window.sigrelayDiag = null; });
    await tab.click('#run');
    await tab.waitForFunction(() => window.sigrelayDiag && window.sigrelayDiag.done, null, { timeout: 90000 });
    await tab.click('#copy');
    await tab.waitForFunction(() => document.querySelector('#copied').textContent !== '', null, { timeout: 10000 });
    const clipboard = await tab.evaluate(() => navigator.clipboard.readText());
    const result = await tab.evaluate(() => {
      const d = window.sigrelayDiag;
      return {
        checks: d.checks.map((c) => ({ id: c.id, name: c.name, status: c.status, detail: c.detail || '' })),
        connIds: d.connIds, findings: d.findings, report: d.report,
        rows: [...document.querySelectorAll('#checks tbody tr')].map((tr) => tr.dataset.status),
      };
    });
    say({ event: 'run', ...result, clipboard });
  }
  if (spec.screenshot) await tab.screenshot({ path: spec.screenshot, fullPage: true });
  say({ event: 'done', cspViolations: csp });
} catch (e) {
  process.stderr.write(`diag.mjs: ${e.stack || e}\n`);
  exitCode = 1;
} finally {
  await browser.close();
}
process.exit(exitCode);
