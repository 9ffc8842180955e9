//! The demo page: opens WebSockets through the gateway and shows them working.

pub const HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>upgate demo</title>
<style>
 body{font:15px/1.4 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.4rem} section{border:1px solid #ccc;border-radius:6px;padding:1rem;margin:1rem 0}
 .st{font-weight:600} .ok{color:#17803d} .bad{color:#b42318}
 pre{background:#f6f6f6;padding:.5rem;height:9rem;overflow:auto;margin:.5rem 0 0}
 input{width:70%} button{margin-left:.5rem}
</style></head><body>
<h1>upgate demo</h1>
<p>This page was proxied by upgate from a demo backend (plain HTTP). The boxes below open WebSockets
through the same gateway and port: <code>/chat</code> goes to two echo backends (round robin),
<code>/ticker</code> is a fan-out route: every client of a pair shares one upstream connection to the price feed.</p>
<section><div>Chat echo: <span id="cs" class="st">connecting…</span></div>
<form id="f"><input id="m" value="hello through upgate" autocomplete="off"><button>send</button></form>
<pre id="cl"></pre></section>
<section><div>Ticker: <span id="ts" class="st">connecting…</span> <span id="tc">0</span> ticks</div>
<pre id="tl"></pre></section>
<section><div>Live session (<code>/live</code>, <code>mode: frames</code>, <code>resume: true</code>):
<span id="ls" class="st">connecting…</span>, served by <b id="lb">?</b>, moved <b id="lr">0</b> times</div>
<p>Restart the backend serving this session: it closes all its sessions with 1012 (as a server being
redeployed does) and refuses new ones for 2 s. This session moves to the other backend and stays open;
a chat session on the restarted backend above is closed (splice cannot move).</p>
<button id="rb">Restart its backend</button>
<pre id="ll"></pre></section>
<script>
const base = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
function open(path, st, log, onmsg) {
  const ws = new WebSocket(base + path);
  const s = document.getElementById(st), l = document.getElementById(log);
  ws.onopen = () => { s.textContent = 'open (' + base + path + ')'; s.className = 'st ok'; };
  ws.onclose = e => { s.textContent = 'closed ' + e.code; s.className = 'st bad'; };
  ws.onerror = () => { s.textContent = 'error'; s.className = 'st bad'; };
  ws.onmessage = e => { onmsg && onmsg(); l.textContent = e.data + '\n' + l.textContent.slice(0, 4000); };
  return ws;
}
const chat = open('/chat', 'cs', 'cl');
chat.addEventListener('open', () => chat.send('/whoami'));
document.getElementById('f').onsubmit = e => { e.preventDefault(); chat.send(document.getElementById('m').value); };
let n = 0;
open('/ticker?pair=EURUSD', 'ts', 'tl', () => { document.getElementById('tc').textContent = ++n; });
let moves = 0;
const live = open('/live', 'ls', 'll');
live.addEventListener('open', () => live.send('/whoami'));
live.addEventListener('message', e => {
  const m = /^backend=(\S+)/.exec(e.data);
  if (m) document.getElementById('lb').textContent = m[1];
  if (e.data === '{"resumed":true}') document.getElementById('lr').textContent = ++moves;
});
document.getElementById('rb').onclick = () => live.send('/restart');
</script></body></html>
"#;
