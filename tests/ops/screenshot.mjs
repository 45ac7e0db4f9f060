// Draws the dashboard's queries on Prometheus's own graph page (the classic UI Debian ships) in
// headless Chromium, each under its panel's title, and saves one picture of them all. Run by
// tests/prometheus.rs with a JSON spec: { base, closed, range, queries: [{title, legend, expr}],
// out }. Prints {"graphs": N, "errors": [...]}: N queries drawn, and any query's error text.
import { launch } from '../browser/launch.mjs';

const spec = JSON.parse(process.argv[2]);
// The classic page sorts its g<N>. parameters as strings, so g10 would land before g2: ten
// graphs a page, the pages put side by side.
const PER_PAGE = 10;
const WIDTH = 900;

const browser = await launch(spec.closed);
try {
  const page = await browser.newPage({ viewport: { width: WIDTH, height: 900 } });
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  let graphs = 0;
  const errors = [];
  const shots = [];
  for (let start = 0; start < spec.queries.length; start += PER_PAGE) {
    const queries = spec.queries.slice(start, start + PER_PAGE);
    const params = new URLSearchParams();
    queries.forEach((q, i) => {
      params.set(`g${i}.expr`, q.expr);
      params.set(`g${i}.tab`, '0');
      params.set(`g${i}.range_input`, spec.range);
      params.set(`g${i}.step_input`, '1');
    });
    await page.goto(`${spec.base}/classic/graph?${params}`);
    const state = () => ({
      drawn: document.querySelectorAll('.graph_area .graph svg').length,
      errors: [...document.querySelectorAll('.error')]
        .filter((e) => e.offsetParent && e.textContent.trim())
        .map((e) => e.textContent.trim()),
    });
    try {
      await page.waitForFunction(
        ([n, state]) => {
          const s = new Function(`return (${state})()`)();
          return s.drawn + s.errors.length >= n;
        },
        [queries.length, state.toString()],
        { timeout: 60000 },
      );
    } catch (e) {
      await page.screenshot({ path: spec.out.replace(/\.png$/, '.failed.png'), fullPage: true });
      throw new Error(`page ${start / PER_PAGE}: ${JSON.stringify(await page.evaluate(state))}: ${e.message}`);
    }
    const s = await page.evaluate(state);
    graphs += s.drawn;
    errors.push(...s.errors);
    await page.evaluate((queries) => {
      document.querySelector('nav')?.remove();
      document.querySelectorAll('.query_form').forEach((form, i) => {
        const q = queries[i];
        if (!q) return;
        const h = document.createElement('h4');
        h.textContent = q.legend ? `${q.title}: ${q.legend}` : q.title;
        h.style.margin = '24px 0 6px';
        form.parentNode.insertBefore(h, form);
      });
    }, queries);
    await page.waitForTimeout(300);
    shots.push((await page.screenshot({ fullPage: true })).toString('base64'));
  }
  // The pages side by side, at half size.
  const half = WIDTH / 2;
  const imgs = shots.map((b) => `<img src="data:image/png;base64,${b}" style="width:${half}px">`).join('');
  await page.setViewportSize({ width: half * shots.length, height: 600 });
  await page.setContent(`<body style="margin:0;display:flex;align-items:flex-start;background:#fff">${imgs}</body>`);
  await page.waitForFunction(() => [...document.images].every((i) => i.complete));
  await page.screenshot({ path: spec.out, fullPage: true });
  console.log(JSON.stringify({ graphs, errors }));
} finally {
  await browser.close();
}
