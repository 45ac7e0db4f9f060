// sigrelay's /diag page: runs every check from the user's browser and writes a report.
// No third-party code; served under a CSP that allows only this file and the two Twilio hosts
// of the direct-path check. Strings from the server or the token are only ever set as text.
'use strict';

const DIRECT_URLS = ['wss://global.vss.twilio.com/signaling', 'wss://sdkgw.us1.twilio.com/v1/VideoEvents'];
const ECHO_ROUND_TRIPS = 5;
const $ = (sel) => document.querySelector(sel);

let checks = [];
let connIds = [];
let info = null;
let skewMs = 0;

function wsBase() {
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
}

function fmtMs(ms) {
  return ms == null ? '' : ms < 10 ? ms.toFixed(1) + ' ms' : Math.round(ms) + ' ms';
}

function fmtDuration(s) {
  s = Math.abs(Math.round(s));
  const parts = [[86400, 'd'], [3600, 'h'], [60, 'min'], [1, 's']];
  const out = [];
  for (const [unit, name] of parts) {
    if (s >= unit || (unit === 1 && out.length === 0)) {
      out.push(Math.floor(s / unit) + ' ' + name);
      s %= unit;
    }
    if (out.length === 2) break;
  }
  return out.join(' ');
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function addCheck(c) {
  checks.push(c);
  render();
  return c;
}

function render() {
  const body = $('#checks tbody');
  body.replaceChildren();
  for (const c of checks) {
    const tr = el('tr');
    tr.dataset.check = c.id;
    tr.dataset.status = c.status;
    tr.append(el('td', null, c.name));
    const result = el('td');
    result.append(el('span', 'badge ' + c.status, c.status === 'running' ? '…' : c.status.toUpperCase()));
    tr.append(result);
    tr.append(el('td', 'time', fmtMs(c.ms)));
    const detail = el('td', 'detail', c.detail || '');
    if (c.fix && c.status !== 'pass') detail.append(el('div', 'fix', 'Fix: ' + c.fix));
    tr.append(detail);
    body.append(tr);
  }
  $('#results').hidden = checks.length === 0;
}

function withTimeout(promise, ms, what) {
  return Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(what + ' took over ' + ms / 1000 + ' s')), ms))]);
}

// ---- browser ----
function checkBrowser() {
  const missing = [];
  if (typeof WebSocket !== 'function') missing.push('WebSocket');
  if (typeof RTCPeerConnection !== 'function') missing.push('WebRTC (RTCPeerConnection)');
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) missing.push('camera and microphone access (getUserMedia)');
  if (!window.isSecureContext) missing.push('a secure (https) page');
  addCheck({
    id: 'browser', name: 'Browser supports WebSocket and WebRTC',
    status: missing.length ? 'fail' : 'pass',
    detail: missing.length ? 'Missing: ' + missing.join(', ') + '. ' + navigator.userAgent : navigator.userAgent,
    fix: 'Use a current version of Chrome, Edge, Firefox or Safari, on an https page.',
  });
}

// ---- relay info and clock ----
async function loadInfo() {
  const t0 = Date.now();
  const started = performance.now();
  const c = addCheck({ id: 'relay-http', name: 'Page can reach the relay (HTTPS)', status: 'running' });
  try {
    const r = await withTimeout(fetch('/diag/api/info', { cache: 'no-store' }), 10000, 'the relay');
    if (!r.ok) throw new Error('HTTP ' + r.status);
    info = await r.json();
    const t1 = Date.now();
    c.ms = performance.now() - started;
    skewMs = info.now_ms - (t0 + t1) / 2;
    c.status = 'pass';
    c.detail = 'sigrelay ' + info.version + ' at ' + location.host;
  } catch (e) {
    c.status = 'fail';
    c.detail = String(e.message || e);
    c.fix = 'The relay answered this page but not its API; reload the page, and if it persists send the report to your operator.';
  }
  render();
  if (!info) return;
  const skewS = skewMs / 1000;
  addCheck({
    id: 'clock', name: 'Browser clock matches the relay',
    status: Math.abs(skewS) > 30 ? 'warn' : 'pass',
    detail: Math.abs(skewS) < 1 ? 'The browser\'s clock is within a second of the relay\'s.'
      : 'The browser\'s clock is ' + fmtDuration(skewS) + (skewS > 0 ? ' behind' : ' ahead of') + ' the relay\'s.',
    fix: 'Set this computer to get its time automatically. Token times below use the relay\'s clock.',
  });
}

// ---- relay echo over wss ----
function echoCheck() {
  const c = addCheck({ id: 'relay-ws', name: 'WebSocket to the relay (echo, no Twilio)', status: 'running' });
  return new Promise((resolve) => {
    const started = performance.now();
    const rtts = [];
    let connId = null;
    let sentAt = 0;
    let done = false;
    let opened = false;
    const ws = new WebSocket(wsBase() + '/diag/echo');
    const finish = (status, detail, fix) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      c.status = status;
      c.ms = rtts.length ? median(rtts) : performance.now() - started;
      c.detail = detail + (connId ? ' (conn ' + connId + ')' : '');
      c.fix = fix;
      render();
      resolve();
    };
    const timer = setTimeout(() => {
      finish('fail', opened ? 'the relay stopped answering' : 'no WebSocket within 10 s',
        'Something between this browser and ' + location.host + ' holds WebSocket connections (a proxy that buffers or a firewall that drops them). Ask your network team to allow WebSockets (wss) to ' + location.host + '.');
      ws.close();
    }, 10000);
    const sendNext = () => {
      sentAt = performance.now();
      ws.send(JSON.stringify({ seq: rtts.length, pad: 'x'.repeat(200) }));
    };
    ws.onopen = () => { opened = true; };
    ws.onmessage = (e) => {
      let m = null;
      try { m = JSON.parse(e.data); } catch (_) { /* an echo of ours is JSON too */ }
      if (m && m.type === 'hello') {
        connId = m.conn_id;
        connIds.push(connId);
        sendNext();
        return;
      }
      rtts.push(performance.now() - sentAt);
      if (rtts.length < ECHO_ROUND_TRIPS) {
        sendNext();
      } else {
        ws.close(1000, 'diag done');
        const sorted = rtts.slice().sort((a, b) => a - b);
        finish('pass', ECHO_ROUND_TRIPS + ' round trips: median ' + fmtMs(median(rtts)) + ', max ' + fmtMs(sorted[sorted.length - 1]));
      }
    };
    ws.onclose = (e) => {
      if (e.code === 1013) {
        finish('fail', 'the relay refused: ' + e.code + ' ' + e.reason, 'The relay is at a connection limit. Wait a minute and run the checks again; if it persists, your operator needs to raise the relay\'s [limits].');
      } else if (!opened) {
        finish('fail', 'the browser could not open a WebSocket to ' + location.host + ' (close code ' + e.code + ')',
          'This network (a proxy or firewall between this browser and ' + location.host + ') blocks WebSocket upgrades, even though the page itself loaded. Ask your network team to allow WebSockets (wss) to ' + location.host + '. (Less likely: the relay is at its connection limit; if a second run passes, that was it.)');
      } else {
        finish('fail', 'the connection closed early: ' + e.code + ' ' + e.reason, 'See the close-code table below.');
      }
    };
  });
}

function median(xs) {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

// ---- gateways, probed by the relay ----
const GATEWAY_FIXES = {
  upstream_dns_error: 'The relay cannot resolve this gateway\'s name. Your operator should check DNS on the relay host (or [upstream.resolve]).',
  upstream_connect_error: 'The relay cannot open a connection to this gateway: its outbound firewall blocks port 443 to Twilio, or the gateway is down. Your operator should allow egress to Twilio or set [upstream] proxy.',
  upstream_timeout: 'The gateway did not answer in time: outbound traffic is being dropped, or the gateway is overloaded. Your operator should check the relay\'s egress.',
  upstream_tls_error: 'TLS to the gateway failed: a TLS-inspecting proxy on the relay\'s way out? Your operator can add its CA with [upstream] ca_file.',
  upstream_rejected: 'The gateway refused the WebSocket upgrade.',
  upstream_protocol_error: 'The gateway did not speak WebSocket properly: something in between rewrites traffic.',
  upstream_proxy_error: 'The relay\'s CONNECT proxy ([upstream] proxy) refused or failed.',
};

async function gatewayChecks() {
  const c = addCheck({ id: 'gateways', name: 'Relay can reach Twilio\'s gateways', status: 'running' });
  try {
    const r = await withTimeout(fetch('/diag/api/probes', { method: 'POST', headers: { 'x-sigrelay-diag': '1' }, cache: 'no-store' }), 30000, 'the gateway probes');
    if (!r.ok) throw new Error('HTTP ' + r.status);
    const run = await r.json();
    checks = checks.filter((x) => x !== c);
    for (const p of run.probes) {
      const phases = [['dns', p.dns_ms], ['proxy', p.proxy_ms], ['tcp', p.connect_ms], ['tls', p.tls_ms], ['ws', p.websocket_ms]]
        .filter(([, v]) => v != null).map(([k, v]) => k + ' ' + fmtMs(v));
      const total = [p.dns_ms, p.proxy_ms, p.connect_ms, p.tls_ms, p.websocket_ms].reduce((a, v) => a + (v || 0), 0);
      addCheck({
        id: 'gateway', name: 'Relay → ' + p.route + ' in ' + p.region,
        status: p.ok ? 'pass' : 'fail', ms: total,
        detail: p.url + (phases.length ? ': ' + phases.join(', ') : '') + (p.error ? '. ' + p.outcome + ': ' + p.error : '') +
          (run.ran_s_ago > 0.5 ? ' (probed ' + Math.round(run.ran_s_ago) + ' s ago)' : ''),
        fix: GATEWAY_FIXES[p.outcome] || 'Your operator should run `sigrelay diagnose` on the relay host.',
      });
    }
  } catch (e) {
    c.status = 'fail';
    c.detail = String(e.message || e);
    c.fix = 'Your operator should run `sigrelay diagnose` on the relay host.';
    render();
  }
}

// ---- the direct path to Twilio, without the relay ----
function directCheck(url) {
  const c = addCheck({ id: 'direct', name: 'Direct to Twilio, no relay: ' + new URL(url).host, status: 'running' });
  return new Promise((resolve) => {
    const started = performance.now();
    let done = false;
    let ws;
    const finish = (ok, detail) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      c.status = ok ? 'pass' : 'fail';
      c.ms = performance.now() - started;
      c.detail = detail;
      c.fix = 'This network blocks Twilio directly. That is what the relay is for: the app must give the SDK this relay as wsServer and wsServerInsights.';
      render();
      resolve();
    };
    const timer = setTimeout(() => { finish(false, 'no connection within 5 s (blocked or black-holed)'); try { ws.close(); } catch (_) { /* never opened */ } }, 5000);
    try {
      ws = new WebSocket(url);
    } catch (e) {
      finish(false, 'the browser refused to open it: ' + e.message);
      return;
    }
    ws.onopen = () => { finish(true, 'reachable: this network does not block Twilio'); ws.close(1000); };
    ws.onclose = (e) => finish(false, 'blocked: the connection failed (close code ' + e.code + ')');
  });
}

// ---- the token ----
function decodeJwt(token) {
  const parts = token.split('.');
  if (parts.length !== 3) throw new Error('an access token has three parts separated by dots; this has ' + parts.length);
  const dec = (s, what) => {
    try {
      const b64 = s.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - s.length % 4) % 4);
      const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (_) {
      throw new Error('its ' + what + ' is not base64url JSON');
    }
  };
  return { header: dec(parts[0], 'header'), payload: dec(parts[1], 'payload') };
}

// The wsServer URL typed in: null when empty, { bad } when unusable, else its host and path.
function wsServer() {
  const raw = $('#wsserver').value.trim();
  if (!raw) return null;
  try {
    const u = new URL(raw, location.href);
    return { host: u.host, path: u.pathname + u.search };
  } catch (_) {
    return { bad: raw };
  }
}

async function tokenChecks() {
  // A token pasted from an email or a terminal may be wrapped over lines.
  const raw = $('#token').value.replace(/\s+/g, '');
  if (!raw) {
    addCheck({ id: 'token', name: 'Token', status: 'info', detail: 'No token pasted: token checks skipped.' });
    return null;
  }
  let jwt;
  try {
    jwt = decodeJwt(raw);
  } catch (e) {
    addCheck({ id: 'token', name: 'Token can be read', status: 'fail', detail: 'Not an access token: ' + e.message + '.', fix: 'Paste the whole token your app passes to Video.connect().' });
    return { unreadable: true };
  }
  const p = jwt.payload;
  const grants = p.grants || {};
  const identity = grants.identity;
  const room = grants.video && grants.video.room;
  const twr = jwt.header.twr;
  const now = (Date.now() + skewMs) / 1000;
  const t = { identity, room, twr, exp: p.exp, nbf: p.nbf };
  addCheck({ id: 'token', name: 'Token can be read', status: 'pass',
    detail: 'identity ' + (identity || '(none)') + ', room ' + (room || '(any)') + ', region (twr) ' + (twr || '(none: global)') });
  if (typeof p.exp === 'number') {
    const left = p.exp - now;
    t.expired = left <= 0;
    addCheck({
      id: 'token-exp', name: 'Token has not expired', status: t.expired ? 'fail' : 'pass',
      detail: 'exp ' + new Date(p.exp * 1000).toISOString() + (t.expired ? ': EXPIRED ' + fmtDuration(left) + ' ago' : ': valid for another ' + fmtDuration(left)),
      fix: 'Mint a new token when joining (and before it expires on long calls); Twilio rejects an expired one (error 20104).',
    });
  } else {
    addCheck({ id: 'token-exp', name: 'Token has not expired', status: 'warn', detail: 'The token has no exp.', fix: 'Twilio access tokens carry an exp; check how this one was made.' });
  }
  if (typeof p.nbf === 'number' && p.nbf > now) {
    t.notYet = true;
    addCheck({ id: 'token-nbf', name: 'Token is already valid', status: 'fail',
      detail: 'nbf ' + new Date(p.nbf * 1000).toISOString() + ': not valid for another ' + fmtDuration(p.nbf - now),
      fix: 'The clock of the server that mints tokens is ahead; it should sync its time (NTP).' });
  }
  const defaultPath = (info && info.routes[0]) ? info.routes[0].path : '/signaling';
  const ws = wsServer();
  if (ws && (ws.bad || ws.host !== location.host)) {
    t.notRelay = true;
    addCheck({ id: 'token-region', name: 'The app\'s wsServer points at this relay', status: 'fail',
      detail: ws.bad ? 'Not a URL: ' + ws.bad : 'wsServer names ' + ws.host + ', not this relay (' + location.host + ').',
      fix: 'Give the SDK this relay: wsServer ' + wsBase() + defaultPath + '.' });
    return t;
  }
  const path = ws ? ws.path : defaultPath;
  try {
    const q = new URLSearchParams({ path, region: twr || '' });
    const r = await fetch('/diag/api/route?' + q, { cache: 'no-store' });
    const route = await r.json();
    if (!route.ok) {
      t.badPath = true;
      addCheck({ id: 'token-region', name: 'Token region matches the gateway', status: 'fail', detail: 'wsServer path ' + path + ': ' + route.error,
        fix: 'Use one of the relay\'s paths for wsServer, e.g. ' + wsBase() + (info ? info.routes[0].path : '/signaling') + '.' });
    } else {
      t.gateway = route.gateway;
      t.region = route.region;
      const where = 'With wsServer path ' + path + ' the relay sends this token to ' + route.gateway + ' (region ' + route.region + ', chosen by ' + route.source + ').';
      if (twr && route.token_region_allowed === false) {
        t.mismatch = true;
        addCheck({ id: 'token-region', name: 'Token region matches the gateway', status: 'fail',
          detail: 'The token was minted for region ' + twr + ', which this relay does not allow. ' + where,
          fix: 'Ask your operator to add ' + twr + ' to [routing] regions, or mint tokens for an allowed region.' });
      } else if (route.mismatch) {
        t.mismatch = true;
        addCheck({ id: 'token-region', name: 'Token region matches the gateway', status: 'fail',
          detail: 'REGION MISMATCH: the token was minted for ' + twr + ' but the connection goes to ' + route.region + '. ' + where,
          fix: 'Twilio refuses a token at another region\'s gateway. Let the relay follow the token: drop the region from the wsServer URL (' + wsBase() + (info ? info.routes[0].path : '/signaling') + '), or mint tokens for ' + route.region + '.' });
      } else {
        addCheck({ id: 'token-region', name: 'Token region matches the gateway', status: 'pass', detail: where });
      }
    }
  } catch (e) {
    addCheck({ id: 'token-region', name: 'Token region matches the gateway', status: 'fail', detail: String(e.message || e) });
  }
  return t;
}

// ---- summary and report ----
// ---- media paths (only when asked: the token goes through the relay to the gateway) ----
// The gateway hands out ICE servers in answer to a hello asking for them; the relay points
// Twilio's TURN-over-TLS entry at itself. Each path is tried with a real RTCPeerConnection.
const TWILIO_TURNS = 'turns:global.turn.twilio.com:443?transport=tcp';

function iceServersFromGateway(token, path) {
  return withTimeout(new Promise((resolve, reject) => {
    const ws = new WebSocket(wsBase() + path);
    ws.onopen = () => ws.send(JSON.stringify({ id: 'diag', timeout: 5000, type: 'hello', version: 2,
      body: { edge: 'roaming', token, type: 'ice', version: 1 } }));
    ws.onmessage = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch (_) { return; }
      if (m.type === 'msg' && m.body && m.body.type === 'iced') {
        ws.close(1000, 'diag done');
        resolve(m.body.ice_servers || []);
      }
    };
    ws.onclose = (e) => reject(new Error('the gateway closed the socket: ' + e.code + ' ' + e.reason));
  }), 8000, 'the gateway\'s ICE servers');
}

function urlsOf(server) {
  return Array.isArray(server.urls) ? server.urls : [server.urls];
}

function hostOf(url) {
  const rest = url.slice(url.indexOf(':') + 1).split(/[?/]/)[0];
  return rest.replace(/:\d+$/, '');
}

// The candidates of `type` one offer gathers with these servers and policy.
async function gather(servers, policy, type) {
  const pc = new RTCPeerConnection({ iceServers: servers, iceTransportPolicy: policy });
  const found = [];
  pc.onicecandidate = (e) => { if (e.candidate && e.candidate.candidate) found.push(e.candidate); };
  pc.createDataChannel('diag');
  await pc.setLocalDescription(await pc.createOffer());
  await withTimeout(new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') resolve();
    pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === 'complete') resolve(); };
  }), 10000, 'gathering').catch(() => {});
  pc.close();
  return found.filter((c) => c.type === type);
}

async function mediaChecks(token, path) {
  const c = addCheck({ id: 'media', name: 'Media: ICE servers from the gateway', status: 'running' });
  let servers;
  try {
    servers = await iceServersFromGateway(token, path);
    c.status = 'pass';
    c.detail = servers.length + ' ICE servers: ' + servers.map((s) => urlsOf(s).join(' ')).join(', ');
  } catch (e) {
    c.status = 'fail';
    c.detail = String(e.message || e);
    c.fix = 'The media checks need the gateway\'s answer to a hello with this token; run the checks above first.';
    render();
    return;
  }
  render();
  const turn = (s) => urlsOf(s).some((u) => u.startsWith('turn'));
  const viaRelay = servers.filter((s) => turn(s) && urlsOf(s).some((u) => hostOf(u) === location.hostname));
  // The relay replaced Twilio's TURN-over-TLS entry: ask Twilio's own with the same credentials.
  const direct = viaRelay.map((s) => ({ urls: TWILIO_TURNS, username: s.username, credential: s.credential }))
    .concat(servers.filter((s) => turn(s) && !urlsOf(s).some((u) => hostOf(u) === location.hostname)));
  const stun = servers.filter((s) => urlsOf(s).some((u) => u.startsWith('stun:')));
  const paths = [
    ['media-udp', 'Media: UDP direct to Twilio (STUN)', stun, 'all', 'srflx',
      'This network blocks UDP to Twilio (10000–60000); calls then need TURN.'],
    ['media-turn-direct', 'Media: TURN direct to Twilio', direct, 'relay', 'relay',
      'This network blocks Twilio\'s TURN servers (UDP 3478, TLS 443); calls then need the relay\'s TURN.'],
    ['media-turn-relay', 'Media: TURN through this relay', viaRelay, 'relay', 'relay',
      'The relay\'s TURN did not give a relay candidate: your operator should check [turn] and run `sigrelay diagnose`.'],
  ];
  await Promise.all(paths.map(async ([id, name, list, policy, type, fix]) => {
    const p = addCheck({ id, name, status: 'running' });
    if (!list.length) {
      p.status = 'info';
      p.detail = 'The gateway offered no server for this path.';
      return render();
    }
    const started = performance.now();
    try {
      const found = await gather(list, policy, type);
      p.ms = performance.now() - started;
      p.status = found.length ? 'pass' : 'fail';
      p.detail = found.length ? found.length + ' ' + type + ' candidate(s) via ' + list.map((s) => urlsOf(s).join(' ')).join(', ')
        : 'no ' + type + ' candidate via ' + list.map((s) => urlsOf(s).join(' ')).join(', ');
      p.fix = fix;
    } catch (e) {
      p.status = 'fail';
      p.detail = String(e.message || e);
    }
    render();
  }));
}

function findings(t) {
  const out = [];
  const failed = (id) => checks.some((c) => c.id === id && c.status === 'fail');
  if (failed('browser')) out.push(['problem', 'Unsupported browser: it lacks what video calls need.']);
  if (failed('relay-http') || failed('relay-ws')) out.push(['problem', 'Blocked network: this browser cannot hold a WebSocket to the relay.']);
  if (failed('gateway') || failed('gateways')) out.push(['problem', 'Gateway down or unreachable: the relay cannot reach some of Twilio\'s gateways.']);
  if (t && t.unreadable) out.push(['problem', 'Unreadable token: what was pasted is not an access token.']);
  if (t && t.expired) out.push(['problem', 'Expired token: the token was no longer valid.']);
  if (t && t.notYet) out.push(['problem', 'Token not yet valid: the token server\'s clock is ahead.']);
  if (t && t.mismatch) out.push(['problem', 'Region mismatch: the token\'s region differs from the gateway it would be sent to.']);
  if (t && t.badPath) out.push(['problem', 'Wrong wsServer path: the relay has no route for the path the app uses.']);
  if (t && t.notRelay) out.push(['problem', 'Not using the relay: the app\'s wsServer points somewhere else.']);
  if (checks.some((c) => c.id === 'clock' && c.status === 'warn')) out.push(['note', 'This computer\'s clock is off.']);
  const passed = (id) => checks.some((c) => c.id === id && c.status === 'pass');
  if (checks.some((c) => c.id.startsWith('media-'))) {
    if (passed('media-udp') || passed('media-turn-direct')) {
      out.push(['note', 'Media can reach Twilio from this network' + (passed('media-turn-relay') ? ', and through the relay\'s TURN too.' : '.')]);
    } else if (passed('media-turn-relay')) {
      out.push(['note', 'Media reaches Twilio only through the relay\'s TURN: this network blocks UDP and Twilio\'s TURN servers.']);
    } else {
      out.push(['problem', 'No media path: neither UDP, nor Twilio\'s TURN, nor the relay\'s TURN works from this browser.']);
    }
  }
  const direct = checks.filter((c) => c.id === 'direct');
  if (direct.some((c) => c.status === 'fail')) {
    out.push(['note', 'Twilio is blocked from this network directly, so calls must go through this relay.']);
  }
  if (!out.some(([kind]) => kind === 'problem')) {
    out.unshift(['ok', 'No problem found: video signalling works from this browser through the relay.']);
  }
  return out;
}

function reportText(found) {
  const lines = [];
  lines.push('sigrelay diagnostics report');
  const skew = Math.round(skewMs / 100) / 10 || 0;
  lines.push('time:      ' + new Date().toISOString() + ' (browser clock; the relay\'s is ' + (skew >= 0 ? '+' : '') + skew.toFixed(1) + ' s from it)');
  lines.push('page:      ' + location.origin + location.pathname);
  lines.push('relay:     ' + (info ? 'sigrelay ' + info.version : 'unknown'));
  lines.push('browser:   ' + navigator.userAgent);
  lines.push('conn ids:  ' + (connIds.length ? connIds.join(' ') : '(none)') + '   (search the relay\'s records for these)');
  lines.push('');
  lines.push('findings:');
  for (const [kind, text] of found) lines.push('  ' + (kind === 'problem' ? '!! ' : kind === 'note' ? ' * ' : 'ok ') + text);
  lines.push('');
  lines.push('checks:');
  for (const c of checks) {
    lines.push('  [' + c.status.toUpperCase().padEnd(4) + '] ' + c.name + (c.ms != null ? ' (' + fmtMs(c.ms) + ')' : '') + (c.detail ? ': ' + c.detail : ''));
  }
  return lines.join('\n') + '\n';
}

async function runAll() {
  const button = $('#run');
  button.disabled = true;
  $('#state').textContent = 'Running…';
  checks = [];
  connIds = [];
  info = null;
  skewMs = 0;
  render();
  $('#findings').hidden = true;
  $('#report-section').hidden = true;
  checkBrowser();
  await loadInfo();
  await echoCheck();
  await Promise.all([gatewayChecks(), ...DIRECT_URLS.map(directCheck)]);
  const t = await tokenChecks();
  const token = $('#token').value.replace(/\s+/g, '');
  if ($('#media').checked && token && t && !t.unreadable) {
    const ws = wsServer();
    const path = ws && !ws.bad && ws.host === location.host ? ws.path : ((info && info.routes[0]) ? info.routes[0].path : '/signaling');
    await mediaChecks(token, path);
  }
  const found = findings(t);
  const list = $('#summary');
  list.replaceChildren(...found.map(([kind, text]) => el('li', kind, text)));
  $('#findings').hidden = false;
  const report = reportText(found);
  $('#report').value = report;
  $('#report-section').hidden = false;
  $('#state').textContent = 'Done.';
  button.disabled = false;
  // For automation (tests, support tooling): the structured result.
  window.sigrelayDiag = { done: true, checks, connIds, findings: found, report };
}

async function copyReport() {
  const text = $('#report').value;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    $('#report').select();
    document.execCommand('copy');
  }
  $('#copied').textContent = 'Copied.';
}

document.addEventListener('DOMContentLoaded', () => {
  $('#wsserver').placeholder = wsBase() + '/signaling';
  $('#run').addEventListener('click', runAll);
  $('#copy').addEventListener('click', copyReport);
  $('#footer').textContent = 'sigrelay diagnostics. The token stays in this page unless you tick the media check, which sends it through ' + location.host + ' to Twilio\'s signalling gateway for TURN credentials. Besides ' + location.host + ', the page only opens (and sends nothing on) WebSockets to ' + DIRECT_URLS.map((u) => new URL(u).host).join(' and ') + ', to see whether this network blocks them, and, for the media check, asks the TURN and STUN servers the gateway names.';
});
