// The browsers the tests run the SDK in, headless and quiet, trusting the relay's test-CA
// certificate, and with every host name but the test's own leading nowhere (a closed loopback
// port), so nothing leaves the machine:
//   Debian's Chromium, driven by playwright-core;
//   Debian's Firefox ESR, driven by puppeteer-core over WebDriver BiDi.
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
  throw new Error(`unknown engine ${name}`);
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
