// DOM and fetch helpers. Everything from the store is model- or env-generated text: it only ever enters
// the page as text nodes (h() children, textContent), never as HTML.

export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(node.style, v);
    else if (k === "value") node.value = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(node, c);
    else node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export class ApiError extends Error {}

export async function api(path) {
  let response;
  try {
    response = await fetch(path, {cache: "no-store"});
  } catch (e) {
    throw new ApiError(`the viewer server cannot be reached (${e.message}); is \`cwm-rl view\` still running?`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(body && body.error ? body.error : `HTTP ${response.status} for ${path}`);
  return body;
}

export const rows = (page) => page.rows.map((r) => Object.fromEntries(page.columns.map((c, i) => [c, r[i]])));

export const fmt = (x, digits = 3) => {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  return Number(x.toPrecision(digits)).toString();
};
export const signed = (x, digits = 3) => (x === null || x === undefined ? "–" : (x > 0 ? "+" : "") + fmt(x, digits));
export const shortId = (id) => (id || "").slice(0, 10);
export const versions = (a, b) => (b < 0 ? "–" : a === b ? `v${a}` : `v${a}–${b}`);

export function ago(unixSeconds) {
  if (!unixSeconds) return "–";
  const s = Date.now() / 1000 - unixSeconds;
  if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(unixSeconds * 1000).toISOString().slice(0, 16).replace("T", " ");
}

export const statusChip = (status, reason) =>
  h("span", {class: `chip status-${status}`, title: reason ? `reason: ${reason}` : null},
    status.startsWith("dropped") && reason ? `dropped (${reason})` : status);

export const returnBadge = (r) => h("span", {class: `ret ${r > 0 ? "pos" : r < 0 ? "neg" : "zero"}`}, fmt(r, 4));

export function errorBox(message) {
  return h("div", {class: "error", role: "alert"}, h("strong", {}, "Cannot show this: "), message);
}

export const enc = encodeURIComponent;

// "#/r/RUN/t/ID?color=x": path parts are URI-encoded, empty parameters left out.
export function hashOf(parts, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") query.set(k, v);
  const q = query.toString();
  return "#/" + parts.map(enc).join("/") + (q ? `?${q}` : "");
}

export const link = (href, ...children) => h("a", {href}, ...children);

// The tooltip shared by token spans and chart points: lines of [label, value], set as text.
export function showTip(event, lines) {
  const tip = document.getElementById("tip");
  tip.replaceChildren(...lines.map(([k, v]) => h("div", {}, h("span", {class: "k"}, k), " ", h("span", {class: "v"}, v))));
  tip.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = event.clientY + 18 + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 10 : event.clientY + 18;
  tip.style.left = `${x}px`;
  tip.style.top = `${y}px`;
}
export const hideTip = () => { document.getElementById("tip").hidden = true; };
