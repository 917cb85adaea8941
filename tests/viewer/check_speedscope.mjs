// Opens a Chrome trace in speedscope (the npm package's static build) inside headless Chromium,
// through speedscope's own file import, and checks that it imported: no page error or alert,
// the expected thread name in speedscope's title bar, and more than one (pid, tid) profile.
// Usage: node check_speedscope.mjs <chromium> <trace.json> <expected text> <screenshot.png>
import puppeteer from 'puppeteer-core';
import {fileURLToPath} from 'node:url';
import path from 'node:path';

const [, , chromium, trace, expected, shot] = process.argv;
const here = path.dirname(fileURLToPath(import.meta.url));
const index = path.join(here, 'node_modules', 'speedscope', 'dist', 'release', 'index.html');

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  args: ['--no-sandbox', '--no-zygote', '--disable-dev-shm-usage', '--use-angle=swiftshader',
         '--enable-unsafe-swiftshader'],
});
const problems = [];
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => problems.push('page error: ' + (e.stack || e)));
  page.on('dialog', async (d) => {
    problems.push('alert: ' + d.message());
    await d.dismiss();
  });
  await page.goto('file://' + index);
  const input = await page.waitForSelector('input[type=file]', {timeout: 20000});
  await input.uploadFile(trace);
  let text = '';
  for (let i = 0; i < 120 && !text.includes(expected); i++) {
    await new Promise((r) => setTimeout(r, 250));
    text = await page.evaluate(() => document.body.innerText);
  }
  if (shot) await page.screenshot({path: shot});
  if (!text.includes(expected)) problems.push(`"${expected}" not shown; page says: ${text.slice(0, 200)}`);
  const m = text.match(/\((\d+)\/(\d+)\)/);
  if (!m || Number(m[2]) < 2) problems.push('expected several thread profiles, found: ' + (m ? m[0] : 'none'));
  console.log(m ? `speedscope imported ${m[2]} thread profiles` : 'no profile count shown');
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join('\n'));
  process.exit(1);
}
console.log('speedscope opened the trace');
