// The live page of cbtsim serve. No host logic here: every button sends one
// Request (JSON) to /api/action or /api/map and shows what the host answers.
'use strict';

const $ = (id) => document.getElementById(id);
const ui = {
  state: null,     // the last `state` event
  vm: null,        // the selected VM's name
  disk: 0,
  point: 'now',    // the map's snapshot, or 'now'
  queryAt: null,   // the snapshot a query asks about (the newest taken here by default)
  since: null,     // the change ID whose answer is marked on the map
  answer: null,    // the last QueryChangedDiskAreas answer
  map: null,       // the last map drawn (DiskMap)
  points: [],      // backup points of the repository
  chainKey: '',
  busy: false,
  again: false,
  maps: 0,         // maps drawn (tests wait on it)
  drawn: 0,        // when the last live redraw started (ms)
};
const LIVE_MS = 1500;
window.cbt = ui;

const url = (path) => location.origin + path;

function human(n) {
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  if (n < 1024) return n === 1 ? '1 byte' : `${n} bytes`;
  let v = n / 1024, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${Number.isInteger(v) ? v : v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

async function call(path, body) {
  const r = await fetch(url(path), body === undefined ? {} : {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await r.text();
  let v;
  try { v = JSON.parse(text); } catch { v = { kind: `http ${r.status}`, message: text }; }
  if (!r.ok) throw v;
  return v;
}

function summary(res) {
  const d = res.data;
  switch (res.result) {
    case 'snapshot-created': return `snapshot ${d.name}: change ID ${d.disks.map((x) => x.change_id).join(', ')}`;
    case 'changed-areas': return `${plural(d.areas.length, 'area')}, ${human(d.changed_bytes)}`;
    case 'backup': return `point ${d.point} (${d.kind}): read ${human(d.bytes_read)}, stored ${human(d.bytes_stored)}`;
    case 'backup-points': return `${d.length} points`;
    case 'guest-started': return `workload ${d.id} started`;
    case 'guest': return `workload ${d.id}: ${d.state}, ${d.ops} ops`;
    default: return res.result;
  }
}

// Sends one Request, logging it and its answer.
async function act(request) {
  const li = el('li', {}, JSON.stringify(request), el('span', { class: 'res' }, '…'));
  $('log').prepend(li);
  try {
    const res = await call('/api/action', request);
    li.classList.add('ok');
    li.querySelector('.res').textContent = '→ ' + summary(res);
    return res;
  } catch (e) {
    li.classList.add('err');
    li.querySelector('.res').textContent = `→ ${e.kind}: ${e.message}`;
    throw e;
  }
}

function selectedVm() {
  return ui.state && ui.state.vms.find((v) => v.name === ui.vm);
}

function cidOf(snapshot) {
  const d = snapshot.disks[ui.disk];
  return d ? d.change_id : null;
}

// ---- drawing the state --------------------------------------------------

// Sets a select's options (left alone when they are the same, so an open
// list stays open), keeping `keep` (or the current value) selected.
function fill(select, options, keep) {
  const old = keep ?? select.value;
  const key = JSON.stringify(options);
  if (select.dataset.key !== key) {
    select.dataset.key = key;
    select.replaceChildren(...options.map(([value, label]) => el('option', { value }, label)));
  }
  if (options.some(([v]) => v === old)) select.value = old;
}

function renderVms() {
  const list = $('vm-list');
  const key = JSON.stringify([ui.vm, ui.state.vms, ui.state.guests]);
  if (list.dataset.key === key) return;
  list.dataset.key = key;
  list.replaceChildren(...ui.state.vms.map((v) => {
    const running = ui.state.guests.filter((g) => g.vm === v.name && g.state === 'running');
    return el('li', {
      class: v.name === ui.vm ? 'selected' : '',
      'data-vm': v.name,
      onclick: () => selectVm(v.name),
    }, v.name, el('small', {}, `${v.disks.length} disk(s) · ${v.chain.length} snapshot(s) · power ${v.powered_on ? 'on' : 'off'} · CBT ${v.cbt ? 'on' : 'off'}${running.length ? ` · guest running (${running[0].ops} ops)` : ''}`));
  }));
}

function renderVm() {
  const v = selectedVm();
  if (!v) return;
  $('vm-title').textContent = `VM ${v.name}`;
  $('disks').replaceChildren(...v.disks.map((size, i) => el('button', {
    class: 'disk' + (i === ui.disk ? ' selected' : ''),
    onclick: () => { ui.disk = i; ui.since = null; renderVm(); drawMap(); },
  }, `disk ${i} · ${human(size)}`)));
  const snaps = v.chain.map((s) => s.name);
  fill($('point'), [['now', 'now (live)'], ...snaps.map((n) => [n, `snapshot ${n}`])], ui.point);
  if (!snaps.includes(ui.point)) ui.point = 'now';
  $('point').value = ui.point;
  fill($('query-at'), snaps.slice().reverse().map((n) => [n, n]), ui.queryAt);
  ui.queryAt = $('query-at').value;
  fill($('remove-which'), snaps.map((n) => [n, n]));
  const since = [['*', '* (everything allocated)']];
  for (const s of v.chain) if (cidOf(s)) since.push([cidOf(s), `${s.name} · ${cidOf(s)}`]);
  for (const p of ui.points) {
    const c = p.change_ids[ui.disk];
    if (p.vm === v.name && c && !since.some(([x]) => x === c)) since.push([c, `backup ${p.point} · ${c}`]);
  }
  fill($('since'), since);
  renderChain();
  const running = ui.state.guests.find((g) => g.vm === v.name && g.state === 'running');
  $('guest-status').textContent = running ? `workload ${running.id} (${running.profile}) running: ${running.ops} ops` : 'no workload running';
}

function epochColor(name) {
  const e = ui.map && ui.map.epochs.find((x) => x.from === name);
  return e ? e.color : null;
}

function renderChain() {
  const v = selectedVm();
  if (!v) return;
  const rows = [el('tr', {}, el('th', {}, 'snapshot'), el('th', {}, 'created (UTC)'), el('th', {}, `change ID of disk ${ui.disk}`), el('th', {}, 'epoch after it'))];
  for (const s of v.chain) {
    const color = epochColor(s.name);
    const e = ui.map && ui.map.epochs.find((x) => x.from === s.name);
    rows.push(el('tr', { 'data-snapshot': s.name },
      el('td', {}, s.name),
      el('td', {}, new Date(s.created * 1000).toISOString().replace('.000', '')),
      el('td', { class: 'cid' }, cidOf(s) || '(CBT off)'),
      el('td', {}, color ? el('span', { class: 'swatch', style: `background:${color}` }) : '', e ? `until ${e.to}: ${human(e.bytes)}` : '')));
  }
  $('chain').replaceChildren(...rows);
}

function renderPoints() {
  const rows = [el('tr', {}, el('th', {}, 'point'), el('th', {}, 'VM'), el('th', {}, 'kind'), el('th', {}, 'time (UTC)'), el('th', {}, 'read'), el('th', {}, 'stored'), el('th', {}, `change ID of disk ${ui.disk}`))];
  for (const p of ui.points) {
    const c = p.change_ids[ui.disk];
    rows.push(el('tr', { 'data-point': p.point },
      el('td', {}, p.point), el('td', {}, p.vm), el('td', {}, p.kind), el('td', {}, p.time_utc),
      el('td', { class: 'num' }, human(p.bytes_read)), el('td', { class: 'num' }, human(p.bytes_stored)),
      el('td', { class: 'cid' + (c ? ' pick' : ''), title: 'use as "since"', onclick: () => { if (c) { renderVm(); $('since').value = c; } } }, c || '')));
  }
  $('points').replaceChildren(...rows);
}

// ---- the map ------------------------------------------------------------

async function drawMap() {
  if (!ui.vm) return;
  if (ui.busy) { ui.again = true; return; }
  ui.busy = true;
  const request = { vm: ui.vm, disk: ui.disk, layout: $('layout').value };
  if (ui.point !== 'now') request.snapshot = ui.point;
  if (ui.since) request.since = ui.since;
  if ($('history').checked) request.history = Number($('history-n').value) || 8;
  try {
    const r = await call('/api/map', request);
    ui.map = r.map;
    $('map').innerHTML = r.svg;
    $('map').dataset.at = r.map.at;
    $('map-error').textContent = '';
    ui.maps++;
    renderChain();
  } catch (e) {
    $('map-error').textContent = `map: ${e.kind}: ${e.message}`;
  } finally {
    ui.busy = false;
    if (ui.again) { ui.again = false; setTimeout(drawMap, 200); }
  }
}

function selectVm(name) {
  ui.vm = name;
  ui.disk = 0;
  ui.point = 'now';
  ui.since = null;
  ui.answer = null;
  $('answer').textContent = '';
  renderVms();
  renderVm();
  drawMap();
}

// ---- live updates ---------------------------------------------------------

function onState(state) {
  if (state.kind) { $('map-error').textContent = `state: ${state.message}`; return; }
  ui.state = state;
  $('datastore').textContent = state.datastore;
  // The repository of `serve --repo`, unless one was typed.
  if (state.repository && !$('repo').value) {
    $('repo').value = state.repository;
    points().catch(() => {});
  }
  fill($('profile'), state.profiles.map((p) => [p, p]), $('profile').value || 'oltp-db');
  renderVms();
  const v = selectedVm();
  if (!v) return;
  renderVm();
  const key = JSON.stringify(v.chain) + v.disks.join(',');
  const running = state.guests.some((g) => g.vm === v.name && g.state === 'running');
  // While a guest writes, the map of now is redrawn at most every LIVE_MS
  // (each map of now takes and removes a snapshot).
  const live = running && ui.point === 'now' && Date.now() - ui.drawn >= LIVE_MS;
  if (key !== ui.chainKey || live) {
    ui.chainKey = key;
    ui.drawn = Date.now();
    drawMap();
  }
}

function connect() {
  const es = new EventSource(url('/api/events'));
  es.addEventListener('state', (ev) => onState(JSON.parse(ev.data)));
  es.onopen = () => { $('live').textContent = 'live'; $('live').className = 'live on'; };
  es.onerror = () => { $('live').textContent = 'reconnecting'; $('live').className = 'live off'; };
}

// ---- the VADP steps -------------------------------------------------------

function nextName() {
  const v = selectedVm();
  const taken = new Set(v.chain.map((s) => s.name));
  let n = v.chain.length + 1;
  while (taken.has(`backup-${n}`)) n++;
  return `backup-${n}`;
}

async function snapshot() {
  if (!selectedVm()) return;
  const name = $('snap-name').value.trim() || nextName();
  await act({ action: 'snapshot-create', vm: ui.vm, name });
  $('snap-name').value = '';
  // The new snapshot is the map's point and the query's. The state event
  // that lists it may come before or after the answer: take the state now.
  ui.point = name;
  ui.queryAt = name;
  onState(await call('/api/state'));
  drawMap();
}

async function query() {
  const at = $('query-at').value;
  const since = $('since').value;
  if (!ui.vm || !at) { $('answer').textContent = 'take a snapshot first: a query asks about a snapshot'; return; }
  const res = await act({ action: 'query', vm: ui.vm, snapshot: at, disk: ui.disk, since });
  const a = res.data;
  ui.answer = a;
  const share = (100 * a.changed_bytes / a.disk_size);
  const lines = a.areas.slice(0, 40).map((x) => `  [${String(x.start).padStart(14)} .. ${String(x.start + x.length).padStart(14)})  ${human(x.length)}`);
  if (a.areas.length > 40) lines.push(`  … ${a.areas.length - 40} more`);
  const box = $('answer');
  box.dataset.bytes = a.changed_bytes;
  box.dataset.areas = a.areas.length;
  box.dataset.since = a.since;
  box.textContent = `QueryChangedDiskAreas(${a.snapshot}, disk ${a.disk}, since ${a.since}): ${plural(a.areas.length, 'area')}, ${human(a.changed_bytes)} = ${share.toPrecision(3)}% of the disk (marked on the map)\n` + lines.join('\n');
  ui.point = at;
  ui.since = since;
  $('point').value = at;
  drawMap();
}

async function backup() {
  const repository = $('repo').value.trim();
  if (!repository) { $('answer').textContent = 'give the absolute path of a repository (created if missing)'; return; }
  localStorage.setItem('cbtsim-repo', repository);
  await act({ action: 'backup-run', vm: ui.vm, repository });
  await points();
}

async function points() {
  const repository = $('repo').value.trim();
  if (!repository) return;
  const res = await act({ action: 'backup-list', repository });
  ui.points = res.data;
  renderPoints();
  renderVm();
}

async function remove() {
  const name = $('remove-which').value;
  if (!name) return;
  await act({ action: 'snapshot-remove', vm: ui.vm, name });
  if (ui.point === name) { ui.point = 'now'; ui.since = null; drawMap(); }
}

async function guest() {
  await act({ action: 'guest-run', vm: ui.vm, profile: $('profile').value, disk: ui.disk, threads: 1, seed: Date.now() % 100000, detach: true });
  ui.point = 'now';
  ui.since = null;
}

async function guestStop() {
  const g = ui.state.guests.find((x) => x.vm === ui.vm && x.state === 'running');
  if (g) await act({ action: 'guest-stop', id: g.id });
}

const safely = (f) => () => { f().catch(() => {}); };
$('btn-snapshot').addEventListener('click', safely(snapshot));
$('btn-query').addEventListener('click', safely(query));
$('btn-backup').addEventListener('click', safely(backup));
$('btn-remove').addEventListener('click', safely(remove));
$('btn-guest').addEventListener('click', safely(guest));
$('btn-guest-stop').addEventListener('click', safely(guestStop));
$('btn-points').addEventListener('click', safely(points));
$('btn-clear').addEventListener('click', () => { ui.since = null; $('answer').textContent = ''; drawMap(); });
$('point').addEventListener('change', () => { ui.point = $('point').value; if (ui.point === 'now') ui.since = null; drawMap(); });
$('layout').addEventListener('change', drawMap);
$('query-at').addEventListener('change', () => { ui.queryAt = $('query-at').value; });
$('history').addEventListener('change', drawMap);
$('history-n').addEventListener('change', drawMap);
$('repo').value = new URLSearchParams(location.search).get('repo') || localStorage.getItem('cbtsim-repo') || '';
if ($('repo').value) points().catch(() => {});
connect();
