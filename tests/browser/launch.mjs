// The browsers the tests run the SDK in, headless and quiet, trusting the relay's test-CA
// certificate, and with every host name but the test's own leading nowhere (a closed loopback
// port), so nothing leaves the machine:
//   Debian's Chromium, driven by playwright-core;
//   Debian's Firefox ESR, driven by puppeteer-core over WebDriver BiDi;
//   Debian's WebKitGTK (its MiniBrowser, under Xvfb), driven over classic WebDriver by
//   WebKitWebDriver, with the few commands needed written out below.
import { spawn } from 'node:child_process';
import net from 'node:net';
import { chromium } from 'playwright-core';
import puppeteer from 'puppeteer-core';

/// Chromium with every host name but `exclude` resolving to `closed` (as "host:port").
export function launch(closed, exclude = ['localhost']) {
  const rules = [`MAP * ${closed}`, ...exclude.map((h) => `EXCLUDE ${h}`)].join(', ');
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--ignore-certificate-errors',
      `--host-resolver-rules=${rules}`,
    ],
  });
}

/// Firefox ESR with every host name but `exclude` sent to a proxy at `closed`, which refuses.
function launchFirefox(closed, exclude) {
  const [host, port] = closed.split(':');
  return puppeteer.launch({
    browser: 'firefox',
    executablePath: process.env.FIREFOX || '/usr/bin/firefox-esr',
    headless: true,
    acceptInsecureCerts: true,
    extraPrefsFirefox: {
      'network.proxy.type': 1,
      'network.proxy.http': host,
      'network.proxy.http_port': Number(port),
      'network.proxy.ssl': host,
      'network.proxy.ssl_port': Number(port),
      'network.proxy.share_proxy_settings': true,
      'network.proxy.no_proxies_on': exclude.join(', '),
      'network.proxy.allow_hijacking_localhost': false,
      'network.dns.disablePrefetch': true,
      'network.captive-portal-service.enabled': false,
      'network.connectivity-service.enabled': false,
      'app.update.enabled': false,
      'browser.safebrowsing.malware.enabled': false,
      'browser.safebrowsing.phishing.enabled': false,
      'media.navigator.streams.fake': true,
      'media.navigator.permission.disabled': true,
    },
  });
}

/// One browser of either engine behind the same small interface: `tab()` opens a page with
/// `goto(url)`, `evaluate(fn, arg)`, `log(prefix)` (console and page errors to stderr) and
/// `close()`; `close()` ends the browser.
export async function engine(name, closed, exclude = ['localhost', '127.0.0.1']) {
  if (name === 'chromium') {
    const browser = await launch(closed, exclude);
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    return {
      version: browser.version(),
      async tab() {
        const page = await context.newPage();
        return wrap(page, (m) => `${m.type()}] ${m.text()}`);
      },
      close: () => browser.close(),
    };
  }
  if (name === 'firefox') {
    const browser = await launchFirefox(closed, exclude);
    return {
      version: await browser.version(),
      async tab() {
        const page = await browser.newPage();
        return wrap(page, (m) => `${m.type()}] ${m.text()}`);
      },
      close: () => browser.close(),
    };
  }
  if (name === 'webkit') return webkit(closed, exclude);
  throw new Error(`unknown engine ${name}`);
}

/// Where Debian's libwebkit2gtk-4.1-0 puts MiniBrowser on amd64 (`$MINIBROWSER` elsewhere).
export const MINIBROWSER = '/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser';

/// WebKitGTK's MiniBrowser on its own Xvfb display, through WebKitWebDriver. A tab is the one
/// window, navigated; closing it navigates to about:blank, which closes the page's sockets.
async function webkit(closed, exclude) {
  // On a loaded 2-core machine WebKitWebDriver now and then never answers its first session
  // (seen in full test runs; alone it answers in a second or two): a fresh Xvfb and driver do.
  for (let attempt = 1; ; attempt++) {
    try {
      return await webkitOnce(closed, exclude, 25000);
    } catch (e) {
      if (attempt >= 2 || !String(e && e.message).startsWith('no a WebKit session')) throw e;
      console.error(`${e.message}; starting WebKitWebDriver again`);
    }
  }
}

async function webkitOnce(closed, exclude, sessionMs) {
  const children = [];
  const stop = () => children.forEach((c) => c.kill());
  try {
    // -displayfd: Xvfb picks a free display and writes its number to fd 3. Neither child gets
    // our stderr: a child outliving us must not hold the test's pipe open.
    const xvfb = spawn('Xvfb', ['-displayfd', '3', '-screen', '0', '1280x720x24', '-nolisten', 'tcp'], { stdio: ['ignore', 'ignore', 'ignore', 'pipe'] });
    children.push(xvfb);
    const display = await within(10000, 'Xvfb to pick a display', new Promise((resolve, reject) => {
      xvfb.stdio[3].once('data', (d) => resolve(`:${String(d).trim()}`));
      xvfb.once('error', reject);
      xvfb.once('exit', (code) => reject(new Error(`Xvfb exited with ${code}`)));
    }));
    const port = await freePort();
    const driver = spawn(process.env.WEBKITWEBDRIVER || 'WebKitWebDriver', [`--port=${port}`, '--host=127.0.0.1'],
      { stdio: 'ignore', env: { ...process.env, DISPLAY: display } });
    children.push(driver);
    const driverFailed = new Promise((_, reject) => {
      driver.once('error', reject);
      driver.once('exit', (code) => reject(new Error(`WebKitWebDriver exited with ${code}`)));
    });
    driverFailed.catch(() => {});
    const wd = webdriver(`http://127.0.0.1:${port}`);
    const session = await within(sessionMs, 'a WebKit session', Promise.race([driverFailed, retry(() => wd('POST', '/session', { capabilities: { alwaysMatch: {
      acceptInsecureCerts: true,
      timeouts: { script: 60000 },
      proxy: { proxyType: 'manual', httpProxy: closed, sslProxy: closed, noProxy: exclude },
      'webkitgtk:browserOptions': { binary: process.env.MINIBROWSER || MINIBROWSER, args: ['--automation'] },
    } } }))]));
    const at = `/session/${session.sessionId}`;
    return {
      version: `${session.capabilities.browserName}/${session.capabilities.browserVersion}`,
      async tab() {
        return {
          goto: (url) => wd('POST', `${at}/url`, { url }),
          async evaluate(fn, arg) {
            const script = `const done = arguments[1];
              Promise.resolve((${fn})(arguments[0])).then(done, (e) => done({ evaluateError: String(e && e.stack || e) }));`;
            const out = await wd('POST', `${at}/execute/async`, { script, args: [arg ?? null] });
            if (out && out.evaluateError) throw new Error(out.evaluateError);
            return out;
          },
          // Classic WebDriver has no console events.
          log() {},
          close: () => wd('POST', `${at}/url`, { url: 'about:blank' }),
        };
      },
      async close() {
        await wd('DELETE', at).catch(() => {});
        stop();
      },
    };
  } catch (e) {
    stop();
    throw e;
  }
}

/// `promise`, or an error naming `what` after `ms`.
function within(ms, what, promise) {
  let timer;
  const late = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms); });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/// A classic WebDriver client: `wd(method, path, body)` returns the answer's `value`. Each
/// command gets 90 s (an async script may run for up to 60).
function webdriver(base) {
  return async (method, path, body) => {
    const res = await fetch(base + path, {
      method, headers: { 'content-type': 'application/json' }, body: body && JSON.stringify(body), signal: AbortSignal.timeout(90000),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(`WebDriver ${method} ${path}: ${JSON.stringify(answer.value)}`);
    return answer.value;
  };
}

/// A loopback port nobody listens on (for WebKitWebDriver, which cannot be given port 0).
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/// `f()` until it stops failing, for up to 10 s (WebKitWebDriver takes a moment to listen).
async function retry(f) {
  for (let i = 0; ; i++) {
    try {
      return await f();
    } catch (e) {
      if (i >= 100 || !(e.cause && e.cause.code === 'ECONNREFUSED')) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

function wrap(page, describe) {
  return {
    goto: (url) => page.goto(url),
    evaluate: (fn, arg) => page.evaluate(fn, arg),
    log(prefix) {
      page.on('console', (m) => process.stderr.write(`[${prefix} ${describe(m)}\n`));
      page.on('pageerror', (e) => process.stderr.write(`[${prefix} error] ${e}\n`));
    },
    close: () => page.close(),
  };
}
