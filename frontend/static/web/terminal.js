// The console page: ask the API for a single-use ticket (session cookie + CSRF token), open the
// relay's WebSocket and bind it to xterm.js. Binary frames carry terminal bytes both ways; text
// frames are the relay's status messages (ready, notice, closed). See docs/console.md.
(function () {
  "use strict";
  const box = document.getElementById("terminal");
  if (!box) return;
  const status = document.querySelector("[data-field=terminal-status]");
  const again = document.getElementById("terminal-reconnect");
  const csrf = JSON.parse(document.body.getAttribute("hx-headers") || "{}")["X-CSRFToken"];
  const term = new Terminal({ cursorBlink: true, convertEol: false, scrollback: 5000, fontSize: 14 });
  term.open(box);
  const encoder = new TextEncoder();
  let ws = null;

  function say(text, cls) {
    status.textContent = text;
    status.className = cls || "muted";
  }

  async function connect() {
    again.hidden = true;
    say("Asking for a console ticket…");
    const body = { mode: box.dataset.mode };
    let resp;
    try {
      resp = await fetch(box.dataset.api, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
        body: JSON.stringify(body),
      });
    } catch (e) {
      say("The portal did not answer: " + e, "error");
      again.hidden = false;
      return;
    }
    const data = await resp.json().catch(() => ({}));
    if (resp.status !== 201) {
      say(data.message || data.detail || "Refused (" + resp.status + ")", "error");
      again.hidden = false;
      return;
    }
    ws = new WebSocket(data.ws_url);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => {
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      const msg = JSON.parse(ev.data);
      if (msg.type === "ready") {
        say(msg.mode === "view" ? "Connected (view only)." : "Connected.");
        ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
        term.focus();
      } else if (msg.type === "notice") {
        say(msg.message, "warning");
      }
    };
    ws.onclose = (ev) => {
      say("Closed: " + (ev.reason || "connection lost") + " (code " + ev.code + ")", "error");
      again.hidden = false;
    };
  }

  term.onData((d) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
  });
  term.onResize((size) => {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "resize", cols: size.cols, rows: size.rows }));
    }
  });
  again.addEventListener("click", connect);
  connect();
})();
