// Debian's Chromium for the browser tests: headless, quiet, trusting the relay's test-CA
// certificate, and with every host name but the test's own resolving to `closed` (a closed
// loopback port), so nothing leaves the machine.
import { chromium } from 'playwright-core';

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
